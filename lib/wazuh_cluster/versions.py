"""Recent versions of our big files, so that a change goes to peers as a delta (delta.py).

A delta needs the bytes of the version the peer holds. wazuh-clusterd keeps, in memory, the
versions of files of at least `min_bytes` it read to send or to compare (keyed by SHA-256,
at most `budget` bytes, least recently used first out): with the default 10 MiB, the current
client.keys of 100 000 agents (9.4 MB; the previous one is a link, below), and a file of up to
the whole budget. A version evicted or never read (after a restart) only means the whole
file goes, as before. The budget is part of wazuh-clusterd's memory bound (budget.bound).

It also spares the sessions their reads: the newest version of each name is remembered with
its stat fingerprint, and ten sessions sending the same change read and hash the file once
(9.4 MB: 70 ms of SHA-256 each on 2.7). A delta for a (base, new) pair is made once and shared
(`delta()`), like compressed bodies (compresscache.py). Thread-safe.

Older versions are kept as links, not bytes. When a newer version of a file is read, the
common prefix and suffix of the two are recorded (a few numbers) and the older bytes let go:
a delta from any version of the chain to a newer one is the newest bytes between the
smallest prefix and the smallest suffix along the way (each link's prefix and suffix are
shared by both ends, so the smallest ones are shared by the whole chain). The master then
holds one client.keys, not two plus the one being read, and a client that is several appends
behind still gets a delta instead of the whole file.

A new version that starts with the bytes of the newest one held (an append) is not hashed
whole: the SHA-256 state after those bytes is kept with them, and only the new tail is
hashed from it. The prefix is proven by comparing the bytes read with the bytes held (a
memcmp, ~10x cheaper than SHA-256), never assumed from sizes or times: an in-place edit
anywhere in it gets the whole file hashed. Under an append a second this was ~6 of the
~10 ms of wazuh-clusterd's read of a 9.4 MB client.keys.

Nor is an append read into a new buffer of the whole file. The newest version is held as
its bytes plus a tail of what was appended since (Version); a new read compares the file with
it in CHUNK_BYTES pieces (each piece a small string from malloc's heap, compared in place
with the held bytes) and reads only what follows as a new tail. A fresh 9.4 MB string each
append was a new mapping (daemon.py fixes malloc's mmap threshold at 256 KiB for the memory
bound): ~2 300 page faults, each page zeroed by the kernel, then the old one unmapped. A
delta from a version of the chain is then only a slice of the tail; the whole file is
joined only when it goes whole (bytes_of), once per version (kept joined), and the tail is
folded into new bytes once it passes FOLD_BYTES, so no tail copy needs a mapping of its own.
Any byte of the file that differs from the held version's (an edit, a rewrite, a shorter
file) gets the whole file read and hashed as before.
"""
from __future__ import absolute_import, division, print_function

import collections
import os
import threading

from wazuh_cluster import compat, delta

MIN_BYTES = 64 << 10
READ_WAITS = 2     # times a session waits for another's read of a file before reading it
READ_WAIT_SECONDS = 60.0
BUDGET_BYTES = 10 << 20
DELTAS_KEPT = 16
LINKS_KEPT = 256   # versions a delta can start from without their bytes (a few numbers each)
DELTA_KEPT_BYTES = 64 << 10  # a larger middle (a rewrite) is made again when asked again
# Pieces of a file compared with the version held: below malloc's mmap threshold (daemon.py),
# so each is taken from the heap and given back to it, never a mapping of its own.
CHUNK_BYTES = 128 << 10
# A tail longer than this is folded into the version's bytes (one new string, ~11 minutes
# of client.keys appends at one agent a second): its copies stay below the mmap threshold.
FOLD_BYTES = 64 << 10


def most(budget):
    """The most a VersionStore of `budget` holds (wazuh-clusterd's memory bound,
    budget.bound): its versions, the one file being read beside them (one at a time; the
    version it replaces lets its bytes go only once the new one is read) and the deltas it
    keeps."""
    return 2 * budget + DELTAS_KEPT * DELTA_KEPT_BYTES


class Version(object):
    """The bytes of one version of a file, read-only: `base` (a byte string) followed by the
    first (len - len(base)) bytes of `tail`, a bytearray only ever appended to and shared by
    the later versions of a chain of appends (each a snapshot: what one version covers never
    changes). Sliced, it gives byte strings; delta.py takes it as it takes bytes."""

    __slots__ = ("_parts", "_size")

    def __init__(self, base, tail=None, size=None):
        self._parts = (base, tail)  # swapped whole (join): readers take both at once
        self._size = len(base) if size is None else size

    def __len__(self):
        return self._size

    def __getitem__(self, key):
        start, stop, _ = key.indices(self._size)  # slices only, step 1
        base, tail = self._parts
        cut = len(base)
        if stop <= cut:
            return base[start:stop]
        if start >= cut:
            return bytes(tail[start - cut:stop - cut])
        return b"".join((base[start:], bytes(tail[:stop - cut])))

    def join(self):
        """The whole version as one byte string: made once (a whole-file send), then held
        instead of its parts."""
        base, tail = self._parts
        if tail is None:
            return base
        whole = self[0:self._size]
        self._parts = (whole, None)
        return whole

    def extended(self, more):
        """This version followed by the byte string `more`: a Version sharing its bytes."""
        if not more:
            return self
        base, tail = self._parts
        used = self._size - len(base)
        if tail is None or len(tail) != used:  # not the end of its chain: a tail of its own
            tail = bytearray(tail[:used] if tail is not None else b"")
        if used + len(more) > FOLD_BYTES:  # one new string: its bytes are not copied twice
            return Version(b"".join((base, bytes(tail[:used]), more)))
        tail.extend(more)
        return Version(base, tail, self._size + len(more))

    def matches(self, offset, piece):
        """True when the byte string `piece` is this version's bytes from `offset` on."""
        base, tail = self._parts
        end = offset + len(piece)
        if end > self._size:
            return False
        cut = len(base)
        if end <= cut:
            return base.startswith(piece, offset)  # compared in place: no copy of base
        if offset < cut and not base.startswith(piece[:cut - offset], offset):
            return False
        start = max(offset, cut)
        return tail[start - cut:end - cut] == piece[start - offset:]

    def startswith(self, other):
        """True when this version begins with `other` (a Version or a byte string)."""
        if len(other) > self._size:
            return False
        if isinstance(other, Version):
            mine, theirs = self._parts[0], other._parts[0]
            if mine is theirs:  # one chain: the shared bytes are the same object
                return self.matches(len(mine), other[len(mine):len(other)])
        for offset in range(0, len(other), CHUNK_BYTES):
            if not self.matches(offset, other[offset:offset + CHUNK_BYTES]):
                return False
        return True


def bytes_of(data):
    """The byte string of `data`, a Version or bytes (a whole-file send)."""
    return data.join() if isinstance(data, Version) else data


def _version(data):
    return data if isinstance(data, Version) else Version(data)


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
        self._versions = collections.OrderedDict()  # sha256 hex -> Version, LRU first
        self._latest = {}                           # path -> (fingerprint, sha256, mtime_ns)
        self._deltas = collections.OrderedDict()    # (base sha, new sha) -> Delta or None
        self._lock = threading.Lock()
        self._making = threading.Lock()             # one delta computed at a time
        self._reading = {}                          # path -> Event of the thread reading it
        self._one_read = threading.Lock()           # one big file read at a time (most())
        # old sha256 -> (newer sha256, old size, common prefix, common suffix), LRU first
        self._links = collections.OrderedDict()
        self.waiting = 0                            # sessions waiting for such a read
        # path -> (sha256 hex, SHA-256 state after exactly those bytes) of the newest
        # version read (one per big file; a few hundred bytes each)
        self._states = {}
        self.tail_hashed = 0                        # reads hashed from a held version's state
        # callable(path, scanner fingerprint, sha256 hex, wall ns) for each new version read
        # whose descriptor kept that fingerprint through the read (hashtell.py), or None;
        # read_func then takes a third argument (sync.read_stable's `seen`)
        self.told = None

    def wanted(self, size):
        # Up to the whole budget: a newer version links the older one and lets its bytes go
        # before it is put (_read), so one file never needs room for two of its versions.
        return self.min_bytes > 0 and self.min_bytes <= size <= self.budget

    def get(self, sha256):
        with self._lock:
            data = self._versions.pop(sha256, None)
            if data is not None:
                self._versions[sha256] = data  # most recently used last
            return data

    def put(self, sha256, data):
        """Keep `data` (bytes or a Version; its SHA-256 is `sha256`) when it is big enough
        and fits. Charged its length: its bytes and its tail (the versions of a chain share
        theirs, but an older one is linked and let go before the newer one is put)."""
        if not self.wanted(len(data)):
            return
        with self._lock:
            if sha256 in self._versions:
                return
            self._versions[sha256] = _version(data)
            self.bytes += len(data)
            while self.bytes > self.budget:
                _, old = self._versions.popitem(last=False)
                self.bytes -= len(old)

    def read(self, path, read_func):
        """(data, sha256, mtime_ns) of the file at `path`, or None (see sync.read_stable);
        data is a Version when the file is big (bytes_of() for its byte string).

        From memory when its stat fingerprint is the one of the newest version read;
        otherwise read_func(path), kept when big. A big file is read by one session at a
        time: the others wait for that read and take its bytes. Every session reading its own
        copy after each client.keys append (once a second, 9.4 MB each) is what made the
        master's peak grow with its clients (4: 94 MB, 10: 147 MB).
        """
        mine = None
        for _ in range(READ_WAITS + 1):
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
            if not self.wanted(fp[0]):
                break
            with self._lock:
                busy = self._reading.get(path)
                if busy is None:
                    mine = self._reading[path] = compat.Event()  # 2.7: a waiter must not poll
                    break
                self.waiting += 1
            try:
                busy.wait(READ_WAIT_SECONDS)
            finally:
                with self._lock:
                    self.waiting -= 1
        if mine is None:  # small, or changed under every read we waited for: read it here
            if not self.wanted(fp[0]):
                # outside _one_read: not from the version held, whose tail only one read
                # at a time may extend (the file may have grown big again since its lstat)
                return self._read(path, read_func, extend=False)
            with self._one_read:
                return self._read(path, read_func)
        try:
            with self._one_read:
                return self._read(path, read_func)
        finally:
            with self._lock:
                del self._reading[path]
            mine.set()

    def _read(self, path, read_func, extend=True):
        reading = self._reading_of(path) if extend else _Reading(self, None, None)
        seen = [] if self.told is not None else None
        got = read_func(path, reading, seen)
        if got is not None and seen:
            self.told(path, seen[0][0], got[1], seen[0][1])
        if got is not None and self.wanted(len(got[0])):
            got = (_version(got[0]),) + tuple(got[1:])
            if reading.hashed and reading.hashed[0] == got[1]:
                with self._lock:
                    self._states[path] = reading.hashed
            with self._lock:
                before = self._latest.get(path)
                # Versions held in bytes that this one starts with (one read while the file
                # grew, or put by a receiver) are older states of the same file: linked too.
                older = set(sha for sha, data in self._versions.items()
                            if len(data) < len(got[0]) and got[0].startswith(data))
            if before is not None:
                older.add(before[1])
            older.discard(got[1])
            # Linked before the new bytes are put: the put evicts least recently used bytes
            # when two versions are held (one read while the file grew), and a version
            # evicted before its link is gone for every peer holding it (whole file).
            for sha in older:
                self._link(sha, got[1], got[0])
            self.put(got[1], got[0])
            try:
                after = fingerprint(os.lstat(path))
            except OSError:
                return got
            if after[0] == len(got[0]) and after[1] == got[2]:
                with self._lock:
                    self._latest[path] = (after, got[1], got[2])
        return got

    def _reading_of(self, path):
        """read_func's `reading` for a new read of `path` (see _Reading)."""
        with self._lock:
            prior = self._states.get(path)
            held = None if prior is None else self._versions.get(prior[0])  # LRU unmoved
        return _Reading(self, held, None if held is None else prior[1])

    def _link(self, old_sha256, new_sha256, new):
        """Keep how `new` (a Version) differs from the stored version `old_sha256`, not
        its bytes (one chain of appends: a comparison of their tails)."""
        old = self.get(old_sha256)
        if old is None:
            return
        head = delta.common_prefix(old, new)
        tail = delta.common_suffix(old, new, min(len(old), len(new)) - head)
        with self._lock:
            self._links[old_sha256] = (new_sha256, len(old), head, tail)
            while len(self._links) > LINKS_KEPT:
                self._links.popitem(last=False)
            if self._versions.pop(old_sha256, None) is not None:
                self.bytes -= len(old)

    def _chained(self, base_sha256, new_sha256, new):
        """The delta.Delta from `base_sha256` to `new` along the links, or None."""
        size = head = tail = None
        sha = base_sha256
        with self._lock:
            for _ in range(len(self._links)):
                link = self._links.get(sha)
                if link is None:
                    return None
                sha, old_size, link_head, link_tail = link
                if size is None:
                    size, head, tail = old_size, link_head, link_tail
                head, tail = min(head, link_head), min(tail, link_tail)
                if sha == new_sha256:
                    break
            else:
                return None
        return delta.Delta(size, head, tail, new[head:len(new) - tail])

    def delta(self, base_sha256, new_sha256, new):
        """The delta.Delta from the base (stored, or linked to `new`: bytes or a Version) to
        `new`, or None when the base is unknown or the delta is not worth it; made once per
        pair for every session."""
        key = (base_sha256, new_sha256)
        new = _version(new)
        with self._making:
            with self._lock:
                if key in self._deltas:
                    return self._deltas[key]
            base = self.get(base_sha256)
            if base is None:
                made = self._chained(base_sha256, new_sha256, new)
                if made is None:
                    return None
            else:
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


class _Reading(object):
    """How sync.read_stable reads and hashes one new version of a big file (one at a time).

    `held`: the newest version read of that file (a Version, or None) and `state` the SHA-256
    state after exactly its bytes. The file is compared with `held` piece by piece; when it
    begins with all of it, only the rest is read, as a Version extending it, and only the rest
    is hashed, from `state`. Otherwise the file is read and hashed whole (bytes).
    """

    def __init__(self, store, held, state):
        self.store = store
        self.held = held
        self.state = state
        self.more = None    # the bytes read after `held`, when the file begins with it
        self.hashed = None  # (hex digits, SHA-256 state after them) of the last digest

    def read(self, handle, most):
        """At most `most` bytes of the open file `handle`."""
        held = self.held
        self.more = None
        if held is not None and len(held) < most:
            offset = 0
            while offset < len(held):
                piece = handle.read(min(CHUNK_BYTES, len(held) - offset))
                if not piece or not held.matches(offset, piece):
                    break
                offset += len(piece)
            else:
                self.more = handle.read(most - len(held))
                return held.extended(self.more)
            handle.seek(0)
        return handle.read(most)

    def digest(self, data):
        """The SHA-256 hex digits of `data`, what read() returned."""
        if self.more is not None:
            state = self.state.copy()
            state.update(self.more)
            self.store.tail_hashed += 1
        else:
            state = compat.sha256(bytes_of(data))
        self.hashed = (state.hexdigest(), state)
        return self.hashed[0]
