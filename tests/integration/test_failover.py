"""Master failover among real daemons (cluster.failover=1, SPEC section 10): three nodes on
loopback, short timeouts. Every wait polls with a bound; a failing test prints the logs.

The slow, many-trial scenarios are in test_failover_scenarios.py (skipped by default).
"""
from __future__ import absolute_import, division, print_function

import os
import signal

import pytest

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


def acting(node, term_pattern=r"\d+"):
    """The log line of `node` saying it acts as master (a term pattern may be given)."""
    return node.wait_log(r"acting master in term %s" % term_pattern, WAIT)


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
    try:
        acting(nodes[0])
        wait_for(lambda: same_tree(nodes), WAIT, 0.1, what="clients identical to the master")
    except AssertionError as err:  # a fixture's failure shows no logs otherwise
        raise AssertionError("%s\n%s" % (err, "\n".join(failover_lines(n) for n in nodes)))
    return nodes


def test_the_preferred_master_is_elected_and_every_node_keeps_a_session_to_every_other(
        failover_cluster):
    master, client1, client2 = failover_cluster
    assert os.path.exists(master.path("var", "db", "cluster-election.json"))
    for node in (client1, client2):
        node.wait_log(r"Failover: master leads term 1", WAIT)
    # the full mesh: the two clients have a session with each other, too
    client1.wait_log(r"node client2 connected from", WAIT)
    assert "acting master" not in client1.log() + client2.log()


def test_leader_killed_another_node_acts_and_its_client_keys_reach_the_third(
        failover_cluster):
    master, client1, client2 = failover_cluster
    kill_node(master)
    wait_for(lambda: "acting master in term" in client1.log() + client2.log(), WAIT, 0.1,
             what="a client elected acting master")
    leader, other = (client1, client2) if "acting master in term" in client1.log() \
        else (client2, client1)
    put(leader, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
    wait_for(lambda: same_tree([leader, other], ("etc/client.keys",)), WAIT, 0.1,
             what="the new acting master's client.keys on the other client")
