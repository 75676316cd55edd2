"""The durable election record of this node: term, voted_for, last applied version.

One small JSON file of wazuh-clusterd's own (election.py explains why it is not in
cluster.db), var/db/cluster-election.json. save() returns only when the new record is durable:
written to a temporary file in the same folder (O_EXCL, never following a symlink), fsync'd,
renamed over the old one, and the folder fsync'd (fsops' helpers, as for received files). A
crash at any instant leaves the old or the new record, never a mixture, and at most a temporary
file that the next load() removes. load() never guesses: a record that cannot be read whole is
an error naming the file (starting again from term 0 could vote twice in a term).

A missing record is told from a never written one by a marker, etc/cluster-election.joined,
written and fsync'd before the first record (and at the first start of a node whose record
predates it). The record missing while the marker exists stops the start. Why etc/: the
record's own folder var/db is the one an operator wipes or restores (a damaged cluster.db, a
reset database, a backup of the data only), and a marker there would go with the record; etc/
holds the node's configuration and keys, which no such step removes. Losing both takes an
operator deleting the marker, the documented recovery (README: Failover, a lost election
record), or a reinstall (a new node).
"""
from __future__ import absolute_import, division, print_function

import binascii
import errno
import json
import os

from wazuh_cluster import compat, fsops
from wazuh_cluster.compat import integer_types, string_types
from wazuh_cluster.daemon import remove_file

FILE_NAME = "cluster-election.json"
MARKER_NAME = "cluster-election.joined"
MARKER_TEXT = (b"This node has kept an election record (var/db/cluster-election.json) with "
               b"cluster.failover=1.\nWhile this file exists the record must exist too: see "
               b"README, Master failover, a lost election record.\n")
_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
          | getattr(os, "O_CLOEXEC", 0))
EMPTY = (0, None, (0, 0))


class ElectionStoreError(Exception):
    """The election record exists but cannot be used; the message names the file."""


def path_in(db_folder):
    """Where the record lives: next to cluster.db, in a folder wazuh-clusterd writes."""
    return os.path.join(db_folder, FILE_NAME)


def marker_in(db_folder):
    """The marker's place for a record in `db_folder` (PREFIX/var/db): PREFIX/etc."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(db_folder)))
    return os.path.join(home, "etc", MARKER_NAME)


def _valid_int(value):
    return isinstance(value, integer_types) and not isinstance(value, bool) and value >= 0


def decode(raw, path):
    """(term, voted_for, (term, seq)) from the file's bytes; ElectionStoreError otherwise."""
    try:
        record = json.loads(compat.to_text(raw))
    except ValueError as exc:
        raise ElectionStoreError("%s: not a valid election record (%s)" % (path, exc))
    last = record.get("last") if isinstance(record, dict) else None
    voted_for = record.get("voted_for") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or not _valid_int(record.get("term"))
            or not (voted_for is None or isinstance(voted_for, string_types))
            or not isinstance(last, list) or len(last) != 2
            or not all(_valid_int(item) for item in last) or last[0] > record["term"]):
        raise ElectionStoreError("%s: not a valid election record (fields term, voted_for, "
                                 "last)" % path)
    return record["term"], voted_for, (last[0], last[1])


def encode(term, voted_for, last):
    return compat.to_bytes(json.dumps({"term": term, "voted_for": voted_for,
                                       "last": [last[0], last[1]]}, sort_keys=True) + "\n")


class FileStore(object):
    """Election record in `path`, its marker in `marker`; load(), save() and joined() as
    election.Election expects."""

    def __init__(self, path, marker):
        self.path = path
        self.marker = marker
        self._joined = None     # known after load()

    def joined(self):
        """False only when load() found neither the record nor the marker: this node never
        saved a record, so it never voted nor acknowledged a heartbeat (a promise)."""
        return self._joined is not False

    def load(self):
        """The record; also removes the temporary files a crash in save() left behind."""
        for path in (self.path, self.marker):
            folder, base = os.path.split(path)
            try:
                names = os.listdir(folder or ".")
            except OSError:
                names = []     # a missing folder: open() below says what is wrong
            for name in names:
                if name.startswith(base + ".") and name.endswith(".tmp"):
                    remove_file(os.path.join(folder, name))
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except (IOError, OSError) as exc:
            if exc.errno != errno.ENOENT:
                raise ElectionStoreError("%s: cannot read the election record: %s"
                                         % (self.path, fsops.why(exc)))
            if os.path.lexists(self.marker):
                raise ElectionStoreError(
                    "%s is missing but %s says this node kept one: starting from term 0 "
                    "could vote twice in a term (see README, Master failover, a lost election "
                    "record)" % (self.path, self.marker))
            self._joined = False
            return EMPTY
        record = decode(raw, self.path)
        try:
            self._mark()      # a record from before the marker existed
        except (IOError, OSError) as exc:
            raise ElectionStoreError("%s: cannot write the marker of the election record: %s"
                                     % (self.marker, fsops.why(exc)))
        self._joined = True
        return record

    def _mark(self):
        """The marker, durable, before any record depends on it (once)."""
        if self._joined or os.path.lexists(self.marker):
            return
        write_durably(MARKER_TEXT, self.marker)

    def save(self, term, voted_for, last):
        self._mark()
        self._joined = True
        write_durably(encode(term, voted_for, last), self.path)


def write_durably(data, path):
    """`data` in `path`, replaced atomically and durably: a temporary file (never following a
    symlink), fsync'd, renamed, the folder fsync'd. A crash leaves the old or the new file."""
    folder = os.path.dirname(path) or "."
    temp = "%s.%s.tmp" % (path, compat.to_text(binascii.hexlify(os.urandom(6))))
    fd = os.open(temp, _FLAGS, 0o600)
    try:
        try:
            fsops.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except (IOError, OSError):
        remove_file(temp)
        raise
    fsops.fsync_folder(folder)


class MemoryStore(object):
    """The same contract kept in memory (tests: a simulated node's 'disk' across restarts)."""

    def __init__(self):
        self.record = EMPTY
        self.saves = 0

    def load(self):
        return self.record

    def joined(self):
        return self.saves > 0 or self.record != EMPTY

    def save(self, term, voted_for, last):
        self.record = (term, voted_for, tuple(last))
        self.saves += 1

