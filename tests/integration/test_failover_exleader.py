"""An ex-leader following a new leader (cluster.failover=1, SPEC section 10) with real
daemons: what it pushed while it acted is the cluster's state, not a local edit (no backup,
no warning when the new leader replaces it); an edit made there afterwards still is one."""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import json
import os

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from test_failover import FAILOVER, acting, kill_node, read, start_failover_cluster, wait
from test_failover import same_tree
from test_sync import put

CONF = "etc/shared/default/agent.conf"


def backups(node):
    root = node.path("backup", "cluster")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def received(node):
    """The ex-leader's record of the cluster's state (localedits.py), {} while unreadable."""
    try:
        with io.open(node.path("var", "db", "cluster-received.json"), "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (IOError, OSError, ValueError):
        return {}


def test_an_ex_leader_backs_up_only_what_was_edited_after_it_stopped_acting(make_node):
    # no failback: the returning master stays a follower of the new leader
    nodes = start_failover_cluster(make_node, dict(FAILOVER, **{"cluster.failback": "0"}))
    master, client1, client2 = nodes
    acting(nodes, master)
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    led = u"<agent_config><led/></agent_config>\n"
    put(master, CONF, led)   # its operator's edit while it acts: pushed to both clients
    wait(nodes, lambda: same_tree(nodes) and received(master).get(CONF) ==
         hashlib.sha256(led.encode("utf-8")).hexdigest(), "the edit pushed and recorded")
    kill_node(master)
    wait(nodes, lambda: "acting master in term" in client1.log() + client2.log(),
         "a client elected acting master")
    leader = client1 if "acting master in term" in client1.log() else client2
    newer = u"<agent_config><newer/></agent_config>\n"
    put(leader, CONF, newer)
    wait(nodes, lambda: same_tree([client1, client2]), "the clients converged")
    master.start()
    wait(nodes, lambda: read(master, CONF) == newer, "the new leader's file on the ex-leader")
    assert backups(master) == [], master.dump_logs()
    assert "local edit" not in master.log()
    mine = u"<agent_config><edited-on-the-ex-leader/></agent_config>\n"
    put(master, CONF, mine)   # a genuine local edit: the leader's round puts its file back
    wait(nodes, lambda: read(master, CONF) == newer, "the leader's file back")
    folders = backups(master)
    assert len(folders) == 1, folders
    assert read(master, "backup/cluster/%s/%s" % (folders[0], CONF)) == mine
    assert "local edit of '%s'" % CONF in master.log()
