"""What a master holds to SEND is bounded by its memory budget too (issue 11 item 4).

A master with a small cluster.max_inflight_bytes first-syncs a shared tree larger than that
budget to four clients started at once. Every client must end with the whole tree, and the
master's peak RSS (VmHWM) must stay under its RSS before the clients came plus budget.bound()
(what the budget lets it hold, urgent reserve included, and the versions of big files kept for
deltas: these 2 MiB files are) plus SLACK_KB for what no budget counts (threads, manifests,
the interpreter's own growth). Each session used to read, join, frame and compress
its own batches, two in flight and one being read, with nothing counting them: four clients
took such a master from 20 to 99 MB (bound 65 MB; 3.13), and ten clients of the scale
benchmark to 179-237 MB. Sending under the budget: 39 MB.
"""
from __future__ import absolute_import, division, print_function

import os

import pytest

from flooders import RssSampler, memory_of
from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)
from test_crash import converge
from test_sync import FAST, KEYS, put
from wazuh_cluster import budget, config, versions

CLIENTS = 4
BUDGET = 16 << 20                    # the smallest cluster.max_inflight_bytes
FILES = 20
FILE_BYTES = 2 << 20                 # incompressible: the compressed stream is as large
SLACK_KB = 24 * 1024
SYNC_WAIT = 300.0


def _write_tree(master):
    folder = master.path("etc", "shared", "default")
    if not os.path.isdir(folder):
        os.makedirs(folder)
    for n in range(FILES):
        with open(os.path.join(folder, "big%02d.bin" % n), "wb") as handle:
            handle.write(os.urandom(FILE_BYTES))


# slow: 80 MB to four clients. The default run keeps the send budget's unit tests
# (test_budget, test_peersync) and the syncs of every other integration test.
@pytest.mark.slow
def test_a_master_first_syncing_a_tree_larger_than_its_budget_to_four_clients_stays_bounded(
        make_node):
    master = make_node("master", "master", configure=False)
    clients = [make_node("client%d" % k, "client", configure=False) for k in range(CLIENTS)]
    listed = [master.address] + [c.address for c in clients]
    for node in [master] + clients:
        node.port = master.port
        node.configure("master" if node is master else "client", listed, interval="5m")
        # keepalive 10 s, not FAST's 1 s: a send that makes no progress for 3 keepalives is cut
        # off, and a loaded machine can keep a reader writing 2 MB files that long
        options = dict(FAST, **{"cluster.keepalive": "10"})
        if node is master:
            options["cluster.max_inflight_bytes"] = str(BUDGET)
        write_internal_options(node.prefix, options)
    put(master, "etc/client.keys", KEYS)
    _write_tree(master)
    master.start()
    pid = master.running_pid()
    wait_for(lambda: master.internal_pid(), 20, what="the master's internal daemon")
    before = memory_of(pid)
    sampler = RssSampler(pid).start()
    try:
        for client in clients:
            client.start()
        converge([master] + clients, timeout=SYNC_WAIT)
    finally:
        sampled = sampler.stop()
    peak = memory_of(pid).get("VmHWM", 0)
    store = config.read_options([], []).delta_store_bytes   # the default
    bound = before.get("VmRSS", 0) + budget.bound(BUDGET, versions.most(store)) // 1024 + SLACK_KB
    print("master wazuh-clusterd: VmRSS %d kB before the clients, peak VmRSS %d kB sampled, "
          "VmHWM %d kB; bound %d kB" % (before.get("VmRSS", 0), sampled, peak, bound))
    assert master.running_pid() == pid, master.explain("the master died")
    assert peak < bound, master.explain("master peaked at %d kB (bound %d kB)" % (peak, bound))
