"""Encode once, send to many: the zlib stream of a large message body, kept for the next
session that sends the same bytes.

A master pushing a change to ten clients sends each the same sync_files body (the same
files, checksums and mtimes); it compressed that body once per client, and compression
was over half of wazuh-clusterd's busy time under churn (issue 11, a 9.4 MB client.keys).
Bodies of at least `min_bytes` are keyed by their SHA-256 (hashing costs a tenth of zlib at
level 1); at most `budget` bytes of compressed streams are kept (`.bytes` counts them),
the least recently used going first; wazuh-clusterd sets that bound to the part of its memory
budget set aside for the cache (budget.py, `resize`). A session that asks for a body another session is
compressing at that moment waits for that result instead of compressing it too.
Thread-safe; a leaf (standard library and compat only).
"""
from __future__ import absolute_import, division, print_function

import collections
import threading
import zlib

from wazuh_cluster import compat

MIN_BYTES = 1 << 20
BUDGET_BYTES = 16 << 20
WAIT_SECONDS = 60.0  # a compression in another thread that takes longer is done again here


class CompressedCache(object):
    """compress(data) -> compress_func(data), shared by every caller for large bodies;
    compress_parts(parts) the same for the concatenation of `parts`, never joined here."""

    def __init__(self, compress_func, min_bytes=MIN_BYTES, budget=BUDGET_BYTES, level=1):
        self._compress = compress_func
        self.level = level
        self.min_bytes = min_bytes
        self.budget = budget
        self.bytes = 0
        self.hits = 0
        self._entries = collections.OrderedDict()  # digest -> compressed bytes, LRU first
        self._running = {}                          # digest -> Event of the thread at work
        self._lock = threading.Lock()

    def compress(self, data):
        """The compressed stream of `data`, from the cache when another session made it."""
        if len(data) < self.min_bytes:
            return self._compress(data)
        return self._cached(compat.sha256(data).digest(), lambda: self._compress(data))

    def compress_parts(self, parts):
        """The compressed stream of b"".join(parts), without that join: a batch of files is
        held once, not twice, while it is compressed."""
        if sum(len(p) for p in parts) < self.min_bytes:
            return self._compress(b"".join(parts))
        digest = compat.sha256()
        for part in parts:
            digest.update(part)
        return self._cached(digest.digest(), lambda: _deflate_parts(parts, self.level))

    def resize(self, budget):
        """Keep at most `budget` bytes from now on."""
        with self._lock:
            self.budget = budget
            self._trim()

    def _cached(self, key, make):
        with self._lock:
            found = self._take(key)
            if found is None:
                running = self._running.get(key)
                if running is None:
                    self._running[key] = compat.Event()  # 2.7: a waiter must not poll
        if found is not None:
            return found
        if running is not None:
            # Another session compresses these very bytes now: wait for its stream.
            running.wait(WAIT_SECONDS)
            with self._lock:
                found = self._take(key)
            return found if found is not None else make()
        try:
            out = make()
            with self._lock:
                self._keep(key, out)
        finally:
            with self._lock:
                self._running.pop(key).set()
        return out

    def _take(self, key):
        found = self._entries.pop(key, None)
        if found is not None:
            self._entries[key] = found  # most recently used last
            self.hits += 1
        return found

    def _keep(self, key, out):
        if len(out) > self.budget or key in self._entries:
            return
        self._entries[key] = out
        self.bytes += len(out)
        self._trim()

    def _trim(self):
        while self.bytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old)


def _deflate_parts(parts, level):
    z = zlib.compressobj(level)
    out = [z.compress(part) for part in parts]
    out.append(z.flush())
    return b"".join(out)
