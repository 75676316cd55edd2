"""An ex-leader following a new leader (cluster.failover=1, SPEC section 10) with real
daemons: what it pushed while it acted is the cluster's state, not a local edit (no backup,
no warning when the new leader replaces it); an edit made there afterwards still is one."""
from __future__ import absolute_import, division, print_function

import os
import re

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from test_failover import FAILOVER, acting, kill_node, read, start_failover_cluster, wait
from test_failover import same_tree
from test_sync import put

CONF = "etc/shared/default/agent.conf"


def backups(node):
    root = node.path("backup", "cluster")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_an_ex_leader_backs_up_only_what_was_edited_after_it_stopped_acting(make_node):
    # no failback: the returning master stays a follower of the new leader
    nodes = start_failover_cluster(make_node, dict(FAILOVER, **{"cluster.failback": "0"}))
    master, client1, client2 = nodes
    acting(nodes, master)
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    # the test made the master's group folder as root; an installation's is Wazuh's, and
    # the clients' was made by their daemons: the master must receive into it as a follower
    like = os.stat(client1.path("etc", "shared", "default"))
    os.chown(master.path("etc", "shared", "default"), like.st_uid, like.st_gid)
    os.chmod(master.path("etc", "shared", "default"), like.st_mode & 0o7777)
    led = u"<agent_config><led/></agent_config>\n"
    before = len(master.log())
    put(master, CONF, led)   # its operator's edit while it acts: pushed to both clients

    def sent_to_both():  # logged once the peer's answer is handled
        return all(re.search(r"Pushed to %s: [1-9]|Full round with %s: [^\n]*; [1-9]\d* sent"
                             % (n, n), master.log()[before:]) for n in ("client1", "client2"))
    wait(nodes, lambda: same_tree(nodes) and sent_to_both(), "the edit pushed to both")
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
