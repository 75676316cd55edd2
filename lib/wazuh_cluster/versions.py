"""Recent versions of our big files, so that a change goes to peers as a delta (delta.py).

A delta needs the bytes of the version the peer holds. wazuh-clusterd keeps, in memory, the
versions of files of at least `min_bytes` it read to send or to compare (keyed by SHA-256,
at most `budget` bytes, least recently used first out): with the default 24 MiB, the current
and the previous client.keys of 100 000 agents (9.4 MB each). A version evicted or never
read (after a restart) only means the whole file goes, as before.

It also spares the sessions their reads: the newest version of each name is remembered with
its stat fingerprint, and ten sessions sending the same change read and hash the file once
(9.4 MB: 70 ms of SHA-256 each on 2.7). A delta for a (base, new) pair is made once and shared
(`delta()`), like compressed bodies (compresscache.py). Thread-safe.

Appends. A version read that starts with another version held in bytes (client.keys grown
by an agent; whatever file it was read from, a prefix is a prefix) makes that one a prefix of
it: kept as (newer SHA-256, size), not as bytes, for up to PREFIXES_KEPT versions. Clients applying a change take a second or more
under load, while the master appends an agent a second: with only the last two versions in
bytes, a client three appends behind got the whole 9.4 MB file, which took it longer still,
and every client fell behind for good (most pushes of a 60 s churn at 10 clients went whole).
"""
from __future__ import absolute_import, division, print_function

import collections
import os
import threading

from wazuh_cluster import compat, delta

MIN_BYTES = 64 << 10
BUDGET_BYTES = 24 << 20
DELTAS_KEPT = 16
DELTA_KEPT_BYTES = 256 << 10  # a larger middle (a rewrite) is made again when asked again
PREFIXES_KEPT = 1024          # older versions remembered as a prefix of a newer one


def fingerprint(st):
    """What must stay equal for a file's content to be taken as unchanged (as scanner.py)."""
    return (st.st_size, compat.stat_mtime_ns(st), st.st_ino, st.st_dev, compat.stat_ctime_ns(st))


class VersionStore(object):
    """Bytes of recent versions of big files by SHA-256, and the deltas between them."""

    def __init__(self, min_bytes=MIN_BYTES, budget=BUDGET_BYTES):
        self.min_bytes = min_bytes
        self.budget = budget
        self.bytes = 0
        self.deltas_made = 0
        self._versions = collections.OrderedDict()  # sha256 hex -> bytes, LRU first
        self._latest = {}                           # path -> (fingerprint, sha256, mtime_ns)
        self._deltas = collections.OrderedDict()    # (base sha, new sha) -> Delta or None
        self._prefixes = collections.OrderedDict()  # sha256 -> (newer sha256, size), oldest first
        self._lock = threading.Lock()
        self._making = threading.Lock()             # one delta computed at a time

    def wanted(self, size):
        return self.min_bytes > 0 and self.min_bytes <= size <= self.budget // 2

    def get(self, sha256):
        with self._lock:
            data = self._versions.pop(sha256, None)
            if data is not None:
                self._versions[sha256] = data  # most recently used last
                return data
            owner, size = self._prefixes.get(sha256, (None, 0))
            data = self._versions.get(owner)
            return None if data is None else data[:size]

    def _grown(self, old_sha256, new_sha256, new):
        """Version `new` was read: when it starts with the version `old_sha256` held in
        bytes, that one (and every prefix of it) becomes a prefix of the new one, and its
        bytes go. Called with the lock held."""
        old = self._versions.get(old_sha256)
        if old is None or len(old) >= len(new) or not new.startswith(old):
            return
        for sha, (owner, size) in list(self._prefixes.items()):
            if owner == old_sha256:
                self._prefixes[sha] = (new_sha256, size)
        self._prefixes.pop(old_sha256, None)
        self._prefixes[old_sha256] = (new_sha256, len(old))
        while len(self._prefixes) > PREFIXES_KEPT:
            self._prefixes.popitem(last=False)
        del self._versions[old_sha256]
        self.bytes -= len(old)

    def put(self, sha256, data):
        """Keep `data` (whose SHA-256 is `sha256`) when it is big enough and fits."""
        if not self.wanted(len(data)):
            return
        with self._lock:
            if sha256 in self._versions:
                return
            self._versions[sha256] = data
            self.bytes += len(data)
            while self.bytes > self.budget:
                _, old = self._versions.popitem(last=False)
                self.bytes -= len(old)

    def read(self, path, read_func):
        """(data, sha256, mtime_ns) of the file at `path`, or None (see sync.read_stable).

        From memory when its stat fingerprint is the one of the newest version read;
        otherwise read_func(path), kept when big.
        """
        try:
            fp = fingerprint(os.lstat(path))
        except OSError:
            return None
        with self._lock:
            known = self._latest.get(path)
        if known is not None and known[0] == fp:
            data = self.get(known[1])
            if data is not None:
                return data, known[1], known[2]
        got = read_func(path)
        if got is not None and self.wanted(len(got[0])):
            with self._lock:  # before the put, which could evict an old version
                for old in [sha for sha in self._versions if sha != got[1]]:
                    self._grown(old, got[1], got[0])
            self.put(got[1], got[0])
            try:
                after = fingerprint(os.lstat(path))
            except OSError:
                return got
            if after[0] == len(got[0]) and after[1] == got[2]:
                with self._lock:
                    self._latest[path] = (after, got[1], got[2])
        return got

    def delta(self, base_sha256, new_sha256, new):
        """The delta.Delta from the stored base to `new`, or None when the base is not here
        or the delta is not worth it; made once per pair for every session."""
        key = (base_sha256, new_sha256)
        with self._making:
            with self._lock:
                if key in self._deltas:
                    return self._deltas[key]
            with self._lock:
                owner, size = self._prefixes.get(base_sha256, (None, 0))
            if owner == new_sha256:  # an append: no 9.4 MB compared to find it
                made = delta.Delta(size, size, 0, new[size:])
            else:
                base = self.get(base_sha256)
                if base is None:
                    return None
                made = delta.make(base, new)
                del base
            if not delta.worth(made, len(new)):
                made = None
            self.deltas_made += 1
            if made is not None and len(made.middle) > DELTA_KEPT_BYTES:
                return made
            with self._lock:
                self._deltas[key] = made
                while len(self._deltas) > DELTAS_KEPT:
                    self._deltas.popitem(last=False)
            return made
