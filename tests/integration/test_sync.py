"""Synchronisation between real daemons: a master and two clients on loopback addresses.

Every wait polls a condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import os
import shutil
import time

import pytest

from harness import (base_install, make_node, python, start_all, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)

FAST = {"cluster.poll_interval": "0.2", "cluster.scan_interval": "1", "cluster.push_delay": "0.05",
        "cluster.keepalive": "1", "cluster.reconnect_max": "1",
        "cluster.log_level": "1"}
KEYS = u"001 web01 any 1111\n002 db01 10.0.0.5 2222\n003 mail01 10.0.0.0/24 3333\n"
SYNC_WAIT = 20.0
MASTER_ITEMS = ("etc/client.keys", "etc/shared", "queue/agent-groups")


def tree(prefix, parts=MASTER_ITEMS):
    """{relative name: sha256} of the regular files under the given items (excluded names out)."""
    found = {}
    for part in parts:
        path = os.path.join(prefix, *part.split("/"))
        if os.path.isfile(path):
            found[part] = _sha(path)
            continue
        for folder, _dirs, files in os.walk(path):
            for name in files:
                if name in ("merged.mg", "ar.conf", "ossec.conf") or name.startswith("."):
                    continue
                full = os.path.join(folder, name)
                found[os.path.relpath(full, prefix).replace(os.sep, "/")] = _sha(full)
    return found


def _sha(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def put(node, rel, text, mtime=None):
    path = node.path(*rel.split("/"))
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def agent_info(node_name, uname="Linux web01 3.10.0 #1 SMP x86_64 - Wazuh v3.0.0"):
    return u"%s\n7976a83d1aebcca09bc14459b5518ed5 merged.mg\n\n#\"manager_hostname\":%s\n" \
           u"#\"node_name\":%s\n" % (uname, node_name, node_name)


@pytest.fixture
def cluster(make_node):
    """A started master and two started clients, already converged."""
    names = ("master", "client1", "client2")
    nodes = [make_node(name, "master" if name == "master" else "client", configure=False)
             for name in names]
    addresses = [n.address for n in nodes]
    port = nodes[0].port
    for node in nodes:
        node.port = port  # one cluster port on every node's own address
        node.configure("master" if node.name == "master" else "client", addresses,
                       interval="3s")
        write_internal_options(node.prefix, FAST)
    master = nodes[0]
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    put(master, "etc/shared/web/agent.conf", u"<agent_config><x/></agent_config>\n")
    put(master, "etc/shared/web/merged.mg", u"built by each manager\n")
    put(master, "queue/agent-groups/001", u"web")
    start_all(nodes)
    converge(nodes)
    return nodes


def stop(node):
    """ossec-control stop does not wait (Wazuh's convention): wait for the processes to go."""
    pids = node.all_pids()
    node.stop()
    node.wait_stopped(pids, timeout=10)


def configure_cluster(make_node, names, interval, options=None):
    """Nodes `names` (the first the master) on one port, configured, not started; each gets
    FAST plus its entry of `options` {node name: {option: value}}."""
    nodes = [make_node(name, "master" if i == 0 else "client", configure=False)
             for i, name in enumerate(names)]
    for i, node in enumerate(nodes):
        node.port = nodes[0].port
        node.configure("master" if i == 0 else "client", [n.address for n in nodes],
                       interval=interval)
        write_internal_options(node.prefix, dict(FAST, **(options or {}).get(node.name, {})))
    return nodes


def converge(nodes, timeout=SYNC_WAIT, parts=MASTER_ITEMS):
    master = nodes[0]
    wait_for(lambda: all(tree(n.prefix, parts) == tree(master.prefix, parts) for n in nodes[1:]),
             timeout, 0.1, what="clients identical to the master (%s)" % (parts,))


def test_first_sync_copies_master_files_but_not_excluded_ones(cluster):
    master, client1, client2 = cluster
    assert "etc/shared/web/agent.conf" in tree(client1.prefix)
    assert not os.path.exists(client1.path("etc", "shared", "web", "merged.mg"))
    with open(client2.path("queue", "agent-groups", "001")) as handle:
        assert handle.read() == "web"


def test_changes_creates_renames_and_deletes_propagate(cluster):
    master = cluster[0]
    put(master, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
    put(master, "etc/shared/web/new.txt", u"new file\n")
    converge(cluster)
    tmp = put(master, "etc/shared/web/.tmp-edit", u"renamed over\n")
    os.rename(tmp, master.path("etc", "shared", "web", "new.txt"))
    converge(cluster)
    os.unlink(master.path("etc", "shared", "web", "new.txt"))
    converge(cluster)
    assert not os.path.exists(cluster[1].path("etc", "shared", "web", "new.txt"))


def test_mtime_and_mode_follow_the_master(cluster):
    master, client1 = cluster[0], cluster[1]
    put(master, "etc/shared/default/rootcheck.txt", u"x\n", mtime=1500000000)
    converge(cluster)
    st = os.stat(client1.path("etc", "shared", "default", "rootcheck.txt"))
    assert int(st.st_mtime) == 1500000000
    assert st.st_mode & 0o777 == 0o660


def test_group_folder_removed_on_master_is_removed_on_clients(cluster):
    master = cluster[0]
    shutil.rmtree(master.path("etc", "shared", "web"))
    converge(cluster)
    wait_for(lambda: not os.path.exists(cluster[1].path("etc", "shared", "web")), SYNC_WAIT,
             what="group folder web removed on client1")


def test_in_place_edits_reach_the_peers_through_the_full_pass(cluster):
    # Same size, and the folder untouched: only a full pass sees these, within
    # cluster.scan_interval, also right after the file's previous change (racy records).
    master, client1 = cluster[0], cluster[1]
    path = master.path("etc", "shared", "web", "agent.conf")
    size = os.path.getsize(path)
    with io.open(path, "r+b") as handle:
        handle.write(b"<AGENT_CONFIG>")
    assert os.path.getsize(path) == size
    converge(cluster)
    with io.open(client1.path("etc", "shared", "web", "agent.conf"), "rb") as handle:
        assert handle.read().startswith(b"<AGENT_CONFIG>")
    put(client1, "queue/agent-info/web01-any", agent_info("client1"))
    target = master.path("queue", "agent-info", "web01-any")
    wait_for(lambda: os.path.exists(target), SYNC_WAIT, what="agent-info on the master")
    info = client1.path("queue", "agent-info", "web01-any")
    with io.open(info, "r+b") as handle:
        handle.write(b"Windows")  # a keepalive rewriting the file in place

    def arrived():
        with io.open(target, "rb") as handle:
            return handle.read().startswith(b"Windows")
    wait_for(arrived, SYNC_WAIT, what="the in-place agent-info edit on the master")


def test_hand_edited_and_deleted_files_on_a_client_are_repaired(cluster):
    client1 = cluster[1]
    put(client1, "etc/shared/default/agent.conf", u"edited by hand\n")
    os.unlink(client1.path("queue", "agent-groups", "001"))
    put(client1, "etc/shared/default/stray.conf", u"not on the master\n")
    converge(cluster)
    assert not os.path.exists(client1.path("etc", "shared", "default", "stray.conf"))


def test_agent_info_reaches_the_master_with_the_clients_mtime_and_touches(cluster):
    master, client1 = cluster[0], cluster[1]
    now = int(time.time())
    put(client1, "queue/agent-info/web01-any", agent_info("client1"), mtime=now - 100)
    target = master.path("queue", "agent-info", "web01-any")
    wait_for(lambda: os.path.exists(target) and int(os.stat(target).st_mtime) == now - 100,
             SYNC_WAIT, what="agent-info on the master with the client's mtime")
    os.utime(client1.path("queue", "agent-info", "web01-any"), (now, now))  # a keepalive
    wait_for(lambda: int(os.stat(target).st_mtime) == now, SYNC_WAIT,
             what="the keepalive touch on the master")


def test_newest_keepalive_wins_when_two_clients_report_one_agent(cluster):
    master, client1, client2 = cluster
    now = int(time.time())
    put(client2, "queue/agent-info/db01-10.0.0.5", agent_info("client2"), mtime=now - 10)
    target = master.path("queue", "agent-info", "db01-10.0.0.5")
    wait_for(lambda: os.path.exists(target) and int(os.stat(target).st_mtime) == now - 10,
             SYNC_WAIT, what="client2's report")
    put(client1, "queue/agent-info/db01-10.0.0.5", agent_info("client1"), mtime=now - 500)
    # client1's older report must not replace client2's newer one; wait until client1 has
    # the master's answer for it (recorded in client1's database) before checking.
    wait_for(lambda: _states(client1, "queue/agent-info/db01-10.0.0.5").get("master"),
             SYNC_WAIT, what="the master's answer to client1's report")
    assert int(os.stat(target).st_mtime) == now - 10
    with open(target) as handle:
        assert '"node_name":client2' in handle.read()


def _states(node, name):
    import sqlite3
    conn = sqlite3.connect(node.path("var", "db", "cluster.db"), timeout=10)
    try:
        return dict(conn.execute("SELECT node, state FROM states WHERE file = ?", (name,)))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def test_agent_removed_from_client_keys_is_backed_up_and_cleaned_on_clients(cluster):
    master, client1 = cluster[0], cluster[1]
    put(client1, "queue/agent-info/db01-10.0.0.5", agent_info("client1"))
    put(client1, "queue/rids/002", u"1:2\n")
    wait_for(lambda: os.path.exists(master.path("queue", "agent-info", "db01-10.0.0.5")),
             SYNC_WAIT, what="agent-info on the master")
    put(master, "etc/client.keys", KEYS.replace(u"002 db01", u"002 !db01"))
    converge(cluster, parts=("etc/client.keys",))
    wait_for(lambda: not os.path.exists(client1.path("queue", "agent-info", "db01-10.0.0.5")),
             SYNC_WAIT, what="db01's agent-info removed on client1")
    assert not os.path.exists(client1.path("queue", "rids", "002"))
    backups = []
    for folder, _dirs, files in os.walk(client1.path("backup", "agents")):
        backups.extend(os.path.join(folder, f) for f in files)
    assert set(os.path.basename(b) for b in backups) == set(["agent-info", "rids"]), backups
    assert all(os.path.basename(os.path.dirname(b)) == "002-db01-10.0.0.5" for b in backups)


def test_emptied_client_keys_is_held_back_on_clients(cluster):
    master, client1 = cluster[0], cluster[1]
    put(client1, "queue/agent-info/web01-any", agent_info("client1"))
    put(master, "etc/client.keys", u"")
    wait_for(lambda: "held back" in client1.log(), SYNC_WAIT, what="the guard's warning")
    with open(client1.path("etc", "client.keys")) as handle:
        assert handle.read() == KEYS
    assert os.path.exists(client1.path("queue", "agent-info", "web01-any"))


def test_client_restarted_and_master_restarted_converge(cluster):
    master, client1 = cluster[0], cluster[1]
    stop(client1)
    put(master, "etc/shared/default/while-down.txt", u"changed while client1 was down\n")
    client1.start()
    converge(cluster)
    stop(master)
    put(master, "etc/shared/default/after-restart.txt", u"master back\n")
    master.start()
    converge(cluster)


def test_client_database_deleted_is_rebuilt_and_sync_goes_on(cluster):
    master, client1 = cluster[0], cluster[1]
    stop(client1)
    os.unlink(client1.path("var", "db", "cluster.db"))
    put(master, "etc/shared/default/after-db-loss.txt", u"x\n")
    client1.start()
    converge(cluster)
    assert os.path.exists(client1.path("var", "db", "cluster.db"))


def test_thousands_of_files_travel_in_bounded_batches_and_rounds(cluster):
    """A round's manifest and a push of 3000 files exceed any single small header."""
    master = cluster[0]
    for n in range(3000):
        put(master, "etc/shared/bulk%02d/file-%04d.conf" % (n % 30, n), u"line %d\n" % n)
    converge(cluster, timeout=90)
    # A later integrity round (interval 3 s) over the same 3000 files must not fail either.
    put(master, "etc/shared/default/after-bulk.txt", u"x\n")
    converge(cluster, timeout=30)
    assert "protocol error" not in cluster[1].log() + master.log()
