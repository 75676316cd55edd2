"""cluster_control (control.main) against a real control socket served by a fake daemon.

The fake is the daemon's own ControlServer (localsock framing, peer credentials) handed a
dispatcher of canned results in the documented shapes, or error replies; the installation is
a temporary folder with a real ossec.conf <cluster> block and the shipped etc/cluster.json.
"""
from __future__ import absolute_import, division, print_function

import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from wazuh_cluster import agentrows, compat, control, localsock, paths  # noqa: E402
from wazuh_cluster.control_server import ControlServer  # noqa: E402
from wazuh_cluster.errors import RequestError  # noqa: E402

KEY = "abcdefghijklmnopqrstuvwxyz012345"
NOW = time.time()

CONF = u"""<ossec_config>
  <cluster>
    <name>wazuh</name>
    <node_name>node01</node_name>
    <node_type>master</node_type>
    <key>%(key)s</key>
    <interval>2m</interval>
    <port>1516</port>
    <bind_addr>127.0.0.2</bind_addr>
    <nodes>
      <node>127.0.0.2</node>
      <node>127.0.0.3</node>
    </nodes>
    <hidden>no</hidden>
    <disabled>%(disabled)s</disabled>
  </cluster>
</ossec_config>
"""

NODES = {"nodes": [
    {"name": "node01", "type": "master", "status": "connected", "address": "127.0.0.2",
     "version": "3.0.0+py.1", "last_keepalive": NOW, "connected_since": None},
    {"name": "node02-long-name", "type": "client", "status": "connected",
     "address": "127.0.0.3", "version": "3.0.0+py.1", "last_keepalive": NOW - 5,
     "connected_since": NOW - 100, "extra": "ignored"},
    {"name": "node03", "type": None, "status": "disconnected", "address": None,
     "version": None, "last_keepalive": None, "connected_since": None},
]}
AGENTS = {"agents": [
    {"id": "010", "name": "web10", "ip": "10.0.0.10", "status": "Disconnected",
     "node_name": "node02-long-name", "last_keepalive": NOW - 4000},
    {"id": "002", "name": "db-server-02", "ip": "any", "status": "Active",
     "node_name": "node01", "last_keepalive": NOW},
    {"id": "003", "name": "new", "ip": "10.0.0.0/24", "status": "Never connected",
     "node_name": None, "last_keepalive": None},
]}
FILES = {"files": [
    {"node": "node02-long-name", "file": "etc/shared/default/agent.conf", "status": "pending"},
    {"node": "node02-long-name", "file": "etc/client.keys", "status": "synchronized"},
    {"node": "node03", "file": "etc/client.keys", "status": "failed"},
]}
HEALTH = {"nodes": [
    {"node": "node01", "type": "master", "connected": True, "agents": 1, "pending": 0,
     "failed": 0, "invalid": 0, "synchronized": 0, "last_sync_ago": None,
     "last_sync_ok": None},
    {"node": "node02-long-name", "type": "client", "connected": True, "agents": 1,
     "pending": 3, "failed": 1, "invalid": 2, "synchronized": 40, "last_sync_ago": 12.4,
     "last_sync_ok": True},
    {"node": "node03", "type": "client", "connected": False, "agents": 0, "pending": 0,
     "failed": 0, "invalid": 0, "synchronized": 0, "last_sync_ago": 300.0,
     "last_sync_ok": False},
], "held": [{"node": "node02-long-name", "since": NOW - 60,
             "message": "client.keys from the master removes 5 of 6 agents."}]}

RESULTS = {
    "nodes": NODES, "agents": AGENTS, "files": FILES, "health": HEALTH,
    "push": {"scheduled": ["node03", "node02-long-name"]},
    "force": {"scheduled": ["node03"]},
    "scan": {"scheduled": True},
    "confirm_removals": {"removed": ["web10", "new"]},
    "status": {"cluster": "wazuh", "node": "node01"},
}


class FakeDaemon(object):
    """Dispatcher for ControlServer: canned results; `errors[cmd] = (code, message)`."""

    def __init__(self):
        self.calls = []
        self.results = dict(RESULTS)
        self.errors = {}

    def handle(self, cmd, args):
        self.calls.append((cmd, args))
        if cmd in self.errors:
            code, message = self.errors[cmd]
            raise RequestError(message, code)
        if cmd not in self.results:
            raise RequestError("unknown command '%s'" % cmd, "unknown_command")
        return self.results[cmd]


def write(path, text):
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


@pytest.fixture
def home():
    # Short path: a UNIX socket path is limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="wcc")
    for folder in ("etc", "queue/ossec", "logs", "var/run"):
        os.makedirs(os.path.join(path, folder))
    write(os.path.join(path, "etc", "ossec.conf"), CONF % {"key": KEY, "disabled": "no"})
    shutil.copy(os.path.join(ROOT, "etc", "cluster.json"), os.path.join(path, "etc"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(home):
    fake = FakeDaemon()
    server = ControlServer(paths.Paths(home).control_socket, fake)
    server.start()
    assert server.thread is not None, "the fake daemon could not listen"
    yield fake
    server.stop()


def cli(home, *args):
    """control.main(args + ['-D', home]) -> (exit code, stdout text, stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    code = control.main(list(args) + ["-D", home], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def ok(home, *args):
    code, out, err = cli(home, *args)
    assert (code, err) == (0, u""), (code, out, err)
    return out


def fails(home, *args):
    code, out, err = cli(home, *args)
    assert code == 1, (code, out, err)
    assert out == u""
    assert err.endswith(u"\n") and err.count(u"\n") == 1, repr(err)
    assert err.startswith(u"cluster_control: ")
    return err


def columns(text, headers):
    """Split an aligned table into cells by the header's column offsets; checks alignment."""
    lines = text.rstrip(u"\n").split(u"\n")
    starts = [lines[0].index(h) for h in headers]
    assert starts[0] == 0
    rows = []
    for line in lines:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(line)
            cell = line[start:end]
            # A column starts where the previous one (plus two blanks) left off.
            assert start == 0 or line[start - 2:start] == u"  ", (line, headers[i])
            assert not cell.startswith(u" ") and cell.strip(), (line, headers[i])
            cells.append(cell.rstrip())
        assert line == line.rstrip()
        rows.append(cells)
    assert rows[0] == list(headers)
    return rows[1:]


DATE_RE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}$")


def local(epoch):
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(epoch))


# -- listings ------------------------------------------------------------------------------------

def test_nodes_table(home, daemon):
    rows = columns(ok(home, "-n"), ["Node", "Status", "Address", "Type", "Version",
                                    "Last keepalive"])
    assert rows[0][:5] == ["node01", "connected", "127.0.0.2", "master", "3.0.0+py.1"]
    assert rows[0][5] == local(NOW) and DATE_RE.match(rows[0][5])
    assert rows[1][0] == "node02-long-name" and rows[1][5] == local(NOW - 5)
    assert rows[2] == ["node03", "disconnected", "-", "-", "-", "-"]
    assert daemon.calls == [("nodes", {"names": None})]


def test_nodes_by_name_are_passed_on(home, daemon):
    ok(home, "-n", "node01", "node03")
    assert daemon.calls == [("nodes", {"names": ["node01", "node03"]})]


def test_nodes_json_shape(home, daemon):
    data = json.loads(ok(home, "-n", "-j"))
    assert list(data) == ["nodes"]
    for node in data["nodes"]:
        assert sorted(node) == sorted(["name", "type", "status", "address", "version",
                                       "last_keepalive", "connected_since"])
        assert isinstance(node["name"], compat.string_types)
        assert node["status"] in ("connected", "disconnected")
        for key in ("last_keepalive", "connected_since"):
            assert node[key] is None or isinstance(node[key], float)
    assert data["nodes"][1]["connected_since"] == NOW - 100


def test_agents_table_sorted_by_id(home, daemon):
    rows = columns(ok(home, "-a"), ["ID", "IP", "Name", "Status", "Node name"])
    assert rows == [["002", "any", "db-server-02", "Active", "node01"],
                    ["003", "10.0.0.0/24", "new", "Never connected", "-"],
                    ["010", "10.0.0.10", "web10", "Disconnected", "node02-long-name"]]


def test_agents_json_shape(home, daemon):
    data = json.loads(ok(home, "-j", "-a"))
    assert list(data) == ["agents"]
    assert [a["id"] for a in data["agents"]] == ["002", "003", "010"]
    for agent in data["agents"]:
        assert sorted(agent) == sorted(["id", "name", "ip", "status", "node_name",
                                        "last_keepalive"])
        assert agent["status"] in ("Active", "Pending", "Disconnected", "Never connected")
        assert agent["last_keepalive"] is None or isinstance(agent["last_keepalive"], float)
    assert data["agents"][1]["node_name"] is None


def test_agents_as_raw_rows_after_the_reply(home, daemon):
    # The daemons relay the agent rows as bytes (agentrows); cluster_control decodes them.
    as_dicts = ok(home, "-j", "-a")
    rows = [[a["id"], a["name"], a["ip"], a["status"], a["node_name"], a["last_keepalive"]]
            for a in AGENTS["agents"]]
    daemon.results["agents"] = localsock.WithData(
        {"count": len(rows), "rows_in_data": True, "columns": list(agentrows.COLUMNS)},
        json.dumps(rows).encode("utf-8"))
    assert ok(home, "-j", "-a") == as_dicts
    assert columns(ok(home, "-a"), ["ID", "IP", "Name", "Status", "Node name"])[0] == \
        ["002", "any", "db-server-02", "Active", "node01"]


# Rows that exercise the table: escapes, a cell past CELL_LIMIT, None, trailing blanks, a
# number where text belongs, widths that differ from one chunk to the next.
TRICKY_ROWS = [
    ["001", "a", "any", "Active", "node01", NOW],
    ["002", u"caf\xe9\x1b[2J", "10.0.0.0/24", "Never connected", None, None],
    ["010", "x" * 1500, "any", "Pending", u"node \u2028two ", NOW - 5],
    ["011", "b", 12, "Disconnected", "", NOW - 4000],
    ["120", "c", "any", "Active", "node02-long-name", NOW - 1],
    ["121", "d", "any", "Active", u"tab\there", 1.5],
]


def chunked(rows, per):
    """The rows as the internal daemon streams them, `per` rows a chunk."""
    return [json.dumps(rows[i:i + per]).encode("ascii")[1:-1] for i in range(0, len(rows), per)]


def as_objects(rows):
    """The rows as the objects of an older daemon's answer: the whole-listing path (sorted
    rows, text_agents, emit_printable), which the streamed table must match."""
    return {"agents": [dict(zip(agentrows.COLUMNS, row)) for row in rows]}


@pytest.mark.parametrize("rows", [TRICKY_ROWS, TRICKY_ROWS[3:] + TRICKY_ROWS[:3],
                                  [[str(i), "n%d" % i, "any", "Active", "node01", NOW]
                                   for i in range(1, 2600)]])
@pytest.mark.parametrize("per", [1, 2, 1000])
def test_streamed_agents_print_the_same_as_the_whole_listing(home, daemon, rows, per):
    # The streamed table (AgentTable, a chunk at a time) writes what the whole-listing
    # path (sorted rows, text_agents, emit_printable) writes, and -j stays byte-identical.
    daemon.results["agents"] = as_objects(rows)
    before = [ok(home, "-a"), ok(home, "-a", "-j")]
    daemon.results["agents"] = localsock.Chunked(agentrows.streamed(len(rows)),
                                                 chunked(rows, per))
    assert [ok(home, "-a"), ok(home, "-a", "-j")] == before
    daemon.results["agents"] = localsock.WithData(agentrows.result(len(rows)),
                                                  agentrows.joined(chunked(rows, per)))
    assert [ok(home, "-a"), ok(home, "-a", "-j")] == before  # a client relays one array
    assert len(before[0].splitlines()) == len(rows) + 1
    # The text table is asked without keepalives (null in every row): the same text.
    bare = [row[:5] + [None] for row in rows]
    daemon.results["agents"] = localsock.Chunked(agentrows.streamed(len(rows)),
                                                 chunked(bare, per))
    assert ok(home, "-a") == before[0]
    daemon.results["agents"] = as_objects(bare)
    assert ok(home, "-a") == before[0]


def test_the_text_table_asks_for_no_keepalives(home, daemon):
    # Writing and parsing a float per agent was a fifth of a listing's CPU in the internal
    # daemon, for a column the table does not show; -j keeps them.
    ok(home, "-a")
    ok(home, "-a", "-j")
    assert daemon.calls == [("agents", {"keepalives": False}), ("agents", {})]


def test_streamed_table_is_the_old_table_for_in_order_rows():
    # AgentTable against the old functions themselves, for rows it takes in order.
    table = control.AgentTable()
    for part in (TRICKY_ROWS[:2], TRICKY_ROWS[2:5], TRICKY_ROWS[5:]):
        table.add(part)
    assert table.in_order
    new, old = io.StringIO(), io.StringIO()
    table.write(new)
    control.emit_printable(control.text_agents(control.shape_agents(
        {"agents": [list(r) for r in TRICKY_ROWS]})), old)
    assert new.getvalue() == old.getvalue()
    assert u"\x1b" not in new.getvalue() and u"\\x1b" in new.getvalue()


def test_streamed_rows_out_of_order_or_not_numeric_are_not_taken_in_order():
    for parts in ([TRICKY_ROWS[2:], TRICKY_ROWS[:2]], [[["7", "a", "any", "Active", "n", 1.0],
                                                       ["7", "b", "any", "Active", "n", 1.0]]],
                  [[["x1", "a", "any", "Active", "n", 1.0]]], [[[3, "a", "any", "Active",
                                                                 "n", 1.0]]]):
        table = control.AgentTable()
        for part in parts:
            table.add(part)
        assert table.used and not table.in_order and table.parts == []


@pytest.mark.parametrize("chunks", [[b"[1,2]"], [b'["1","a","any","Active","n",1.0],[2'],
                                    [b'["1","a","any","Active","n"]'], [b"{}"], [b"1],[2"]])
def test_a_malformed_chunk_of_agent_rows_is_one_line(home, daemon, chunks):
    daemon.results["agents"] = localsock.Chunked(agentrows.streamed(1), chunks)
    assert "malformed answer to 'agents'" in fails(home, "-a")


@pytest.mark.parametrize("chunks,count,why", [
    ([b'["1","a","any","Active","n",1.0]'] * 2, 1, "more rows than the 1 announced"),
    ([b'["1","a","any","Active","n",1.0]'], 3, "1 rows, 3 announced"),
    ([b'["1","a","any","Active","n",{}]'], 1, "column 'last_keepalive' is a list or an object"),
    ([b" "], 1, "something else than rows"),
    ([b'["1","\xff","any","Active","n",1.0]'], 1, "not JSON"),
])
def test_relayed_rows_that_break_the_rules_name_the_master(home, daemon, chunks, count, why):
    # A client relays its master's pages unparsed (agentpages): cluster_control checks them.
    daemon.results["agents"] = localsock.Chunked(agentrows.streamed(count, u"m\x1b"), chunks)
    err = fails(home, "-a")
    assert u"master 'm\\x1b' sent a bad page of the agent listing: " in err, err
    assert why in err, err


def test_a_stream_cut_short_is_one_line_with_its_reason(home, daemon):
    def cut():
        yield b'["1","a","any","Active","n",1.0]'
        raise RequestError("internal daemon unavailable", "internal_unavailable")
    daemon.results["agents"] = localsock.Chunked(agentrows.streamed(2), cut())
    assert "internal daemon unavailable (internal_unavailable)" in fails(home, "-a")


def test_malformed_agent_rows_are_one_line(home, daemon):
    daemon.results["agents"] = localsock.WithData({"count": 1, "rows_in_data": True}, b"[1,")
    assert "malformed answer to 'agents'" in fails(home, "-a")


def test_files_table(home, daemon):
    rows = columns(ok(home, "-l"), ["Manager", "Filename", "Status"])
    assert rows == [["node02-long-name", "etc/client.keys", "synchronized"],
                    ["node02-long-name", "etc/shared/default/agent.conf", "pending"],
                    ["node03", "etc/client.keys", "failed"]]
    assert daemon.calls == [("files", {"nodes": None, "files": None})]


def test_files_named_in_3_0_style_or_absolute_are_relative_names(home, daemon):
    ok(home, "-l", "/etc/client.keys", os.path.join(home, "etc", "shared", "x"),
       "queue/agent-groups/001")
    assert daemon.calls[0][1]["files"] == ["etc/client.keys", "etc/shared/x",
                                           "queue/agent-groups/001"]


def test_files_restricted_to_managers(home, daemon):
    ok(home, "-l", "etc/client.keys", "-m", "node02-long-name", "node03")
    ok(home, "-m", "node03", "-l")
    assert daemon.calls == [
        ("files", {"nodes": ["node02-long-name", "node03"], "files": ["etc/client.keys"]}),
        ("files", {"nodes": ["node03"], "files": None})]


def test_files_json_shape(home, daemon):
    data = json.loads(ok(home, "-l", "-j"))
    assert list(data) == ["files"]
    assert len(data["files"]) == 3
    for row in data["files"]:
        assert sorted(row) == ["file", "node", "status"]
        assert all(isinstance(v, compat.string_types) for v in row.values())


def test_empty_listing_prints_the_header(home, daemon):
    daemon.results["files"] = {"files": []}
    assert ok(home, "-l") == u"Manager  Filename  Status\n"


def test_health_table_and_held_warning(home, daemon):
    lines = ok(home, "-i").rstrip(u"\n").split(u"\n")
    rows = columns(u"\n".join(lines[:-1]), ["Node", "Type", "Connected", "Last sync", "Pending",
                                            "Failed", "Invalid", "Agents"])
    assert rows[0] == ["node01", "master", "yes", "-", "0", "0", "0", "1"]
    assert rows[1] == ["node02-long-name", "client", "yes", "12 s ago", "3", "1", "2", "1"]
    assert rows[2] == ["node03", "client", "no", "300 s ago (failed)", "0", "0", "0", "0"]
    assert lines[-1].startswith(u"WARNING: node02-long-name: client.keys from the master "
                                u"removes 5 of 6 agents. (held since %s;" % local(NOW - 60))
    assert u"--confirm-removals" in lines[-1]


def test_health_never_synced_client(home, daemon):
    daemon.results["health"] = {"nodes": [dict(HEALTH["nodes"][1], last_sync_ago=None,
                                               last_sync_ok=None)], "held": []}
    rows = columns(ok(home, "-i"), ["Node", "Type", "Connected", "Last sync", "Pending",
                                    "Failed", "Invalid", "Agents"])
    assert rows[0][3] == "never"


def test_health_json_shape(home, daemon):
    daemon.results["health"] = {"nodes": HEALTH["nodes"] + [{"node": "bare"}],
                                "held": HEALTH["held"]}
    data = json.loads(ok(home, "-i", "-j"))
    assert sorted(data) == ["held", "nodes"]
    keys = ["node", "type", "connected", "agents", "pending", "failed", "invalid",
            "synchronized", "last_sync_ago", "last_sync_ok"]
    for node in data["nodes"]:
        assert sorted(node) == sorted(keys)
        assert isinstance(node["connected"], bool)
        for key in ("agents", "pending", "failed", "invalid", "synchronized"):
            assert isinstance(node[key], int) and not isinstance(node[key], bool)
        assert node["last_sync_ago"] is None or isinstance(node["last_sync_ago"], float)
        assert node["last_sync_ok"] in (None, True, False)
    bare = data["nodes"][-1]
    assert (bare["connected"], bare["pending"], bare["last_sync_ago"]) == (False, 0, None)
    assert data["held"] == [{"node": "node02-long-name", "message": HEALTH["held"][0]["message"],
                             "since": NOW - 60}]


# -- actions ---------------------------------------------------------------------------------

def test_push(home, daemon):
    assert ok(home, "-p") == u"Push scheduled to: node02-long-name, node03.\n"
    assert json.loads(ok(home, "-p", "-j")) == {"scheduled": ["node02-long-name", "node03"]}
    daemon.results["push"] = {"scheduled": []}
    assert u"no connected peer" in ok(home, "-p")
    assert [c[0] for c in daemon.calls] == ["push"] * 3


def test_force_all_and_some(home, daemon):
    assert ok(home, "-f", "-m", "node03") == u"Full resync scheduled with: node03.\n"
    ok(home, "-f")
    assert daemon.calls == [("force", {"nodes": ["node03"]}), ("force", {"nodes": None})]
    assert json.loads(ok(home, "-f", "-j")) == {"scheduled": ["node03"]}


def test_scan(home, daemon):
    assert ok(home, "-s") == u"Scan scheduled.\n"
    assert json.loads(ok(home, "-s", "-j")) == {"scheduled": True}
    assert daemon.calls[0] == ("scan", {})


def test_confirm_removals(home, daemon):
    assert ok(home, "--confirm-removals") == (u"Held agent removal confirmed: 2 agent(s) "
                                              u"removed: web10, new\n")
    assert json.loads(ok(home, "--confirm-removals", "-j")) == {"removed": ["web10", "new"]}


def test_version_needs_no_daemon(home):
    assert ok(home, "-V") == u"cluster_control (wazuh-cluster) %s\n" % control.__version__
    assert json.loads(ok(home, "-V", "-j")) == {"version": control.__version__}


def test_help(home, capsys):
    assert control.main(["-h"]) == 0
    assert u"--confirm-removals" in capsys.readouterr().out


# -- errors: exit 1 and one line on stderr ------------------------------------------------------

def test_daemon_not_running_no_socket(home):
    for args in (["-n"], ["-l"], ["-p"], ["-i", "-j"]):
        assert u"wazuh-clusterd is not running" in fails(home, *args)


def test_daemon_not_running_stale_socket(home):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(paths.Paths(home).control_socket)
    sock.close()  # the path stays, nobody listens: connection refused
    assert u"wazuh-clusterd is not running" in fails(home, "-a")


def test_disabled_cluster(home, daemon):
    write(os.path.join(home, "etc", "ossec.conf"), CONF % {"key": "", "disabled": "yes"})
    assert u"cluster is disabled" in fails(home, "-n")
    assert daemon.calls == []


def test_configuration_error(home, daemon):
    write(os.path.join(home, "etc", "ossec.conf"), CONF % {"key": "short", "disabled": "no"})
    err = fails(home, "-n")
    assert u"configuration error" in err and u"<key>" in err and u"short" not in err
    assert daemon.calls == []


def test_master_unreachable(home, daemon):
    daemon.errors["nodes"] = ("unreachable", "the master is unreachable (no session with it)")
    err = fails(home, "-n")
    assert u"master unreachable" in err


def test_unknown_node(home, daemon):
    daemon.errors["files"] = ("unknown_node", "unknown node 'nope'")
    assert u"unknown node" in fails(home, "-l", "-m", "nope")
    daemon.errors["force"] = ("unknown_node", "node 'nope' is not connected")
    assert u"nope" in fails(home, "-f", "-m", "nope")


def test_nothing_held(home, daemon):
    daemon.errors["confirm_removals"] = ("nothing_held", "no agent removal is held back")
    assert u"no agent removal is held back" in fails(home, "--confirm-removals")


def test_other_daemon_error_keeps_its_code(home, daemon):
    daemon.errors["scan"] = ("failed", "the internal daemon is\nrestarting")
    assert fails(home, "-s") == u"cluster_control: the internal daemon is restarting (failed)\n"


def test_daemon_closing_the_connection(home):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(paths.Paths(home).control_socket)
    listener.listen(1)
    import threading

    def close_first():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()
    thread = threading.Thread(target=close_first)
    thread.start()
    try:
        assert u"closed the connection" in fails(home, "-n")
    finally:
        thread.join(10)
        listener.close()


def test_manager_applies_to_files_and_force_only(home, daemon):
    assert u"-m applies to -l and -f only" in fails(home, "-a", "-m", "node01")
    assert daemon.calls == []


def test_no_action(home, daemon):
    assert u"nothing to do" in fails(home)


def test_usage_error_is_2(home, capsys):
    assert cli(home, "-a", "-n")[0] == 2
    assert u"not allowed with" in capsys.readouterr().err


# -- what a peer chose is escaped in text, exact in JSON -----------------------------------------

EVIL = u"x\n2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged\r\x1b[2J\x1b]0;t\x07\x00\u00e9\u202e"


def terminal_safe(out):
    """Nothing but printable ASCII and the line ends: no escape sequence, no forged line."""
    assert all(0x20 <= ord(c) < 0x7f for c in out.replace(u"\n", u"")), repr(out)
    assert not any(line.startswith(u"2031/") for line in out.split(u"\n"))
    return out


def hostile_results(daemon):
    daemon.results["nodes"] = {"nodes": [dict(NODES["nodes"][1], name=EVIL, version=EVIL,
                                              address=EVIL, type=EVIL,
                                              last_keepalive="soon")]}
    daemon.results["files"] = {"files": [{"node": EVIL, "file": EVIL + u"y" * 5000,
                                          "status": "invalid"}]}
    daemon.results["agents"] = {"agents": [dict(AGENTS["agents"][0], name=EVIL, node_name=EVIL,
                                                ip=EVIL), dict(AGENTS["agents"][1], id=7),
                                           dict(AGENTS["agents"][2], id=u"\xb2")]}
    daemon.results["health"] = {"nodes": [dict(HEALTH["nodes"][1], node=EVIL, type=EVIL,
                                               last_sync_ago="x")],
                                "held": [{"node": EVIL, "message": EVIL, "since": NOW}]}


@pytest.mark.parametrize("option", ["-n", "-l", "-a", "-i"])
def test_tables_escape_what_peers_sent(home, daemon, option):
    hostile_results(daemon)
    out = terminal_safe(ok(home, option))
    assert u"x\\x0a2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged\\x0d\\x1b[2J" in out
    assert max(len(line) for line in out.split(u"\n")) < 3 * control.CELL_LIMIT + 200


@pytest.mark.parametrize("option", ["-n", "-l", "-a", "-i"])
def test_json_stays_exact_and_ascii(home, daemon, option):
    hostile_results(daemon)
    out = terminal_safe(ok(home, option, "-j"))
    data = json.loads(out)
    key = {"-n": "nodes", "-l": "files", "-a": "agents", "-i": "nodes"}[option]
    field = {"-n": "name", "-l": "node", "-a": "name", "-i": "node"}[option]
    assert EVIL in [row[field] for row in data[key]]


@pytest.mark.parametrize("option,command,key", [("-n", "nodes", "nodes"),
                                                ("-a", "agents", "agents"),
                                                ("-i", "health", "nodes")])
def test_a_malformed_relayed_answer_shows_an_empty_table(home, daemon, option, command, key):
    daemon.results[command] = {key: 5, "held": "x"}
    assert len(terminal_safe(ok(home, option)).rstrip(u"\n").split(u"\n")) == 1


def test_an_error_message_from_the_daemon_is_escaped(home, daemon):
    daemon.errors["nodes"] = ("unreachable", u"master said \x1b[2J" + EVIL)
    err = fails(home, "-n")
    terminal_safe(err.rstrip(u"\n"))
    assert u"\\x1b[2J" in err


# -- formatting --------------------------------------------------------------------------------

def test_table_alignment_and_none():
    lines = control.table(("A", "Long header"), [("xxxx", None), ("y", "z")])
    assert lines == [u"A     Long header", u"xxxx  -", u"y     z"]


def cell_by_cell(headers, rows):
    """The table as it was made before columns were checked whole: every cell escaped."""
    rows = [list(headers)] + [[u"-" if c is None else control.cell_text(c) for c in row]
                              for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    line = u"  ".join(u"{%d:<%d}" % (i, width) for i, width in enumerate(widths))
    return [line.format(*row).rstrip() for row in rows]


def test_tables_are_the_same_as_escaped_cell_by_cell():
    # Columns checked as one string must give what escaping every cell gave: clean columns,
    # one hostile cell, numbers, None, trailing blanks, a cell past CELL_LIMIT, bytes.
    long_cell = u"x" * (control.CELL_LIMIT + 5)
    rows = [(u"001", u"web01", None, 3, u"Active"),
            (u"002", u"\x1b[2Jevil\nline", u"node 1 ", 4.5, u"Pending"),
            (u"003", long_cell, u"caf\xe9", None, b"raw\xff"),
            (u"004", u"", u"a\\b", True, u"Never connected")]
    for some in (rows, rows[:1], [rows[0], rows[3]], []):
        assert control.table(("ID", "Name", "Node", "N", "Status"), some) == \
            cell_by_cell(("ID", "Name", "Node", "N", "Status"), some)


@pytest.mark.parametrize("ids", [
    [u"10", u"9", u"010", u"1", u"10", u"0"],                  # ASCII digits: the fast path
    [u"1", u"2", u"10", u"0011"],                              # in order already
    [u"10", u"x", u"9", u"", u"\xb2", u"1", u"09", u"a1"],      # mixed: id_order itself
])
def test_agents_sort_by_id_as_id_order(ids):
    values = [[agent_id, u"n%d" % i] for i, agent_id in enumerate(ids)]
    expected = sorted(values, key=control.id_order)
    control.sort_by_id(values)
    assert values == expected


@pytest.mark.parametrize("values", [
    [[u"001", u"web01", u"any", u"Active", u"client01", 1700000000.123456789],
     [u"002", u'we"ird\\\n\x1b', u"caf\xe9", u"\U0001f600", None, None],
     [u"003", u"", u"10.0.0.0/24", u"Pending", u"n", 17],
     [u"004", True, False, 1e300, -0.0, float("nan")]],
    [[u"001", u"x", u"any", u"Active", [], None]],                   # empty container
    [[u"001", u"x", u"any", u"Active", [u"a", 1], {u"k": None}]],    # containers: json itself
    [],
])
def test_json_text_is_what_the_indented_encoder_writes(values):
    data = {"agents": control.Rows(control.AGENT_KEYS, values)}
    assert control.json_text(data) == compat.to_text(json.dumps(
        control.jsonable(data), indent=2, separators=(",", ": ")))


def test_output_is_written_in_chunks_and_escaped():
    out = io.StringIO()
    lines = [u"line %d" % i for i in range(control.EMIT_LINES + 2)] + [u"bad\x1b[2J\nline"]
    control.emit_printable(lines, control.TextOut(out))
    written = out.getvalue().split(u"\n")
    assert written[:-2] == lines[:-1] and written[-2:] == [u"bad\\x1b[2J\\x0aline", u""]


def test_time_helpers():
    assert control.when(None) == u"-"
    assert DATE_RE.match(control.when(NOW))
    assert control.ago(11.6) == u"12 s ago"
    assert control.ago(None) == u"never"
    assert control.ago(3, False) == u"3 s ago (failed)"


# -- failover views (-n role/term, -i status and backups, --ack-backups) ----------------------

FAILOVER = {"failover": True, "role": "acting master", "term": 7, "leader": "node02-long-name",
            "preferred": "node01", "lease_remaining": 4.25,
            "failovers": [{"time": NOW - 3600, "term": 5, "leader": "node02-long-name"},
                          {"time": NOW - 60, "term": 7, "leader": "node02-long-name"}],
            "last": [7, 3]}
BACKUP = {"path": "backup/cluster/7-20261203050000/etc/client.keys", "file": "etc/client.keys",
          "term": 7, "time": NOW - 30}


def test_failover_off_leaves_nodes_and_health_exactly_as_before(home, daemon):
    before = [ok(home, *args) for args in (["-n"], ["-n", "-j"], ["-i"], ["-i", "-j"])]
    daemon.results["nodes"] = dict(NODES, failover=False)
    daemon.results["health"] = dict(HEALTH, failover={"failover": False})
    after = [ok(home, *args) for args in (["-n"], ["-n", "-j"], ["-i"], ["-i", "-j"])]
    assert after == before
    assert "Role" not in before[0] and "Failover" not in before[2]


def test_nodes_with_failover_show_role_and_term(home, daemon):
    rows = [dict(n, role=r, term=t) for n, r, t in zip(
        NODES["nodes"], ["client", "acting master", "candidate"], [None, 7, None])]
    daemon.results["nodes"] = {"nodes": rows, "failover": True}
    table_rows = columns(ok(home, "-n"), ["Node", "Status", "Address", "Type", "Version",
                                          "Last keepalive", "Role", "Term"])
    assert [r[6:] for r in table_rows] == [["client", "-"], ["acting master", "7"],
                                           ["candidate", "-"]]
    data = json.loads(ok(home, "-n", "-j"))
    assert data["failover"] is True
    assert [(n["role"], n["term"]) for n in data["nodes"]] == [
        ("client", None), ("acting master", 7), ("candidate", None)]


def test_health_with_failover_shows_leader_term_lease_history_and_backups(home, daemon):
    daemon.results["health"] = dict(HEALTH, failover=FAILOVER, backups=[BACKUP],
                                    backups_more=2)
    lines = ok(home, "-i").rstrip(u"\n").split(u"\n")
    start = [i for i, line in enumerate(lines) if line.startswith(u"Failover:")][0]
    assert lines[start] == (u"Failover: this node is acting master in term 7; leader: "
                            u"node02-long-name (lease 4.2 s left); preferred master: node01.")
    assert lines[start + 1] == u"Failovers: 2, newest first:"
    assert lines[start + 2] == u"  %s  term 7  leader node02-long-name" % local(NOW - 60)
    assert lines[start + 3] == u"  %s  term 5  leader node02-long-name" % local(NOW - 3600)
    assert lines[start + 4].startswith(u"WARNING: local edits replaced by the leader's files")
    assert u"--ack-backups" in lines[start + 4]
    rows = columns(u"\n".join(lines[start + 5:-1]), ["Backup", "Original file", "Term", "Time"])
    assert rows == [[BACKUP["path"], "etc/client.keys", "7", local(NOW - 30)]]
    assert lines[-1] == u"... and 2 more backups"
    data = json.loads(ok(home, "-i", "-j"))
    assert data["failover"] == dict((k, v) for k, v in FAILOVER.items() if k != "failover")
    assert data["backups"] == [BACKUP] and data["backups_more"] == 2


def test_health_failover_status_from_a_peer_is_escaped_and_survives_nonsense(home, daemon):
    daemon.results["health"] = dict(HEALTH, failover={
        "failover": True, "role": u"master\x1b[2J", "term": "x\ny", "leader": None,
        "preferred": 12, "lease_remaining": "soon", "failovers": [None, {"time": "?",
                                                                       "leader": u"\u202e"}],
        "last": 3}, backups="nope", backups_more="many")
    out = ok(home, "-i")
    terminal_safe(out)
    assert u"this node is master\\x1b[2J in term x\\x0ay; leader: none known; preferred " \
           u"master: 12." in out
    assert u"Failovers: 1, newest first:\n  ?  term -  leader \\u202e\n" in out
    data = json.loads(ok(home, "-i", "-j"))
    assert data["backups"] == [] and data["backups_more"] == 0


def test_ack_backups_all_or_some(home, daemon):
    daemon.results["ack_backups"] = {"acknowledged": [BACKUP["path"]]}
    assert ok(home, "--ack-backups") == u"Acknowledged 1 backup(s); the files are kept.\n"
    assert ok(home, "--ack-backups", "backup/cluster/7-20261203050000", "-j") == \
        json.dumps({"acknowledged": [BACKUP["path"]]}, indent=2) + u"\n"
    assert daemon.calls == [("ack_backups", {"paths": None}),
                            ("ack_backups", {"paths": ["backup/cluster/7-20261203050000"]})]
    daemon.results["ack_backups"] = {"acknowledged": []}
    assert ok(home, "--ack-backups") == u"No backup to acknowledge.\n"
    daemon.errors["ack_backups"] = ("unknown_backup", "no unacknowledged backup at 'x'")
    assert fails(home, "--ack-backups", "x") == \
        u"cluster_control: unknown backup: no unacknowledged backup at 'x'\n"
