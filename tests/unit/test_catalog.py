"""Catalog: the internal daemon's commands and its timer (scanner + database)."""
from __future__ import absolute_import, division, print_function

import binascii
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import pytest

from wazuh_cluster import catalog as catalog_mod
from wazuh_cluster import agentlist, agentrows, compat, db as dbmod, errors, localsock
from wazuh_cluster import scanner as scanner_mod
from wazuh_cluster.pathrules import MTIME_SLACK_NS

from test_scanner import EXCLUDE, ITEMS, write  # noqa: I100 - shared fixtures of the scanner

NOW = 1700000000.0


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-cat-")
    for folder in ("etc/shared/default", "queue/agent-groups", "queue/agent-info", "var/db"):
        os.makedirs(os.path.join(path, folder))
    yield path
    # Close the databases first: one closed by the garbage collector during rmtree removes
    # its -wal file under rmtree's feet.
    while OPENED:
        OPENED.pop().close()
    shutil.rmtree(path)


OPENED = []


class Clock(object):
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(home, role="master", node_name="master01", db_name="cluster.db", **options):
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db", db_name), log, wall=lambda: NOW)
    OPENED.append(db)
    options.setdefault("poll_interval", 1.0)
    options.setdefault("scan_interval", 10.0)
    return catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, role=role, node_name=node_name,
                               wall=lambda: NOW, **options)


def test_first_tick_is_a_full_pass_and_stores_files(home):
    write(home, "etc/shared/default/agent.conf", "conf")
    cat = make(home)
    assert cat.timeout(0.0) == 0.0
    event = cat.tick(0.0)
    assert event["event"] == "changes"
    assert event["changed"] == ["etc/shared/default/agent.conf"]
    assert cat.tick(0.5) is None           # only client.keys looked at (HOT_CHECKS_PER_POLL)
    assert cat.timeout(0.5) == pytest.approx(1.0 / catalog_mod.HOT_CHECKS_PER_POLL)
    assert cat.tick(1.0) is None           # poll, nothing changed
    assert [r[0] for r in cat.db.load_files()] == ["etc/shared/default/agent.conf"]
    status = cat.handle("status", {})
    assert status["files"] == 1 and status["last_scan"] == NOW and status["role"] == "master"


def test_restart_does_not_report_unchanged_files(home):
    write(home, "etc/shared/default/agent.conf", "conf")
    write(home, "etc/shared/default/old", "old")
    cat = make(home)
    cat.tick(0.0)
    cat.db.close()
    os.unlink(os.path.join(home, "etc/shared/default/old"))
    cat = make(home)
    event = cat.tick(0.0)
    assert event["changed"] == [] and event["deleted"] == ["etc/shared/default/old"]
    assert cat.db.deleted_files() == ["etc/shared/default/old"]


def test_changes_mark_pending_for_known_clients_only(home):
    cat = make(home)
    cat.tick(0.0)
    cat.handle("peer_seen", {"name": "client01", "role": "client", "address": "127.0.0.2",
                             "version": "1.0"})
    cat.handle("peer_seen", {"name": "master01", "role": "client"})  # our own name: never
    cat.handle("set_states", {"rows": [["client02", "etc/client.keys", "synchronized"]]})
    write(home, "etc/client.keys", "001 web01 any k\n")
    write(home, "queue/agent-info/web01-any", "Linux")  # client-owned: not sent by a master
    cat.handle("rescan", {})  # a pass over everything, received items included
    event = cat.tick(1.0)
    assert event["changed"] == ["etc/client.keys", "queue/agent-info/web01-any"]
    assert cat.handle("pending", {"node": "client01"}) == {"files": ["etc/client.keys"],
                                                           "deleted": []}
    assert cat.handle("pending", {"node": "client02"})["files"] == ["etc/client.keys"]
    assert cat.handle("pending", {"node": "master01"})["files"] == []
    os.unlink(os.path.join(home, "etc/client.keys"))
    cat.tick(2.0)
    assert cat.handle("pending", {"node": "client01"})["deleted"] == ["etc/client.keys"]
    assert cat.handle("set_states", {"rows": [["client01", "etc/client.keys",
                                               "synchronized"]]}) == {"updated": 1}
    assert cat.handle("pending", {"node": "client01"})["files"] == []


def test_client_sends_agent_info_touches_to_master(home):
    write(home, "queue/agent-info/web01-any", "Linux")
    cat = make(home, role="client", node_name="client01")
    cat.tick(0.0)
    cat.handle("peer_seen", {"name": "master01", "role": "master"})
    compat.set_mtime_ns(os.path.join(home, "queue/agent-info/web01-any"), 1600000000 * 10 ** 9)
    event = cat.tick(10.0)
    assert event["touched"] == ["queue/agent-info/web01-any"]
    assert cat.handle("pending", {"node": "master01"})["files"] == ["queue/agent-info/web01-any"]


def test_rescan_schedules_a_full_pass(home):
    cat = make(home)
    cat.tick(0.0)
    path = write(home, "etc/shared/default/agent.conf", "aaaa")
    cat.tick(10.0)
    write(home, "etc/shared/default/agent.conf", "bbbb")  # in place, mtime restored
    assert cat.handle("rescan", {}) == {"scheduled": True}
    assert cat.timeout(10.1) == 0.0
    assert cat.tick(10.1)["changed"] == ["etc/shared/default/agent.conf"]
    assert os.path.exists(path)


def test_manifest_filters_by_source_and_item(home):
    write(home, "etc/shared/default/agent.conf", "abc")
    write(home, "queue/agent-info/web01-any", "Linux")
    cat = make(home)
    cat.tick(0.0)
    files = cat.handle("manifest", {"source": "master", "items": None})["files"]
    assert list(files) == ["etc/shared/default/agent.conf"]
    entry = files["etc/shared/default/agent.conf"]
    assert entry["item"] == "shared" and entry["size"] == 3
    assert entry["sha256"].startswith("ba7816bf")
    assert list(cat.handle("manifest", {"items": ["agent-info"]})["files"]) == \
        ["queue/agent-info/web01-any"]
    assert len(cat.handle("manifest", {})["files"]) == 2
    assert list(cat.handle("manifest", {"source": "master", "names": [
        "etc/shared/default/agent.conf", "queue/agent-info/web01-any", "nope"]})["files"]) == \
        ["etc/shared/default/agent.conf"]
    json.dumps(cat.handle("manifest", {}))


def test_manifest_as_data_is_the_same_mapping_as_json_bytes(home):
    write(home, "etc/shared/default/agent.conf", "abc")
    write(home, "etc/shared/default/we\"ird.conf", "x")  # a quote must be escaped
    write(home, "queue/agent-info/web01-any", "Linux")
    write(home, "queue/agent-info/db01-10.0.0.2", "")
    cat = make(home)
    cat.tick(0.0)
    for args in ({}, {"source": "master"}, {"source": "client"},
                 {"source": "client", "names": ["queue/agent-info/web01-any", "nope",
                                                "etc/shared/default/agent.conf"]},
                 {"source": "client", "names": []}):
        plain = cat.handle("manifest", dict(args))["files"]
        raw = cat.handle("manifest", dict(args, as_data=True))
        assert isinstance(raw, localsock.WithData)
        assert raw.result == {"count": len(plain)}
        assert isinstance(raw.data, bytes)
        assert json.loads(raw.data.decode("utf-8")) == plain


def test_states_query(home):
    cat = make(home)
    cat.handle("set_states", {"rows": [["n2", "a", "failed"], ["n3", "a", "invalid"]]})
    assert cat.handle("states", {"node": "n2"}) == {"rows": [["n2", "a", "failed"]]}
    assert len(cat.handle("states", {"node": None, "files": ["a"]})["rows"]) == 2


@pytest.mark.parametrize("cmd,args,code", [
    ("nope", {}, "unknown_command"),
    ("status", [], "bad_request"),
    ("pending", {}, "bad_request"),
    ("set_states", {"rows": [["n", "f", "bogus"]]}, "bad_request"),
    ("set_states", {"rows": [["n", "f"]]}, "bad_request"),
    ("set_states", {"rows": "x"}, "bad_request"),
    ("states", {"files": "x"}, "bad_request"),
    ("manifest", {"source": "other"}, "bad_request"),
    ("peer_seen", {"name": "n2", "role": "boss"}, "bad_request"),
    ("meta_get", {}, "bad_request"),
])
def test_bad_requests_raise_request_error_with_code(home, cmd, args, code):
    cat = make(home)
    with pytest.raises(errors.RequestError) as info:
        cat.handle(cmd, args)
    assert info.value.code == code


def test_meta_and_peers(home):
    cat = make(home)
    assert cat.handle("meta_get", {"key": "held_removal"}) == {"value": None}
    cat.handle("meta_set", {"key": "held_removal", "value": {"removed": 40, "total": 50}})
    assert cat.handle("meta_get", {"key": "held_removal"})["value"] == {"removed": 40,
                                                                         "total": 50}
    cat.handle("meta_set", {"key": "held_removal", "value": None})
    assert cat.handle("meta_get", {"key": "held_removal"})["value"] is None
    cat.handle("peer_seen", {"name": "c1", "role": "client", "address": "127.0.0.2"})
    assert [p["node"] for p in cat.handle("peers", {})["peers"]] == ["c1"]
    assert "agents" in cat.commands() and "status" in cat.commands()


def test_agents_status_and_node_name(home):
    write(home, "etc/client.keys", "\n".join([
        "001 web01 10.0.0.5 k1", "002 db01 any k2", "003 !gone 10.0.0.7 k3",
        "004 new01 10.0.0.0/24 k4", "005 old01 any k5", "# comment", ""]))
    info = os.path.join(home, "queue/agent-info")
    write(home, "queue/agent-info/web01-10.0.0.5",
          'Linux web01\n#"manager_hostname":m1\n#"node_name":client01\n',
          mtime_ns=int((NOW - 60) * 1e9))
    write(home, "queue/agent-info/db01-any", "", mtime_ns=int((NOW - 10) * 1e9))
    write(home, "queue/agent-info/old01-any", "Linux old01\n", mtime_ns=int((NOW - 1831) * 1e9))
    assert os.path.isdir(info)
    cat = make(home)
    cat.tick(0.0)
    cat.handle("agent_nodes", {"rows": [["old01-any", "client02"]]})
    agents = dict((a["id"], a) for a in listed_agents(cat))
    assert sorted(agents) == ["001", "002", "004", "005"]
    assert agents["001"]["status"] == "Active" and agents["001"]["node_name"] == "client01"
    assert agents["001"]["last_keepalive"] == pytest.approx(NOW - 60)
    assert agents["002"]["status"] == "Pending"
    assert agents["004"]["status"] == "Never connected" and agents["004"]["ip"] == "10.0.0.0/24"
    assert agents["005"]["status"] == "Disconnected" and agents["005"]["node_name"] == "client02"
    json.dumps(agents)


def test_agent_rows_are_exactly_those_of_before(home):
    # The listing moved from files to the database; its bytes must not change: statuses,
    # node names from the file or from the node that sent it, removed (! and #), comment,
    # malformed and repeated lines, a CIDR, hostile and non-ASCII names and node names.
    write(home, "etc/client.keys", u"\n".join([
        u"001 web01 10.0.0.5 k1", u"002 db01 any k2", u"003 !gone 10.0.0.7 k3",
        u"004 new01 10.0.0.0/24 k4", u"005 old01 any k5", u"006 #hash any k6", u"# comment",
        u"bad line", u'007 we"ird\\ any k7', u"008 caf\xe9 any k8", u"009 dup any k9",
        u"009 dup any k9b", u"010 link any k10", u""]).encode("utf-8"))
    old, fresh = int((NOW - 1831) * 1e9), int((NOW - 60) * 1e9)
    write(home, "queue/agent-info/web01-10.0.0.5",
          'Linux web01\n#"manager_hostname":m1\n#"node_name":client01\n', mtime_ns=fresh)
    write(home, "queue/agent-info/db01-any", "", mtime_ns=int((NOW - 10) * 1e9))
    write(home, "queue/agent-info/old01-any", "Linux old01\n", mtime_ns=old)
    write(home, compat.native_str(u"queue/agent-info/caf\xe9-any"),
          b'Linux\n#"node_name":\x1b[2J\xc3\xa9vil\n', mtime_ns=fresh)
    write(home, "queue/agent-info/dup-any", 'x\n#"node_name":"client03"\n', mtime_ns=old)
    os.mkdir(os.path.join(home, "queue/agent-info/link-any"))
    cat = make(home)
    cat.tick(0.0)
    cat.handle("agent_nodes", {"rows": [["old01-any", "client02"], ["db01-any", "client02"],
                                        ["new01-10.0.0.0", "client04"]]})
    rows = [
        ["001", "web01", "10.0.0.5", "Active", "client01", NOW - 60],
        ["002", "db01", "any", "Pending", "client02", NOW - 10],
        ["004", "new01", "10.0.0.0/24", "Never connected", "client04", None],
        ["005", "old01", "any", "Disconnected", "client02", NOW - 1831],
        ["007", u'we"ird\\', "any", "Never connected", None, None],
        ["008", u"caf\xe9", "any", "Active", u"\x1b[2J\xe9vil", NOW - 60],
        ["009", "dup", "any", "Disconnected", "client03", NOW - 1831],
        ["009", "dup", "any", "Disconnected", "client03", NOW - 1831],
        ["010", "link", "any", "Never connected", None, None],
    ]
    for _ in range(2):  # the first listing after the scan and the next are the same
        answer = cat.handle("agents", {})
        assert answer.result["count"] == len(rows)
        assert agentrows.joined(answer.chunks) == \
            json.dumps(rows, separators=(",", ":")).encode("ascii")
    # cluster_control's text table asks without keepalives: null in each row, nothing else
    # changes; any other value of the argument (a peer's) gets them.
    answer = cat.handle("agents", {"keepalives": False})
    assert agentrows.joined(answer.chunks) == json.dumps(
        [row[:5] + [None] for row in rows], separators=(",", ":")).encode("ascii")
    for args in ({"keepalives": True}, {"keepalives": "no"}, {"keepalives": 0}):
        assert agentrows.joined(cat.handle("agents", args).chunks) == \
            json.dumps(rows, separators=(",", ":")).encode("ascii")


def test_files_changed_since_the_scan_show_the_node_that_sent_them(home):
    # The listing reads the sender only where no node name is known (db.agent_listing): a
    # file emptied, removed or replaced since the scan read its node name still shows the
    # node that sent it, as the join with every sender showed it.
    write(home, "etc/client.keys", "001 a any k1\n002 b any k2\n003 c any k3\n004 d any k4\n")
    for name in ("a-any", "b-any", "c-any", "d-any"):
        write(home, "queue/agent-info/" + name, 'Linux\n#"node_name":client01\n',
              mtime_ns=int((NOW - 60) * 1e9))
    cat = make(home)
    cat.tick(0.0)
    cat.handle("agent_nodes", {"rows": [[n, "client02"] for n in ("a-any", "b-any", "c-any")]})
    info = os.path.join(home, "queue/agent-info")
    write(home, "queue/agent-info/a-any", "", mtime_ns=int((NOW - 10) * 1e9))
    os.unlink(os.path.join(info, "b-any"))
    os.unlink(os.path.join(info, "c-any"))
    os.mkdir(os.path.join(info, "c-any"))
    assert cat.db.agent_file_nodes() == dict.fromkeys(["a-any", "b-any", "c-any", "d-any"],
                                                      "client01")  # no scan since
    assert [(a["status"], a["node_name"]) for a in listed_agents(cat)] == [
        ("Pending", "client02"), ("Never connected", "client02"),
        ("Never connected", "client02"), ("Active", "client01")]


def listed_agents(cat):
    answer = cat.handle("agents", {})
    return [dict(zip(agentrows.COLUMNS, row)) for row in agentrows.from_chunks(answer.chunks)]


def test_agents_are_raw_rows_streamed_in_chunks(home):
    # 100 000 agents as dicts and one JSON string of them kept +160 MB in the internal
    # daemon: the rows go out as bytes, encoded and sent a chunk at a time (localsock).
    names = ["a%04d" % i for i in range(2 * agentrows.ROWS_PER_CHUNK + 3)]
    write(home, "etc/client.keys", "".join("%04d %s any k\n" % (i + 1, n)
                                           for i, n in enumerate(names)) +
          '9999 we"ird\\ any k\n')
    cat = make(home)
    cat.tick(0.0)
    answer = cat.handle("agents", {})
    assert isinstance(answer, localsock.Chunked)
    assert answer.result == {"count": len(names) + 1, "rows_in_chunks": True,
                             "columns": list(agentrows.COLUMNS)}
    chunks = list(answer.chunks)
    assert [len(agentrows.decode_chunk(c)) for c in chunks] == \
        [agentrows.ROWS_PER_CHUNK] * 2 + [4]  # a chunk at a time, in order
    rows = json.loads(agentrows.joined(chunks).decode("utf-8"))
    assert [r[1] for r in rows] == names + ['we"ird\\']
    assert rows[0] == ["0001", "a0000", "any", "Never connected", None, None]


def test_node_names_are_read_by_the_scan_never_by_a_listing(home):
    # A listing read every agent-info file it had no node name of: 2.5-3.9 s for the first
    # listing of 100 000 agents after a start. The scan that sees the content reads it.
    path = "queue/agent-info/web01-any"
    write(home, "etc/client.keys", "001 web01 any k1\n")
    write(home, path, 'Linux web01\n#"node_name":client01\n', mtime_ns=int((NOW - 60) * 1e9))
    cat = make(home)
    cat.tick(0.0)
    assert cat.db.agent_file_nodes() == {"web01-any": "client01"}  # kept on disk, not memory
    reads = agentlist.READS[0]
    assert listed_agents(cat)[0]["node_name"] == "client01"
    assert listed_agents(cat)[0]["node_name"] == "client01"
    assert agentlist.READS[0] == reads
    # Unseen by the scanner yet: the recorded name stands (the file is not read again).
    write(home, path, 'Linux web01\n#"node_name":client02\n', mtime_ns=int((NOW - 30) * 1e9))
    assert listed_agents(cat)[0]["node_name"] == "client01"
    cat.handle("rescan", {})
    cat.tick(1.0)
    assert cat.db.agent_file_nodes() == {"web01-any": "client02"}
    assert listed_agents(cat)[0]["node_name"] == "client02"
    os.unlink(os.path.join(home, path))
    cat.handle("rescan", {})
    cat.tick(2.0)
    assert cat.db.agent_file_nodes() == {}
    assert listed_agents(cat)[0]["status"] == "Never connected"


def test_a_file_the_database_knows_no_node_of_is_read_by_one_listing(home):
    # A database from before the scan recorded node names: the first listing reads and records.
    write(home, "etc/client.keys", "001 web01 any k1\n")
    write(home, "queue/agent-info/web01-any", 'Linux\n#"node_name":client01\n',
          mtime_ns=int((NOW - 60) * 1e9))
    cat = make(home)
    cat.tick(0.0)
    cat.db.forget_agent_files(["web01-any"])
    reads = agentlist.READS[0]
    assert listed_agents(cat)[0]["node_name"] == "client01"
    assert agentlist.READS[0] == reads + 1
    assert cat.db.agent_file_nodes() == {"web01-any": "client01"}
    assert listed_agents(cat)[0]["node_name"] == "client01"
    assert agentlist.READS[0] == reads + 1


def test_client_keys_is_parsed_once_per_change(home):
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    cat.tick(0.0)
    cat.tick(1.0)
    assert not agentlist.refresh_keys(cat.db, keys)  # the tick after the scan parsed it
    assert [a["name"] for a in listed_agents(cat)] == ["web01"]
    assert not agentlist.refresh_keys(cat.db, keys)
    # Changed and not scanned yet: the listing itself sees the new fingerprint.
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k2\n")
    assert [a["name"] for a in listed_agents(cat)] == ["web01", "db01"]
    assert not agentlist.refresh_keys(cat.db, keys)
    os.unlink(keys)
    assert listed_agents(cat) == []


def test_client_keys_is_parsed_after_the_tick_that_announces_it(home):
    """At most every scan_interval, never in the tick whose event sends an append to the
    clients (issue 11: append latency; an append a second had every node parse it at once)."""
    keys = os.path.join(home, "etc/client.keys")
    parsed = lambda: cat.db.agent_keys_source() == agentlist.keys_fingerprint(keys)
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    assert cat.tick(0.0)["changed"] == ["etc/client.keys"] and not parsed()
    assert cat.tick(1.0) is None and parsed()
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k22\n")
    assert cat.tick(2.0)["changed"] == ["etc/client.keys"] and not parsed()
    assert cat.tick(3.0) is None and not parsed()      # parsed 2 s ago: not yet
    assert cat.tick(11.0) is None and parsed()
    write(home, "etc/client.keys", "001 web01 any k1\n")
    assert [a["name"] for a in listed_agents(cat)] == ["web01"]   # a listing is exact


def test_client_keys_grown_by_lines_adds_only_their_rows(home):
    # Under churn an agent is appended once a second: every node rewrote all its rows.
    keys = os.path.join(home, "etc/client.keys")
    lines = ["%03d agent%d any k%d\n" % (i, i, i) for i in range(1, 201)]
    write(home, "etc/client.keys", "".join(lines))
    cat = make(home)
    cat.tick(0.0)
    cat.tick(1.0)   # parses client.keys (the tick after the one that found it)
    rows = lambda: cat.db._conn.execute("SELECT seq, prefix FROM agent_keys ORDER BY seq"
                                        ).fetchall()
    before, changes = rows(), cat.db._conn.total_changes
    write(home, "etc/client.keys", "".join(lines) + "201 new01 any k\n202 !gone any k\n")
    assert agentlist.refresh_keys(cat.db, keys)
    assert cat.db._conn.total_changes - changes <= 3  # one row and the meta values
    assert rows() == before + [(201, u'["201","new01","any"')]
    # Anything else is parsed again: a line changed, or an old text that ended mid-line.
    for text in ("".join(lines[1:]) + "201 new01 any k\n", "001 a any k", "001 a any k\n002"
                 " b any k\n", ""):
        write(home, "etc/client.keys", text)
        assert agentlist.refresh_keys(cat.db, keys)
        names = [a["name"] for a in listed_agents(cat)]
        assert names == [line.split()[1] for line in text.splitlines()]


def test_skipped_entries_are_logged_once(home, caplog):
    os.symlink("/etc/passwd", os.path.join(home, "etc/shared/default/link"))
    cat = make(home)
    with caplog.at_level(logging.WARNING, logger="test-catalog"):
        cat.tick(0.0)
        cat.tick(10.0)
        cat.tick(20.0)
    assert len([r for r in caplog.records if "link" in r.getMessage()]) == 1


def test_mass_change_event_overflows_to_a_full_round(home):
    for i in range(3):
        write(home, "etc/shared/default/f%d" % i, "x")
    cat = make(home)
    assert cat.max_event_names is None
    cat.max_event_names = 2
    event = cat.tick(0.0)
    assert event["overflow"] is True and event["changed"] == []
    assert len(cat.db.load_files()) == 3
    write(home, "etc/shared/default/g", "y")
    assert cat.tick(1.0)["changed"] == ["etc/shared/default/g"]


def test_items_this_node_only_receives_are_passed_on_a_slower_cadence(home):
    write(home, "queue/agent-info/web01-any", "Linux")
    write(home, "etc/shared/default/agent.conf", "conf")
    cat = make(home)  # master: agent-info is foreign
    assert cat.foreign_scan_interval == catalog_mod.FOREIGN_SCAN_INTERVAL
    cat.tick(0.0)
    compat.set_mtime_ns(os.path.join(home, "queue/agent-info/web01-any"), 1600000000 * 10 ** 9)
    write(home, "etc/shared/default/agent.conf", "CONF")  # in place, same size and mtime
    event = cat.tick(10.0)
    assert event["changed"] == ["etc/shared/default/agent.conf"] and event["touched"] == []
    assert cat.timeout(10.0) == pytest.approx(1.0 / catalog_mod.HOT_CHECKS_PER_POLL)
    event = cat.tick(catalog_mod.FOREIGN_SCAN_INTERVAL)
    assert event["touched"] == ["queue/agent-info/web01-any"]


def test_client_keys_is_looked_at_between_polls(home):
    """An agent added on the master goes to the clients a fraction of a poll later, not up
    to a whole poll (issue 11: append -> every client, p50 1 s); nothing else is polled more."""
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    cat.tick(0.0)
    assert cat.tick(1.0) is None
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k22\n")
    write(home, "etc/shared/default/new", "n")   # a new file: found by the next poll
    step = 1.0 / catalog_mod.HOT_CHECKS_PER_POLL
    assert cat.timeout(1.0) == pytest.approx(step)
    assert cat.tick(1.0 + step)["changed"] == ["etc/client.keys"]
    assert cat.tick(1.0 + 2 * step) is None
    assert cat.tick(2.0)["changed"] == ["etc/shared/default/new"]


def test_a_changed_client_keys_is_announced_before_it_is_hashed(home):
    """look_hot names a client.keys whose lstat changed at once, once per change, without
    reading it; the next poll hashes and stores it (issue 11: at 20 clients under churn an
    append waited up to 1.9 s for the tick that hashed it, behind requests and passes)."""
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    cat.tick(0.0)
    assert cat.look_hot(0.1) is None                      # unchanged
    with open(keys, "ab") as handle:
        handle.write(b"002 db01 any k22\n")
    step = catalog_mod.HOT_LOOK_SECONDS
    assert cat.look_hot(0.1 + step / 2) is None           # too soon after the last look
    event = cat.look_hot(0.2)
    assert event["changed"] == ["etc/client.keys"]
    assert not (event["touched"] or event["deleted"] or event["deleted_dirs"])
    stored = dict((r[0], r[1]) for r in cat.db.load_files())
    assert stored["etc/client.keys"] == len("001 web01 any k1\n")   # not hashed nor stored
    assert cat.look_hot(0.3) is None                      # announced once
    assert cat.tick(0.3) is None                          # its hash waits for the poll
    stored = dict((r[0], r[1]) for r in cat.db.load_files())
    assert stored["etc/client.keys"] == len("001 web01 any k1\n")
    # hashed and stored by the poll, and not named again: that version went with the
    # announcement
    assert cat.tick(1.0) is None
    stored = dict((r[0], r[1]) for r in cat.db.load_files())
    assert stored["etc/client.keys"] == os.path.getsize(keys)
    assert cat.look_hot(1.1) is None
    assert cat.timeout(1.1) > 0
    with open(keys, "ab") as handle:
        handle.write(b"003 app01 any k333\n")
    assert cat.look_hot(1.2)["changed"] == ["etc/client.keys"]
    with open(keys, "ab") as handle:                      # again before the hash
        handle.write(b"004 web02 any k4444\n")
    assert cat.tick(1.3)["changed"] == ["etc/client.keys"]   # a newer one: hashed, named
    stored = dict((r[0], r[1]) for r in cat.db.load_files())
    assert stored["etc/client.keys"] == os.path.getsize(keys)


def test_an_announced_append_is_hashed_once_by_the_poll(home):
    """An append look_hot announced went to the peers already (wazuh-clusterd reads what it
    sends): the internal daemon hashes it once, at the next poll, not at the next tick and
    again at the poll because it is racy (two SHA-256 of a 9.4 MB client.keys an append, an
    append a second on a busy master). Not announced, a change is hashed by the next tick."""
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db", "cluster.db"), log)
    OPENED.append(db)
    cat = catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, poll_interval=1.0,
                              scan_interval=10.0)   # the real wall clock: racy as it is
    cat.tick(0.0)
    step = 1.0 / catalog_mod.HOT_CHECKS_PER_POLL
    for second in (0, 1, 2):   # polls at whole seconds, an append just after each
        with open(keys, "ab") as handle:
            handle.write(b"%03d agent%d any key\n" % (second + 2, second))
        hashed = cat.scanner.hashed
        assert cat.look_hot(second + 0.05)["changed"] == ["etc/client.keys"]
        for quarter in range(1, catalog_mod.HOT_CHECKS_PER_POLL):
            assert cat.tick(second + quarter * step) is None
        assert cat.scanner.hashed == hashed                 # not yet
        assert cat.tick(second + 1.0) is None               # the poll: the version announced
        assert cat.scanner.hashed == hashed + 1
        stored = dict((r[0], r[1]) for r in cat.db.load_files())
        assert stored["etc/client.keys"] == os.path.getsize(keys)
    with open(keys, "ab") as handle:   # not announced (no look): hashed by the next tick
        handle.write(b"009 agent9 any key\n")
    assert cat.tick(3.0 + step)["changed"] == ["etc/client.keys"]


def test_the_internal_loop_announces_client_keys_between_requests(home):
    """The internal daemon's loop looks at client.keys after each request it answers and
    tells its subscribers (wazuh-clusterd) before any tick hashes the file."""
    from wazuh_cluster import internal
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    cat.tick(0.0)
    clock = Clock()
    loop = internal.InternalLoop(None, cat, None, clock=clock)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        subscriber, asker = [localsock.Connection(ours) for ours, _ in pairs]
        subscriber.subscribed = True
        loop.connections = [subscriber, asker]
        with open(keys, "ab") as handle:
            handle.write(b"002 db01 any k22\n")
        pairs[1][1].sendall(localsock.encode({"id": 1, "cmd": "status", "args": {}}))
        loop.read_requests(asker)
        theirs = pairs[0][1]
        theirs.setblocking(False)
        data = theirs.recv(65536)   # sent already: nothing is waited for
        (length,) = localsock.HEADER.unpack(data[:localsock.HEADER.size])
        event = localsock.decode(data[localsock.HEADER.size:localsock.HEADER.size + length])
        assert event["event"] == "changes" and event["changed"] == ["etc/client.keys"]
        stored = dict((r[0], r[1]) for r in cat.db.load_files())
        assert stored["etc/client.keys"] == len("001 web01 any k1\n")
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_client_keys_changed_during_a_pass_is_announced_before_the_pass_ends(home):
    """A full pass over the shared folders (up to 0.7 s under load at 20 clients) looks at
    client.keys between folders and announces a change at once (Catalog.announce)."""
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    for n in range(3):
        os.makedirs(os.path.join(home, "etc/shared/group%d" % n))
        write(home, "etc/shared/group%d/agent.conf" % n, "conf %d" % n)
    clock = Clock()
    cat = make(home, clock=clock)
    cat.tick(0.0)
    announced = []
    cat.announce = announced.append
    listed = []
    real = cat.scanner._scan_dir

    def scan_dir(item, rel, *args, **kwargs):
        listed.append(rel)
        if rel.endswith("group1"):
            with open(keys, "ab") as handle:   # appended while the pass is under way
                handle.write(b"002 db01 any k22\n")
            clock.t += 1.0
        return real(item, rel, *args, **kwargs)
    cat.scanner._scan_dir = scan_dir
    cat.handle("rescan", {})
    cat.tick(20.0)
    assert [e["changed"] for e in announced] == [["etc/client.keys"]]
    assert any(rel.endswith("group2") for rel in listed)   # announced mid-pass


def test_a_client_announces_no_client_keys(home):
    """A client's client.keys is the master's to push: nothing is announced there."""
    keys = os.path.join(home, "etc/client.keys")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home, role="client", node_name="client01")
    cat.tick(0.0)
    with open(keys, "ab") as handle:
        handle.write(b"002 db01 any k22\n")
    assert cat.look_hot(0.5) is None


def test_database_errors_do_not_stop_detection(home, monkeypatch):
    cat = make(home)
    cat.tick(0.0)

    def broken(*args):
        raise dbmod.Error("disk I/O error")
    monkeypatch.setattr(cat.db, "save_files", broken)
    monkeypatch.setattr(cat.db, "pending", broken)
    write(home, "etc/shared/default/new", "n")
    assert cat.tick(1.0)["changed"] == ["etc/shared/default/new"]
    with pytest.raises(errors.RequestError) as info:
        cat.handle("pending", {"node": "x"})
    assert info.value.code == "db_error"


def test_received_items_folders_are_polled_every_scan_interval(home):
    cat = make(home)  # master: agent-info is received
    cat.tick(0.0)
    write(home, "queue/agent-info/new-any", "Linux")
    write(home, "etc/shared/default/new", "n")
    assert cat.tick(1.0)["changed"] == ["etc/shared/default/new"]
    assert cat.tick(2.0) is None
    write(home, "etc/shared/default/other", "o")
    assert cat.tick(3.0)["changed"] == ["etc/shared/default/other"]
    event = cat.tick(10.0)  # full pass of our own items; received folders were not listed
    assert event is None or "queue/agent-info/new-any" not in event["changed"]
    assert cat.tick(11.0)["changed"] == ["queue/agent-info/new-any"]


def test_a_client_made_master_by_failover_polls_the_master_items_at_once(home):
    clock = Clock()
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home, role="client", node_name="c1", clock=clock)
    cat.tick(clock())
    clock.t += 1
    cat.tick(clock())
    cat.handle("set_role", {"role": "master"})   # failover: this node now leads
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k22\n")
    clock.t += 1
    assert cat.tick(clock.t)["changed"] == ["etc/client.keys"]   # not at the next full pass
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k22\n003 x any k333\n")
    clock.t += 1
    assert cat.tick(clock.t)["changed"] == ["etc/client.keys"]   # polled like a master's
    cat.handle("set_role", {"role": "client"})
    clock.t += 1
    cat.tick(clock.t)           # the switch's own full pass
    write(home, "etc/shared/default/new", "n")
    write(home, "etc/client.keys", "001 web01 any k1\n")
    clock.t += 1
    event = cat.tick(clock.t)   # a client again: the master's items wait for a full pass
    assert event is None or "etc/client.keys" not in event["changed"]


def test_a_peer_asking_for_received_items_gets_a_fresh_view(home):
    clock = Clock()
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db/cluster.db"), log, wall=lambda: NOW)
    OPENED.append(db)
    cat = catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, role="client", node_name="c1",
                              clock=clock, wall=lambda: NOW)
    path = write(home, "etc/shared/default/agent.conf", "from master")
    cat.tick(clock())
    write(home, "etc/shared/default/agent.conf", "BY HAND  EDIT")  # in place, same mtime
    clock.t += 20
    entry = cat.handle("manifest", {"source": "master"})["files"]["etc/shared/default/agent.conf"]
    assert entry["size"] == os.path.getsize(path) == 13
    assert cat.tick(clock.t)["changed"] == ["etc/shared/default/agent.conf"]  # then pushed


def test_a_client_asking_by_names_gets_fresh_mtimes_of_its_files(home):
    clock = Clock()
    cat = make(home, clock=clock)
    name = "queue/agent-info/web01-any"
    path = write(home, name, "Linux")
    cat.tick(clock())
    keepalive = compat.stat_mtime_ns(os.stat(path)) + 60 * 10 ** 9
    compat.set_mtime_ns(path, keepalive)  # written by a client's push, not yet scanned
    clock.t += 20
    for as_data in (False, True):
        got = cat.handle("manifest", {"source": "client", "names": [name], "as_data": as_data})
        files = json.loads(got.data.decode("utf-8")) if as_data else got["files"]
        assert abs(files[name]["mtime_ns"] - keepalive) <= MTIME_SLACK_NS


def test_merge_of_change_sets():
    from wazuh_cluster.scanner import ChangeSet, merge
    a = ChangeSet(["x"], ["t"], ["y"], [])
    b = ChangeSet(["y"], [], ["x"], ["d"])
    merged = merge([a, b])
    assert merged == ChangeSet(["y"], ["t"], ["x"], ["d"])


def test_received_gives_the_hash_of_new_content_clusterd_just_wrote(home):
    from wazuh_cluster import deltarx
    write(home, "etc/client.keys", "001 a any k\n")
    cat = make(home, role="client", node_name="client01")
    cat.tick(0.0)
    write(home, "etc/client.keys", "001 a any k\n002 b any k\n")
    row = deltarx.written_row(home, "etc/client.keys", "%064x" % 5)  # proves it is not read
    assert cat.handle("received", {"rows": [row]}) == {"learned": 0, "hinted": 1}
    # A client polls what it receives every scan_interval: tick until that poll ran.
    events = [cat.tick(float(t)) for t in range(1, 13)]
    assert [e["changed"] for e in events if e] == [["etc/client.keys"]]
    assert cat.scanner.get("etc/client.keys")["sha256"] == "%064x" % 5
    for bad in ([row[:6]], [row[:6] + ["XYZ"]], [[1] + row[1:]], [row[:2] + [True] + row[3:]]):
        with pytest.raises(errors.RequestError):
            cat.handle("received", {"rows": bad})


def test_received_records_the_agents_of_the_batch_in_the_same_call(home):
    # One call per keepalive batch: the fingerprints and the agents the batch reported; a
    # bad agent row refuses the whole request before anything is taken.
    name = "queue/agent-info/web01-any"
    write(home, name, "Linux web01\n", mtime_ns=int((NOW - 30) * 1e9))
    cat = make(home)
    cat.handle("rescan", {})
    cat.tick(0.0)
    record = cat.scanner.row(name)
    compat.set_mtime_ns(os.path.join(home, name), int((NOW - 5) * 1e9))
    st = os.lstat(os.path.join(home, name))
    row = [name] + list(scanner_mod.fingerprint(st)) + [record[7]]
    for bad in ([["web01-any"]], [["web01-any", "client02", "x"]], [[1, "client02"]], "x"):
        with pytest.raises(errors.RequestError):
            cat.handle("received", {"rows": [row], "agents": bad})
        assert cat.scanner.get(name)["mtime_ns"] == int((NOW - 30) * 1e9)
    assert cat.handle("received", {"rows": [row], "agents": [
        ["web01-any", "client02", int((NOW - 5) * 1e9)]]}) == \
        {"learned": 1, "hinted": 0, "updated": 1}
    assert cat.scanner.get(name)["mtime_ns"] == int((NOW - 5) * 1e9)
    assert cat.db.agents()["web01-any"] == ("client02", int((NOW - 5) * 1e9))


def scanned_agent_infos(home, count):
    """A master's catalog that has scanned `count` agent-info files dated NOW - 30 s."""
    names = ["queue/agent-info/web%02d-any" % i for i in range(count)]
    for name in names:
        write(home, name, "Linux %s\n" % name, mtime_ns=int((NOW - 30) * 1e9))
    cat = make(home)
    cat.handle("rescan", {})
    cat.tick(0.0)
    return cat, names


def kept_alive_rows(home, cat, names):
    """"received" rows of these files touched 5 s ago: their new stat, their recorded digest."""
    rows = []
    for name in names:
        compat.set_mtime_ns(os.path.join(home, name), int((NOW - 5) * 1e9))
        st = os.lstat(os.path.join(home, name))
        rows.append([name] + list(scanner_mod.fingerprint(st)) + [cat.scanner.row(name)[7]])
    return rows


def test_received_rows_are_checked_whole_before_any_is_learned(home):
    # The rows are checked a column at a time: one bad row anywhere refuses the request and
    # no row before it is taken (a keepalive batch is 2 000 rows).
    cat, names = scanned_agent_infos(home, 3)
    rows = kept_alive_rows(home, cat, names)
    last = rows[-1]
    for bad in (last[:6] + [last[6][:63] + u"\n"],      # not 64 hex digits
                last[:6] + [last[6][:63] + u"g"],
                last[:6] + [last[6].upper()],
                last[:6] + [5],
                last[:4] + [float(last[4])] + last[5:],
                last[:5] + [False] + last[6:],
                ["etc/client.keys"] + last[1:],            # a file this master sends
                ["etc/shared/default/agent.conf"] + last[1:],
                [None] + last[1:]):
        with pytest.raises(errors.RequestError) as info:
            cat.handle("received", {"rows": rows[:-1] + [bad]})
        assert info.value.code == "bad_request"
        assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 30) * 1e9) for n in names)
    assert cat.handle("received", {"rows": rows}) == {"learned": 3, "hinted": 0}
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in names)


def packed(rows):
    """A keepalive batch's learned rows as "received" carries them (keepalive.tell)."""
    return {"names": [row[0] for row in rows], "records": binascii.b2a_base64(b"".join(
        scanner_mod.FINGERPRINT.pack(*(row[1:6] + [binascii.unhexlify(row[6])]))
        for row in rows)).decode("ascii")}


def test_received_records_learn_the_files_and_record_their_node_as_each_agents_reporter(home):
    # A keepalive batch's files travel as names and packed fingerprint records (no JSON
    # value per number); with "node", each agent-info file among them is that node's
    # report with its record's mtime (no second list of agent rows). Checked whole first.
    cat, names = scanned_agent_infos(home, 3)
    rows = kept_alive_rows(home, cat, names)
    request = dict(packed(rows), node="client02")
    for bad in (dict(request, records=request["records"][:-8] + "\n"),   # records cut short
                dict(request, records=[request["records"]]),
                dict(request, names=names[:2]),
                dict(request, names=names[:2] + [7]),
                dict(request, names=names[:2] + ["etc/client.keys"]),   # a file we send
                dict(request, node=5)):
        with pytest.raises(errors.RequestError) as info:
            cat.handle("received", bad)
        assert info.value.code == "bad_request"
        assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 30) * 1e9) for n in names)
    assert cat.handle("received", request) == {"learned": 3, "hinted": 0, "updated": 3}
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in names)
    assert cat.db.agents() == dict((n.rpartition("/")[2], ("client02", int((NOW - 5) * 1e9)))
                                   for n in names)
    # A record of other content is not learned (hinted: the next check hashes the file).
    other = [rows[0][:6] + ["ab" * 32]]
    assert cat.handle("received", packed(other)) == {"learned": 0, "hinted": 1}


class Wire(object):
    """wazuh-clusterd's link to this catalog, each request and answer through JSON as the
    socket carries them (localsock), recorded; `refuse_tickets`: an internal daemon of
    before tickets (it answers none and refuses a "received" that has no names)."""

    def __init__(self, cat, refuse_tickets=False):
        self.cat, self.refuse_tickets, self.calls = cat, refuse_tickets, []

    def call(self, cmd, args):
        return self.call_data(cmd, args)[0]

    def call_data(self, cmd, args):
        request = localsock.decode(localsock.encode({"id": 1, "cmd": cmd, "args": args})[4:])
        self.calls.append((cmd, request["args"]))
        if self.refuse_tickets and "ticket" in request["args"]:
            raise errors.RequestError("'records' must be base64 of one fingerprint record "
                                      "per name", "bad_request")
        result = self.cat.handle(cmd, request["args"])
        data = None
        if isinstance(result, localsock.WithData):
            result, data = result.result, result.data
            if self.refuse_tickets:
                result.pop("ticket", None)
        return localsock.decode(localsock.encode(result)[4:]), data


def kept_alive_batch(home, cat, names):
    """A keepalive batch of these files as wazuh-clusterd applies it: the meta-only updates
    (receive.Incoming) and the learned rows (Receiver.apply_batch) of kept_alive_rows."""
    from wazuh_cluster.receive import Incoming
    rows = kept_alive_rows(home, cat, names)
    incoming = [Incoming(row[0], None, row[6], row[2], True) for row in rows]
    learned = [(row[0], scanner_mod.FINGERPRINT.pack(*(row[1:6] + [binascii.unhexlify(
        row[6])]))) for row in rows]
    return incoming, learned


@pytest.mark.parametrize("older", [False, True])
def test_received_refers_to_the_names_asked_by_their_ticket(home, older):
    # A keepalive batch's "received" names its files by the ticket of the "fingerprints"
    # request before it and their indexes there: no name travels or is parsed twice. An
    # internal daemon of before answers no ticket: the names are sent as before.
    from wazuh_cluster import keepalive
    cat, names = scanned_agent_infos(home, 5)
    wire = Wire(cat, refuse_tickets=older)
    incoming, learned = kept_alive_batch(home, cat, names)
    known = keepalive.records(wire, incoming)
    assert sorted(known) == names
    learned = learned[3:] + learned[:3]        # in the batch's order, not the asked one
    keepalive.tell(wire, learned[1:], [], "client02", known)   # one file not touched here
    (_cmd, asked), (cmd, told) = wire.calls
    assert cmd == "received" and told["node"] == "client02"
    if older:
        assert "ticket" not in told and told["names"] == [row[0] for row in learned[1:]]
    else:
        assert "names" not in told and [asked["names"][i] for i in told["at"]] == \
            [row[0] for row in learned[1:]]
    learned_names = [row[0] for row in learned[1:]]
    for name in names:
        assert cat.scanner.get(name)["mtime_ns"] == int(
            (NOW - (5 if name in learned_names else 30)) * 1e9)
    assert cat.db.agents() == dict((n.rpartition("/")[2], ("client02", int((NOW - 5) * 1e9)))
                                   for n in learned_names)
    # A batch that learned nothing but has agent rows to tell gives its ticket back.
    known = keepalive.records(wire, incoming)
    assert older or known.ticket in cat._asked
    keepalive.tell(wire, [], [[learned[0][0].rpartition("/")[2], "client03", int(NOW * 1e9)]],
                   "client03", known)
    told = wire.calls[-1][1]
    assert ("ticket" in told) is not older and "node" not in told and "names" not in told
    # (a wazuh-clusterd of before takes no ticket: its names stay until later ones come)
    assert len(cat._asked) == (2 if older else 0)
    assert cat.db.agents()[learned[0][0].rpartition("/")[2]] == ("client03", int(NOW * 1e9))


@pytest.mark.parametrize("skip", [0, 1])
def test_a_tickets_received_learns_the_very_names_its_fingerprints_looked_up(home, skip):
    # The names a ticket keeps are the objects the "fingerprints" answer looked up (their
    # hashes computed), handed to learn_records as they are, not text decoded again: each
    # lookup of a keepalive's name costs its hash and a compare with the stored key.
    from wazuh_cluster import keepalive
    cat, names = scanned_agent_infos(home, 4)
    looked, learned = [], []
    fingerprints, learn_records = cat.scanner.fingerprints, cat.scanner.learn_records

    def spy_fingerprints(names):
        looked.extend(names)
        return fingerprints(names)

    def spy_learn_records(names, data, folder=None, replaced=None):
        learned.extend(names)
        return learn_records(names, data, folder, replaced)
    cat.scanner.fingerprints, cat.scanner.learn_records = spy_fingerprints, spy_learn_records
    wire = Wire(cat)
    incoming, rows = kept_alive_batch(home, cat, names)
    known = keepalive.records(wire, incoming)
    keepalive.tell(wire, rows[skip:], [], "client02", known)
    assert "ticket" in wire.calls[-1][1]
    assert learned == names[skip:] and all(a is b for a, b in zip(learned, looked[skip:]))
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in names[skip:])


def test_a_ticket_is_taken_once_and_a_mismatched_reference_is_refused_whole(home):
    # Nothing of a "received" whose ticket is unknown (an earlier run of the daemon, taken
    # already, dropped) or that does not match its names is taken; its sender then sends
    # the names (keepalive.tell).
    cat, names = scanned_agent_infos(home, 3)
    rows = kept_alive_rows(home, cat, names)
    request = dict(packed(rows), of=3, at=[0, 1, 2], node="client02")
    del request["names"]
    other = catalog_mod.Catalog(home, ITEMS, EXCLUDE, cat.db, cat.log, role="master",
                                node_name="master01", wall=lambda: NOW)
    assert other._next_ticket != cat._next_ticket    # drawn: another run's are not its own
    for bad in (lambda t: dict(request, ticket=t + 1000),
                lambda t: dict(request, ticket=str(t)),
                lambda t: dict(request, ticket=float(t)),
                lambda t: dict(request, ticket=None),
                lambda t: dict(request, ticket=t, of=2),
                lambda t: dict(request, ticket=t, of=True),
                lambda t: dict(request, ticket=t, at=[0, 1, 3]),
                lambda t: dict(request, ticket=t, at=[0, 1, -1]),
                lambda t: dict(request, ticket=t, at=[0, 1, 1]),
                lambda t: dict(request, ticket=t, at=[0, 1, True]),
                lambda t: dict(request, ticket=t, at=[0, 1, 2.0]),
                lambda t: dict(request, ticket=t, at=[0, 1]),
                lambda t: dict(request, ticket=t, at="012"),
                lambda t: dict(request, ticket=t, names=names)):
        ticket = cat.handle("fingerprints", {"names": names}).result["ticket"]
        with pytest.raises(errors.RequestError) as info:
            cat.handle("received", bad(ticket))
        assert info.value.code == "bad_request"
        assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 30) * 1e9) for n in names)
        assert cat.db.agents() == {}
        with pytest.raises(errors.RequestError):    # another run's daemon knows none
            other.handle("received", dict(request, ticket=ticket))
        cat._asked.pop(ticket, None)
    ticket = cat.handle("fingerprints", {"names": names}).result["ticket"]
    assert cat.handle("received", dict(request, ticket=ticket, at=[2, 0, 1], records=packed(
        [rows[2], rows[0], rows[1]])["records"])) == {"learned": 3, "hinted": 0, "updated": 3}
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in names)
    with pytest.raises(errors.RequestError) as info:   # taken once
        cat.handle("received", dict(request, ticket=ticket))
    assert info.value.code == "bad_request"


def test_a_refused_reference_takes_its_ticket(home):
    cat, names = scanned_agent_infos(home, 3)
    request = dict(packed(kept_alive_rows(home, cat, names)), of=3, at=[0, 1, 2])
    del request["names"]
    ticket = cat.handle("fingerprints", {"names": names}).result["ticket"]
    with pytest.raises(errors.RequestError):
        cat.handle("received", dict(request, ticket=ticket, at=[0, 1, 1]))
    with pytest.raises(errors.RequestError):
        cat.handle("received", dict(request, ticket=ticket))
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 30) * 1e9) for n in names)


def test_only_the_latest_fingerprints_requests_are_kept_for_a_ticket(home):
    from wazuh_cluster import keepalive
    cat, names = scanned_agent_infos(home, 2)
    wire = Wire(cat)
    incoming, learned = kept_alive_batch(home, cat, names)
    known = keepalive.records(wire, incoming)
    tickets = [cat.handle("fingerprints", {"names": names}).result["ticket"]
               for _ in range(catalog_mod.ASKED_KEPT)]
    assert len(cat._asked) == catalog_mod.ASKED_KEPT and known.ticket not in cat._asked
    keepalive.tell(wire, learned, [], "client02", known)  # refused, then told by its names
    assert [cmd for cmd, _args in wire.calls] == ["fingerprints", "received", "received"]
    assert "ticket" in wire.calls[1][1] and wire.calls[2][1]["names"] == names
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in names)
    assert sorted(cat.db.agents()) == [n.rpartition("/")[2] for n in names]
    assert sorted(cat._asked) == sorted(tickets)
    # and the names' text they hold is bounded too (a request may ask about 16 384 names)
    many = [u"queue/agent-info/%s-%05d" % ("a" * 100, i)
            for i in range(catalog_mod.MAX_FINGERPRINT_NAMES)]
    tickets = [cat.handle("fingerprints", {"names": many}).result["ticket"] for _ in range(4)]
    # as many of the latest as their names' str objects fit (~2.7 MB each on 3.x, three times
    # that as 2.7's unicode: 4 bytes a character)
    each = sum(_held_bytes(name) for name in many)
    assert 2.5e6 < each * (1 if sys.version_info[0] > 2 else 0.3) < 3e6
    fit = min(4, catalog_mod.ASKED_BYTES // each)
    assert sorted(cat._asked) == sorted(tickets[4 - fit:])
    assert cat._asked_bytes == sum(kept[2] for kept in cat._asked.values()) <= \
        catalog_mod.ASKED_BYTES


def test_an_abandoned_batch_or_a_restart_never_applies_other_names_nor_holds_more(home):
    # wazuh-clusterd's session dropped between a batch's "fingerprints" and its "received",
    # its link reconnecting meanwhile, the internal daemon restarting: a ticket refers to
    # the names it was drawn for or to none (the sender then sends the names), and those
    # never told hold no more than the last ASKED_KEPT (and ASKED_BYTES) do.
    from wazuh_cluster import keepalive
    cat, names = scanned_agent_infos(home, 4)
    first, second = names[:2], names[2:]
    incoming, learned = kept_alive_batch(home, cat, names)
    abandoned = keepalive.records(Wire(cat), incoming[:2])        # its session dropped
    wire = Wire(cat)                                               # the link reconnected
    known = keepalive.records(wire, incoming[2:])
    keepalive.tell(wire, learned[2:], [], "client02", known)
    assert "names" not in wire.calls[-1][1]                        # by its own ticket
    assert sorted(cat.db.agents()) == [n.rpartition("/")[2] for n in second]
    assert all(cat.scanner.get(n)["mtime_ns"] == int((NOW - 30) * 1e9) for n in first)
    assert list(cat._asked) == [abandoned.ticket]                  # waits for its turn
    for _ in range(catalog_mod.ASKED_KEPT):                        # other batches, abandoned
        cat.handle("fingerprints", {"names": second})
    assert len(cat._asked) == catalog_mod.ASKED_KEPT and abandoned.ticket not in cat._asked
    assert cat._asked_bytes == sum(kept[2] for kept in cat._asked.values())
    # The internal daemon restarted, and by chance drew the abandoned ticket for the same
    # number of other names: a late "received" of the abandoned batch then names them.
    restarted = catalog_mod.Catalog(home, ITEMS, EXCLUDE, cat.db, cat.log, role="master",
                                    node_name="master01", wall=lambda: NOW)
    restarted.handle("rescan", {})
    restarted.tick(0.0)
    restarted._next_ticket = abandoned.ticket
    assert restarted.handle("fingerprints", {"names": second}).result["ticket"] == \
        abandoned.ticket
    request = keepalive._by_ticket(learned[:2], [], None, abandoned)
    before = [restarted.scanner.row(n) for n in second]
    # Not one record is taken for another file: a record names its inode and ctime
    # (Scanner.learn_records), so no content is proven for the wrong name
    assert restarted.handle("received", request) == {"learned": 0, "hinted": 2}
    assert [restarted.scanner.row(n) for n in second] == before
    late = Wire(restarted)
    # ... and without that one-in-2**52 draw the ticket is unknown: the names are sent
    restarted._asked.clear()
    keepalive.tell(late, learned[:2], [], "client03", abandoned)
    assert late.calls[-1][1]["names"] == first
    assert all(restarted.scanner.get(n)["mtime_ns"] == int((NOW - 5) * 1e9) for n in first)


def test_the_mtimes_of_received_records_keep_no_format_per_batch_size(home):
    # The agent rows of a "received" batch take their mtimes by one struct call of a
    # format as long as the batch: struct's module cache kept one compiled format per
    # batch size seen (100 of them; batches of 1 901 to 2 000 names held 8.6 MB on 3.13).
    tracemalloc = pytest.importorskip("tracemalloc")
    import struct
    cat = make(home)
    info = "queue/agent-info/"
    names = [u"%sagent%05d-any" % (info, i) for i in range(2000)]
    data = b"".join(scanner_mod.FINGERPRINT.pack(1, 7 + i, 3, 4, 0o100640, b"\0" * 32)
                    for i in range(2000))
    struct._clearcache()
    tracemalloc.start()
    try:
        for size in range(1901, 2001):
            rows = cat._reported(names[:size], data[:size * scanner_mod.FINGERPRINT.size],
                                 "client02")
            assert rows[-1] == (names[size - 1][len(info):], "client02", 7 + size - 1)
        del rows
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < 1 << 20, kept


def test_agent_rows_are_written_by_the_tick_a_second_later_and_read_at_once(home):
    # 10 000 keepalives a second come as five batches: their agent rows are held and
    # written together by the tick AGENT_ROWS_DELAY later (the select() wakes for it);
    # anything reading the agents table meanwhile (a client's summary) sees them first.
    clock = Clock()
    cat = make(home, clock=clock)
    cat.tick(clock())
    stored = lambda: cat.db._conn.execute("SELECT name, node FROM agents").fetchall()
    clock.t += 0.3
    assert cat.handle("agent_nodes", {"rows": [["a-any", "client02"]]}) == {"updated": 1}
    assert stored() == []
    clock.t += dbmod.AGENT_ROWS_DELAY - 0.05
    cat.tick(clock())
    assert stored() == []
    assert cat.timeout(clock()) == pytest.approx(0.05)   # before the next look at client.keys
    clock.t += 0.05
    assert cat.timeout(clock()) == 0.0
    cat.tick(clock())
    assert stored() == [("a-any", "client02")]
    cat.handle("agent_nodes", {"rows": [["b-any", "client03"]]})
    assert cat.db.agent_names("client03") == ["b-any"]
    assert sorted(stored()) == [("a-any", "client02"), ("b-any", "client03")]


def test_received_rows_of_an_item_this_node_sends_are_refused_behind_an_item_path(home):
    # "received" looks the items up once per folder; an item's own path (a file item in a
    # folder another item covers) must not answer for the rest of its folder.
    from wazuh_cluster.config import Item
    items = [Item("etc", "etc", "dir", "master", False, 0o640, 0o750, False, False, False),
             Item("keys", "etc/client.keys", "file", "client", False, 0o640, 0o750, False,
                  False, False)]
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db", "cluster.db"), log, wall=lambda: NOW)
    OPENED.append(db)
    cat = catalog_mod.Catalog(home, items, EXCLUDE, db, log, role="master",
                              node_name="master01", wall=lambda: NOW)
    rows = []
    for name in ("etc/client.keys", "etc/foo"):
        st = os.lstat(write(home, name, "x"))
        rows.append([name] + list(scanner_mod.fingerprint(st)) + [u"0" * 64])
    with pytest.raises(errors.RequestError) as info:
        cat.handle("received", {"rows": rows})
    assert info.value.code == "bad_request"


def test_learn_rows_takes_what_it_can_and_returns_the_rest(home):
    cat, names = scanned_agent_infos(home, 3)
    scan = cat.scanner
    rows, digests = [], []
    for name in names:
        st = os.lstat(os.path.join(home, name))
        fp = scanner_mod.fingerprint(st)
        rows.append([name, fp[0], fp[1] + 10, fp[2], fp[3] + 1, fp[4]])
        digests.append(binascii.unhexlify(scan.get(name)["sha256"]))
    rows[1][4] -= 2            # an older ctime than recorded: an older look
    digests[2] = b"\0" * 32    # another content than recorded
    rows.append(["queue/agent-info/none-any"] + rows[0][1:])
    digests.append(digests[0])
    assert scan.learn_rows(rows, digests) == rows[1:]
    assert scan.get(names[0])["mtime_ns"] == rows[0][2]
    assert [scan.get(n)["mtime_ns"] for n in names[1:]] == [int((NOW - 30) * 1e9)] * 2


def test_fingerprints_vouch_only_for_settled_records(home):
    # The receiver stamps a keepalive's mtime without reading the file when this answer
    # proves the content: a record taken in the clock tick of the file's last write proves
    # nothing until it is hashed again RACY_NS later.
    name = "queue/agent-info/web01-any"
    path = write(home, name, "Linux web01", mtime_ns=None)
    st = os.stat(path)
    now = [max(compat.stat_mtime_ns(st), compat.stat_ctime_ns(st)) / 1e9]
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db/cluster.db"), log, wall=lambda: NOW)
    OPENED.append(db)
    cat = catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, role="master",
                              node_name="master01", wall=lambda: now[0])
    cat.tick(0.0)
    answer = cat.handle("fingerprints", {"names": [name, "queue/agent-info/none-any"]})
    assert answer.result["count"] == 2 and type(answer.result["ticket"]) in compat.integer_types
    assert answer.data == scanner_mod.NO_FINGERPRINT * 2
    now[0] += 2.5
    cat.tick(1.0)  # the poll that settles it
    answer = cat.handle("fingerprints", {"names": ["queue/agent-info/none-any", name]})
    assert answer.data[:scanner_mod.FINGERPRINT.size] == scanner_mod.NO_FINGERPRINT
    record = scanner_mod.FINGERPRINT.unpack(answer.data[scanner_mod.FINGERPRINT.size:])
    st = os.lstat(path)
    assert record == tuple(scanner_mod.fingerprint(st)) + (
        binascii.unhexlify(cat.scanner.get(name)["sha256"]),)
    for bad in ([1], "x", [[name]], [""] * (catalog_mod.MAX_FINGERPRINT_NAMES + 1)):
        with pytest.raises(errors.RequestError):
            cat.handle("fingerprints", {"names": bad})
    assert len(cat.handle("fingerprints", {"names": [""] * catalog_mod.MAX_FINGERPRINT_NAMES})
               .data) == catalog_mod.MAX_FINGERPRINT_NAMES * scanner_mod.FINGERPRINT.size


class TickingClock(object):
    """Monotonic time that moves on by `step` at every look (hashing takes time)."""

    def __init__(self, step):
        self.t, self.step = 100.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def drain_ticks(cat, now, limit=100):
    """Tick while the catalog says work is due at once; the events' changed names."""
    changed = []
    for _ in range(limit):
        if cat.timeout(now) != 0.0:
            return changed
        event = cat.tick(now)
        changed.extend(event["changed"] if event else ())
    raise AssertionError("still due after %d ticks" % limit)


def with_new_files(home, pattern, count):
    """A master's catalog after its first tick, whose clock moves on by a hundredth of a
    HASH_SLICE at every look (~100 files hashed per slice), and `count` files written since
    (names from `pattern`): (catalog, names)."""
    cat = make(home, clock=TickingClock(catalog_mod.HASH_SLICE / 100))
    cat.tick(0.0)
    names = [pattern % i for i in range(count)]
    for name in names:
        write(home, name, "data")
    return cat, names


def test_received_files_are_hashed_in_slices_and_client_keys_is_seen_between(home):
    """A master polling its agent-info folder after a first sync found tens of thousands of
    new files and hashed them in one tick of its internal daemon: 6-9 s at 100 000 agents,
    during which no client.keys append was seen and no push's outcome recorded (issue 11:
    the append p99). They are hashed HASH_SLICE at a time; client.keys is looked at first
    in every tick meanwhile, and every file is still reported once."""
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat, names = with_new_files(home, "queue/agent-info/agent%04d-any", 600)
    cat.tick(10.0)                          # our own items' full pass
    first = cat.tick(11.0)["changed"]       # the received folders' poll: one slice
    assert 0 < len(first) < len(names) / 2
    assert cat.timeout(11.0) == 0.0         # the rest follows at once, a slice a tick
    write(home, "etc/client.keys", "001 web01 any k1\n002 db01 any k22\n")
    event = cat.tick(11.0)
    assert "etc/client.keys" in event["changed"]
    assert 0 < len(event["changed"]) - 1 < len(names) / 2
    rest = drain_ticks(cat, 11.0)
    reported = first + event["changed"] + rest
    assert sorted(reported) == sorted(names + ["etc/client.keys"])   # each one once
    assert len(cat.db.load_files()) == len(names) + 1
    assert cat.timeout(11.0) > 0


def test_an_emptied_backlog_costs_the_polls_nothing(home):
    """Files left for later (a master's first sync: 100 000 agent-info files) fill a set
    whose table stays that large once they are hashed: every poll walked its empty slots
    (~1 ms a second at 100 000, most of an idle master's CPU between full passes). Once the
    backlog is empty, the polls no longer walk it and its memory is given back."""
    cat, names = with_new_files(home, "queue/agent-info/agent%04d-any", 3000)
    cat.tick(10.0)
    cat.tick(11.0)
    assert cat.scanner.backlog() > len(names) / 2
    drain_ticks(cat, 11.0, limit=1000)
    assert cat.scanner.backlog() == 0
    walks = []

    class Watched(set):
        def __iter__(self):
            walks.append(len(self))
            return set.__iter__(self)
    cat.scanner._deferred = Watched(cat.scanner._deferred)
    cat.tick(12.0)                          # a poll of our own items: nothing waits
    assert walks == []
    assert sys.getsizeof(cat.scanner._deferred) == sys.getsizeof(set())


def test_files_this_node_sends_are_never_left_for_later(home):
    """A file missing from a master's manifest would be deleted on its clients by a round:
    its own items are hashed in the pass that finds them, however long it takes."""
    cat, names = with_new_files(home, "etc/shared/default/f%04d", 400)
    assert sorted(cat.tick(1.0)["changed"]) == names
    assert cat.timeout(1.0) > 0


def test_a_peers_round_sees_received_files_not_hashed_yet(home):
    """A round compares with our copy of the peer's files: the files a sliced pass left are
    in it (the on-demand pass hashes them), not reported missing."""
    cat, names = with_new_files(home, "queue/agent-info/agent%04d-any", 400)
    cat.tick(10.0)
    cat.tick(11.0)
    assert cat.timeout(11.0) == 0.0
    waiting = [n for n in names if n not in dict((r[0], r) for r in cat.db.load_files())]
    assert len(waiting) > len(names) / 2
    asked = cat.handle("manifest", {"source": "client", "names": waiting[:3]})["files"]
    assert sorted(asked) == waiting[:3]
    assert sorted(cat.handle("manifest", {"source": "client"})["files"]) == names


def test_an_announced_client_keys_pushed_before_its_hash_does_not_stay_pending(home):
    """look_hot announces client.keys before it is hashed: wazuh-clusterd pushes it and its
    states rows may be written before the tick that hashes it (that tick may come after
    requests: a pass that announced it in between, a poll/4 later). The tick's pending rows
    must not then overwrite the "synchronized" of the push: the tick's event leaves the file
    out, so no later push writes it again, and the row says pending until the next round."""
    write(home, "etc/client.keys", "001 web01 any k1\n")
    cat = make(home)
    cat.tick(0.0)
    cat.handle("peer_seen", {"name": "client01", "role": "client", "address": "127.0.0.2",
                             "version": "1.0"})
    with open(os.path.join(home, "etc/client.keys"), "ab") as handle:
        handle.write(b"002 db01 any k22\n")
    assert cat.look_hot(0.2)["changed"] == ["etc/client.keys"]
    # wazuh-clusterd's push of the announced version, its states rows in before the hash
    cat.handle("set_states", {"rows": [["client01", "etc/client.keys", "synchronized"]]})
    assert cat.tick(0.3) is None            # hashed: the version announced, not named again
    assert cat.handle("pending", {"node": "client01"})["files"] == []


def _held_bytes(value):
    """Memory of a value and of what the lists and tuples in it hold (sys.getsizeof)."""
    size = sys.getsizeof(value)
    if isinstance(value, (list, tuple)):
        size += sum(_held_bytes(item) for item in value)
    return size


def test_the_names_kept_for_tickets_stay_within_their_bytes_in_memory(home):
    # ASKED_BYTES bounds what a hostile or buggy local client can make the internal daemon
    # keep. The names were counted a byte a character and 50 a name: a text's character
    # takes 4 bytes on 2.7 (UCS-4) and, beyond U+FFFF, on 3.x; 20 requests of 1 000 such
    # names of 200 characters (800 KB of JSON each) held ~17.5 MB for a bound of 6 MB.
    cat = make(home)
    names = [u"queue/agent-info/%04d-%s" % (i, u"\U0001F600" * 200) for i in range(1000)]
    wire = json.dumps({"names": names}, ensure_ascii=False).encode("utf-8")
    assert len(wire) < localsock.MAX_MESSAGE
    for _ in range(catalog_mod.ASKED_KEPT):
        cat.handle("fingerprints", json.loads(wire.decode("utf-8")))
    assert cat._asked
    assert sum(_held_bytes(kept) for kept in cat._asked.values()) <= catalog_mod.ASKED_BYTES


def test_names_that_cannot_be_kept_whole_get_no_ticket(home):
    # The folder of a ticket's names is seen in their text with a NUL between them
    # (_one_folder): a name with a NUL gets no ticket, and its sender sends the names
    # (keepalive.tell).
    cat = make(home)
    answer = cat.handle("fingerprints", {"names": [u"queue/agent-info/a\0b", u"queue/c"]})
    assert answer.result["count"] == 2 and "ticket" not in answer.result
    assert not cat._asked and cat._asked_bytes == 0
    # a lone surrogate (no UTF-8 has it): the same name back
    names = [u"queue/agent-info/a", u"queue/agent-info/\udc80"]
    answer = cat.handle("fingerprints", {"names": names})
    assert answer.result["count"] == 2
    assert cat._asked_names({"ticket": answer.result["ticket"], "of": 2,
                             "at": [1, 0]}) == (names[::-1], u"queue/agent-info")
    assert not cat._asked and cat._asked_bytes == 0
    names = [u"", u"queue/agent-info/\u00e9", u""]
    ticket = cat.handle("fingerprints", {"names": names}).result["ticket"]
    assert cat._asked_names({"ticket": ticket, "of": 3, "at": [2, 1, 0]}) == (names[::-1],
                                                                              None)


def test_the_folder_a_tickets_names_are_all_in_is_seen_once_and_exactly():
    # A keepalive batch's names are all directly in the agent-info folder: seen once when
    # its ticket is kept (three C calls over the joined text), and its "received" does not
    # look again at each name. Exactly: one name deeper or elsewhere, and there is none.
    def one(names):
        return catalog_mod._one_folder(u"\0".join(names), names)
    assert one([u"queue/agent-info/a", u"queue/agent-info/b"]) == u"queue/agent-info"
    assert one([u"queue/agent-info/a"]) == u"queue/agent-info"
    for names in ([u"queue/agent-info/a", u"queue/agent-info/x/b"],   # one deeper
                  [u"queue/agent-info/x/b", u"queue/agent-info/a"],
                  [u"queue/agent-info/a", u"queue/agent-infox/b"],    # a sibling's start
                  [u"queue/agent-info/a", u"queue/agent-info"],
                  [u"queue/agent-info/a", u"etc/client.keys"],
                  [u"a", u"b"]):                                      # no folder
        assert one(names) is None, names


def test_a_ticket_of_names_all_in_a_folder_this_node_sends_is_refused(home):
    # The folder a ticket's names are all in answers for all of them (_any_sent_by_us): a
    # master refuses a "received" of its own shared files by ticket as by names, and takes
    # nothing of it.
    names = ["etc/shared/default/f%d.txt" % i for i in range(3)]
    for name in names:
        write(home, name, "shared %s\n" % name, mtime_ns=int((NOW - 30) * 1e9))
    cat = make(home)
    cat.handle("rescan", {})
    cat.tick(0.0)
    before = [cat.scanner.get(name) for name in names]
    answer = cat.handle("fingerprints", {"names": names})
    records = binascii.b2a_base64(answer.data).decode("ascii")
    with pytest.raises(errors.RequestError) as info:
        cat.handle("received", {"ticket": answer.result["ticket"], "of": 3, "at": [0, 1, 2],
                                "records": records, "node": "client02"})
    assert info.value.code == "bad_request"
    assert [cat.scanner.get(name) for name in names] == before and not cat.db.agents()


def hinting(home, role="master"):
    """A catalog on a wall clock the test sets, and client.keys scanned by its first pass."""
    write(home, "etc/client.keys", "001 web01 any k1\n")
    log = logging.getLogger("test-catalog")
    db = dbmod.ClusterDB(os.path.join(home, "var/db", "cluster.db"), log)
    OPENED.append(db)
    wall = [time.time() + 10]
    cat = catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, role=role, poll_interval=1.0,
                              scan_interval=10.0, wall=lambda: wall[0])
    cat.tick(0.0)
    return cat, wall


def appended(home, line=b"002 web02 any k2\n"):
    """Append to client.keys: (its fingerprint now as a list, when it changed in ns)."""
    path = os.path.join(home, "etc/client.keys")
    with open(path, "ab") as handle:
        handle.write(line)
    st = os.lstat(path)
    fp = list(scanner_mod.fingerprint(st))
    return fp, max(fp[1], fp[3])


FAKE = "%064x" % 0xabcdef   # no file has it: a record with it was taken from the hint, not read


def test_a_hash_clusterd_told_is_recorded_without_reading_client_keys(home):
    """wazuh-clusterd read and hashed the append it pushed: the poll records that checksum
    (9.4 MB not hashed again, an append a second) while the lstat is exactly the one it
    read, settled (its change more than RACY_NS before the read)."""
    cat, wall = hinting(home)
    fp, changed = appended(home)
    wall[0] = changed / 1e9 + 5
    hashed = cat.scanner.hashed
    assert cat.handle("hashed", {"name": "etc/client.keys", "fingerprint": fp, "sha256": FAKE,
                                 "hashed_at": changed + 3 * scanner_mod.RACY_NS // 2}) == \
        {"taken": True}
    assert cat.tick(1.0)["changed"] == ["etc/client.keys"]
    assert cat.scanner.hashed == hashed
    assert cat.scanner.get("etc/client.keys")["sha256"] == FAKE
    assert cat.handle("status", {})["hot_hinted"] == 1
    assert not cat.scanner.is_racy("etc/client.keys")
    assert cat.tick(2.0) is None and cat.scanner.hashed == hashed   # settled: not read


def test_a_hash_told_of_another_fingerprint_is_not_taken(home):
    """Rewritten after wazuh-clusterd read it (same size, another mtime): hashed as before."""
    cat, wall = hinting(home)
    fp, changed = appended(home)
    wall[0] = changed / 1e9 + 5
    cat.handle("hashed", {"name": "etc/client.keys", "fingerprint": fp, "sha256": FAKE,
                          "hashed_at": changed + 3 * scanner_mod.RACY_NS // 2})
    path = os.path.join(home, "etc/client.keys")
    with open(path, "r+b") as handle:
        handle.write(b"009")
    os.utime(path, (1, 1))
    assert os.path.getsize(path) == fp[0]
    hashed = cat.scanner.hashed
    assert cat.tick(1.0)["changed"] == ["etc/client.keys"]
    assert cat.scanner.hashed == hashed + 1
    with open(path, "rb") as handle:
        assert cat.scanner.get("etc/client.keys")["sha256"] == \
            compat.sha256(handle.read()).hexdigest()


def test_a_racy_hash_told_is_read_again_at_the_next_poll(home):
    """Read by wazuh-clusterd in the clock tick of the append (as under churn), a rewrite of
    the same size in that tick after its read would keep the fingerprint: the record it
    gave is racy, as one this scanner took then would be, and the next poll reads the file
    (a hot racy file is hashed at every poll until it settles)."""
    cat, wall = hinting(home)
    fp, changed = appended(home)
    wall[0] = changed / 1e9 + 0.5
    cat.handle("hashed", {"name": "etc/client.keys", "fingerprint": fp, "sha256": FAKE,
                          "hashed_at": changed + 1000})
    hashed = cat.scanner.hashed
    assert cat.tick(1.0)["changed"] == ["etc/client.keys"]
    assert cat.scanner.hashed == hashed and cat.scanner.is_racy("etc/client.keys")
    assert cat.tick(2.0)["changed"] == ["etc/client.keys"]   # the real content differs
    assert cat.scanner.hashed == hashed + 1
    assert cat.scanner.get("etc/client.keys")["sha256"] != FAKE


def test_a_hash_told_of_a_file_this_node_does_not_send_is_not_taken(home, caplog):
    cat, wall = hinting(home, role="client")   # a client receives client.keys
    fp, changed = appended(home)
    wall[0] = changed / 1e9 + 5
    args = {"name": "etc/client.keys", "fingerprint": fp, "sha256": FAKE,
            "hashed_at": changed + 3 * scanner_mod.RACY_NS // 2}
    assert cat.handle("hashed", args) == {"taken": False}
    master, wall = hinting(home)
    for name in ("etc/shared/default/agent.conf", "etc/client.keys/", "etc/../etc/client.keys"):
        assert master.handle("hashed", dict(args, name=name)) == {"taken": False}
    assert master.handle("hashed", dict(args, hashed_at=int(wall[0] * 1e9) + 10 ** 9)) == \
        {"taken": False}   # "read" later than now
    caplog.clear()
    for bad in (dict(args, fingerprint=fp[:4]), dict(args, fingerprint=fp[:4] + [True]),
                dict(args, sha256=FAKE.upper()), dict(args, sha256=FAKE[1:]),
                dict(args, hashed_at=None), dict(args, name=5)):
        with pytest.raises(errors.RequestError):
            master.handle("hashed", bad)
    assert len([r for r in caplog.records if "malformed 'hashed'" in r.getMessage()]) == 6
