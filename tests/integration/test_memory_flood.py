"""wazuh-clusterd's memory under flooding insiders stays bounded, and real clients keep syncing.

Flooders (see flooders.py) hold the cluster key and pipeline zip bombs, large compressed
requests and bursts of small ones at a real master, as fast as they can, from listed addresses.
Meanwhile a change on the master must reach the real client daemon, and the client's agent-info
must reach the master. The master's peak RSS (VmHWM from /proc) must stay under PEAK_LIMIT_KB;
it is printed either way, and must also stay under the bound of issue 11: its RSS before the
flood plus budget.bound() of its options (what its budget may grant, urgent answers included;
nothing here goes through the store of versions) plus SLACK_KB for what no budget counts
(threads and their stacks, the interpreter's own growth, allocator pages). The flooders take every session's share
and answer the master's own calls with zip bombs (urgent grants): the budget's worst case.
The memory bound is the assertion; the durations only bound the test.
"""
from __future__ import absolute_import, division, print_function

import collections
import os
import re
import time

import pytest

from flooders import Flooder, RssSampler, bodies, memory_of
from wazuh_cluster import budget, config
from harness import (base_install, make_node, new_address, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from test_crash import converge
from test_sync import FAST, KEYS, agent_info, put

# More or fewer by hand: WAZUH_CLUSTER_FLOODERS=8 tests/run -k test_memory_flood -s
FLOODERS = int(os.environ.get("WAZUH_CLUSTER_FLOODERS", "6"))
PEAK_LIMIT_KB = 150 * 1024
SLACK_KB = 8 * 1024
SYNC_WAIT = 30.0
FLOOD_SECONDS = 10.0     # at least this long, however fast the legitimate syncs go
# Stop early when the master is clearly unbounded (the code before the process budget went
# past a gigabyte): the figure is what matters then, not the machine's memory.
RUNAWAY_KB = 1536 * 1024


def _flooding(master, client, flood_addresses, flooders, rounds):
    """Start the flooders, run legitimate syncs both ways (at least `rounds`, and for at least
    FLOOD_SECONDS), stop them; `flooders` gets them."""
    bodies()  # built before the clock starts
    flooders.extend(Flooder("flood%02d" % i, address, master.address, master.port, master.key)
                    for i, address in enumerate(flood_addresses))
    for f in flooders:
        f.start()
    try:
        wait_for(lambda: sum(f.sent for f in flooders) >= 50 * len(flooders), 30, 0.05,
                 what="the flooders to get going")
        pid = master.running_pid()
        began = time.time()
        n = 0
        while n < rounds or time.time() - began < FLOOD_SECONDS:
            name = "etc/shared/default/flood-%d.txt" % n
            put(master, name, u"change %d during the flood\n" % n)
            wait_for(lambda: os.path.isfile(client.path(*name.split("/"))) or
                     memory_of(pid).get("VmHWM", 0) > RUNAWAY_KB, SYNC_WAIT, 0.1,
                     what="%s on the client during the flood" % name)
            agent = "queue/agent-info/flood%d-10.0.0.%d" % (n, n + 1)
            put(client, agent, agent_info(client.name))
            wait_for(lambda: os.path.isfile(master.path(*agent.split("/"))) or
                     memory_of(pid).get("VmHWM", 0) > RUNAWAY_KB, SYNC_WAIT, 0.1,
                     what="%s on the master during the flood" % agent)
            n += 1
    finally:
        for f in flooders:
            f.stopped.set()
        for f in flooders:
            f.stop()


# slow: ten seconds of flooding at least. The default run keeps the budget's session tests
# (unit test_channel, test_budget) and the hostile insiders of test_hostile*.
@pytest.mark.slow
def test_flooding_insiders_keep_the_master_under_its_memory_bound_and_clients_syncing(
        make_node):
    master = make_node("master", "master", configure=False)
    client = make_node("client", "client", configure=False)
    client.port = master.port
    flood_addresses = [new_address() for _ in range(FLOODERS)]
    listed = [master.address, client.address] + flood_addresses
    for node in (master, client):
        node.configure(node.name, listed, interval="3s")
        write_internal_options(node.prefix, FAST)
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    master.start()
    client.start()
    converge([master, client])
    pid = master.running_pid()
    before = memory_of(pid)
    sampler = RssSampler(pid).start()
    flooders = []
    try:
        _flooding(master, client, flood_addresses, flooders, rounds=3)
    finally:
        peak_rss = sampler.stop()
        after = memory_of(pid)
        sent = sum(f.sent for f in flooders)
        print("master wazuh-clusterd: VmRSS %d kB before the flood, peak VmRSS %d kB sampled, "
              "VmHWM %d kB; %d flooders sent %d requests in %d sessions"
              % (before.get("VmRSS", 0), peak_rss, after.get("VmHWM", 0), len(flooders), sent,
                 sum(f.sessions for f in flooders)))
    reasons = collections.Counter(re.sub(r"[0-9]+", "N", m) for m in re.findall(
        r"closed: (?:protocol error: )?([^\n]*)", master.log()))
    print("why flooder sessions ended: %s" % dict(reasons))
    assert master.running_pid() == pid, master.explain("the master died under the flood")
    assert after.get("VmHWM", 0) < PEAK_LIMIT_KB, master.explain(
        "master peaked at %d kB (limit %d kB)" % (after.get("VmHWM", 0), PEAK_LIMIT_KB))
    options = config.read_options([], [])   # the defaults: the test sets none of these
    # nothing the master sends here is big enough for its store of versions: no term for it
    most = budget.bound(options.max_inflight_bytes, 0)
    bound = before.get("VmRSS", 0) + most // 1024 + SLACK_KB
    print("bound: %d kB before + %d kB (budget.bound of the defaults) + %d kB slack = %d kB"
          % (before.get("VmRSS", 0), most // 1024, SLACK_KB, bound))
    assert after.get("VmHWM", 0) < bound, master.explain(
        "master peaked at %d kB (bound %d kB)" % (after.get("VmHWM", 0), bound))
    # the refusals close a flooder's session often: it comes back and goes on
    assert sent >= 20 * len(flooders), "the flooders barely sent anything"
