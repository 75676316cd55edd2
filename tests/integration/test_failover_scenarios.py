"""Failover scenarios run many times (slow): skipped unless WAZUH_CLUSTER_TESTS_FULL=1.

Each trial kills the acting master with -9, waits for another node to act, makes a client.keys
change on it, waits until the other live node holds it (the failover time of issue 14), then
restarts the killed node and waits until it holds the same files. Bounded waits throughout;
the times are printed (p50 and max). Also: a 2/3 split of five nodes in network namespaces
with the old master in the minority, each node restarted in turn (its term kept), all under the
log recorder's checks (failover_log.py). `tests/run --full` sets WAZUH_CLUSTER_TESTS_FULL=1.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import re
import time

import pytest

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from failover_log import Recorder, check
from test_failover import (FAILOVER, acting, kill_node, logged, same_tree,
                           start_failover_cluster, wait)
from test_failover_partition import (assert_edit_backed_up_not_spread, heal_and_converge,
                                     isolate_the_leader, partitioned_cluster, read, same)
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


def test_five_nodes_split_two_three_with_the_old_master_in_the_minority(make_node):
    names = ("master", "client1", "client2", "client3", "client4")
    with partitioned_cluster(make_node, names) as (network, nodes, recorder):
        master, client1 = nodes[0], nodes[1]
        leader, majority = isolate_the_leader(network, nodes, recorder, [1, 2], edit_at_cut=True)
        put(leader, "etc/client.keys", KEYS + u"004 split01 any 4444\n")
        wait(nodes, lambda: same(majority), "the new leader's change on the majority side")
        # the minority (2 of 5) elects nobody and receives nothing
        assert not recorder.of("elected", client1), recorder.dump()
        assert "split01" not in read(master, "etc/client.keys") + read(client1, "etc/client.keys")
        heal_and_converge(network, nodes, recorder, [1, 2])
        assert "split01" in read(master, "etc/client.keys")
        assert_edit_backed_up_not_spread(master, nodes)
        check(recorder)


def stored_term(node):
    with open(node.path("var", "db", "cluster-election.json")) as handle:
        return json.load(handle)["term"]


def acting_now(recorder, nodes):
    """The node whose last recorded "acting" has no stop or end after it, else None."""
    last = {}
    for event in recorder.events:
        if event.kind in ("acting", "stopped", "killed"):
            last[event.node] = event.kind
    found = [n for n in nodes if last.get(n.name) == "acting"]
    return found[0] if len(found) == 1 else None


def test_each_node_restarted_in_turn_keeps_its_term(make_node):
    """ossec-control restart of every node in turn (failback off, so that the leader only
    changes when it is the one restarted): the stored term never goes back, a new change
    reaches every node after each restart."""
    nodes = start_failover_cluster(make_node, dict(FAILOVER, **{"cluster.failback": "0"}))
    with Recorder(nodes) as recorder:
        acting(nodes, nodes[0])
        wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
        for trial, node in enumerate(nodes):
            before = stored_term(node)
            starts = node.log().count("Failover on: term")
            assert node.stop().rc == 0
            recorder.mark(node, "killed")   # a stopped daemon acts no more
            assert stored_term(node) >= before
            node.start()
            wait(nodes, lambda: node.log().count("Failover on: term") > starts,
                 "%s started again" % node.name)
            started = int(re.findall(r"Failover on: term (\d+)", node.log())[-1])
            assert started >= before, "%s restarted in term %d, had %d" % (node.name, started,
                                                                            before)
            leader = wait(nodes, lambda: acting_now(recorder, nodes), "an acting master")
            wait(nodes, lambda: same_tree(nodes, ("etc/client.keys",)), "identical before")
            line = KEYS + u"%03d restart%d any %d\n" % (200 + trial, trial, trial)
            put(leader, "etc/client.keys", line)
            wait(nodes, lambda: all(read(n, "etc/client.keys") == line for n in nodes),
                 "restart %d: the change of %s on every node" % (trial, leader.name))
        assert not any(logged(n, r"Traceback") for n in nodes)
        check(recorder)
