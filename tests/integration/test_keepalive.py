"""Keepalives between real daemons (issue 11, "cheap keepalives"): a master and three clients.

Touches on several clients at once, of their own agents and of one agent they all report:
the master ends with the newest mtime of each and records the node that sent it, does not
read the touched files again (its internal daemon's hash count), and never dates content it
cannot prove (a file changed by hand on the master is repaired, not stamped).
Every wait polls a condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import os
import sqlite3
import time

import pytest

from harness import (base_install, make_node, python, start_all, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)
from test_internal import call
from test_sync import KEYS, agent_info, configure_cluster, put

WAIT = 30.0
CLIENTS = ("client1", "client2", "client3")
INFO = "queue/agent-info/"


@pytest.fixture
def cluster(make_node):
    """A started master and three started clients, each with an agent-info of its own."""
    nodes = configure_cluster(make_node, ("master",) + CLIENTS, "3s")
    put(nodes[0], "etc/client.keys", KEYS)
    base = int(time.time()) - 1000
    for node in nodes[1:]:
        put(node, INFO + own(node), agent_info(node.name), mtime=base)
    start_all(nodes)
    master = nodes[0]
    wait_for(lambda: all(mtime(master, INFO + own(n)) == base for n in nodes[1:]), WAIT,
             what="every client's agent-info on the master")
    return nodes, base


def own(node):
    return "own-%s-any" % node.name


def mtime(node, rel):
    try:
        return int(os.stat(node.path(*rel.split("/"))).st_mtime)
    except OSError:
        return None


def content(node, rel):
    with open(node.path(*rel.split("/"))) as handle:
        return handle.read()


def touch(node, rel, when):
    os.utime(node.path(*rel.split("/")), (when, when))


def reporting_node(master, agent):
    conn = sqlite3.connect(master.path("var", "db", "cluster.db"), timeout=10)
    try:
        row = conn.execute("SELECT node FROM agents WHERE name = ?", (agent,)).fetchone()
        return row[0] if row else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def settled(master):
    """The master's internal daemon status once no file is left to hash again (racy)."""
    status = {}

    def quiet():
        status.update(call(master, "status"))
        return status["racy"] == 0
    wait_for(quiet, WAIT, what="no racy file left on the master")
    return status


def test_keepalives_of_several_clients_arrive_newest_and_are_not_hashed_again(cluster):
    nodes, base = cluster
    master, clients = nodes[0], nodes[1:]
    before = settled(master)["hashed"]
    touches = 0
    for step in range(1, 6):
        for index, node in enumerate(clients):
            touch(node, INFO + own(node), base + 10 * step + index)
            touches += 1
        wait_for(lambda: all(mtime(master, INFO + own(n)) == base + 10 * step + i
                             for i, n in enumerate(clients)), WAIT,
                 what="step %d's keepalives on the master" % step)
    names = [INFO + own(n) for n in clients]
    # The master's record follows the files (told by wazuh-clusterd, or found by its own
    # pass, which hashes them).
    wait_for(lambda: all(call(master, "manifest", {"names": names})["files"][name]["mtime_ns"]
                         // 10 ** 9 == base + 50 + i for i, name in enumerate(names)), WAIT,
             what="the master's record of the touched files")
    after = call(master, "status")["hashed"]
    assert after - before < touches, (before, after, touches)
    for node in clients:
        assert reporting_node(master, own(node)) == node.name


# slow: another three-client cluster. The default run keeps the several clients' keepalives
# above and the unit tests of one agent reported by two peers (test_keepalive).
@pytest.mark.slow
def test_one_agent_reported_by_every_client_keeps_the_newest_keepalive_and_its_node(cluster):
    nodes, base = cluster
    master, clients = nodes[0], nodes[1:]
    shared = INFO + "roaming-any"
    for index, node in enumerate(clients):
        put(node, shared, agent_info(node.name), mtime=base + index)
    wait_for(lambda: mtime(master, shared) == base + 2, WAIT, what="client3's first report")
    # Three rounds of touches at once on every client; the newest goes to another client at
    # each, the last to client1 (the first started, not the last touched).
    newest = {1: clients[2], 2: clients[1], 3: clients[0]}
    for step in (1, 2, 3):
        for node in clients:
            touch(node, shared, base + 10 * step + (5 if node is newest[step] else clients.index(
                node)))
    final = base + 35
    wait_for(lambda: mtime(master, shared) == final and
             '"node_name":client1' in content(master, shared) and
             reporting_node(master, "roaming-any") == "client1", WAIT,
             what="client1's newest keepalive, content and node on the master")
    assert reporting_node(master, "roaming-any") == "client1"


def test_a_keepalive_for_content_changed_on_the_master_is_not_applied_blindly(cluster):
    nodes, base = cluster
    master, client1 = nodes[0], nodes[1]
    name = INFO + own(client1)
    settled(master)
    original = content(master, name)
    forged = original.replace("client1", "clientX")  # same size: only the ctime tells
    assert len(forged) == len(original) and forged != original
    path = master.path(*name.split("/"))
    with open(path, "r+") as handle:
        handle.write(forged)
    os.utime(path, (base, base))
    touch(client1, name, base + 100)
    # Stamped blindly, the master would hold the forged text dated by client1's keepalive,
    # and record it as client1's content: no round would ever repair it.
    wait_for(lambda: mtime(master, name) == base + 100 and content(master, name) == original,
             WAIT, what="client1's content and keepalive back on the master")
