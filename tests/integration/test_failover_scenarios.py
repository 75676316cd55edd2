"""Failover scenarios run many times (slow): skipped unless WAZUH_CLUSTER_TESTS_FULL=1.

Each trial kills the acting master with -9, waits for another node to act, makes a client.keys
change on it, waits until the other live node holds it (the failover time of issue 14), then
restarts the killed node and waits until it holds the same files. Bounded waits throughout;
the times are printed (p50 and max). Also: a 2/3 split of five nodes in network namespaces
with the old master in the minority, each node restarted in turn (its term kept), the leader's
link flapping, simultaneous candidates in five nodes, the wall clock of one node jumping by
hours (libfaketime), all under the log recorder's checks (failover_log.py). `tests/run --full`
sets WAZUH_CLUSTER_TESTS_FULL=1.
"""
from __future__ import absolute_import, division, print_function

import glob
import json
import os
import random
import re
import time

import pytest

from harness import (BARE_ENV, base_install, make_node, python, run,  # noqa: F401
                     tmp_prefix_dir, workspace, write_internal_options)
from failover_log import Recorder, check
from test_failover import (FAILOVER, acting, kill_node, logged, same_tree,
                           start_failover_cluster, wait)
from test_failover_partition import (assert_edit_backed_up_not_spread, heal_and_converge,
                                     isolate_the_leader, partitioned_cluster, read, same)
from test_sync import KEYS, configure_cluster, put

if os.environ.get("WAZUH_CLUSTER_TESTS_FULL") != "1":
    pytest.skip("slow failover scenarios: set WAZUH_CLUSTER_TESTS_FULL=1",
                allow_module_level=True)

TRIALS = int(os.environ.get("WAZUH_CLUSTER_FAILOVER_TRIALS", "5"))
T = float(FAILOVER["cluster.failover_timeout"])
FAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))  # apt package faketime


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
    with Recorder(nodes) as recorder:
        for trial in range(TRIALS):
            leader = acting_node(nodes, nodes)
            live = [n for n in nodes if n is not leader]
            terms = dict((n.name, n.log().count("acting master in term")) for n in live)
            kill_node(leader)
            recorder.mark(leader, "killed")
            started = time.time()
            wait(nodes, lambda: any(n.log().count("acting master in term") > terms[n.name]
                                    for n in live), "trial %d: a new acting master" % trial)
            new = [n for n in live if n.log().count("acting master in term") > terms[n.name]][0]
            recorder.change(new, "etc/client.keys", KEYS + u"%03d trial%d any %d\n" % (
                100 + trial, trial, trial))
            wait(nodes, lambda: same_tree(live, ("etc/client.keys",)),
                 "trial %d: the change on every live node" % trial)
            times.append(time.time() - started)
            leader.start()
            wait(nodes, lambda: same_tree(nodes, ("etc/client.keys",)),
                 "trial %d: the restarted node caught up" % trial)
            assert not logged(leader, r"Traceback")
        check(recorder)
    times.sort()
    print("failover time over %d trials: p50 %.2f s, max %.2f s (failover_timeout %s s)"
          % (len(times), times[len(times) // 2], times[-1], FAILOVER["cluster.failover_timeout"]))


def test_five_nodes_split_two_three_with_the_old_master_in_the_minority(make_node):
    names = ("master", "client1", "client2", "client3", "client4")
    with partitioned_cluster(make_node, names) as (network, nodes, recorder):
        master, client1 = nodes[0], nodes[1]
        leader, majority = isolate_the_leader(network, nodes, recorder, [1, 2], edit_at_cut=True)
        recorder.change(leader, "etc/client.keys", KEYS + u"004 split01 any 4444\n")
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
            pids = node.all_pids()
            assert node.stop().rc == 0
            # ossec-control stop signals and returns, as Wazuh's does: the old daemon may
            # still hold its port (a start at once failed with "Address already in use")
            node.wait_stopped(pids)
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
            change_everywhere(recorder, nodes, leader,
                              u"%03d restart%d any %d\n" % (200 + trial, trial, trial),
                              "restart %d" % trial)
        assert not any(logged(n, r"Traceback") for n in nodes)
        check(recorder)


def seeded(name):
    """A random source for the timing of one test, its seed printed (rerun it with
    WAZUH_CLUSTER_FAILOVER_SEED)."""
    seed = int(os.environ.get("WAZUH_CLUSTER_FAILOVER_SEED") or random.randrange(10 ** 6))
    print("%s: seed %d" % (name, seed))
    return random.Random(seed)


def change_everywhere(recorder, nodes, leader, line, what):
    """A client.keys line added on the acting `leader` (recorded) reaches every node of
    `nodes`."""
    data = KEYS + line
    recorder.change(leader, "etc/client.keys", data)
    wait(nodes, lambda: all(read(n, "etc/client.keys") == data for n in nodes),
         "%s: the change of %s on every node" % (what, leader.name))
    # Seen spread before the test's next step: a stop right after this wait, read in the
    # same poll as the spread, ended the change unspread, and the next change's removal of
    # its lines counted as a loss (test_each_node_restarted_in_turn_keeps_its_term, 2.7).
    recorder.poll()


def test_the_leaders_link_flapping(make_node):
    """The acting master's cable cut and restored again and again, down and up for random
    bounded times around failover_timeout (shorter than a lease, long enough for an election,
    anything between): one leader per term, never two acting at once, and after the last heal
    one acting master whose change reaches every node."""
    rng = seeded("flapping")
    with partitioned_cluster(make_node, ("master", "client1", "client2")) as (
            network, nodes, recorder):
        for flap in range(8):
            leader = acting_now(recorder, nodes) or nodes[0]
            host = nodes.index(leader) + 1
            network.link(host, up=False)
            time.sleep(rng.uniform(0.1, 2.5 * T))
            network.link(host, up=True)
            time.sleep(rng.uniform(0.1, 1.5 * T))
        # Failback (on here) hands the role back to the preferred master once it caught up,
        # maybe just after the last heal: an edit made on the acting node in that moment,
        # before its catalog saw it, is then backed up there and spread nowhere (not a
        # leader's change for the checker). The change is made once the preferred master
        # acts again, for good.
        leader = wait(nodes, lambda: acting_now(recorder, nodes) is nodes[0] and nodes[0],
                      "the preferred master acting again at last")
        change_everywhere(recorder, nodes, leader, u"005 flap01 any 5555\n", "after the last heal")
        assert not any(logged(n, r"Traceback") for n in nodes)
        check(recorder)


def test_simultaneous_candidates_in_five_nodes(make_node):
    """The preferred master of five nodes killed, with the node of the first candidacy slot
    in one trial (three candidates then stand a slot apart, tens of milliseconds here) and
    without it in the other: one leader per term, and soon one acting master that every live
    node follows. Split votes may happen; they must only cost another round."""
    names = ("master", "client1", "client2", "client3", "client4")
    for trial, also_killed in enumerate((0, 1)):
        nodes = configure_cluster(make_node, tuple("t%d%s" % (trial, n) for n in names), "3s")
        for node in nodes:
            write_internal_options(node.prefix, dict(FAILOVER, **{"cluster.failback": "0"}))
        put(nodes[0], "etc/client.keys", KEYS)
        with Recorder(nodes) as recorder:
            for node in nodes:
                node.start()
            acting(nodes, nodes[0])
            wait(nodes, lambda: same_tree(nodes), "every node identical to the master")
            # the first slot belongs to the lowest listed address after the master's
            first = min(nodes[1:], key=lambda n: n.address)
            dead = [nodes[0]] + ([first] if also_killed else [])
            for node in dead:
                kill_node(node)
                recorder.mark(node, "killed")
            live = [n for n in nodes if n not in dead]
            leader = wait(nodes, lambda: acting_now(recorder, live), "one acting master")
            change_everywhere(recorder, live, leader, u"007 simul%d any 7777\n" % trial,
                              "trial %d" % trial)
            assert not any(logged(n, r"Traceback") for n in live)
            intervals = check(recorder)
        rounds = sum(n.log().count("election round for term") for n in live)
        print("trial %d: leader %s, %d acting intervals, %d failed rounds logged" % (
            trial, leader.name, len(intervals), rounds))
        for node in live:
            node.stop()


# time.sleep of Python 3.11+ under libfaketime 0.9.10 (faketime_sleep/sitecustomize.py says why)
SLEEP_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faketime_sleep")


def faketime_env(stamp, shim=False):
    """The environment of a node whose wall clock follows the offset in file `stamp`
    (libfaketime); its monotonic and boot-time clocks stay true (DONT_FAKE_MONOTONIC).
    `shim`: time.sleep with a relative timeout, as before Python 3.11."""
    env = dict(BARE_ENV, LD_PRELOAD=FAKETIME[0], FAKETIME_TIMESTAMP_FILE=stamp,
               FAKETIME_CACHE_DURATION="1", DONT_FAKE_MONOTONIC="1")
    if shim:
        env["PYTHONPATH"] = SLEEP_SHIM
    return env


def faketime_usable(interpreter, stamp):
    """(environment of a node under libfaketime, None), or (None, why it cannot run)."""
    if not FAKETIME:
        return None, "libfaketime.so.1 not installed (apt package faketime; .ci/run installs it)"
    probe = "import threading, time; time.sleep(0.01); threading.Event().wait(0.01)"
    for shim in (False, True):
        env = faketime_env(stamp, shim)
        result = run([interpreter, "-c", probe], env=env)
        if result.rc == 0:
            return env, None
    return None, ("libfaketime with DONT_FAKE_MONOTONIC breaks this interpreter's sleeps, "
                  "even with time.sleep on select() (%s)" % result.err.strip().splitlines()[-1:])


def set_offset(stamp, offset):
    with open(stamp, "w") as handle:
        handle.write(offset + "\n")
    os.chmod(stamp, 0o644)


@pytest.mark.parametrize("jumped", ["leader", "follower"])
def test_the_wall_clock_of_one_node_jumps_by_hours(make_node, python, jumped):
    """One node runs under libfaketime; its wall clock jumps 3 hours ahead while the cluster
    runs, then 5 hours back (the election reads only the boot-time clock): the leader keeps
    its lease, nobody else is elected, changes still reach every node, and a later failover
    works with the jumped node among the candidates."""
    nodes = configure_cluster(make_node, ("master", "client1", "client2"), "3s")
    node = nodes[0] if jumped == "leader" else nodes[1]
    stamp = node.path("faketime")
    set_offset(stamp, "+0")
    env, reason = faketime_usable(python, stamp)
    if reason:
        pytest.skip(reason)
    for each in nodes:
        write_internal_options(each.prefix, dict(FAILOVER, **{"cluster.failback": "0"}))
    put(nodes[0], "etc/client.keys", KEYS)
    with Recorder(nodes) as recorder:
        for each in nodes:
            if each is node:
                result = each.control("start", env=env)
                assert result.rc == 0, each.explain("start under libfaketime failed", result)
                each.wait_running()
            else:
                each.start()
        acting(nodes, nodes[0])
        wait(nodes, lambda: same_tree(nodes), "every node identical to the master")
        elections = len(recorder.of("elected"))
        for step, offset in enumerate(("+3h", "-2h")):
            set_offset(stamp, offset)
            time.sleep(2 * T)   # several leases long: a lease read off the wall would end
            change_everywhere(recorder, nodes, nodes[0], u"%03d jump%d any 8888\n" % (8 + step, step),
                              "wall clock at %s on %s" % (offset, node.name))
        assert len(recorder.of("elected")) == elections, recorder.dump()
        assert not recorder.of("stopped"), recorder.dump()
        kill_node(nodes[0])
        recorder.mark(nodes[0], "killed")
        live = nodes[1:]
        leader = wait(nodes, lambda: acting_now(recorder, live), "a new acting master")
        change_everywhere(recorder, live, leader, u"010 after any 1010\n", "after the failover")
        assert not any(logged(n, r"Traceback") for n in live)
        check(recorder)
