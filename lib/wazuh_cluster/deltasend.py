"""The sending side of deltas: which version of our big files one peer holds.

A delta (delta.py) is made against the version the peer holds, never a guess: its SHA-256
comes from the peer's manifest in a full round (for file items: client.keys) or from the
peer's answer "synchronized" to what we sent. A state other than "synchronized" forgets it,
and so does a refused delta: the whole file goes then. The bytes of that version come from
the process-wide versions.VersionStore; without them the whole file goes, as to a peer that
did not announce "delta" (store None: every file whole, as before deltas existed).
"""
from __future__ import absolute_import, division, print_function

import os

from wazuh_cluster import text

STABLE_READS = 3   # reads of a file that changed while read, before it is postponed


class PeerVersions(object):
    """Per peer: name -> (SHA-256, mtime_ns) of the version it holds, for our big files.

    `store`: the shared versions.VersionStore, or None when no delta goes to this peer;
    `items`: our items by name; `read_func(path, reading=None, seen=None)`:
    sync.read_stable. Used by the peer's sync thread and its sync_files calls in flight (single
    dict operations only).
    """

    def __init__(self, store, home, items, read_func):
        self.store = store
        self.home = home
        self.items = items
        self.read_func = read_func
        self.held = {}         # name -> (sha256, mtime_ns of that version as the peer took it)
        self.sent = 0        # deltas the peer applied
        self.whole_why = None  # why delta_for's last None, for a debug line
        # name -> why the version the peer holds is unknown: big files only (at most one
        # entry per big file the peer was sent), never one per small file sent
        self.forgot = {}

    def shares(self, size):
        """True when a file of `size` bytes is read into the shared store (deltas possible)."""
        return self.store is not None and self.store.wanted(size)

    def read(self, name):
        """(data, sha256, mtime_ns) of our file `name`, or None when it is gone, or changed
        while read STABLE_READS times in a row; data is a versions.Version when the file is
        read into the store (versions.bytes_of for its byte string).

        Read again at once when it changed: what changed it is newer still, and the caller
        postponing it sends it only after sync.RETRY_DELAY. Under an append a second, a read
        of client.keys on a busy master (0.7 s at load 16) often spanned one: that client
        had the append 2 s late (issue 11)."""
        path = os.path.join(self.home, *name.split("/"))
        for _ in range(STABLE_READS):
            got = self.read_func(path) if self.store is None else \
                self.store.read(path, self.read_func)
            if got is not None or not os.path.lexists(path):
                return got
        return None

    def delta_for(self, name, got):
        """(base sha256, delta.Delta) from the peer's version to `got`; None: send it whole."""
        base = self.held.get(name, (None,))[0]
        if self.store is None or base is None or base == got[1] or \
                not self.store.wanted(len(got[0])):
            self.whole_why = "the version the peer holds is unknown (%s)" % \
                self.forgot.get(name, "never told") if base is None else "the peer holds it"
            return None
        made = self.store.delta(base, got[1], got[0])
        self.whole_why = "no delta from the version the peer holds (%s): gone from the " \
            "store, or not worth it" % text.printable(base[:12])
        return None if made is None else (base, made)

    def holds(self, name, sha256):
        """True when the peer told us it holds this very version of our big file `name`."""
        return self.store is not None and self.held.get(name, (None,))[0] == sha256

    def holds_exactly(self, name, sha256, mtime_ns):
        """True when the peer told us it holds this version with this very mtime: nothing of
        it is left to send."""
        return self.store is not None and self.held.get(name) == (sha256, mtime_ns)

    def note_meta(self, entries, states):
        """After a sync_files answer: a metadata-only update of a big file that failed means
        the peer does not hold the version we took it for."""
        for entry in entries:
            name = entry["name"]
            held = self.held.get(name)
            if held is None:
                continue
            if states.get(name) != "synchronized":
                self._forget(name, "its mtime update", states)
            elif held[0] == entry["sha256"]:
                self.held[name] = (held[0], entry.get("mtime_ns"))

    def _hold(self, name, sha256, mtime_ns):
        self.held[name] = (sha256, mtime_ns)
        self.forgot.pop(name, None)

    def _forget(self, name, why, states=None):
        self.held.pop(name, None)
        if states is not None:
            why = "%s: %s" % (why, text.printable(states.get(name)))
        self.forgot[name] = why

    def refused(self, deltas, names):
        """The names of `deltas` (header entries we sent) that the peer listed as refused;
        their versions are forgotten."""
        sent = set(entry["name"] for entry in deltas)
        found = [n for n in names if n in sent] if isinstance(names, list) else []
        for name in found:
            self._forget(name, "a delta refused")
        return found

    def note_sent(self, entries, states):
        """After a sync_files answer: what the peer holds now of the files and deltas sent."""
        if self.store is None:
            return
        for entry in entries:
            name = entry["name"]
            if not self.store.wanted(entry.get("result_size", entry["size"])):
                # A small file never goes as a delta: nothing to remember of it (a why per
                # small file sent held 8 MB at 8 clients and 10 000 shared files, growing
                # with clients times files for the whole session).
                if name in self.held:
                    self._forget(name, "the last one sent is not a big file")
                continue
            if states.get(name) == "synchronized":
                self._hold(name, entry["sha256"], entry.get("mtime_ns"))
                if "result_size" in entry:
                    self.sent += 1
            else:
                self._forget(name, "the last one sent", states)

    def applied_since(self, name, listed):
        """True when the peer's manifest entry `listed` is older than the version the peer
        told us it applied: its internal daemon had not looked at the file again since a
        push (a bucket's manifest is refreshed once per scan_interval). Under an append a
        second, a round's manifest had the version of seconds before: its delta was
        refused and the whole 9.4 MB went (20 clients, issue 11). A wrong guess costs the
        same: a delta refused, then the whole file."""
        sha256, known = self.held.get(name, (None, None))
        return known is not None and sha256 != listed.sha256 and \
            listed.mtime_ns is not None and listed.mtime_ns < known

    def note_round(self, mine, theirs):
        """A full round: the versions of our file items (client.keys) the peer holds. One that
        is also ours goes into the store now, so that the next change has its base even
        right after a start."""
        if self.store is None:
            return
        for name, entry in mine.items():
            item = self.items.get(entry.item)
            if item is None or item.kind != "file":
                continue
            held = theirs.get(name)
            if held is None or held.sha256 is None:
                self._forget(name, "not in its manifest")
                continue
            if self.applied_since(name, held):
                continue
            self._hold(name, held.sha256, held.mtime_ns)
            if held.sha256 == entry.sha256:
                self.read(name)
