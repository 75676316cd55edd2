"""The cluster database (var/db/cluster.db): schema, migrations, queries.

The internal daemon is its only writer, through one connection opened after the fork. The
database is a cache of what the files and the peers say: it can always be rebuilt from a
rescan, so a corrupt, unreadable or foreign file is moved aside and a fresh one created
instead of refusing to start (a crash loop helps nobody).

SQL stays within SQLite 3.6.20 (CentOS 6): no UPSERT (INSERT OR REPLACE instead), no CTEs,
no partial indexes; WAL and the agents table WITHOUT ROWID (migration 6) only where the
library has them, the same table with a rowid elsewhere; connect(timeout=...)
instead of PRAGMA busy_timeout; writers in BEGIN IMMEDIATE through transaction(); bound
parameters only; one transaction per batch (keepalives: per second, ClusterDB.record_agents).
"""
from __future__ import absolute_import, division, print_function

import contextlib
import operator
import os
import sqlite3
import time

from wazuh_cluster import compat

STATES = ("pending", "synchronized", "failed", "invalid")
# What callers catch around database work (disk full, I/O error, locked past the timeout).
Error = sqlite3.Error
CONNECT_TIMEOUT = 30.0
# SQLite before 3.32 allows at most 999 bound parameters per statement.
_CHUNK = 500
# The meta key of the client.keys fingerprint that agent_keys was parsed from.
AGENT_KEYS_SOURCE = "agent_keys.source"
# "invalid" rows kept per node: the names a peer sent that we refused. A peer chooses them,
# as many as it likes; beyond this many the oldest go, so that one insider cannot grow the
# database (the refusals are in the log as well, bounded per batch).
MAX_INVALID_PER_NODE = 1000
# ... and in all: an insider may connect under ever new node names. Trimmed down to
# INVALID_TRIM_TO of it, so that counting them all (a scan of the states index) is rare.
MAX_INVALID_TOTAL = 10 * MAX_INVALID_PER_NODE
INVALID_TRIM_TO = 0.9
# Agent rows (keepalives) are held and written at most this many seconds later or once this
# many are held (ClusterDB.record_agents): a second of the real rate at 100 000 agents.
AGENT_ROWS_DELAY = 1.0
AGENT_ROWS_HELD = 10000

# Each migration takes the schema from version N-1 to N, inside one transaction.
# Version 1 is the 3.0-like core (files and node/file/state rows); version 2 adds deletion
# tombstones, agents, peers and meta, and the indexes the queries need; version 3 the
# node names read from agent-info files.
MIGRATIONS = (
    (1, (
        "CREATE TABLE files (name TEXT PRIMARY KEY, item TEXT NOT NULL, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,"
        " mode INTEGER NOT NULL, sha256 TEXT NOT NULL)",
        "CREATE TABLE states (node TEXT NOT NULL, file TEXT NOT NULL, state TEXT NOT NULL,"
        " updated REAL NOT NULL, PRIMARY KEY (node, file))",
    )),
    (2, (
        "ALTER TABLE files ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE files ADD COLUMN deleted_at REAL",
        "CREATE INDEX states_node_state ON states (node, state)",
        "CREATE INDEX states_file ON states (file)",
        "CREATE TABLE agents (name TEXT PRIMARY KEY, node TEXT, keepalive_ns INTEGER,"
        " updated REAL NOT NULL)",
        "CREATE TABLE peers (node TEXT PRIMARY KEY, role TEXT, address TEXT, version TEXT,"
        " last_seen REAL NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    )),
    (3, (
        # The node_name line read from each agent-info file, forgotten when the file's
        # content changes: cluster_control -a reads a file again only then (an in-memory
        # cache of 100 000 entries was the internal daemon's lasting growth after a listing).
        "CREATE TABLE agent_files (name TEXT PRIMARY KEY, node TEXT)",
    )),
    (4, (
        # The agents of client.keys as cluster_control -a lists them, parsed once per change
        # of the file (agentlist.py): a row's JSON prefix ["ID","NAME","IP" and its
        # agent-info file name, in file order.
        "CREATE TABLE agent_keys (seq INTEGER PRIMARY KEY, file TEXT NOT NULL,"
        " prefix TEXT NOT NULL)",
    )),
    (5, (
        # The agents one node reports (agent_names), read from the index alone: a client's
        # round summary on a master of 100 000 agents scanned the whole table for its 10 000
        # (11 against 3 ms), a fifth of an idle master's internal daemon with 10 clients.
        # Keepalives of an agent's own node leave node out of their UPDATE (flush_agents):
        # naming it, even with the same value, rewrites the index entry.
        "CREATE INDEX agents_node_name ON agents (node, name)",
    )),
    (6, (
        # The agents table keyed by name alone (WITHOUT ROWID): a keepalive's UPDATE seeks
        # one B-tree, not the name's index and then the table by rowid, whose pages follow
        # the order agents were first recorded in, not the name order a flush writes in.
        "CREATE TABLE agents_by_name (name TEXT PRIMARY KEY, node TEXT, keepalive_ns INTEGER,"
        " updated REAL NOT NULL) WITHOUT ROWID",
        "INSERT INTO agents_by_name (name, node, keepalive_ns, updated)"
        " SELECT name, node, keepalive_ns, updated FROM agents WHERE name IS NOT NULL",
        "DROP TABLE agents",
        "ALTER TABLE agents_by_name RENAME TO agents",
        "CREATE INDEX agents_node_name ON agents (node, name)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# WITHOUT ROWID came with SQLite 3.8.2: on an older library (CentOS 6's 3.6.20, CentOS 7's
# 3.7.17) a migration that needs it is recorded as done without its statements; the table
# it would rebuild keeps its rowid, with the same columns and key.
_WITHOUT_ROWID_SINCE = (3, 8, 2)


class _Unusable(Exception):
    """The file opened but is not a database we can use (reason in args[0])."""


_FIRST = operator.itemgetter(0)


def _chunks(seq, size=_CHUNK):
    seq = list(seq)
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


class ClusterDB(object):
    """One connection to the cluster database; `log` is a logging.Logger.

    `path` may be ":memory:" (tests). `wall` returns epoch seconds for the `updated`
    columns (display only). `connect` is the seam a test uses to fake an unusable file.
    """

    def __init__(self, path, log, wall=time.time):
        self.path = path
        self.log = log
        self._wall = wall
        self._conn = None
        self._depth = 0
        self._agent_rows = []       # [agent file name, node, keepalive_ns]: record_agents
        self._agents_since = None   # when the first of them came (record_agents' `now`)
        self._agents_failed = False  # the last write of them failed (_flush_to_read)
        # Moves on every write of agent rows that may have changed which node reports which
        # agent (agents_generation); a keepalive from an agent's own node does not move it.
        self._agents_generation = 0
        self._invalid_bound = None  # an upper bound of the invalid rows (None: count them)
        self.in_memory = False
        self._open()

    # -- opening, checking, migrating --------------------------------------------------------

    def _connect(self, path):
        conn = sqlite3.connect(path, timeout=CONNECT_TIMEOUT, isolation_level=None)
        conn.text_factory = compat.text_type
        return conn

    def _open(self):
        try:
            self._conn = self._connect(self.path)
            self._check()
        except (sqlite3.DatabaseError, _Unusable) as exc:
            self._close_quietly()
            if self.path == ":memory:":
                raise
            self._move_aside(exc)
            try:
                self._conn = self._connect(self.path)
                self._check()
            except (sqlite3.DatabaseError, _Unusable, OSError) as exc2:
                # Still unusable (e.g. the folder is not writable): run from memory so the
                # daemon keeps working; the cache is rebuilt by the next start.
                self._close_quietly()
                self.log.error("cluster database %s unusable (%s); running from memory",
                               self.path, exc2)
                self._conn = self._connect(":memory:")
                self.in_memory = True
                self._check()
        self._configure()
        self._migrate()

    def _check(self):
        """Integrity check and schema sanity; raises _Unusable or sqlite3.DatabaseError."""
        rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            raise _Unusable("integrity check: %s" % "; ".join(str(r[0]) for r in rows[:3]))
        tables = set(r[0] for r in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        if not tables:
            return
        if "schema_version" not in tables:
            raise _Unusable("not a wazuh-cluster database (no schema_version table)")
        version = self.version()
        if version is None or version > SCHEMA_VERSION:
            raise _Unusable("schema version %r unknown to this program (%d)"
                            % (version, SCHEMA_VERSION))

    def _configure(self):
        if sqlite3.sqlite_version_info >= (3, 7, 0) and not self.in_memory \
                and self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")

    def _migrate(self):
        tables = set(r[0] for r in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        with self.transaction() as conn:
            if "schema_version" not in tables:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = start = self.version()
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            if sqlite3.sqlite_version_info < _WITHOUT_ROWID_SINCE and \
                    any("WITHOUT ROWID" in sql for sql in statements):
                statements = ()
            with self.transaction() as conn:
                for sql in statements:
                    conn.execute(sql)
                conn.execute("UPDATE schema_version SET version = ?", (version,))
            if start:
                self.log.info("cluster database %s migrated to schema version %d",
                              self.path, version)
            current = version

    def _move_aside(self, reason):
        """Rename the database and its -wal/-shm/-journal to NAME.corrupt-TIMESTAMP."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self._wall()))
        target = "%s.corrupt-%s" % (self.path, stamp)
        counter = 1
        while os.path.exists(target):
            counter += 1
            target = "%s.corrupt-%s-%d" % (self.path, stamp, counter)
        self.log.error("cluster database %s unusable (%s): moved aside to %s, starting a "
                       "fresh one (it is rebuilt from a rescan)", self.path, reason, target)
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.rename(self.path + suffix, target + suffix)
            except OSError as exc:
                if suffix == "" and os.path.exists(self.path):
                    self.log.error("cannot move %s aside: %s", self.path, exc)

    def _close_quietly(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def close(self):
        """Write the held agent rows and close the connection (safe to call twice)."""
        if self._conn is not None:
            try:
                self.flush_agents()
            except sqlite3.Error as exc:
                self.log.error("cluster database %s: %d agent rows not written at close: %s",
                               self.path, len(self._agent_rows), exc)
        self._close_quietly()

    def version(self):
        """The schema version stored in the file (None when unreadable)."""
        try:
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.DatabaseError:
            return None
        return row[0] if row else None

    # -- the one transaction helper ----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._depth = 0
            self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self._conn.execute("COMMIT")

    # -- files -------------------------------------------------------------------------------

    def iter_files(self):
        """Iterate (name, size, mtime_ns, ino, ctime_ns, mode, sha256) of files not deleted,
        without holding them all in memory (used to seed the scanner at start)."""
        return self._conn.execute(
            "SELECT name, size, mtime_ns, ino, ctime_ns, mode, sha256 FROM files"
            " WHERE deleted = 0")

    def load_files(self):
        """[(name, size, mtime_ns, ino, ctime_ns, mode, sha256)] of files not deleted."""
        return self.iter_files().fetchall()

    def file_count(self):
        """Number of live (not deleted) file rows."""
        return self._conn.execute("SELECT COUNT(*) FROM files WHERE deleted = 0").fetchone()[0]

    def save_files(self, rows):
        """Insert or replace (name, item, size, mtime_ns, ino, ctime_ns, mode, sha256) rows.

        `rows` may be a generator: 100 000 rows are never held in memory at once.
        """
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO files (name, item, size, mtime_ns, ino, ctime_ns, mode,"
                " sha256, deleted, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)",
                (tuple(r) for r in rows))

    def mark_deleted(self, names):
        """Keep a tombstone for deleted files (what clients must delete too)."""
        now = self._wall()
        with self.transaction() as conn:
            conn.executemany("UPDATE files SET deleted = 1, deleted_at = ? WHERE name = ?",
                             [(now, n) for n in names])

    def deleted_files(self, names=None):
        """Names among `names` (or all) that carry a deletion tombstone."""
        if names is None:
            return [r[0] for r in self._conn.execute(
                "SELECT name FROM files WHERE deleted = 1")]
        found = []
        for chunk in _chunks(names):
            found.extend(r[0] for r in self._conn.execute(
                "SELECT name FROM files WHERE deleted = 1 AND name IN (%s)"
                % ",".join("?" * len(chunk)), chunk))
        return found

    def purge_deleted(self, older_than):
        """Forget tombstones (and their states) older than `older_than` epoch seconds."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM states WHERE file IN (SELECT name FROM files"
                         " WHERE deleted = 1 AND deleted_at < ?)", (older_than,))
            cur = conn.execute("DELETE FROM files WHERE deleted = 1 AND deleted_at < ?",
                               (older_than,))
            return cur.rowcount

    # -- node / file / state rows -------------------------------------------------------------

    def set_states(self, rows):
        """Store [node, file, state] rows in one transaction; returns how many changed.

        A row whose stored state is already that one is not written: a full round confirms
        every unchanged file of a peer as "synchronized" every interval, and rewriting 10 000
        rows per client each time was most of a round's cost on the master. `updated` is
        thus when the state last changed.

        A node keeps at most MAX_INVALID_PER_NODE "invalid" rows, all nodes together at most
        MAX_INVALID_TOTAL: the oldest go first.
        """
        now = self._wall()
        clean = []
        refused = {}
        for row in rows:
            node, name, state = row
            if state not in STATES:
                raise ValueError("state %r is not one of %s" % (state, ", ".join(STATES)))
            clean.append((state, now, node, name, state))
            if state == "invalid":
                refused[node] = refused.get(node, 0) + 1
        try:
            with self.transaction() as conn:
                before = conn.total_changes
                conn.executemany("UPDATE states SET state = ?, updated = ? WHERE node = ?"
                                 " AND file = ? AND state != ?", clean)
                conn.executemany("INSERT OR IGNORE INTO states (node, file, state, updated)"
                                 " VALUES (?, ?, ?, ?)", [(r[2], r[3], r[0], r[1]) for r in clean])
                changed = conn.total_changes - before
                for node in refused:
                    self._trim_invalid(conn, node)
                if refused:
                    self._trim_all_invalid(conn, sum(refused.values()))
        except BaseException:
            self._invalid_bound = None  # rolled back: count again next time
            raise
        return changed

    def _trim_invalid(self, conn, node):
        count = conn.execute("SELECT COUNT(*) FROM states WHERE node = ? AND state = 'invalid'",
                             (node,)).fetchone()[0]
        if count > MAX_INVALID_PER_NODE:
            # INSERT OR REPLACE gives a replaced row a new rowid: rowid orders the ties.
            conn.execute("DELETE FROM states WHERE rowid IN (SELECT rowid FROM states"
                         " WHERE node = ? AND state = 'invalid' ORDER BY updated, rowid"
                         " LIMIT ?)", (node, count - MAX_INVALID_PER_NODE))

    def _trim_all_invalid(self, conn, added):
        # The bound only grows between counts (rows that stop being invalid are not
        # subtracted), so it never undercounts.
        if self._invalid_bound is not None and self._invalid_bound + added <= MAX_INVALID_TOTAL:
            self._invalid_bound += added
            return
        count = conn.execute("SELECT COUNT(*) FROM states WHERE state = 'invalid'").fetchone()[0]
        if count > MAX_INVALID_TOTAL:
            keep = int(MAX_INVALID_TOTAL * INVALID_TRIM_TO)
            conn.execute("DELETE FROM states WHERE rowid IN (SELECT rowid FROM states"
                         " WHERE state = 'invalid' ORDER BY updated, rowid LIMIT ?)",
                         (count - keep,))
            count = keep
        self._invalid_bound = count

    def mark_pending(self, nodes, names):
        """Every (node, file) pair becomes pending; returns the number of rows written."""
        now = self._wall()
        with self.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO states (node, file, state, updated)"
                             " VALUES (?, ?, 'pending', ?)",
                             ((node, name, now) for node in nodes for name in names))
        return len(nodes) * len(names)

    def states(self, node=None, names=None):
        """[[node, file, state]] filtered by node and/or file names, sorted."""
        sql = "SELECT node, file, state FROM states"
        where, params = [], []
        if node is not None:
            where.append("node = ?")
            params.append(node)
        if names is None:
            if where:
                sql += " WHERE " + " AND ".join(where)
            rows = self._conn.execute(sql + " ORDER BY node, file", params).fetchall()
        else:
            rows = []
            for chunk in _chunks(names):
                clause = where + ["file IN (%s)" % ",".join("?" * len(chunk))]
                rows.extend(self._conn.execute(sql + " WHERE " + " AND ".join(clause),
                                               params + list(chunk)))
            rows.sort()
        return [list(r) for r in rows]

    def pending(self, node):
        """Files pending for `node`, sorted."""
        return [r[0] for r in self._conn.execute(
            "SELECT file FROM states WHERE node = ? AND state = 'pending' ORDER BY file",
            (node,))]

    # -- Wazuh 3.0's text commands (legacy_db.py) ---------------------------------------------

    def count_states(self, node):
        """Number of rows of `node`."""
        return self._conn.execute("SELECT COUNT(*) FROM states WHERE node = ?",
                                  (node,)).fetchone()[0]

    def states_page(self, node, limit, offset):
        """[(file, state)] of `node`, sorted by file, `limit` rows from `offset`."""
        return self._conn.execute("SELECT file, state FROM states WHERE node = ? ORDER BY file"
                                  " LIMIT ? OFFSET ?", (node, limit, offset)).fetchall()

    def add_pending(self, pairs):
        """(node, file) pairs without a row get one, pending; existing rows stay as they are."""
        now = self._wall()
        with self.transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO states (node, file, state, updated)"
                             " VALUES (?, ?, 'pending', ?)",
                             ((node, name, now) for node, name in pairs))

    def update_states(self, rows):
        """Existing (node, file) rows take the state of [node, file, state]; no row is added."""
        now = self._wall()
        for _node, _name, state in rows:
            if state not in STATES:
                raise ValueError("state %r is not one of %s" % (state, ", ".join(STATES)))
        with self.transaction() as conn:
            conn.executemany("UPDATE states SET state = ?, updated = ? WHERE node = ? AND file = ?",
                             ((state, now, node, name) for node, name, state in rows))

    def reset_states(self, names=None):
        """Rows of these files (of every file when None), for every node, become pending."""
        now = self._wall()
        with self.transaction() as conn:
            if names is None:
                conn.execute("UPDATE states SET state = 'pending', updated = ?", (now,))
                return
            for chunk in _chunks(names):
                conn.execute("UPDATE states SET state = 'pending', updated = ? WHERE file IN (%s)"
                             % ",".join("?" * len(chunk)), [now] + chunk)

    def forget_states(self, names):
        """Drop the rows of these files, for every node."""
        with self.transaction() as conn:
            for chunk in _chunks(names):
                conn.execute("DELETE FROM states WHERE file IN (%s)"
                             % ",".join("?" * len(chunk)), chunk)

    def state_counts(self):
        """{node: {state: count}}."""
        counts = {}
        for node, state, count in self._conn.execute(
                "SELECT node, state, COUNT(*) FROM states GROUP BY node, state"):
            counts.setdefault(node, {})[state] = count
        return counts

    # -- peers, agents, meta ------------------------------------------------------------------

    def record_peer(self, node, role, address, version):
        """Insert or refresh a peer (last_seen = now)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO peers (node, role, address, version, last_seen)"
                         " VALUES (?, ?, ?, ?, ?)", (node, role, address, version, self._wall()))

    def peers(self):
        """[{node, role, address, version, last_seen}] sorted by node."""
        return [dict(zip(("node", "role", "address", "version", "last_seen"), r))
                for r in self._conn.execute("SELECT node, role, address, version, last_seen"
                                            " FROM peers ORDER BY node")]

    def known_nodes(self):
        """{node: role or None} from the peers table and the nodes named in states rows."""
        nodes = dict((node, None) for node in self._state_nodes())
        for node, role in self._conn.execute("SELECT node, role FROM peers"):
            nodes[node] = role
        return nodes

    def _state_nodes(self):
        """The nodes named in states rows, one index seek each (states_node_state): a
        DISTINCT read the whole index, 110 000 rows on a master with 10 clients (40 ms on
        2.7), at every change of client.keys it stored."""
        nodes = []
        row = self._conn.execute("SELECT MIN(node) FROM states").fetchone()
        while row[0] is not None:
            nodes.append(row[0])
            row = self._conn.execute("SELECT MIN(node) FROM states WHERE node > ?",
                                     (row[0],)).fetchone()
        return nodes

    def record_agents(self, rows, now=None):
        """Take [agent file name, reporting node, keepalive_ns or None] rows; returns how many.

        A row older than the stored keepalive is not taken: two clients' reports of the same
        agent may arrive in either order, the newest keepalive keeps its node (SPEC 4).

        With `now` (monotonic seconds), held as they are and written by flush_agents:
        AGENT_ROWS_DELAY seconds later (Catalog.tick, agents_due_in), once AGENT_ROWS_HELD
        are held, before anything reads the table, and at close; without, at once. 10 000
        keepalives a second came as five "received" batches, each its own transaction: the
        same table pages written to the WAL and synced five times a second, not once.
        """
        held = self._agent_rows
        if not held:
            self._agents_since = now
        before = len(held)
        held.extend(rows)
        count = len(held) - before
        if now is None or len(held) >= AGENT_ROWS_HELD:
            try:
                self.flush_agents(now)
            except sqlite3.Error:
                # These are not taken, as before rows were held (the error goes back to the
                # request): a database that keeps failing must not grow the memory.
                del held[before:]
                raise
        return count

    def agents_due_in(self, now):
        """Seconds until the held agent rows are due to be written (0: now), None when
        none are held (monotonic `now`)."""
        if not self._agent_rows:
            return None
        if self._agents_since is None:
            return 0.0
        return max(0.0, self._agents_since + AGENT_ROWS_DELAY - now)

    def flush_agents(self, now=None):
        """Write the held agent rows in one transaction, each as an UPDATE in turn as they
        came, in name order (a stable sort: one agent's rows keep their order; the index
        seeks then walk the pages once). First the UPDATE of a row from the agent's own
        node, which sets only its keepalive: naming node in SET rewrites its entry of
        agents_node_name even with the same value (at 100 000 agents, 2 000 keepalives a
        transaction: 9.2 + 6.4 us a row updating and committing, 5.0 + 3.6 without node,
        1.9 + 0.7 in batches of 10 000 in name order). Only when some row did not match so
        (another node, an older keepalive, an unknown agent) do they all go through the
        full UPDATE (the rows it leaves are the same after that first pass or without it),
        and unknown agents are inserted from their first row and updated by the rest. On
        error the rows stay held and the error is raised; with `now` (a tick's), the next
        try is AGENT_ROWS_DELAY later, not at once in a loop."""
        held = self._agent_rows
        if not held:
            return
        try:
            # sorted as a copy: the held list keeps the order they came in, which
            # record_agents relies on to give back a refused request's rows (its tail)
            self._write_agents(sorted(held, key=_FIRST), self._wall())
        except sqlite3.Error:
            self._agents_failed = True
            self._agents_generation += 1  # held rows the table does not show: as moved
            if now is not None:
                self._agents_since = now
            raise
        del held[:]
        self._agents_since = None
        self._agents_failed = False

    def _flush_to_read(self):
        """Before a read of the agents table: the held rows written, unless the database
        refuses writes (a full disk, a lock another process holds). The table is a cache
        and is read as it is then, as before rows were held (such rows were refused then):
        a read that failed with the write's error stopped a master's summaries of its
        clients' agents, cluster_control -a and a client's own agents. A read does not try
        again a write that failed (a listing asks agent_sender per row): the tick does,
        AGENT_ROWS_DELAY later, and record_agents at AGENT_ROWS_HELD."""
        if not self._agent_rows or self._agents_failed:
            return
        try:
            self.flush_agents()
        except sqlite3.Error as exc:
            self.log.error("cluster database %s: %d agent rows not written yet (read as "
                           "it is meanwhile): %s", self.path, len(self._agent_rows), exc)

    def _write_agents(self, held, now):
        count = len(held)
        full = "UPDATE agents SET node = ?, keepalive_ns = ?, updated = ? WHERE name = ?" \
            " AND (? IS NULL OR keepalive_ns IS NULL OR keepalive_ns <= ?)"
        # Parameters made row by row, not as lists: 10 000 rows of six values each were
        # 5 MB more at the peak of a first sync, when every agent is new.
        with self.transaction() as conn:
            if conn.executemany(
                    "UPDATE agents SET keepalive_ns = ?, updated = ? WHERE name = ? AND node = ?"
                    " AND (? IS NULL OR keepalive_ns IS NULL OR keepalive_ns <= ?)",
                    ((r[2], now, r[0], r[1], r[2], r[2]) for r in held)).rowcount != count:
                self._agents_generation += 1
                def rows():
                    return ((r[1], r[2], now, r[0], r[2], r[2]) for r in held)
                # A row updates at most one (name is the key): when all did, none is new.
                if conn.executemany(full, rows()).rowcount != count and conn.executemany(
                        "INSERT OR IGNORE INTO agents (name, node, keepalive_ns, updated)"
                        " VALUES (?, ?, ?, ?)", ((r[0], r[1], r[2], now) for r in held)
                ).rowcount:
                    conn.executemany(full, rows())

    def agents_generation(self):
        """A number that stays the same while the agents table's node of every agent does
        (held rows written first, as before a read): any agent row that was not a keepalive
        from the agent's own node (a new agent, another node, an older keepalive, a failed
        write) moves it. A master keeps each client's summary up to date through its
        keepalives while it stays (Catalog._cmd_summary)."""
        self._flush_to_read()
        return self._agents_generation

    def agent_names(self, node, prefix=""):
        """The agent-info file names recorded as sent by `node` (a list, each once), each
        after `prefix` (joined by SQLite: no Python string per name built twice), as the
        interpreter's str: the keys of the scanner's map (on 2.7, converting 10 000 of them
        from unicode was 40 % of a client's summary after every keepalive wave)."""
        self._flush_to_read()
        conn = self._conn
        conn.text_factory = str
        try:
            return [r[0] for r in conn.execute(
                "SELECT ? || name FROM agents WHERE node = ?", (prefix, node))]
        finally:
            conn.text_factory = compat.text_type

    def agents_of_others(self, node, names=None):
        """{agent file name: keepalive_ns or None} of the agents (among `names`, or all)
        recorded as reported by another node than `node`."""
        self._flush_to_read()
        sql = "SELECT name, keepalive_ns FROM agents WHERE node IS NOT NULL AND node != ?"
        if names is None:
            return dict(self._conn.execute(sql, (node,)))
        found = {}
        for chunk in _chunks(names):
            found.update(self._conn.execute(sql + " AND name IN (%s)" % ",".join(
                "?" * len(chunk)), [node] + chunk))
        return found

    def agents(self):
        """{agent file name: (reporting node, keepalive_ns)}."""
        self._flush_to_read()
        return dict((r[0], (r[1], r[2])) for r in self._conn.execute(
            "SELECT name, node, keepalive_ns FROM agents"))

    def agent_file_nodes(self):
        """{agent-info file name: node_name read from its current content, or None}."""
        return dict(self._conn.execute("SELECT name, node FROM agent_files"))

    def record_agent_file_nodes(self, rows):
        """Store [agent-info file name, node_name or None] rows; returns how many."""
        rows = list(rows)
        with self.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO agent_files (name, node) VALUES (?, ?)",
                             rows)
        return len(rows)

    def forget_agent_files(self, names):
        """The content of these agent-info files changed (or they are gone): forget what
        was read from them."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM agent_files WHERE name = ?", ((n,) for n in names))

    def replace_agent_keys(self, rows, source, append=False):
        """The agent_keys table becomes `rows` ([agent-info file name, JSON prefix], any
        iterable), parsed from a client.keys whose fingerprint is `source` (meta); with
        `append`, `rows` are added after the rows it holds (lines appended to the file)."""
        with self.transaction() as conn:
            if not append:
                conn.execute("DELETE FROM agent_keys")
            conn.executemany("INSERT INTO agent_keys (file, prefix) VALUES (?, ?)", rows)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (AGENT_KEYS_SOURCE, source))

    def agent_keys_source(self):
        """The fingerprint of the client.keys that agent_keys holds, or None."""
        return self.get_meta(AGENT_KEYS_SOURCE)

    def agent_listing(self):
        """A cursor of (JSON prefix, agent-info file name, node read from the file known,
        that node, node that sent the file) per agent of agent_keys, in client.keys order.
        The sender only where no node was read (the other rows need it only for a file
        emptied or removed since the scan: agent_sender): a join with agents for every row
        was a third of the query."""
        self._flush_to_read()
        return self._conn.execute(
            "SELECT k.prefix, k.file, f.name IS NOT NULL, f.node, CASE WHEN f.node IS NULL"
            " THEN (SELECT a.node FROM agents a WHERE a.name = k.file) END FROM agent_keys k"
            " LEFT JOIN agent_files f ON f.name = k.file ORDER BY k.seq")

    def agent_sender(self, name):
        """The node that sent agent-info file `name`, or None."""
        self._flush_to_read()
        row = self._conn.execute("SELECT node FROM agents WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def agent_key_count(self):
        """Rows of agent_keys: the rows agent_listing gives."""
        return self._conn.execute("SELECT count(*) FROM agent_keys").fetchone()[0]

    def get_meta(self, key, default=None):
        """A value of the meta table (text) or `default`."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key, value):
        """Store a meta value; None deletes the key."""
        with self.transaction() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             (key, value))
