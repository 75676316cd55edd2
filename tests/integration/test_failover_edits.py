"""Local edits on a node that is not the leader (SPEC section 10) with real daemons: with
cluster.failover=1 a client's local edit of a master-owned file is backed up before the
master's version replaces it, warned about in cluster.log, listed by cluster_control -i until
acknowledged; with failover off nothing of this happens.

Until the election is wired, "not the leader" is "not the configured master"
(localedits.backups_wanted, Inbox.acting).
"""
from __future__ import absolute_import, division, print_function

import io
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402
import lab_harness  # noqa: E402
from harness import wait_for, workspace  # noqa: E402,F401
from test_cluster_control import node_file as read  # noqa: E402

TIMEOUT = 60.0
LOCAL_LINE = b"099 edited-here any " + b"a" * 64 + b"\n"


def write(node, name, data):
    with io.open(node.path(*name.split("/")), "wb") as handle:
        handle.write(data)


def control(node, *args):
    result = node.cluster_control(*args)
    assert (result.rc, result.err) == (0, ""), "%s: %s\n%s" % (node.name, result,
                                                               node.dump_logs())
    return result.out


def backups(node):
    root = node.path("backup", "cluster")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture(params=["1", "0"], ids=["failover-on", "failover-off"])
def cluster(workspace, request):  # noqa: F811
    harness._need_ossec_user()
    base = os.path.join(workspace, "edits-lab-%s" % request.param)
    addresses = [harness.new_address() for _ in range(3)]
    nodes = lab_harness.start_cluster(base, 3, port=harness.free_port(addresses[0]),
                                      addresses=addresses, interval="3s",
                                      options={"cluster.failover": request.param})
    yield request.param == "1", nodes
    lab_harness.stop_nodes(nodes)


def test_a_local_edit_on_a_client_is_backed_up_only_with_failover(cluster):
    failover, nodes = cluster
    master, client, other = nodes
    wait_for(lambda: read(client, "etc/client.keys") == read(master, "etc/client.keys"),
             TIMEOUT, 0.2, what="client.keys on node02")
    original = read(master, "etc/client.keys")
    edited = original + LOCAL_LINE
    write(client, "etc/client.keys", edited)
    # the master's next round puts its own version back
    wait_for(lambda: read(client, "etc/client.keys") == original, TIMEOUT, 0.2,
             what="the master's client.keys back on node02")
    if not failover:
        assert backups(client) == [] and "local edit" not in client.log()
        assert sorted(json.loads(control(client, "-i", "-j"))) == ["held", "nodes"]
        return
    # the backup is named with the term the client knows: the one its leader was elected in
    with open(client.path("var", "db", "cluster-election.json")) as handle:
        term = json.load(handle)["term"]
    assert term >= 1
    folders = backups(client)
    assert len(folders) == 1 and folders[0].startswith("%d-" % term), folders
    path = "backup/cluster/%s/etc/client.keys" % folders[0]
    assert read(client, path) == edited
    assert ("WARNING: local edit of 'etc/client.keys' replaced by the leader's version; the "
            "local version is backed up as '%s'" % path) in client.log()
    assert backups(master) == [] and backups(other) == []
    listed = json.loads(control(client, "-i", "-j"))["backups"]
    assert [(b["path"], b["file"], b["term"]) for b in listed] == [
        (path, "etc/client.keys", term)]
    assert path in control(client, "-i")
    assert control(client, "--ack-backups") == \
        "Acknowledged 1 backup(s); the files are kept.\n"
    assert json.loads(control(client, "-i", "-j"))["backups"] == []
    assert read(client, path) == edited
    # what it received from the master is no local edit: no second backup
    write(master, "etc/client.keys", original + b"098 new-one any " + b"b" * 64 + b"\n")
    wait_for(lambda: read(client, "etc/client.keys") == read(master, "etc/client.keys"),
             TIMEOUT, 0.2, what="the master's new client.keys on node02")
    assert backups(client) == folders
