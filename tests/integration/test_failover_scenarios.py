"""Failover scenarios run many times (slow): skipped unless WAZUH_CLUSTER_TESTS_FULL=1.

Each trial kills the acting master with -9, waits for another node to act, makes a client.keys
change on it, waits until the other live node holds it (the failover time of issue 14), then
restarts the killed node and waits until it holds the same files. Bounded waits throughout;
the times are printed (p50 and max).
"""
from __future__ import absolute_import, division, print_function

import os
import re
import time

import pytest

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from test_failover import (FAILOVER, acting, kill_node, logged, same_tree,
                           start_failover_cluster, wait)
from test_sync import KEYS, put

if os.environ.get("WAZUH_CLUSTER_TESTS_FULL") != "1":
    pytest.skip("slow failover scenarios: set WAZUH_CLUSTER_TESTS_FULL=1",
                allow_module_level=True)

TRIALS = int(os.environ.get("WAZUH_CLUSTER_FAILOVER_TRIALS", "5"))


def acting_node(nodes, live):
    """The live node whose log says last that it acts (the newest term wins)."""
    best = None
    for node in live:
        found = [int(t) for t in re.findall(r"acting master in term (\d+)", node.log())]
        if found and (best is None or max(found) > best[0]):
            best = (max(found), node)
    return best[1] if best else None


def test_leader_killed_again_and_again(make_node):
    nodes = start_failover_cluster(make_node)
    acting(nodes, nodes[0])
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    times = []
    for trial in range(TRIALS):
        leader = acting_node(nodes, nodes)
        live = [n for n in nodes if n is not leader]
        terms = dict((n.name, n.log().count("acting master in term")) for n in live)
        kill_node(leader)
        started = time.time()
        wait(nodes, lambda: any(n.log().count("acting master in term") > terms[n.name]
                                for n in live), "trial %d: a new acting master" % trial)
        new = [n for n in live if n.log().count("acting master in term") > terms[n.name]][0]
        put(new, "etc/client.keys", KEYS + u"%03d trial%d any %d\n" % (100 + trial, trial,
                                                                       trial))
        wait(nodes, lambda: same_tree(live, ("etc/client.keys",)),
             "trial %d: the change on every live node" % trial)
        times.append(time.time() - started)
        leader.start()
        wait(nodes, lambda: same_tree(nodes, ("etc/client.keys",)),
             "trial %d: the restarted node caught up" % trial)
        assert not logged(leader, r"Traceback")
    times.sort()
    print("failover time over %d trials: p50 %.2f s, max %.2f s (failover_timeout %s s)"
          % (len(times), times[len(times) // 2], times[-1], FAILOVER["cluster.failover_timeout"]))
