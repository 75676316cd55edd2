"""Master failover among real daemons (cluster.failover=1, SPEC section 10): three nodes on
loopback, short timeouts. Every wait polls with a bound; a failing test prints the logs.

The slow, many-trial scenarios are in test_failover_scenarios.py (skipped by default).
"""
from __future__ import absolute_import, division, print_function

import io
import json
import os
import re
import signal
import time

import pytest

from failover_log import Recorder, check
from harness import (base_install, kill, make_node, python, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)
from test_sync import FAST, KEYS, MASTER_ITEMS, configure_cluster, put, tree

FAILOVER = dict(FAST, **{"cluster.failover": "1", "cluster.keepalive": "0.5",
                         "cluster.failover_timeout": "2"})
WAIT = 30.0   # bounded: elections take a few failover timeouts at most, sync a few seconds


def start_failover_cluster(make_node, options=FAILOVER):
    nodes = configure_cluster(make_node, ("master", "client1", "client2"), "3s")
    for node in nodes:
        write_internal_options(node.prefix, options)
    put(nodes[0], "etc/client.keys", KEYS)
    put(nodes[0], "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    for node in nodes:
        node.start()
    return nodes


def wait(nodes, predicate, what):
    """wait_for, and on time out the election's lines of every node (the logs' tails that
    make_node prints are mostly synchronisation)."""
    try:
        return wait_for(predicate, WAIT, 0.1, what=what)
    except AssertionError as err:
        raise AssertionError("%s\n%s" % (err, "\n".join(failover_lines(n) for n in nodes)))


def logged(node, pattern):
    return re.search(pattern, node.log())


def acting(nodes, node):
    """Wait for the log line of `node` saying it acts as master."""
    return wait(nodes, lambda: logged(node, r"acting master in term \d+"),
                "%s acting as master" % node.name)


def kill_node(node):
    """kill -9 both daemons of `node` (a crash: nothing written, nothing said to the peers)."""
    pids = node.all_pids()
    for pid in pids:
        kill(pid, signal.SIGKILL)
    node.wait_stopped(pids)


def failover_lines(node):
    """The lines of a node's cluster.log about the election and its sessions (for failures)."""
    lines = [line for line in node.log().splitlines()
             if "DEBUG" not in line or "ailover" in line or "lect" in line]
    return "---- %s\n%s" % (node.name, "\n".join(lines[-80:]))


def same_tree(nodes, parts=MASTER_ITEMS):
    first = tree(nodes[0].prefix, parts)
    return all(tree(n.prefix, parts) == first for n in nodes[1:])


@pytest.fixture
def failover_cluster(make_node):
    nodes = start_failover_cluster(make_node)
    acting(nodes, nodes[0])
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    return nodes


def test_the_preferred_master_is_elected_and_every_node_keeps_a_session_to_every_other(
        failover_cluster):
    master, client1, client2 = failover_cluster
    assert os.path.exists(master.path("var", "db", "cluster-election.json"))
    for node in (client1, client2):
        wait(failover_cluster, lambda: logged(node, r"Failover: master \(\S+\) leads term \d+"),
             "%s following the master" % node.name)
    # the full mesh: the two clients have a session with each other, too
    wait(failover_cluster, lambda: logged(client2, r"node client1 connected from"),
         "a session between the clients")
    assert "acting master" not in client1.log() + client2.log()


def test_leader_killed_another_node_acts_and_its_client_keys_reach_the_third(
        failover_cluster):
    master, client1, client2 = failover_cluster
    with Recorder(failover_cluster) as recorder:
        kill_node(master)
        recorder.mark(master, "killed")
        wait(failover_cluster, lambda: "acting master in term" in client1.log() + client2.log(),
             "a client elected acting master")
        leader, other = (client1, client2) if "acting master in term" in client1.log() \
            else (client2, client1)
        recorder.change(leader, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
        wait(failover_cluster, lambda: same_tree([leader, other], ("etc/client.keys",)),
             "the new acting master's client.keys on the other client")

        def cluster_view():   # cluster-wide views come from the acting master now
            result = other.cluster_control("-n")
            return result.rc == 0 and leader.name in result.out and "master" in result.out
        wait(failover_cluster, cluster_view,
             "cluster_control -n answered through %s" % leader.name)
        check(recorder)


def test_the_leader_stopped_cleanly_hands_over_at_once(make_node):
    """ossec-control stop of the acting master: before its sessions close it hands the role
    to the node holding its newest state, which acts at once; a kill -9 would make the others
    wait failover_timeout (20 s here) for their promises to run out."""
    options = dict(FAILOVER, **{"cluster.keepalive": "1", "cluster.failover_timeout": "20",
                                "cluster.failback": "0"})
    nodes = start_failover_cluster(make_node, options)
    master, client1, client2 = nodes
    acting(nodes, master)
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    # a node that does not hold all of the master's state is not handed the role
    wait(nodes, lambda: len(set(str(last_version(n)) for n in nodes)) == 1,
         "the clients reporting the master's version")
    stopped = time.time()
    assert master.stop().rc == 0
    wait(nodes, lambda: "acting master in term" in client1.log() + client2.log(),
         "a client acting as master")
    took = time.time() - stopped
    assert took < 10, "a new acting master %.1f s after a clean stop" % took
    assert logged(master, r"handing the master role over to client\d .* before stopping")
    leader, other = (client1, client2) if "acting master in term" in client1.log() \
        else (client2, client1)
    put(leader, "etc/client.keys", KEYS + u"006 planned01 any 6666\n")
    wait(nodes, lambda: same_tree([leader, other], ("etc/client.keys",)),
         "the new acting master's client.keys on the other client")


def last_version(node):
    """[term, seq] of the master-owned state `node` holds (cluster_control -j -i)."""
    result = node.cluster_control("-j", "-i")
    return json.loads(result.out)["failover"]["last"] if result.rc == 0 else None


def test_the_preferred_master_restarted_catches_up_then_takes_the_role_back(failover_cluster):
    master, client1, client2 = failover_cluster
    with Recorder(failover_cluster) as recorder:
        kill_node(master)
        recorder.mark(master, "killed")
        wait(failover_cluster, lambda: "acting master in term" in client1.log() + client2.log(),
             "a client elected acting master")
        leader = client1 if "acting master in term" in client1.log() else client2
        recorder.change(leader, "etc/client.keys", KEYS + u"005 during01 any 5555\n")
        wait(failover_cluster, lambda: same_tree([client1, client2]), "the clients converged")
        before = master.log()
        master.start()
        # it follows first and receives what changed meanwhile, then leads again (failback)
        wait(failover_cluster, lambda: re.search(r"acting master in term \d+",
                                                 master.log()[len(before):]),
             "the preferred master acting again")
        assert "005 during01" in read(master, "etc/client.keys")
        wait(failover_cluster, lambda: "handing the master role back to master" in leader.log(),
             "the acting master handing over")
        recorder.change(master, "etc/shared/default/agent.conf",
                        u"<agent_config><back/></agent_config>\n")
        wait(failover_cluster, lambda: same_tree(failover_cluster), "every node like the master")
        check(recorder)


def test_a_node_back_after_a_while_gets_its_sessions_at_once_and_a_failover_needs_them(
        make_node):
    """The lower name dials (one session per pair: client1 < client2 < master); its backoff
    grew while the peer was
    down (up to reconnect_max): when the peer is back and dials in vain, the lower names must
    dial at once, not at the end of their backoff; else a failover needing that session waits
    up to reconnect_max (was: up to 16 s here, more than failover_timeout + 5 s)."""
    nodes = start_failover_cluster(make_node, dict(FAILOVER, **{"cluster.reconnect_max": "30"}))
    master, client1, client2 = nodes
    acting(nodes, master)
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    wait(nodes, lambda: logged(client2, r"node client1 connected from"), "client1-client2")
    kill_node(client2)
    time.sleep(12)   # down long enough for the dialers' backoff to grow to 8-16 s
    before = len(client2.log())
    client2.start()
    back = time.time()
    for peer in (master, client1):   # client1 dials client2 (the lower name dials)
        wait(nodes, lambda: re.search(r"node %s connected from|connected to node %s at"
                                      % (peer.name, peer.name), client2.log()[before:]),
             "a session between %s and client2 again" % peer.name)
        assert time.time() - back < 4, "%s: a session %.1f s after client2 was back" % (
            peer.name, time.time() - back)
    wait(nodes, lambda: same_tree(nodes), "client2 caught up")
    kill_node(master)
    started = time.time()
    wait(nodes, lambda: "acting master in term" in client1.log() + client2.log()[before:],
         "a new acting master")
    assert time.time() - started <= float(FAILOVER["cluster.failover_timeout"]) + 5


def test_failover_off_changes_nothing(make_node):
    """cluster.failover=0 (the default): no election record, no session between clients,
    no failover line in any log."""
    nodes = configure_cluster(make_node, ("master", "client1", "client2"), "3s")
    master, client1, client2 = nodes
    put(master, "etc/client.keys", KEYS)
    for node in nodes:
        node.start()
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    client1.wait_log(r"connected to master master at", WAIT)
    client2.wait_log(r"connected to master master at", WAIT)
    for node in nodes:
        assert not os.path.exists(node.path("var", "db", "cluster-election.json"))
        assert "ailover" not in node.log()
    assert "client2" not in client1.log() and "client1" not in client2.log()


def test_a_node_with_failover_off_is_refused_by_the_others(make_node):
    nodes = configure_cluster(make_node, ("master", "client1", "client2"), "3s")
    master, client1, client2 = nodes
    for node in (master, client1):
        write_internal_options(node.prefix, FAILOVER)
    for node in nodes:
        node.start()
    wait(nodes, lambda: logged(master, r"node client2 has cluster.failover=0 and this node "
                                       r"has cluster.failover=1"), "the mixed cluster refused")
    wait(nodes, lambda: logged(client2, r"refused us: node client2 has cluster.failover=0"),
         "client2 told why")


def read(node, rel):
    with io.open(node.path(*rel.split("/")), encoding="utf-8") as handle:
        return handle.read()
