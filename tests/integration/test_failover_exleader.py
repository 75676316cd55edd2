"""An ex-leader following a new leader (cluster.failover=1, SPEC section 10) with real
daemons: what it pushed while it acted is the cluster's state, not a local edit (no backup,
no warning when the new leader replaces it); an edit made there afterwards still is one. The
agent-info it received from the others as master is not sent as its own."""
from __future__ import absolute_import, division, print_function

import json
import os
import re

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from test_failover import FAILOVER, acting, kill_node, read, start_failover_cluster, wait
from test_failover import same_tree
from test_sync import put

CONF = "etc/shared/default/agent.conf"


def no_failback(make_node):
    """A cluster whose returning master stays a follower of the new leader."""
    nodes = start_failover_cluster(make_node, dict(FAILOVER, **{"cluster.failback": "0"}))
    acting(nodes, nodes[0])
    wait(nodes, lambda: same_tree(nodes), "clients identical to the master")
    return nodes


def new_leader(nodes):
    master, client1, client2 = nodes
    kill_node(master)
    wait(nodes, lambda: "acting master in term" in client1.log() + client2.log(),
         "a client elected acting master")
    return client1 if "acting master in term" in client1.log() else client2


def backups(node):
    root = node.path("backup", "cluster")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_an_ex_leader_backs_up_only_what_was_edited_after_it_stopped_acting(make_node):
    nodes = no_failback(make_node)
    master, client1, client2 = nodes
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
    leader = new_leader(nodes)
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


def reporter(node, agent):
    """The node `node` shows for `agent` (cluster_control -a: the node that sent its agent-info
    when the file names none), False when it cannot tell."""
    result = node.cluster_control("-a", "-j")
    if result.rc != 0:
        return False
    found = [a["node_name"] for a in json.loads(result.out)["agents"] if a["name"] == agent]
    return found[0] if found else False


def test_a_returning_old_master_does_not_report_the_agents_of_the_others(make_node):
    nodes = no_failback(make_node)
    master, client1, client2 = nodes
    # an agent of client2 (no node_name line: the listings show the node that sent the file)
    put(client2, "queue/agent-info/web01-any", u"Linux web01 3.10.0 x86_64\n")
    wait(nodes, lambda: reporter(master, "web01") == "client2", "web01 reported by client2")
    # client2 goes, and comes back without that agent (it left, or the node was reinstalled);
    # the master goes too: client1 and client2 elect a leader, which never hears of web01
    kill_node(client2)
    kill_node(master)
    os.remove(client2.path("queue", "agent-info", "web01-any"))
    client2.start()
    wait(nodes, lambda: "acting master in term" in client1.log() + client2.log(),
         "a client elected acting master")
    leader = client1 if "acting master in term" in client1.log() else client2
    before = len(master.log())
    master.start()   # it holds web01's agent-info, received from client2 as master
    wait(nodes, lambda: len(re.findall(r"Full round with %s: " % leader.name,
                                       master.log()[before:])) >= 2,
         "two rounds of the old master with the leader")
    shown = reporter(leader, "web01")
    assert shown not in ("master", False), "web01 shown as reported by %r\n%s" % (
        shown, master.dump_logs())
