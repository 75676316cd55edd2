"""Stat-based change detection over the items (SPEC section 4), without inotify.

The scanner keeps one small bytes object per tracked file (memory: 100 000 files must fit a
daemon of 100 MB; a tuple of Python ints costs three times as much):
    name -> struct(size, mtime_ns, ino, ctime_ns, st_mode) + sha256 digest (32 raw bytes)
and one tuple per tracked folder:
    name -> (mtime_ns, ctime_ns, ino, file base names, sub-folder base names)
Names are relative to the installation directory with "/" separators, kept as the
interpreter's native str internally and handed out as text.

Two passes:
- poll(): cheap, every second or so. Stats the hot files (client.keys) and every tracked
  folder; only a folder whose fingerprint changed is listed again, which catches creates,
  deletes and renames anywhere (a new sub-folder is scanned in full). It also re-checks the
  few files left for retry (changed while being hashed) or "racy" (see below).
- full_pass(): stats every file; catches in-place edits, which do not touch the folder.
  A folder whose fingerprint is still the one it was listed with holds the files it was
  listed with (creating, removing or renaming an entry changes its mtime), so it is not
  listed again: its files are lstat-ed by name, relative to the folder's descriptor on 3.x
  (no listing, no DirEntry, no path walk per file: the steady pass over 10 000 shared files
  was most of an idle master's cost). A folder listed in the clock tick of its last change
  ("racy", as below) is listed again by the next full pass. Those lstats run in C loops
  and their fingerprints are packed into one "seal" (a SHA-256, 32 bytes per folder) per
  group of files: a group whose seal is the one kept when all its files last matched their
  settled records, none changed since, is unchanged without any Python code per file
  (Scanner._recheck_dir says why that is as strong as comparing each record).

A pass may be given a budget of hashing time: files of the items named to defer_hashing()
(those this node only receives) found new or changed past it wait for drain(), so that one
pass over tens of thousands of arriving files does not hold the internal daemon for seconds.

A file is hashed only when its fingerprint changed. Same content with a new mtime is a
"touch": reported for items whose mtime is data (agent-info keepalives), otherwise the
fingerprint is updated silently.

Racy files (the problem git calls "racily clean"): kernels stamp files with a coarse clock
(a few ms, or a second on some file systems), so a file rewritten with the same size right
after we hashed it can keep the same fingerprint. A file whose mtime/ctime is within
RACY_NS of the moment it was hashed is hashed once more when that much older (not at every
poll meanwhile: a burst of 100 000 received files would be read again at each).
"""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import errno
import fnmatch
import hashlib
import heapq
import itertools
import operator
import os
import re
import stat
import struct
import time

from wazuh_cluster import compat
from wazuh_cluster.pathrules import TEMP_PATTERN

# Files modified this close to the moment we hash them are hashed again later (see above).
RACY_NS = 2 * 10 ** 9
MAX_HINTS = 64  # hints not used yet (see Scanner.hint); a flood of them is dropped
# A pass with a hashing budget (see Scanner.defer_hashing) hashes at least this many files
# before it looks at the clock: a few files never wait for a later slice.
MIN_HASHED_PER_SLICE = 64
READ_CHUNK = 1 << 20
MAX_FOLDERS_REMEMBERED = 4096  # item_of's cache (a tree has some hundreds of folders)
# What receivers accept (SPEC section 4): printable ASCII, no backslash; anything else is skipped
# here (reported once) instead of failing on every peer.
_PORTABLE = re.compile(compat.native_str(r"^[\x20-\x5b\x5d-\x7e]{1,255}$"))
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_GONE = (errno.ENOENT, errno.ENOTDIR)
# A file record: the packed fingerprint, then the digest.
_FP = struct.Struct("<qqQqI")
_FP_LEN = _FP.size
_INO = struct.Struct("<Q")
_REC_LEN = _FP_LEN + 32
# A record may end with its summary bucket and value (Scanner.summary_sums), the 128 bits
# as two halves.
_SUMMED = struct.Struct("<BQQ")
_LOW64 = (1 << 64) - 1
# A summed record's mtime_ns and summary fields in one unpack (summary_sums).
_SUMMED_MTIME = struct.Struct("<8xq%dxBQQ" % (_REC_LEN - 16))
assert _SUMMED_MTIME.size == _REC_LEN + _SUMMED.size
_SUMMED_REC_LEN = _SUMMED_MTIME.size  # a record that keeps its summary's bucket and base
_SUMMED_LENS = frozenset([_SUMMED_REC_LEN])
_NATIVE = frozenset([str])
_PARTS = operator.methodcaller("rpartition", "/")  # a name's (folder, "/", base)
_HEAD = operator.itemgetter(0)
_SLASHES = operator.methodcaller("count", "/")
_INO_AT = 16  # offset of the inode in _FP
_INO_CTIME = struct.Struct("<Qq")  # the inode and ctime_ns, at _INO_AT
_record_ino = operator.itemgetter(slice(_INO_AT, _INO_AT + _INO.size))  # packed, of a record
_st_ino = operator.attrgetter("st_ino")
# A record as the internal daemon's "fingerprints" answer carries it (keepalive.py): size,
# mtime_ns, ino, ctime_ns, st_mode and the SHA-256 digest, its first _REC_LEN bytes as they
# are; all zeros for a file it does not vouch for (no file has inode 0 and that digest).
FINGERPRINT = struct.Struct("<qqQqI32s")
NO_FINGERPRINT = b"\0" * FINGERPRINT.size
FINGERPRINT_MTIME_AT = 8  # offset of the mtime_ns in a FINGERPRINT record
_MTIME_NS = struct.Struct("<q")  # the mtime_ns, at FINGERPRINT_MTIME_AT (and in a record)
assert FINGERPRINT.size == _REC_LEN


class ChangeSet(collections.namedtuple("ChangeSet",
                                       ("changed", "touched", "deleted", "deleted_dirs"))):
    """What one pass saw: sorted lists of names (native str, printable ASCII) relative to
    the installation."""
    __slots__ = ()

    def is_empty(self):
        """True when the pass saw nothing worth telling anyone."""
        return not (self.changed or self.touched or self.deleted or self.deleted_dirs)

    def to_event(self):
        """The frame body pushed to subscribers of the internal daemon."""
        return {"event": "changes", "changed": list(self.changed), "touched": list(self.touched),
                "deleted": list(self.deleted), "deleted_dirs": list(self.deleted_dirs)}


def merge(changesets):
    """One ChangeSet from several, in order (a later change wins over an earlier deletion)."""
    out = _Collector()
    for cs in changesets:
        for name in cs.deleted:
            out.changed.discard(name)
            out.touched.discard(name)
            out.deleted.add(name)
        for name in cs.changed:
            out.deleted.discard(name)
            out.changed.add(name)
        out.touched.update(cs.touched)
        out.deleted_dirs.update(cs.deleted_dirs)
    return out.freeze()


class _Collector(object):
    """Mutable accumulator of one pass (sets, so a name seen twice counts once)."""
    __slots__ = ("changed", "touched", "deleted", "deleted_dirs")

    def __init__(self):
        self.changed, self.touched, self.deleted, self.deleted_dirs = set(), set(), set(), set()

    def freeze(self):
        # A file deleted and re-created inside one pass is simply "changed".
        self.deleted -= self.changed
        self.touched -= self.changed
        # Names stay the interpreter's str: on 2.7 that is bytes, but they are printable
        # ASCII (see _PORTABLE), so they compare, hash and JSON-encode exactly like text,
        # and 100 000 of them as unicode would add ~20 MB to the peak of a first pass.
        return ChangeSet(*[sorted(names) for names in
                           (self.changed, self.touched, self.deleted, self.deleted_dirs)])


if hasattr(os.stat_result, "st_mtime_ns"):
    # One C call builds the whole fingerprint: this is the inner loop of every pass.
    _fingerprint = operator.attrgetter("st_size", "st_mtime_ns", "st_ino", "st_ctime_ns",
                                       "st_mode")
else:  # 2.7: float times only
    def _fingerprint(st):
        # compat.stat_mtime_ns/stat_ctime_ns inlined (same formula): two calls and two
        # getattr per file are a third of a 2.7 pass.
        return (st.st_size, int(round(st.st_mtime * 1e9)), st.st_ino,
                int(round(st.st_ctime * 1e9)), st.st_mode)


# (size, mtime_ns, ino, ctime_ns, st_mode) of a stat result, as a record holds it: a receiver
# that gives a file its mtime tells the internal daemon the result (keepalive.py).
fingerprint = _fingerprint


def packed_record(fp, digest_hex):
    """The FINGERPRINT record of a fingerprint() and a SHA-256 in hex (a receiver's learned
    row, keepalive.tell)."""
    return FINGERPRINT.pack(fp[0], fp[1], fp[2], fp[3], fp[4], binascii.unhexlify(digest_hex))


# A group of files' seal (Scanner._recheck_dir) packs each file's fingerprint as lstat gives
# it: the record's fields on 3.x; on 2.7 the float times as doubles (the record's ns are a
# function of them: equal doubles make equal records), so no Python code runs per file.
SEAL_FILES = 4096  # files per seal: a folder of shared files is one group
if hasattr(os.stat_result, "st_mtime_ns"):
    _SEAL = _FP
    _seal_fields = _fingerprint
    _record_fp = None  # the seal's packing is the record's
else:
    _SEAL = struct.Struct("<qdQdI")
    _seal_fields = operator.attrgetter("st_size", "st_mtime", "st_ino", "st_ctime", "st_mode")

    def _record_fp(packed):
        """A record's packed fingerprint from a seal's packed fields (as _fingerprint)."""
        size, mtime, ino, ctime, mode = _SEAL.unpack(packed)
        return _FP.pack(size, int(round(mtime * 1e9)), ino, int(round(ctime * 1e9)), mode)
_SEAL_LEN = _SEAL.size


if hasattr(os.stat_result, "st_mtime_ns"):
    _dir_fingerprint = operator.attrgetter("st_mtime_ns", "st_ctime_ns", "st_ino")
else:
    def _dir_fingerprint(st):
        return (int(round(st.st_mtime * 1e9)), int(round(st.st_ctime * 1e9)), st.st_ino)


def _folders(names):
    """The folders of these names (not empty): a batch's are all in one, seen by C calls
    without a string made a name."""
    folder = names[0].rpartition("/")[0]
    if all(map(operator.methodcaller("startswith", folder + "/"), names)) and \
            set(map(_SLASHES, names)) == set([folder.count("/") + 1]):
        return [folder]
    return set(map(_HEAD, map(_PARTS, names)))


def _native(name):
    """compat.native_str, without its two calls for a name that is native already (ours,
    or JSON text on 3.x) or JSON text on 2.7 (unicode, encoded here in one call): a peer's
    round looks up 10 000 names several times each, and a 2.7 master's internal daemon
    spent 4 % of its time under churn in those calls for the keepalives' names."""
    if type(name) is str:
        return name
    if type(name) is _JSON_TEXT:
        return name.encode("utf-8")
    return compat.native_str(name)


_JSON_TEXT = compat.text_type if compat.PY2 else None


def native_names(names):
    """`names` as the map keeps them (_native each), the list itself when they are already
    (3.x, and a long JSON document's on 2.7: compat.json_loads), looked at once a batch."""
    return names if set(map(type, names)) <= _NATIVE else [_native(name) for name in names]


def _kind_word(mode):
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


class Scanner(object):
    """Change detection over `items` (config.Item tuples) below `home`.

    `exclude_patterns` are fnmatch patterns matched against base names (files and folders).
    `report(name, reason)` is called once per skipped entry (symlink, special file,
    unportable name, unreadable file); `clock` is monotonic and only times the passes;
    `wall` returns epoch seconds and only serves the racy-file check.
    """

    def __init__(self, home, items, exclude_patterns, clock=compat.monotonic, wall=time.time,
                 report=None, summary_entry=None):
        self.home = compat.native_str(home)
        self.items = tuple(items)
        # The receiver's in-place temporary names (staging.py) are never files of an item.
        self.exclude = tuple(compat.native_str(p) for p in exclude_patterns) + (TEMP_PATTERN,)
        # One regex for all patterns: 8 fnmatch calls per file cost more than the lstat.
        self._exclude_re = re.compile("|".join(
            "(?:%s)" % fnmatch.translate(p) for p in self.exclude) or "(?!)")
        self._clock = clock
        self._wall = wall
        self._report = report or (lambda name, reason: None)
        # entry(name, SHA-256 hex digits, mtime_ns or None) -> (bucket, value) of bytes
        # (summary.entry), for summary_sums; a file hashed keeps its entry's bucket and base
        # from then on (_summed). None: no summaries (wazuh-clusterd's scanners).
        self.summary_entry = summary_entry
        # Called before each folder a pass lists or rechecks (Catalog: a look at client.keys;
        # a pass over 10 000 shared files took up to 0.7 s under load), or None.
        self.between = None
        self._files = {}
        self._dirs = {}
        self._racy_dirs = set()  # folders listed in the clock tick of their change
        self._seals = {}  # folder -> a seal per group of its files, or None (_recheck_dir)
        self._plan = None  # the poll's folder list, kept until a folder comes or goes
        self._retry = set()
        self._deferred = set()  # files a budgeted pass left to hash later (drain)
        self._deferrable = frozenset()  # names of the items whose files may wait (defer_hashing)
        self._until = None    # monotonic end of the running pass's hashing budget, if any
        self._slice_hashed = 0  # files hashed since that budget began
        self._racy = {}       # name -> wall ns from which one more hash settles it
        self._racy_due = []   # heap of (that time, name); stale entries are skipped
        self._noted = {}
        # rel -> (fingerprint, digest, None) of a file wazuh-clusterd just wrote (hint), or
        # (.., wall ns it began reading at) of our hot file it read (hint_hot)
        self._hints = {}
        self._primed = False
        self._roots = []  # (item, native relative path)
        for item in self.items:
            self._roots.append((item, compat.native_str(item.path)))
        self._item_at = {}
        for item, rel in sorted(self._roots, key=lambda root: len(root[1])):
            self._item_at[rel] = item  # the longest wins, as in item_of
        self._item_in = {}  # folder -> item of the files in it (item_of)
        self._prefix = os.path.join(self.home, "")
        self.last_full_pass = None   # monotonic time of the end of the last full pass
        self.last_poll = None
        self.full_pass_seconds = 0.0
        self.poll_seconds = 0.0
        self.hashed = 0  # files read and hashed since start (status; keepalive tests)
        self.hot_hinted = 0  # hot files recorded from wazuh-clusterd's hash (hint_hot)

    # -- queries ------------------------------------------------------------------------------

    def __len__(self):
        return len(self._files)

    def __contains__(self, name):
        return _native(name) in self._files

    def hashed_as(self, name, fingerprint):
        """True when file `name` is recorded with this packed lstat fingerprint (hot_moved)."""
        return self._files.get(_native(name), b"").startswith(fingerprint)

    def item_of(self, name):
        """The item a name belongs to (the longest matching path), or None.

        Looked up by the name's folder, remembered: a peer's round asks about 10 000 names
        and a manifest row needs the item of each."""
        name = _native(name)
        item = self._item_at.get(name)  # the name of an item itself
        if item is not None:
            return item
        folder = name.rpartition("/")[0]
        try:
            return self._item_in[folder]
        except KeyError:
            pass
        best = None
        for item, rel in self._roots:
            if folder == rel or folder.startswith(rel + "/"):
                if best is None or len(rel) > len(best[1]):
                    best = (item, rel)
        if len(self._item_in) >= MAX_FOLDERS_REMEMBERED:
            self._item_in.clear()  # names a peer made up must not grow it without bound
        self._item_in[folder] = item = best[0] if best else None
        return item

    def get(self, name):
        """The record of one file as a dict (manifest format) or None."""
        rec = self._files.get(_native(name))
        if rec is None:
            return None
        item = self.item_of(name)
        size, mtime_ns, _ino, _ctime_ns, mode = _FP.unpack_from(rec)
        return {"size": size, "mtime_ns": mtime_ns, "mode": stat.S_IMODE(mode),
                "sha256": _hex(rec[_FP_LEN:_REC_LEN]),
                "item": item.name if item else None}

    def rows(self, items=None):
        """Yield (name, item, size, mtime_ns, ino, ctime_ns, mode, sha256 hex) per file.

        `items`: names of the items wanted (default all). Walks the folder records of those
        items only, so a manifest of 10 000 shared files does not touch 90 000 others.
        """
        files = self._files
        if items is None or not self._primed:
            for name, rec in files.items():
                yield _row(name, self.item_of(name), rec)
            return
        for item, rel in self._roots:
            if item.name not in items:
                continue
            if item.kind == "file":
                rec = files.get(rel)
                if rec is not None:
                    yield _row(rel, item, rec)
                continue
            stack = [rel]
            while stack:
                folder = stack.pop()
                record = self._dirs.get(folder)
                if record is None:
                    continue
                prefix = folder + "/"
                for base in record[3]:
                    name = prefix + base
                    rec = files.get(name)
                    if rec is not None:
                        yield _row(name, item, rec)
                stack.extend(prefix + base for base in record[4])

    def row(self, name):
        """One row as in rows(), or None."""
        name = _native(name)
        rec = self._files.get(name)
        if rec is None:
            return None
        item = self.item_of(name)
        return _row(name, item, rec)

    def summary_sums(self, names, mtime_is_data, form2, counts, sums):
        """Add the entries of the known files among `names` (of one item: `mtime_is_data` is
        its flag) to a summary's `counts` and `sums` per bucket (summary.Summary's; the sums
        are left unreduced, to_wire reduces them) with summary_entry (summary.entry, of
        bytes; a scanner made without one has no summaries), which makes an entry's
        (bucket, value); `form2`: form 2, whose value of an
        agent-info entry is its base times (2 * mtime seconds + 1) (summary.mixed), else
        form 1.

        Each file's bucket and base (its entry without the mtime) are kept at the end of its
        record while its content is the same (a keepalive keeps them: learn_rows, and a
        touch a pass finds), made when the file is hashed (_summed): a master summarises a
        client's 10 000 agent-info files again after any of them changed, and computing
        every value anew (a SHA-256 each) was most of an idle master's rounds. One loop, one
        unpack and no call per kept file: a value per file yielded to a summing loop cost a
        third more (tests/bench/bench_summaries.py: ten clients' summaries after a keepalive
        wave 0.13 -> 0.09 s on 3.11). Form 1 (an older peer) mixes the mtime into the
        SHA-256: an agent-info file's value is computed anew each time."""
        files = self._files
        rels = native_names(names)
        found = list(compat.imap(files.get, rels))
        if None in found or set(map(len, found)) != _SUMMED_LENS:
            # a file not known, or loaded from the database (no kept values before its
            # first summary): looked at one by one
            known = [(rel, rec) for rel, rec in zip(rels, found) if rec is not None]
            rels = [rel for rel, _rec in known]
            found = [self._with_sums(rel, rec) for rel, rec in known]
        read = _SUMMED_MTIME.unpack_from
        if mtime_is_data and not form2:
            for rel, rec in zip(rels, found):
                mtime_ns, bucket, _low, _high = read(rec)
                counts[bucket] += 1
                sums[bucket] += self._entry(rel, rec[_FP_LEN:_REC_LEN], mtime_ns)[1]
        elif mtime_is_data:
            for mtime_ns, bucket, low, high in compat.imap(read, found):
                counts[bucket] += 1
                sums[bucket] += (low | (high << 64)) * (2 * (mtime_ns // 1000000000) + 1)
        else:
            for _mtime_ns, bucket, low, high in compat.imap(read, found):
                counts[bucket] += 1
                sums[bucket] += low | (high << 64)

    def _with_sums(self, rel, rec):
        """The record of `rel`, `rec`, with its summary's bucket and base (_summed) when it
        has none yet (a record loaded from the database), kept in the map."""
        if len(rec) != _SUMMED_REC_LEN:
            rec = self._files[rel] = rec[:_REC_LEN] + self._summed(rel, rec[_FP_LEN:_REC_LEN])
        return rec

    def _summed(self, rel, digest):
        """The end of a record of file `rel` with this digest that keeps its summary entry's
        bucket and base (summary_sums), b"" without summary_entry. Made when the file is
        hashed (a SHA-256 of its name and checksum, next to the file's own): made at the
        first summary after, it was 10 000 of them in a round's summary of a client's files
        after its first sync, most of a 2.7 master's internal daemon in the minutes after
        (issue 11)."""
        if self.summary_entry is None:
            return b""
        bucket, base = self._entry(rel, digest, None)
        return _SUMMED.pack(bucket, base & _LOW64, base >> 64)

    def _entry(self, rel, digest, mtime_ns):
        """summary_entry's (bucket, value) of file `rel` with this digest (raw bytes)."""
        # A record's name is printable ASCII (_PORTABLE): its bytes are its str's.
        return self.summary_entry(rel if compat.PY2 else rel.encode("ascii"),
                                  binascii.hexlify(digest), mtime_ns)

    def racy_count(self):
        """Files to be hashed once more (see "Racy files" above)."""
        return len(self._racy)

    def is_racy(self, name):
        """True while a file's record is not settled: a rewrite in the clock tick of its
        hash (same size and stamps) would not show yet (see "Racy files" above)."""
        return _native(name) in self._racy

    def fingerprints(self, names):
        """The records of these files as proofs of their content, FINGERPRINT bytes each in
        order (the "fingerprints" answer, keepalive.py); NO_FINGERPRINT for a file not known
        or racy (a record taken in the clock tick of a write proves nothing yet). Slices of
        the records as they are: 2 000 names of a keepalive batch cost a lookup each, not a
        row of Python values and its JSON."""
        racy, none = self._racy, NO_FINGERPRINT
        rels = native_names(names)
        found = compat.imap(self._files.get, rels)
        if not racy:  # as nearly always: no lookup of each name there
            return b"".join([none if rec is None else rec[:_REC_LEN] for rec in found])
        return b"".join([none if rec is None or rel in racy else rec[:_REC_LEN]
                         for rel, rec in zip(rels, found)])

    def learn(self, name, fp, digest):
        """learn_rows() of one file: True when taken."""
        return not self.learn_rows([[name] + list(fp)], [digest])

    def learn_rows(self, rows, digests):
        """learn_records() of [name, size, mtime_ns, ino, ctime_ns, st_mode] rows and their
        `digests` (32 bytes each); returns the rows not taken."""
        pack, names, records, missed = FINGERPRINT.pack, [], [], []
        for row, digest in zip(rows, digests):
            try:
                records.append(pack(row[1], row[2], row[3], row[4], row[5], digest))
            except struct.error:  # no stat's numbers
                missed.append(row)
                continue
            names.append(row)
        taken = self.learn_records([row[0] for row in names], b"".join(records))
        return missed + [row for row, ok in zip(names, taken) if not ok]

    def learn_records(self, names, data, folder=None, replaced=None):
        """Take each FINGERPRINT record of `data` (in the order of `names`: size, mtime_ns,
        ino, ctime_ns, st_mode, digest, as the "fingerprints" answer carries them) as the
        record of a file whose content is known to be the recorded one: a receiver gave it
        its mtime without changing it and found that by fstat after (keepalive.py).
        Returns a list of booleans, True for each record taken; a taken file has nothing
        to hash at the next pass.

        Taken without an lstat of ours (one per keepalive, 10 000 a second on a master of
        100 000 agents): a record is only ever a cache that each pass compares with lstat,
        so one the file no longer matches costs a hash at the next pass, never a change
        unseen. Refused when it cannot be the newer look: another content or inode than
        recorded, or an older ctime (the ctime moves with every change and cannot be set),
        as when two sessions' keepalives of one file are told in the other order.
        `folder`: the one the names are all directly in, when the caller knows it.
        `replaced`: a list to which the record each taken one replaces is appended, in
        order (mtime_moves).
        """
        files, racy, unpack, mtime_of, seals = self._files, self._racy, \
            _INO_CTIME.unpack_from, _MTIME_NS.unpack_from, self._seals
        size = FINGERPRINT.size
        # native as they come, nearly always (a name's type is looked at once per batch)
        rels = native_names(names)
        taken = []
        # The record is compared where it lies in `data` (no slice of it unless taken).
        for at, rel, old in zip(range(0, len(data), size), rels, compat.imap(files.get, rels)):
            if old is not None and data.startswith(old[_FP_LEN:_REC_LEN], at + _FP_LEN):
                ino, ctime_ns = unpack(old, _INO_AT)
                new_ino, new_ctime_ns = unpack(data, at + _INO_AT)
                # In one tick of a coarse ctime clock, the newer keepalive is the later
                # mtime (a master applies only newer ones): the older, told last, is refused.
                if ino == new_ino and (new_ctime_ns > ctime_ns or (
                        new_ctime_ns == ctime_ns and mtime_of(
                            data, at + FINGERPRINT_MTIME_AT) >= mtime_of(
                                old, FINGERPRINT_MTIME_AT))):
                    # Same content: the summary's bucket and base still hold.
                    files[rel] = data[at:at + size] + old[_REC_LEN:]
                    if racy and rel in racy:
                        del racy[rel]
                    if replaced is not None:
                        replaced.append(old)
                    taken.append(True)
                    continue
            taken.append(False)
        if seals and any(taken):  # as _unseal() of each taken, once a folder
            for folder in [_native(folder)] if folder is not None else _folders(
                    list(itertools.compress(rels, taken))):
                seals.pop(folder, None)
        return taken

    @staticmethod
    def mtime_moves(replaced, data, taken, sums):
        """Add to form 2's unreduced `sums` per bucket (summary_sums') what learn_records
        moved them by: each taken record of `data` (FINGERPRINT records, `taken` its answer)
        against the one it `replaced` (the same content: its base is kept), its base times
        twice the seconds its mtime moved (summary.mixed). False, with some added or none,
        when a replaced record keeps no base (loaded from the database, never summed)."""
        read, mtime_of, size = _SUMMED_MTIME.unpack_from, _MTIME_NS.unpack_from, \
            FINGERPRINT.size
        for old, index in zip(replaced, itertools.compress(itertools.count(), taken)):
            if len(old) != _SUMMED_REC_LEN:
                return False
            mtime_ns, bucket, low, high = read(old)
            moved = mtime_of(data, index * size + FINGERPRINT_MTIME_AT)[0] // 1000000000 - \
                mtime_ns // 1000000000
            if moved:
                sums[bucket] += (low | (high << 64)) * 2 * moved
        return True

    # -- seeding from the database ------------------------------------------------------------

    def load(self, rows):
        """Seed the map from (name, size, mtime_ns, ino, ctime_ns, mode, sha256 hex) rows.

        Used at start so that unchanged files are not hashed again; the next pass must be a
        full pass (poll() does one by itself when the folders were never listed). Rows with
        a bad digest are ignored: the file is simply hashed again.
        """
        self._seals.clear()
        for name, size, mtime_ns, ino, ctime_ns, mode, sha in rows:
            try:
                digest = binascii.unhexlify(compat.to_bytes(sha))
            except (TypeError, ValueError, binascii.Error):
                continue
            if len(digest) != 32:
                continue
            # The map keeps the whole st_mode (tracked files are regular), rows the bits.
            self._files[compat.native_str(name)] = _FP.pack(
                size, mtime_ns, ino, ctime_ns, stat.S_IFREG | mode) + digest

    # -- passes -------------------------------------------------------------------------------

    def defer_hashing(self, items):
        """Files of these items (names) that a pass with a budget (full_pass, poll) finds
        new or changed past its budget are hashed by later calls of drain(), not in it.

        For the items this node only receives: a master polling its agent-info folders after
        a first sync found some 50 000 new files and hashed and stored them in one tick of
        its internal daemon (6-9 s at 100 000 agents), and everything else that daemon does
        waited: seeing the client.keys appends, and recording every push's outcome, which
        held each client's next push. Never for the items this node sends: a file missing
        from a master's manifest is one its round deletes on the clients. A peer's round
        makes our copy of its files current first with passes without a budget.
        """
        self._deferrable = frozenset(items)

    def backlog(self):
        """How many files wait for drain()."""
        return len(self._deferred)

    def drain(self, budget):
        """Hash the files budgeted passes left (defer_hashing) for about `budget` seconds;
        a ChangeSet of what they turned out to be."""
        out = _Collector()
        self._budget(budget)
        try:
            while self._deferred and (self._slice_hashed < MIN_HASHED_PER_SLICE or
                                      self._clock() <= self._until):
                rel = self._deferred.pop()
                self._check_path(self.item_of(rel), rel, out)
        finally:
            self._until = None
        return out.freeze()

    def _undeferred(self, only):
        """The waiting files a pass without a budget hashes now: a peer's round looks at
        the folders only and must still count what an earlier sliced pass left."""
        if not self._deferred:
            # A set keeps the table of its largest size: 100 000 files deferred once (a
            # master's first sync) left 262 144 empty slots (4 MB), which this walked at
            # every poll (~1 ms a second, most of an idle master's CPU between passes).
            self._deferred = set()
            return []
        if self._until is not None:
            return []
        return [rel for rel in self._deferred
                if only is None or getattr(self.item_of(rel), "name", None) in only]

    def _budget(self, budget):
        self._until = None if budget is None else self._clock() + budget
        self._slice_hashed = 0

    def _budgeted(self, budget, run, only):
        self._budget(budget)
        try:
            return run(only)
        finally:
            self._until = None

    def _defers(self, item):
        """True when a file of `item` that needs hashing now waits for drain()."""
        if self._until is None or item is None or item.hot or item.name not in self._deferrable:
            return False
        if self._slice_hashed < MIN_HASHED_PER_SLICE:
            self._slice_hashed += 1
            return False
        return self._clock() > self._until

    def full_pass(self, only=None, budget=None):
        """Stat every file of every item (or of the items named in `only`); a ChangeSet.

        The first pass always covers every item. `budget`: seconds of hashing, see
        defer_hashing.
        """
        return self._budgeted(budget, self._full_pass, only)

    def _full_pass(self, only):
        start = self._clock()
        out = _Collector()
        if not self._primed:
            only = None
        seen_files = set() if not self._primed else None
        if only is None:
            self._retry.clear()  # every file is looked at below; failures re-add themselves
        for item, rel in self._roots:
            if only is not None and item.name not in only:
                continue
            if item.kind == "file":
                self._check_path(item, rel, out)
                if seen_files is not None:
                    seen_files.add(rel)
            else:
                self._scan_dir(item, rel, out, deep=True, root=True)
        if seen_files is not None:
            self._drop_unseen(seen_files, out)
        self._primed = True
        end = self._clock()
        self.full_pass_seconds = end - start
        self.last_full_pass = self.last_poll = end
        return out.freeze()

    def check_files(self, names):
        """lstat these tracked files only (the agent-info files one client reports, the
        names a peer asks about); a ChangeSet."""
        out = _Collector()
        files, racy, prefix, pack, lstat = self._files, self._racy, self._prefix, _FP.pack, \
            os.lstat
        for rel in names:
            rel = _native(rel)
            old = files.get(rel)
            if old is None:
                if rel in self._deferred:  # new, left for drain(): asked about now
                    self._check_path(self.item_of(rel), rel, out)
                continue
            # Inline fast path (a client's round asks about its 10 000 files every interval):
            # the record holds S_IFREG, so a matching fingerprint is an unchanged regular file.
            try:
                if old.startswith(pack(*_fingerprint(lstat(prefix + rel)))) and \
                        rel not in racy:
                    continue
            except OSError:
                pass
            self._check_path(self.item_of(rel), rel, out)
        return out.freeze()

    def poll(self, only=None, budget=None, racy_folders=False):
        """Hot files, folder fingerprints, retries and racy files; return a ChangeSet.

        `only`: names of the items whose folders are looked at (default all); `budget`:
        seconds of hashing, see defer_hashing. `racy_folders`: also list again the folders
        listed in the clock tick of their last change (an entry made in that tick left the
        fingerprint as it was); otherwise they wait for the next full pass.
        """
        if not self._primed:
            return self.full_pass(budget=budget)
        return self._budgeted(budget, lambda names: self._poll(names, racy_folders), only)

    def _poll(self, only, racy_folders):
        start = self._clock()
        out = _Collector()
        for item, rel in self._roots:
            if only is not None and item.name not in only:
                continue
            if item.kind == "file":
                if item.hot:
                    self._check_path(item, rel, out)
            elif rel not in self._dirs:
                self._scan_dir(item, rel, out, deep=True, root=True)
        blocked = ()
        for rel, path, item in self._poll_plan():
            record = self._dirs.get(rel)
            if record is None:  # dropped with its parent during this loop
                continue
            if rel.startswith(blocked):
                continue  # below an item folder that is a symlink now: never walked through
            if only is not None and (item is None or item.name not in only):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                blocked += (rel + "/",)
            if st is None or _dir_fingerprint(st) != record[:3] or (
                    racy_folders and rel in self._racy_dirs):
                self._scan_dir(item, rel, out, deep=False, root=self._is_root(rel),
                               quick=True)
        for rel in (list(self._retry) if self._retry else []) + self._due_racy() + \
                self._undeferred(only):
            self._retry.discard(rel)
            self._check_path(self.item_of(rel), rel, out)
        end = self._clock()
        self.poll_seconds = end - start
        self.last_poll = end
        return out.freeze()

    def check_hot(self, only=None, announced=None):
        """The hot files (client.keys) whose fingerprint changed: a ChangeSet. Between two
        polls (Catalog.tick): an lstat each, no folder; a file whose fingerprint is the one
        hashed, even racy, waits for the next poll's settling hash, and so does one whose
        fingerprint is its value in `announced` (name -> packed fingerprint: hot_moved's,
        announced to the peers already). `only`: as in poll()."""
        out = _Collector()
        announced = announced or {}
        for item, rel, fingerprint in self._hot_looks(only):
            if fingerprint is None or not (self._files.get(rel, b"").startswith(fingerprint)
                                           or announced.get(rel) == fingerprint):
                self._check_path(item, rel, out)
        return out.freeze()

    def hot_moved(self, only=None):
        """[(name, fingerprint)] of the hot files that are regular files whose lstat is no
        longer the one they were last hashed with: changed, not hashed yet (nothing is read
        or recorded here; check_hot does that). `only`: as in poll()."""
        moved = []
        for _item, rel, fingerprint in self._hot_looks(only):
            if fingerprint is not None and not self._files.get(rel, b"").startswith(
                    fingerprint):
                moved.append((rel, fingerprint))
        return moved

    def _hot_looks(self, only):
        """(item, name, packed lstat fingerprint of a regular file or None) of each hot file."""
        for item, rel in self._roots if self._primed else ():
            if item.kind != "file" or not item.hot or (only is not None and
                                                       item.name not in only):
                continue
            try:
                st = os.lstat(self._abs(rel))
            except OSError:
                yield item, rel, None
                continue
            yield item, rel, _FP.pack(*_fingerprint(st)) if stat.S_ISREG(st.st_mode) else None

    # -- internals ----------------------------------------------------------------------------

    def _due_racy(self):
        """Names of the racy files whose one more hash is due now (see _check_file)."""
        now = int(self._wall() * 1e9)
        heap, racy, due = self._racy_due, self._racy, []
        while heap and heap[0][0] <= now:
            when, rel = heapq.heappop(heap)
            if racy.get(rel) == when:
                due.append(rel)
        return due

    def _racy_pending(self, rel):
        """True while a racy file's settling hash is not due yet."""
        when = self._racy.get(rel)
        return when is not None and when > int(self._wall() * 1e9)

    def _poll_plan(self):
        """(name, path, item) of every tracked folder, parents first (a removed tree is then
        reported once, as its top-most folder). Built again only after a folder came or went:
        sorting and resolving 300 group folders every second was most of an idle poll."""
        if self._plan is None:
            self._plan = [(rel, self._abs(rel), self.item_of(rel)) for rel in sorted(self._dirs)]
        return self._plan

    def _unseal(self, rel):
        """File `rel`'s record was written or dropped: the seals of its folder spoke for the
        records as they were (see _recheck_dir)."""
        if self._seals:
            self._seals.pop(rel.rpartition("/")[0], None)

    def _abs(self, rel):
        return self._prefix + rel  # os.path.join was a tenth of a named check

    def _is_root(self, rel):
        return any(rel == r for _, r in self._roots)

    def _excluded(self, base):
        return self._exclude_re.match(base) is not None

    def _note(self, rel, reason):
        """Report a skipped entry once (not on every pass)."""
        if self._noted.get(rel) != reason:
            self._noted[rel] = reason
            self._report(compat.to_text(rel, errors="replace"), reason)

    def _drop_unseen(self, seen_files, out):
        """After the first full pass of a seeded map: files of the db that are gone."""
        for rel, record in self._dirs.items():
            prefix = rel + "/"
            seen_files.update(prefix + base for base in record[3])
        for rel in list(self._files):
            if rel not in seen_files:
                del self._files[rel]
                out.deleted.add(rel)

    def _check_path(self, item, rel, out):
        """lstat one file by name and check it (hot files, retries, racy files)."""
        try:
            st = os.lstat(self._abs(rel))
        except OSError as exc:
            if exc.errno not in _GONE:
                # Cannot look: keep what we knew (a "deleted" would delete it everywhere).
                self._note(rel, "cannot stat: %s" % exc.strerror)
                return
            self._forget_file(rel, out)
            return
        if stat.S_ISREG(st.st_mode):
            self._check_file(item, rel, st, out)
        else:
            self._note(rel, "%s skipped (not followed)" % _kind_word(st.st_mode))
            self._forget_file(rel, out)

    def _forget_file(self, rel, out):
        self._retry.discard(rel)
        self._deferred.discard(rel)
        self._racy.pop(rel, None)
        if self._files.pop(rel, None) is not None:
            self._unseal(rel)
            out.deleted.add(rel)

    def _check_file(self, item, rel, st, out):
        """Compare a regular file's lstat with the map; hash it only when needed.

        Racy (modified within RACY_NS of the hash): a rewrite in the same clock tick would
        keep this fingerprint, so the file is hashed once more when that tick is surely
        over, max(hashed_at, its change) + RACY_NS, and not at every poll before: a hash
        taken sooner could still be racy and settles nothing. Hot files (client.keys) are
        still hashed at every poll while racy: a second edit in the tick of the first must
        reach the peers within SPEC's 2 s, not after the settling hash.
        """
        fp = _fingerprint(st)
        old = self._files.get(rel)
        self._deferred.discard(rel)
        same = old is not None and old.startswith(_FP.pack(*fp))
        if same and (rel not in self._racy or (self._racy_pending(rel) and
                                                not (item and item.hot))):
            return
        hint = self._hints.get(rel)
        # A hint of our own hot file (its hashed_at told) stands for a hash at that time,
        # racy rule and all, and only for a fingerprint not recorded yet: a racy record's
        # settling hash reads the file.
        hinted = hint is not None and hint[0] == tuple(fp) and not (hint[2] is not None and
                                                                     same)
        if not hinted and self._defers(item):
            self._deferred.add(rel)
            return
        self._hints.pop(rel, None)
        hashed_at = int(self._wall() * 1e9)
        if hinted and hint[2] is not None:
            hashed_at = hint[2]
            self.hot_hinted += 1
        result = (hint[1], fp) if hinted else self._hash(rel)
        if result is None:
            return  # changed while reading, vanished or unreadable: retried later
        digest, fp = result
        # A touch (same content) keeps the summary's bucket and base (summary_sums).
        self._files[rel] = _FP.pack(*fp) + digest + (
            old[_REC_LEN:] if old is not None and old[_FP_LEN:_REC_LEN] == digest and
            len(old) > _REC_LEN else self._summed(rel, digest))
        self._unseal(rel)
        self._noted.pop(rel, None)
        changed_at = max(fp[1], fp[3])
        if (not hinted or hint[2] is not None) and \
                hashed_at - RACY_NS <= changed_at <= hashed_at + RACY_NS:
            when = max(hashed_at, changed_at) + RACY_NS
            self._racy[rel] = when
            heapq.heappush(self._racy_due, (when, rel))
        else:
            self._racy.pop(rel, None)
        if old is None or old[_FP_LEN:_REC_LEN] != digest:
            out.changed.add(rel)
        elif _FP.unpack_from(old)[1] != fp[1] and item is not None and item.mtime_is_data:
            out.touched.add(rel)

    def hint(self, rel, fp, sha256_hex):
        """wazuh-clusterd wrote file `rel` (a whole file it received, renamed into place) and
        found it with stat fingerprint `fp` (size, mtime_ns, ino, ctime_ns, mode) and this
        SHA-256: the next check takes it instead of reading the file while its fingerprint
        is that one. A received client.keys of 100 000 agents cost 70 ms of SHA-256 on 2.7
        at every change (and again while it was racy, ~2 s). Only the writer's fingerprint,
        taken after its rename, is trusted; anything written since changes it.
        """
        self._keep_hint(compat.native_str(rel), (tuple(fp), binascii.unhexlify(sha256_hex),
                                                 None))

    def hint_hot(self, rel, fp, sha256_hex, hashed_at, only=None):
        """wazuh-clusterd read our hot file `rel` (client.keys) to push it: its descriptor's
        fstat was `fp` before and after the read, begun at wall ns `hashed_at`, and the bytes
        read have this SHA-256. The next check takes it instead of reading 9.4 MB again while
        the lstat is exactly `fp` and no record has that fingerprint, as if this scanner had
        hashed it then: the racy rule (_check_file) marks it racy when its change is within
        RACY_NS of `hashed_at`, and a racy hot file is read again at every poll until it
        settles. False (nothing kept) when `rel` is not a hot file of an item in `only` (as
        in poll()) or `hashed_at` is later than now."""
        rel = compat.native_str(rel)
        if hashed_at > int(self._wall() * 1e9) or not any(
                item.kind == "file" and item.hot and r == rel and
                (only is None or item.name in only) for item, r in self._roots):
            return False
        self._keep_hint(rel, (tuple(fp), binascii.unhexlify(sha256_hex), hashed_at))
        return True

    def _keep_hint(self, rel, hint):
        if len(self._hints) >= MAX_HINTS:
            self._hints.clear()
        self._hints[rel] = hint

    def _hash(self, rel):
        """SHA-256 of a file, stat-ed before and after; None when it moved under us."""
        path = self._abs(rel)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno not in _GONE and exc.errno != errno.ELOOP:
                self._note(rel, "cannot read: %s" % exc.strerror)
            self._retry.add(rel)
            return None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                self._retry.add(rel)
                return None
            sha = compat.sha256()
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                sha.update(chunk)
            after = os.fstat(fd)
        except OSError as exc:
            if exc.errno not in _GONE:
                self._note(rel, "cannot read: %s" % exc.strerror)
            self._retry.add(rel)
            return None
        finally:
            os.close(fd)
        fp = _fingerprint(before)
        if _fingerprint(after) != fp:
            # Written while we read it: not reported yet, read again at the next poll. (A
            # file renamed over this one meanwhile has another inode: the next pass sees it.)
            self._retry.add(rel)
            return None
        self.hashed += 1
        return sha.digest(), fp

    def _scan_dir(self, item, rel, out, deep, root=False, quick=False):
        """List one folder; recurse into new sub-folders (all of them when `deep`).

        `quick` (a poll re-listing a folder whose mtime changed): a known name whose inode
        from the listing (d_ino, no system call) is unchanged is not stat-ed (2.7's listing
        has no inodes: _unmoved lstats those names in bulk instead). The poll looks for
        creations, deletions and renames; in-place edits are the full pass's job. This
        keeps a busy folder (agent-info on a master receives a file every few ms) from
        costing a stat of all its 50 000 entries at every poll.
        """
        if self.between is not None:
            self.between()
        old_dir = self._dirs.get(rel)
        if deep and old_dir is not None and rel not in self._racy_dirs and \
                self._recheck_dir(item, rel, old_dir, out):
            return
        path = self._abs(rel)
        # The racy test below compares the folder's times with when they were read, not with
        # the end of a listing that may take seconds (a file created within the same tick
        # after the lstat leaves the folder's mtime as it was read).
        looked_at = int(self._wall() * 1e9)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                if root or old_dir is not None:
                    self._note(rel, "%s where a folder was expected" % _kind_word(st.st_mode))
                if root:
                    # An item folder turned into a symlink (or a file) is an operator's
                    # mistake: keep what we knew rather than have every peer delete it all.
                    return
                self._forget_dir(rel, out, root)
                return
            entries = compat.scandir(path)
        except OSError as exc:
            if exc.errno not in _GONE:
                self._note(rel, "cannot list: %s" % exc.strerror)
                if old_dir is not None:
                    return  # keep what we knew; a permission glitch is not a deletion
            self._forget_dir(rel, out, root)
            return
        try:
            unmoved = ()
            if quick and old_dir is not None and getattr(entries, "names", None) is not None:
                entries, unmoved = self._unmoved(rel, path, entries)
            # Iterated lazily: a list of 50 000 DirEntry objects (with their cached stat)
            # would cost more memory than the whole map.
            listed = self._list_entries(item, rel, entries, out, deep, quick)
        except OSError as exc:  # the listing itself failed half-way (I/O error, removed)
            self._note(rel, "cannot list: %s" % exc.strerror)
            return
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()
        files, subdirs = listed
        files = unmoved + files
        prefix = rel + "/"
        if old_dir is not None:
            if old_dir[3] != files:
                kept = set(files)
                for base in old_dir[3]:
                    if base not in kept:
                        self._forget_file(prefix + base, out)
            kept = set(subdirs)
            for base in old_dir[4]:
                if base not in kept:
                    self._forget_dir(prefix + base, out, False)
        if old_dir is None:
            self._plan = None
        fingerprint = _dir_fingerprint(st)
        self._dirs[rel] = fingerprint + (files, subdirs)
        self._seals.pop(rel, None)  # they were of the groups of the names listed before
        if looked_at - RACY_NS <= max(fingerprint[0], fingerprint[1]) <= looked_at + RACY_NS:
            self._racy_dirs.add(rel)
        else:
            self._racy_dirs.discard(rel)

    def _recheck_dir(self, item, rel, record, out):
        """A full pass's look at a folder without listing it (see the module docstring):
        True when its fingerprint is `record`'s and every file listed then is still a
        regular file; False when it must be listed (nothing wrong was done meanwhile: a
        file checked twice is hashed at most once).

        The files are lstat-ed by groups of up to SEAL_FILES (a folder of shared files is
        one group), their fingerprints packed by C loops into one byte string, and its
        SHA-256 is the group's "seal". A group whose every file matched its record, none
        racy, keeps that seal; any record written or dropped since (_unseal) takes its
        folder's seals away. So a seal found again means every file still has the exact
        fingerprint (all five fields) of a settled record that nobody changed: what the
        per-file comparison would have concluded, without a name, a lookup, a pack and a
        comparison per file in Python (the pass over the 10 000 shared files every
        scan_interval was 44 % of an idle master's internal daemon, 4.4 us a file against
        2.3-2.8 for the lstat alone). Any write, truncation, rename over, chmod, chown or
        utime moves the file's ctime (which nobody can set) or its inode, so it breaks the
        seal; a change in the clock tick of the last hash is the racy rule's, as before.
        """
        bases = record[3]
        seals = self._seals.get(rel, ())
        kept = []
        with compat.FolderLstat(self._abs(rel), follow=False) as folder:
            try:
                st = folder.folder_stat()
            except OSError:
                return False
            if not stat.S_ISDIR(st.st_mode) or _dir_fingerprint(st) != record[:3]:
                return False
            for at in range(0, len(bases), SEAL_FILES):
                names = bases[at:at + SEAL_FILES]
                try:
                    packed = b"".join(itertools.starmap(
                        _SEAL.pack, compat.imap(_seal_fields, folder.lstats(names))))
                except OSError:  # a name gone or unreadable: looked at one by one below
                    packed = seal = None
                else:
                    seal = hashlib.sha256(packed).digest()
                    if len(kept) < len(seals) and seals[len(kept)] == seal:
                        kept.append(seal)
                        continue
                settled = self._recheck_files(item, rel, names, packed, folder, out)
                if settled is None:
                    return False
                kept.append(seal if settled else None)
        if any(kept):
            self._seals[rel] = tuple(kept)
        else:
            self._seals.pop(rel, None)
        prefix = rel + "/"
        for base in record[4]:
            self._scan_dir(item, prefix + base, out, True)
        return True

    def _recheck_files(self, item, rel, names, packed, folder, out):
        """Each of these files of folder `rel` compared with its record: `packed` holds
        their seal's fields (None: not had). True when all matched settled records (the
        seal may be kept), False when some needed a look, None when the folder must be
        listed."""
        files, racy, pack, fingerprint = self._files, self._racy, _FP.pack, _fingerprint
        prefix = rel + "/"
        lstat = folder.base_lstat()
        settled = packed is not None
        at, convert = 0, _record_fp
        for base in names:
            child = prefix + base
            old = files.get(child)
            if packed is not None:
                mine = packed[at:at + _SEAL_LEN]
                if convert is not None:
                    mine = convert(mine)
                at += _SEAL_LEN
                if old is not None and old.startswith(mine) and child not in racy:
                    continue
                settled = False
            try:
                est = lstat(base)
            except OSError as exc:
                if exc.errno in _GONE:
                    return None
                self._note(child, "cannot stat: %s" % exc.strerror)
                continue  # kept, as when listing (a "deleted" would delete it everywhere)
            # Its record holds S_IFREG, so a matching fingerprint is an unchanged regular
            # file (no S_ISREG call before).
            if old is not None and old.startswith(pack(*fingerprint(est))) and \
                    child not in racy:
                continue
            if not stat.S_ISREG(est.st_mode):
                return None
            self._check_file(item, child, est, out)
        return settled

    def _unmoved(self, rel, path, entries):
        """A quick listing without inodes (2.7's compat.NameListing): (the entries still
        to look at one by one, the names of the known files whose inode is the recorded
        one). What the inodes of a listing tell on 3.x (see _scan_dir), told here by lstats
        and a comparison of their inodes with the records' in C loops, a group of up to
        SEAL_FILES at a time: a 2.7 master took 0.67 s to list its 100 000 agent-info
        files again (an entry object, a stat and a comparison each in Python; 0.08 s on
        3.x) whenever one was created or renamed over, and again at the next client round
        when that was in the clock tick of the listing (racy)."""
        files, racy, retry, prefix = self._files, self._racy, self._retry, rel + "/"
        known, rest = [], []
        for base in entries.names:
            child = prefix + base
            if child in files and child not in racy and child not in retry:
                known.append(base)
            else:
                rest.append(base)
        unmoved = []
        with compat.FolderLstat(path, follow=False) as folder:
            for at in range(0, len(known), SEAL_FILES):
                group = known[at:at + SEAL_FILES]
                recorded = b"".join(compat.imap(_record_ino, compat.imap(
                    files.__getitem__, compat.imap(prefix.__add__, group))))
                try:
                    found = b"".join(compat.imap(_INO.pack, compat.imap(
                        _st_ino, folder.lstats(group))))
                except OSError:  # one gone since the listing: looked at one by one
                    rest.extend(group)
                    continue
                if found == recorded:
                    unmoved.extend(group)
                    continue
                for index, base in enumerate(group):
                    span = slice(index * _INO.size, (index + 1) * _INO.size)
                    (unmoved if found[span] == recorded[span] else rest).append(base)
        return entries.only(rest), tuple(unmoved)

    def _list_entries(self, item, rel, entries, out, deep, quick):
        """Check every entry of one folder; returns (file base names, sub-folder names)."""
        recursive = item is not None and item.recursive
        files, subdirs = [], []
        known = self._files.get
        racy = self._racy
        retry = self._retry
        pack = _FP.pack
        prefix = rel + "/"
        for entry in entries:
            base = entry.name
            child = prefix + base
            old = known(child)
            if old is not None:
                if quick and child not in racy and child not in retry:
                    inode = getattr(entry, "inode", None)  # 2.7's DirEntry has none
                    if inode is not None and inode() == _INO.unpack_from(old, _INO_AT)[0]:
                        files.append(base)
                        continue
                # Fast path (nearly every file of every pass): known, so neither excluded
                # nor unportable; one lstat and one bytes comparison.
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in _GONE:
                        # Cannot look (EACCES, EIO): keep what we knew. Reporting it deleted
                        # would delete it on every client.
                        self._note(child, "cannot stat: %s" % exc.strerror)
                        files.append(base)
                    continue  # vanished between listing and stat: gone
                if stat.S_ISREG(est.st_mode):
                    files.append(base)
                    if not old.startswith(pack(*_fingerprint(est))) or child in racy:
                        self._check_file(item, child, est, out)
                    continue
            elif self._excluded(base):
                continue
            elif not _PORTABLE.match(base):
                self._note(child, "name not portable (printable ASCII only), skipped")
                continue
            else:
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in _GONE:
                        self._note(child, "cannot stat: %s" % exc.strerror)
                        if child in self._dirs:
                            subdirs.append(base)  # a known folder: keep it, as for files
                    continue
            mode = est.st_mode
            if stat.S_ISREG(mode):
                files.append(base)
                self._check_file(item, child, est, out)
            elif stat.S_ISDIR(mode) and recursive:
                subdirs.append(base)
                if deep or child not in self._dirs:
                    self._scan_dir(item, child, out, deep)
            elif not stat.S_ISDIR(mode):
                self._note(child, "%s skipped (not followed)" % _kind_word(mode))
            else:
                self._note(child, "sub-folder of a non-recursive item, skipped")
        return tuple(files), tuple(subdirs)

    def _forget_dir(self, rel, out, root):
        """A folder vanished (or is no folder any more): drop everything below it."""
        record = self._dirs.pop(rel, None)
        self._racy_dirs.discard(rel)
        self._seals.pop(rel, None)
        if record is None:
            return
        self._plan = None
        for base in record[3]:
            self._forget_file(rel + "/" + base, out)
        for base in record[4]:
            # Only the top-most vanished folder is reported: removing it removes the rest.
            self._forget_dir(rel + "/" + base, out, True)
        if not root:
            out.deleted_dirs.add(rel)


def _row(name, item, rec):
    # The name stays native str (printable ASCII: text-equal on 2.7, see _Collector.freeze);
    # a manifest builds 100 000 of these rows.
    size, mtime_ns, ino, ctime_ns, mode = _FP.unpack_from(rec)
    return (name, item.name if item else None, size, mtime_ns, ino, ctime_ns, mode & 0o7777,
            binascii.hexlify(rec[_FP_LEN:_REC_LEN]).decode("ascii"))


def _hex(digest):
    return binascii.hexlify(digest).decode("ascii")
