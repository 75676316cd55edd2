"""Cluster database: schema, migrations, corrupt files moved aside, queries."""
from __future__ import absolute_import, division, print_function

import glob
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile

import pytest

from wazuh_cluster import compat, db as dbmod


class ListLog(object):
    """Just enough of a logger to assert on what was said."""

    def __init__(self):
        self.lines = []

    def _add(self, level, msg, *args):
        self.lines.append((level, msg % args if args else msg))

    def error(self, msg, *args):
        self._add("error", msg, *args)

    def warning(self, msg, *args):
        self._add("warning", msg, *args)

    def info(self, msg, *args):
        self._add("info", msg, *args)

    def debug(self, msg, *args):
        self._add("debug", msg, *args)


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="wzc-db-")
    yield path
    shutil.rmtree(path)


def open_db(folder, log=None):
    return dbmod.ClusterDB(os.path.join(folder, "cluster.db"), log or ListLog())


def row(name, sha="ab" * 32, item="shared"):
    return (name, item, 3, 1500000000 * 10 ** 9 + 123, 42, 1500000000 * 10 ** 9 + 456, 0o660, sha)


def test_fresh_database_has_current_schema(folder):
    db = open_db(folder)
    assert db.version() == dbmod.SCHEMA_VERSION
    tables = set(r[0] for r in db._conn.execute("SELECT name FROM sqlite_master"))
    assert set(["files", "states", "agents", "peers", "meta", "schema_version"]) <= tables
    db.close()
    db.close()
    db = open_db(folder)
    assert db.version() == dbmod.SCHEMA_VERSION


def test_files_round_trip_with_big_nanoseconds(folder):
    db = open_db(folder)
    db.save_files([row("etc/shared/a"), row("etc/client.keys", item="client.keys")])
    db.close()
    db = open_db(folder)
    rows = sorted(db.load_files())
    assert rows[0] == ("etc/client.keys", 3, 1500000000 * 10 ** 9 + 123, 42,
                       1500000000 * 10 ** 9 + 456, 0o660, "ab" * 32)
    assert db.file_count() == 2
    db.mark_deleted(["etc/shared/a"])
    assert [r[0] for r in db.load_files()] == ["etc/client.keys"]
    assert db.deleted_files(["etc/shared/a", "etc/client.keys"]) == ["etc/shared/a"]
    db.save_files([row("etc/shared/a")])  # re-created: the tombstone goes away
    assert db.deleted_files() == []


def test_purge_deleted_drops_old_tombstones_and_states(folder):
    now = [1000.0]
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), ListLog(), wall=lambda: now[0])
    db.save_files([row("etc/shared/a")])
    db.mark_pending(["n2"], ["etc/shared/a"])
    db.mark_deleted(["etc/shared/a"])
    now[0] = 5000.0
    assert db.purge_deleted(older_than=2000.0) == 1
    assert db.states() == [] and db.deleted_files() == []


def test_migration_from_version_1_keeps_rows(folder):
    path = os.path.join(folder, "cluster.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for sql in dbmod.MIGRATIONS[0][1]:
        conn.execute(sql)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row("etc/shared/a"))
    conn.execute("INSERT INTO states VALUES ('n2', 'etc/shared/a', 'synchronized', 1.0)")
    conn.commit()
    conn.close()
    log = ListLog()
    db = dbmod.ClusterDB(path, log)
    assert db.version() == dbmod.SCHEMA_VERSION
    assert [r[0] for r in db.load_files()] == ["etc/shared/a"]
    assert db.states() == [["n2", "etc/shared/a", "synchronized"]]
    db.record_peer("n2", "client", "127.0.0.2", "1.0")
    assert any("migrated" in line for _, line in log.lines)
    assert not glob.glob(path + ".corrupt-*")


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000, b"SQLite format 3\x00" + b"\xff" * 50])
def test_garbage_file_is_moved_aside_and_rebuilt(folder, content):
    path = os.path.join(folder, "cluster.db")
    if content:
        with open(path, "wb") as handle:
            handle.write(content)
        with open(path + "-journal", "wb") as handle:
            handle.write(b"junk")
    log = ListLog()
    db = dbmod.ClusterDB(path, log)
    assert db.version() == dbmod.SCHEMA_VERSION and not db.in_memory
    moved = glob.glob(path + ".corrupt-*")
    if content:
        assert sorted(os.path.basename(p).split("-")[-1] for p in moved) != []
        # SQLite may have discarded the bogus journal itself; it must not sit by the new db.
        journal = path + "-journal"
        assert not os.path.exists(journal) or open(journal, "rb").read() != b"junk"
        assert [lvl for lvl, _ in log.lines] == ["error"]
    else:
        assert moved == [] and log.lines == []  # an empty file is a new database


def test_truncated_database_is_moved_aside(folder):
    path = os.path.join(folder, "cluster.db")
    db = open_db(folder)
    db.save_files([row("etc/shared/f%05d" % i) for i in range(3000)])
    db.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    log = ListLog()
    db = dbmod.ClusterDB(path, log)
    assert db.load_files() == []
    assert len(glob.glob(path + ".corrupt-*")) == 1
    db.save_files([row("etc/shared/a")])
    assert db.file_count() == 1


def test_foreign_database_is_moved_aside(folder):
    path = os.path.join(folder, "cluster.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE manager_file_status (id_manager TEXT, id_file TEXT, status TEXT)")
    conn.commit()
    conn.close()
    db = dbmod.ClusterDB(path, ListLog())
    assert db.version() == dbmod.SCHEMA_VERSION
    assert len(glob.glob(path + ".corrupt-*")) == 1


def test_newer_schema_is_moved_aside(folder):
    path = os.path.join(folder, "cluster.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (999)")
    conn.commit()
    conn.close()
    db = dbmod.ClusterDB(path, ListLog())
    assert db.version() == dbmod.SCHEMA_VERSION


def test_unwritable_location_runs_from_memory(folder):
    log = ListLog()
    db = dbmod.ClusterDB(os.path.join(folder, "missing", "cluster.db"), log)
    assert db.in_memory and db.version() == dbmod.SCHEMA_VERSION
    assert any("running from memory" in line for _, line in log.lines)


def test_states_set_query_pending(folder):
    db = open_db(folder)
    assert db.set_states([["n2", "etc/a", "pending"], ["n2", "etc/b", "synchronized"],
                          ["n3", "etc/a", "failed"]]) == 3
    assert db.pending("n2") == ["etc/a"]
    assert db.states(node="n3") == [["n3", "etc/a", "failed"]]
    assert db.states(names=["etc/a"]) == [["n2", "etc/a", "pending"], ["n3", "etc/a", "failed"]]
    assert db.states(node="n2", names=["etc/b", "x"]) == [["n2", "etc/b", "synchronized"]]
    db.set_states([["n2", "etc/a", "synchronized"]])
    assert db.pending("n2") == []
    assert db.state_counts() == {"n2": {"synchronized": 2}, "n3": {"failed": 1}}
    with pytest.raises(ValueError):
        db.set_states([["n2", "etc/a", "bogus"]])


def test_invalid_rows_per_node_are_bounded_oldest_first(folder):
    clock = [1000.0]
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), ListLog(), wall=lambda: clock[0])
    bound = dbmod.MAX_INVALID_PER_NODE
    db.set_states([["rogue", "etc/shared/kept", "synchronized"],
                   ["other", "refused-by-other", "invalid"]])
    for batch in range(5):  # thousands of refused names, in batches, one second apart
        clock[0] += 1
        db.set_states([["rogue", "bad-%d-%d" % (batch, n), "invalid"] for n in range(bound)])
    assert db.state_counts()["rogue"] == {"invalid": bound, "synchronized": 1}
    names = [row[1] for row in db.states(node="rogue") if row[2] == "invalid"]
    assert sorted(names) == sorted("bad-4-%d" % n for n in range(bound))  # the newest
    assert db.states(node="other") == [["other", "refused-by-other", "invalid"]]
    # One batch larger than the bound keeps its last rows.
    clock[0] += 1
    db.set_states([["rogue", "big-%05d" % n, "invalid"] for n in range(bound + 10)])
    assert db.state_counts()["rogue"]["invalid"] == bound
    kept = set(row[1] for row in db.states(node="rogue"))
    assert "big-00009" not in kept and "big-00010" in kept


def test_invalid_rows_of_all_nodes_are_bounded_too(folder, monkeypatch):
    """An insider may connect under ever new names: the total is bounded as well."""
    monkeypatch.setattr(dbmod, "MAX_INVALID_PER_NODE", 10)
    monkeypatch.setattr(dbmod, "MAX_INVALID_TOTAL", 50)
    clock = [1000.0]
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), ListLog(), wall=lambda: clock[0])
    db.set_states([["real", "etc/shared/a", "synchronized"]])
    totals = []
    for node in range(30):
        clock[0] += 1
        db.set_states([["name%02d" % node, "bad-%d" % n, "invalid"] for n in range(10)])
        totals.append(sum(c.get("invalid", 0) for c in db.state_counts().values()))
    assert max(totals) <= 50 and totals[-1] >= 45
    counts = db.state_counts()
    assert counts["real"] == {"synchronized": 1}
    assert counts["name29"] == {"invalid": 10} and "name00" not in counts  # oldest first
    # A fresh connection (a restarted internal daemon) counts again before it trusts itself.
    db.close()
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), ListLog(), wall=lambda: clock[0])
    db.set_states([["late", "bad-%d" % n, "invalid"] for n in range(10)])
    assert sum(c.get("invalid", 0) for c in db.state_counts().values()) <= 50


def test_unchanged_states_are_not_written_again(folder):
    # A full round confirms every unchanged file every interval: only changes are written.
    clock = [1000.0]
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), ListLog(),
                         wall=lambda: clock[0])
    rows = [["n2", "etc/f%d" % i, "synchronized"] for i in range(3)]
    assert db.set_states(rows) == 3
    clock[0] = 2000.0
    changes = db._conn.total_changes
    assert db.set_states(rows) == 0
    assert db._conn.total_changes == changes  # not a row touched
    assert db.set_states(rows[:1] + [["n2", "etc/f1", "failed"]]) == 1
    assert [tuple(r) for r in db._conn.execute(
        "SELECT file, state, updated FROM states ORDER BY file")] == [
        ("etc/f0", "synchronized", 1000.0), ("etc/f1", "failed", 2000.0),
        ("etc/f2", "synchronized", 1000.0)]
    db.close()


def test_one_transaction_per_batch_rolls_back_entirely(folder):
    db = open_db(folder)
    with pytest.raises(ValueError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO meta VALUES ('a', '1')")
            db.set_states([["n2", "f", "pending"]])  # nested: joins the outer transaction
            raise ValueError("boom")
    assert db.get_meta("a") is None and db.states() == []


def test_large_batch_and_many_names(folder):
    db = open_db(folder)
    names = ["etc/shared/g/f%05d" % i for i in range(5000)]
    db.save_files([row(n) for n in names])
    db.mark_pending(["n2", "n3"], names)
    assert len(db.pending("n3")) == 5000
    assert len(db.states(names=names)) == 10000


def test_known_nodes_does_not_read_every_states_row(folder):
    # A master with 10 clients holds 110 000 states rows; a DISTINCT over them read the whole
    # index (40 ms on 2.7) at every client.keys change it stored. Counted in SQLite's own
    # steps (its progress handler, every 100 instructions), not in time.
    db = open_db(folder)
    names = ["etc/shared/g/f%05d" % i for i in range(5000)]
    db.mark_pending(["n2", "n3", "n4"], names)
    db.record_peer("n5", "client", "127.0.0.5", "1.0")
    steps = []
    db._conn.set_progress_handler(lambda: steps.append(1), 100)
    try:
        assert db.known_nodes() == {"n2": None, "n3": None, "n4": None, "n5": "client"}
    finally:
        db._conn.set_progress_handler(None, 100)
    assert len(steps) < 50, len(steps)  # 15 000 rows read: hundreds


def test_agent_names_reads_only_that_nodes_agents(folder):
    # A client's round summary on a master asks for the agents that client reports: 10 000 of
    # 100 000. A scan of the whole table was a fifth of an idle master's internal daemon;
    # the (node, name) index answers from that node's entries alone. Counted in SQLite's
    # steps (as above), not in time.
    db = open_db(folder)
    db.record_agents([["agent%05d" % i, "n%d" % (i % 10), 100 + i] for i in range(5000)])
    steps = []
    db._conn.set_progress_handler(lambda: steps.append(1), 100)
    try:
        names = db.agent_names("n3", "queue/agent-info/")
    finally:
        db._conn.set_progress_handler(None, 100)
    assert sorted(names) == ["queue/agent-info/agent%05d" % i for i in range(3, 5000, 10)]
    assert len(steps) < 60, len(steps)  # 5 000 rows read: over 200
    assert db.agent_names("n3") == [n[len("queue/agent-info/"):] for n in names]
    assert db.agent_names("nobody", "x/") == []
    # The interpreter's str (the scanner's keys; bytes on 2.7), and only there: every other
    # answer stays text.
    assert set(map(type, names)) == set([str])
    assert set(map(type, db.agents())) == set([compat.text_type])


def _agent_update_plan(conn):
    return " ".join(str(r[-1]) for r in conn.execute(
        "EXPLAIN QUERY PLAN UPDATE agents SET keepalive_ns = ?, updated = ? WHERE name = ?"
        " AND node = ?", (1, 1.0, "a", "n1")))


def test_a_keepalive_updates_the_agents_table_by_one_search(folder):
    # 10 000 keepalives a second each UPDATE an agent's row by name, a fifth of the master's
    # internal daemon: the table is keyed by name itself (WITHOUT ROWID), so a row is one
    # B-tree search, not the name's index then the table by rowid, and a flush in name
    # order walks its pages once. An older database is migrated, its rows kept.
    path = os.path.join(folder, "cluster.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (5)")
    for _version, statements in dbmod.MIGRATIONS[:5]:
        for sql in statements:
            conn.execute(sql)
    conn.executemany("INSERT INTO agents VALUES (?, ?, ?, 1.0)",
                     [("b-any", "n1", 7), ("a-any", "n2", None)])
    assert "sqlite_autoindex_agents_1" in _agent_update_plan(conn)
    conn.commit()
    conn.close()
    db = dbmod.ClusterDB(path, ListLog())
    assert db.version() == dbmod.SCHEMA_VERSION
    assert stored_agents(db) == {"a-any": ("n2", None), "b-any": ("n1", 7)}
    fresh = dbmod.ClusterDB(os.path.join(folder, "fresh.db"), ListLog())
    for conn in (db._conn, fresh._conn):
        assert "PRIMARY KEY (name=?)" in _agent_update_plan(conn)
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("SELECT rowid FROM agents")
    db.record_agents([["a-any", "n2", 9], ["c-any", "n3", 1]])
    assert stored_agents(db) == {"a-any": ("n2", 9), "b-any": ("n1", 7), "c-any": ("n3", 1)}
    assert db.agent_names("n2") == ["a-any"]


def test_an_old_sqlite_migrates_without_without_rowid(folder, monkeypatch):
    # SPEC section 1: the SQL runs on SQLite 3.6.20 (CentOS 6; CentOS 7 has 3.7.17), and
    # WITHOUT ROWID came with 3.8.2: there, schema 6 failed with a syntax error at every
    # start. The agents table keeps its rowid and works as before.
    monkeypatch.setattr(dbmod.sqlite3, "sqlite_version_info", (3, 6, 20))
    db = open_db(folder)
    assert db.version() == dbmod.SCHEMA_VERSION
    db._conn.execute("SELECT rowid FROM agents").fetchall()  # a table with its rowid
    db.record_agents([["a-any", "n2", 9], ["c-any", "n3", 1]])
    assert stored_agents(db) == {"a-any": ("n2", 9), "c-any": ("n3", 1)}
    assert db.agent_names("n2") == ["a-any"]
    db.close()


def stored_agents(db):
    """The agents table as it is in the file (not what record_agents holds)."""
    return dict((r[0], (r[1], r[2])) for r in db._conn.execute(
        "SELECT name, node, keepalive_ns FROM agents"))


def test_held_agent_rows_leave_the_rows_updating_them_in_turn_would(folder):
    # Keepalives are held, newest per agent, and written in one transaction: what is
    # stored must be exactly what the old one-UPDATE-per-batch left, in every order of two
    # nodes' reports (an older keepalive told later, a row without keepalive, an agent
    # unknown before, a move to another node).
    import random
    rnd = random.Random(7)
    direct, held = open_db(folder), dbmod.ClusterDB(os.path.join(folder, "held.db"), ListLog())
    for db in (direct, held):
        db.record_agents([["a%d-any" % i, "n1", 10] for i in range(0, 20, 2)])
    for turn in range(60):
        batch = [["a%d-any" % rnd.randrange(20), rnd.choice(["n1", "n1", "n2"]),
                  rnd.choice([None, 5, 10, 11, 12, 13])] for _ in range(rnd.randrange(1, 8))]
        for one in batch:
            direct.record_agents([one])
        held.record_agents(batch, now=float(turn))
        if turn % 20 == 19:
            assert stored_agents(direct) == held.agents()
    assert held.agents_due_in(100.0) is None  # the read wrote them
    assert stored_agents(held) == stored_agents(direct)


def test_the_agents_generation_moves_only_when_an_agents_node_may_have(folder):
    # A master keeps each client's summary while it stays (Catalog._node_summary): a
    # keepalive from an agent's own node leaves it; a new agent, a move, an older keepalive
    # (refused: the row is not what the sender thinks) move it, held rows written first.
    db = open_db(folder)
    db.record_agents([["a-any", "n1", 10], ["b-any", "n1", 10]])
    first = db.agents_generation()
    db.record_agents([["a-any", "n1", 20], ["b-any", "n1", 15]], now=1.0)
    assert db.agents_generation() == first
    for rows in ([["c-any", "n1", 5]], [["a-any", "n2", 30]], [["b-any", "n2", 5]]):
        before = db.agents_generation()
        db.record_agents(rows, now=2.0)
        assert db.agents_generation() != before
    assert stored_agents(db) == {"a-any": ("n2", 30), "b-any": ("n1", 15),
                                 "c-any": ("n1", 5)}


def test_held_agent_rows_are_written_when_due_when_many_and_at_close(folder, monkeypatch):
    db = open_db(folder)
    db.record_agents([["a-any", "n1", 1], ["b-any", "n1", 1]])
    assert db.agents_due_in(0.0) is None
    db.record_agents([["a-any", "n1", 2]], now=50.0)
    db.record_agents([["a-any", "n2", 3]], now=50.6)   # moved: node too
    assert stored_agents(db) == {"a-any": ("n1", 1), "b-any": ("n1", 1)}
    assert db.agents_due_in(50.6) == pytest.approx(dbmod.AGENT_ROWS_DELAY - 0.0, abs=0.61)
    assert db.agents_due_in(50.0 + dbmod.AGENT_ROWS_DELAY) == 0.0
    db.flush_agents()
    assert stored_agents(db) == {"a-any": ("n2", 3), "b-any": ("n1", 1)}
    assert db.agents_due_in(60.0) is None
    monkeypatch.setattr(dbmod, "AGENT_ROWS_HELD", 3)
    db.record_agents([["a-any", "n2", 4], ["b-any", "n1", 4]], now=61.0)
    assert stored_agents(db)["a-any"] == ("n2", 3)
    db.record_agents([["c-any", "n1", 4]], now=61.1)   # the third held: written
    assert stored_agents(db) == {"a-any": ("n2", 4), "b-any": ("n1", 4), "c-any": ("n1", 4)}
    db.record_agents([["c-any", "n1", 5]], now=62.0)
    db.close()
    assert stored_agents(open_db(folder)) == {"a-any": ("n2", 4), "b-any": ("n1", 4),
                                              "c-any": ("n1", 5)}


def test_held_agent_rows_when_the_database_fails(folder, monkeypatch):
    # A failing write keeps the held rows for a later try, AGENT_ROWS_DELAY later (not at
    # every turn of the loop), and a request that reaches AGENT_ROWS_HELD while it fails
    # gets the error with its rows not taken, as before rows were held: no growth.
    db = open_db(folder)
    db.record_agents([["a-any", "n1", 1]])
    failing = [True]

    def authorizer(action, *args):
        deny = failing[0] and action == sqlite3.SQLITE_UPDATE
        return sqlite3.SQLITE_DENY if deny else sqlite3.SQLITE_OK
    db._conn.set_authorizer(authorizer)
    db.record_agents([["a-any", "n1", 2]], now=10.0)
    with pytest.raises(sqlite3.Error):
        db.flush_agents(11.0)
    assert db.agents_due_in(11.0) == pytest.approx(dbmod.AGENT_ROWS_DELAY)
    monkeypatch.setattr(dbmod, "AGENT_ROWS_HELD", 3)
    with pytest.raises(sqlite3.Error):
        db.record_agents([["b-any", "n1", 2], ["c-any", "n1", 2]], now=12.0)
    assert len(db._agent_rows) == 1
    failing[0] = False
    db.flush_agents()
    assert stored_agents(db) == {"a-any": ("n1", 2)}


def test_a_refused_request_takes_back_its_own_rows_not_those_held_before(folder, monkeypatch):
    # record_agents refuses a request that reaches AGENT_ROWS_HELD while the database
    # fails: the rows it gives back must be that request's, whatever their names. The
    # write sorts the rows by name; the held ones taken before (their requests answered)
    # must stay held and be written once the database works again, none of the refused.
    db = open_db(folder)
    failing = [True]

    def authorizer(action, *args):
        deny = failing[0] and action in (sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_INSERT)
        return sqlite3.SQLITE_DENY if deny else sqlite3.SQLITE_OK
    db._conn.set_authorizer(authorizer)
    db.record_agents([["m-any", "n1", 5], ["z-any", "n1", 5]], now=10.0)
    monkeypatch.setattr(dbmod, "AGENT_ROWS_HELD", 3)
    with pytest.raises(sqlite3.Error):
        db.record_agents([["a-any", "n2", 6]], now=10.5)   # sorts first
    with pytest.raises(sqlite3.Error):
        db.record_agents([["b-any", "n2", 6], ["y-any", "n2", 6]], now=10.6)
    failing[0] = False
    db.flush_agents()
    assert stored_agents(db) == {"m-any": ("n1", 5), "z-any": ("n1", 5)}


def test_the_agents_table_is_read_while_held_rows_cannot_be_written(folder):
    # The database is a cache: while it refuses writes (a full disk, a lock held by
    # another process) its agents are read as they are, as before rows were held (such
    # rows were refused then), not refused with the write's error: a master's summary of
    # each client's agent-info, cluster_control -a and a client's own agents read it. A
    # read does not try again a write that failed (a listing asks agent_sender per row):
    # the tick's next try does, and the reads see everything once it worked.
    db = open_db(folder)
    db.record_agents([["a-any", "n1", 1], ["b-any", "n2", 1]])
    failing, tries = [True], []

    def authorizer(action, *args):
        if action == sqlite3.SQLITE_UPDATE:
            tries.append(action)
        deny = failing[0] and action in (sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_INSERT)
        return sqlite3.SQLITE_DENY if deny else sqlite3.SQLITE_OK
    db._conn.set_authorizer(authorizer)
    db.record_agents([["a-any", "n2", 5], ["c-any", "n1", 5]], now=10.0)
    with pytest.raises(sqlite3.Error):
        db.flush_agents(11.0)
    del tries[:]
    assert db.agent_names("n1") == ["a-any"]
    assert db.agents_of_others("n1") == {"b-any": 1}
    assert db.agents() == {"a-any": ("n1", 1), "b-any": ("n2", 1)}
    assert db.agent_sender("a-any") == "n1"
    assert [row[1] for row in db.agent_listing()] == []
    assert tries == []
    failing[0] = False
    db.flush_agents(12.0)
    assert db.agents() == {"a-any": ("n2", 5), "b-any": ("n2", 1), "c-any": ("n1", 5)}
    assert db.agent_names("n1") == ["c-any"]


def test_held_agent_rows_of_their_own_node_leave_the_node_index_alone(folder):
    # A keepalive from the agent's own node sets its keepalive only: an UPDATE naming node,
    # even with the value it has, rewrites the (node, name) index entry of every row, and
    # its pages go to the WAL. Counted in WAL frames, against that UPDATE of the same rows.
    db = open_db(folder)
    db.record_agents([["agent%05d" % i, "n%d" % (i % 10), 100] for i in range(5000)])

    def pages_of(write):
        db._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        write()
        return db._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]

    def naming_node():
        with db.transaction() as conn:
            conn.executemany(
                "UPDATE agents SET node = ?, keepalive_ns = ?, updated = 0 WHERE name = ?",
                [("n%d" % (i % 10), 300, "agent%05d" % i) for i in range(200)])

    db.record_agents([["agent%05d" % i, "n%d" % (i % 10), 200] for i in range(200)], now=1.0)
    held, named = pages_of(db.flush_agents), pages_of(naming_node)
    assert held * 2 < named, (held, named)   # 6 and 14 pages
    assert db.agents()["agent00005"] == ("n5", 300)
    db.record_agents([["agent00005", "n7", 400]], now=2.0)   # moved: the node is written
    assert db.agents()["agent00005"] == ("n7", 400)


def test_peers_agents_meta(folder):
    db = open_db(folder)
    db.record_peer("n2", "client", "127.0.0.2", "1.0")
    db.record_peer("n2", "client", "127.0.0.9", "1.1")
    db.set_states([["n3", "f", "pending"]])
    assert [p["address"] for p in db.peers()] == ["127.0.0.9"]
    assert db.known_nodes() == {"n2": "client", "n3": None}
    db.record_agents([["web01-any", "n2", 123]])
    assert db.agents() == {"web01-any": ("n2", 123)}
    db.set_meta("held_removal", '{"removed": 3}')
    assert db.get_meta("held_removal") == '{"removed": 3}'
    db.set_meta("held_removal", None)
    assert db.get_meta("held_removal", "none") == "none"


def test_works_with_a_real_logger(folder):
    db = dbmod.ClusterDB(os.path.join(folder, "cluster.db"), logging.getLogger("test"))
    assert db.version() == dbmod.SCHEMA_VERSION


KILLED_WRITER = r"""
import logging, sys
sys.path.insert(0, sys.argv[2])
from wazuh_cluster import db as dbmod
db = dbmod.ClusterDB(sys.argv[1], logging.getLogger("child"))
db.save_files([(u"etc/shared/committed", u"shared", 1, 2, 3, 4, 432, u"ab" * 32)])
with db.transaction():
    db.save_files([(u"etc/shared/f%05d" % i, u"shared", 1, 2, 3, 4, 432, u"cd" * 32)
                   for i in range(2000)])
    sys.stdout.write("inside\n")
    sys.stdout.flush()
    sys.stdin.readline()  # killed here, in the middle of the transaction
"""


def test_writer_killed_mid_transaction_loses_only_that_transaction(folder):
    path = os.path.join(folder, "cluster.db")
    lib = os.path.dirname(os.path.dirname(os.path.abspath(dbmod.__file__)))
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path, lib],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"inside\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    log = ListLog()
    db = dbmod.ClusterDB(path, log)
    assert [r[0] for r in db.load_files()] == ["etc/shared/committed"]
    assert not glob.glob(path + ".corrupt-*") and log.lines == []
