"""cluster_control against a real 3-node cluster (tests/lab_harness): listings on the master and
on a client (which gets the master's answer), actions that reach the peers, and the errors.

One cluster serves the module; the tests that stop daemons come last.
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

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster(workspace, request):  # noqa: F811
    harness._need_ossec_user()
    base = os.path.join(workspace, "control-lab")
    addresses = [harness.new_address() for _ in range(3)]
    nodes = lab_harness.start_cluster(base, 3, port=harness.free_port(addresses[0]),
                                      addresses=addresses, interval="5s")
    yield nodes
    lab_harness.stop_nodes(nodes)


@pytest.fixture(autouse=True)
def logs_on_failure(request):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "cluster" in request.fixturenames:
        for node in request.getfixturevalue("cluster"):
            print(node.dump_logs())


def ok(node, *args):
    result = node.cluster_control(*args)
    assert (result.rc, result.err) == (0, ""), "%s: cluster_control %s\n%s\n%s" % (
        node.name, " ".join(args), result, node.dump_logs())
    return result.out


def fails(node, *args):
    result = node.cluster_control(*args)
    assert result.rc == 1 and result.out == "", result
    assert result.err.count("\n") == 1 and result.err.startswith("cluster_control: "), result
    return result.err


def as_json(node, *args):
    return json.loads(ok(node, *(list(args) + ["-j"])))


def node_file(node, name):
    try:
        with io.open(node.path(*name.split("/")), "rb") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def same_everywhere(nodes, name):
    data = node_file(nodes[0], name)
    return data is not None and all(node_file(n, name) == data for n in nodes[1:])


# -- listings -------------------------------------------------------------------------------------

def test_nodes_on_master_and_client(cluster):
    master, client = cluster[0], cluster[1]
    data = as_json(master, "-n")
    assert [(n["name"], n["type"], n["status"]) for n in data["nodes"]] == [
        ("node01", "master", "connected"), ("node02", "client", "connected"),
        ("node03", "client", "connected")]
    assert [n["address"] for n in data["nodes"]] == [n.address for n in cluster]
    names = lambda d: [(n["name"], n["type"], n["address"]) for n in d["nodes"]]  # noqa: E731
    assert names(as_json(client, "-n")) == names(data)
    text = ok(client, "-n").splitlines()
    assert text[0].split() == ["Node", "Status", "Address", "Type", "Version", "Last",
                               "keepalive"]
    assert [line.split()[0] for line in text[1:]] == ["node01", "node02", "node03"]
    assert [n["name"] for n in as_json(client, "-n", "node03")["nodes"]] == ["node03"]


def test_agents_on_master_and_client(cluster):
    homes = lab_harness.agent_homes(cluster)

    def expected():
        return dict((a.id, (a.name, {"full": "Active", "empty": "Pending", None:
                                     "Never connected"}[a.info],
                            homes[a.id].name if a.id in homes else None))
                    for a in lab_harness.SAMPLE_AGENTS)

    def seen(node):
        return dict((a["id"], (a["name"], a["status"], a["node_name"]))
                    for a in as_json(node, "-a")["agents"])
    # The master learns the reporting node once the clients' agent-info has arrived.
    wait_for(lambda: seen(cluster[0]) == expected(), TIMEOUT, 0.2, what="agents on the master")
    assert seen(cluster[2]) == expected()
    lines = ok(cluster[0], "-a").splitlines()
    assert lines[0].split() == ["ID", "IP", "Name", "Status", "Node", "name"]
    assert len(lines) == 1 + len(lab_harness.SAMPLE_AGENTS)


def test_files_listing(cluster):
    def synced():
        rows = as_json(cluster[0], "-l")["files"]
        return set((r["node"], r["status"]) for r in rows
                   if r["file"] == "etc/client.keys") == {("node02", "synchronized"),
                                                          ("node03", "synchronized")}
    wait_for(synced, TIMEOUT, 0.2, what="client.keys synchronized to both clients")
    rows = as_json(cluster[0], "-l", "etc/client.keys")["files"]
    assert set(r["file"] for r in rows) == {"etc/client.keys"}
    rows = as_json(cluster[0], "-l", "/etc/client.keys", "-m", "node03")["files"]
    assert [(r["node"], r["file"]) for r in rows] == [("node03", "etc/client.keys")]
    rows = as_json(cluster[0], "-l", "-m", "node02")["files"]
    assert rows and set(r["node"] for r in rows) == {"node02"}
    assert "etc/shared/web/agent.conf" in set(r["file"] for r in rows)
    text = ok(cluster[0], "-l", "-m", "node02").splitlines()
    assert text[0].split() == ["Manager", "Filename", "Status"]
    assert all(line.split()[0] == "node02" for line in text[1:])


def test_health(cluster):
    homes = lab_harness.agent_homes(cluster)

    def healthy():
        rows = dict((n["node"], n) for n in as_json(cluster[0], "-i")["nodes"])
        return all(rows[n.name]["connected"] and rows[n.name]["last_sync_ago"] is not None
                   for n in cluster[1:]) and rows
    rows = wait_for(healthy, TIMEOUT, 0.2, what="a full round with every client")
    for node in cluster[1:]:
        assert rows[node.name]["agents"] == sum(1 for n in homes.values() if n is node)
        assert rows[node.name]["last_sync_ok"] is True
    lines = ok(cluster[1], "-i").splitlines()
    assert lines[0].split()[:4] == ["Node", "Type", "Connected", "Last"]
    assert len(lines) == 4 and not any(line.startswith("WARNING") for line in lines)


def test_json_shapes_from_the_real_daemon(cluster):
    shapes = {
        "-n": ("nodes", {"name", "type", "status", "address", "version", "last_keepalive",
                         "connected_since"}),
        "-a": ("agents", {"id", "name", "ip", "status", "node_name", "last_keepalive"}),
        "-l": ("files", {"node", "file", "status"}),
        "-i": ("nodes", {"node", "type", "connected", "agents", "pending", "failed", "invalid",
                         "synchronized", "last_sync_ago", "last_sync_ok"}),
    }
    for node in cluster[:2]:
        for option, (key, fields) in sorted(shapes.items()):
            data = as_json(node, option)
            assert key in data and data[key], (node.name, option, data)
            for row in data[key]:
                assert set(row) == fields, (node.name, option, row)
        held = as_json(node, "-i")["held"]
        assert isinstance(held, list)
        for row in as_json(node, "-n")["nodes"]:
            assert isinstance(row["last_keepalive"], (float, type(None)))


# -- actions --------------------------------------------------------------------------------------

def test_scan_and_push_bring_a_new_shared_file_to_the_clients(cluster):
    name = "etc/shared/default/lab-note.txt"
    harness.write_file(cluster[0].path(*name.split("/")), u"pushed by cluster_control -p\n")
    assert ok(cluster[0], "-s") == "Scan scheduled.\n"
    assert ok(cluster[0], "-p") == "Push scheduled to: node02, node03.\n"
    assert as_json(cluster[0], "-s") == {"scheduled": True}
    wait_for(lambda: same_everywhere(cluster, name), TIMEOUT, 0.1, what="%s everywhere" % name)
    assert as_json(cluster[1], "-p") == {"scheduled": ["node01"]}


def test_force_one_node_repairs_a_file_deleted_by_hand(cluster):
    name = "etc/shared/web/agent.conf"
    wait_for(lambda: same_everywhere(cluster, name), TIMEOUT, 0.1, what="%s everywhere" % name)
    os.unlink(cluster[2].path(*name.split("/")))
    assert ok(cluster[0], "-f", "-m", "node03") == "Full resync scheduled with: node03.\n"
    wait_for(lambda: same_everywhere(cluster, name), TIMEOUT, 0.1,
             what="%s back on node03" % name)
    assert as_json(cluster[0], "-f") == {"scheduled": ["node02", "node03"]}


# -- errors -------------------------------------------------------------------------------------

def test_unknown_node(cluster):
    assert "unknown node" in fails(cluster[0], "-l", "-m", "nope")
    assert "nope" in fails(cluster[0], "-f", "-m", "nope")
    assert "unknown node" in fails(cluster[0], "-n", "nope")
    assert "unknown node" in fails(cluster[1], "-n", "nope")


def test_nothing_held(cluster):
    assert "no agent removal is held back" in fails(cluster[1], "--confirm-removals")
    assert "nothing" in fails(cluster[0], "--confirm-removals")


def test_mass_removal_is_held_shown_by_health_and_confirmed(cluster):
    keys = cluster[0].path("etc", "client.keys")
    client = cluster[1]
    harness.write_file(keys, u"")

    def held():
        data = as_json(client, "-i")
        return data["held"] and data
    data = wait_for(held, TIMEOUT, 0.2, what="the agent removal held on node02")
    assert data["held"][0]["node"] == "node02"
    warning = ok(client, "-i").splitlines()[-1]
    assert warning.startswith("WARNING: node02: ") and "--confirm-removals" in warning
    assert node_file(client, "etc/client.keys")  # the agents are still there
    out = ok(client, "--confirm-removals")
    assert out.startswith("Held agent removal confirmed: ")
    wait_for(lambda: node_file(client, "etc/client.keys") == b"", TIMEOUT, 0.1,
             what="client.keys emptied on node02")
    assert not as_json(client, "-i")["held"]


def test_stopped_daemons(cluster):
    master, client, stopped = cluster
    stopped.stop()
    assert "wazuh-clusterd is not running" in fails(stopped, "-n")

    def disconnected():
        rows = dict((n["name"], n["status"]) for n in as_json(master, "-n")["nodes"])
        return rows.get("node03") == "disconnected"
    wait_for(disconnected, TIMEOUT, 0.2, what="node03 disconnected on the master")
    master.stop()
    wait_for(lambda: client.cluster_control("-n").rc == 1, TIMEOUT, 0.2,
             what="node02 to lose its master")
    assert "master unreachable" in fails(client, "-a")
    assert ok(client, "-l").startswith("Manager")  # local views still answer
