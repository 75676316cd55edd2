"""The receiving side of a transfer: the security boundary (SPEC section 4).

Everything a peer sends is untrusted input, even after the channel authenticated it: a shared
key only proves "a member of the cluster". So, for every name, in this order:

1. `check_name`: the text is split on "/" and each component checked before any system call.
2. `item_for`: the name must fall inside an item that the sender's role may write, and must
   not be excluded; a master never takes a master-owned file from a client.
3. `Receiver`: destination folders are walked from the installation directory with lstat,
   never following a symlink; the target must be absent or a regular file; the data goes to
   a temporary file in our staging folder (staging.py: never a temporary name where a Wazuh
   daemon reads names) and is renamed over the target only after it was written fully,
   checked against its SHA-256 and flushed.

Durability without a per-file fsync bill (SPEC section 8): a batch writes all its temporary
files, flushes them at once, then renames each over its target and flushes the folders
touched. Only then is a file reported `synchronized`. Small batches (up to FSYNC_EACH_UP_TO
files, or folders) fsync one by one, so a push of a file or two stays cheap on a busy manager;
larger ones use one syncfs(2) per file system (through ctypes) for the data, and another
after the renames. syncfs also flushes other writers' dirty data and, before Linux 5.8, does
not report writeback errors; where the C library lacks it (CentOS 6's glibc 2.12) every file
and folder is fsync'd.

Hard links: nothing is ever changed in place through a name that may be another file's. A
file with other names (st_nlink > 1: a link planted in a synchronised folder to another
agent's file or to a file outside the tree) would pass any change of its content, times or
mode on to those names. The rule, operation by operation:
- content: always a new file renamed over the name; the other names keep the old file.
- times (a meta-only keepalive): set in place only on a file with one name, checked with
  fstat on the descriptor that is then given the time (futimens, no second lookup of the
  name); otherwise, or where the owner alone may set its times, or where times can only be
  set by name, a copy of the current content (hashed while copied, checked against the
  sender's SHA-256) with the new time is renamed over the name.
- mode and group: only ever given to our own new temporary files and folders, by descriptor.
- unlink (a deletion, a removed group folder): removes that one name; other names of the
  same file keep their content and times (the shared inode's ctime and link count change,
  nothing a reader of the other name relies on).

Times from peers: an mtime before 1970 or beyond 2262 is refused (`invalid`); one beyond now +
max_future_seconds (cluster.max_future_seconds) is applied as this node's present, and said
once an hour per peer. A local agent-info whose mtime lies beyond that bound never wins
"newest keepalive wins": otherwise one report dated 2100 would keep an agent on its sender
forever.

States returned per name: "synchronized", "failed" (an I/O error, a full disk, a checksum
mismatch: retrying may work, the old file is intact) and "invalid" (refused by the rules:
retrying will not help).

Modification times are compared with a slack of MTIME_SLACK_NS: Python 2.7 reads mtimes
through floats, which keep about a microsecond, so a 2.7 node reads back a slightly different
mtime than it was given; without the slack a full round would re-send the same touch forever.
"""
from __future__ import absolute_import, division, print_function

import collections
import errno
import os
import re
import stat
import threading
import time

from wazuh_cluster import claims, compat, fsops, paths, peertimes, scanner, staging, touches
from wazuh_cluster.errors import PathRefused, TransferError
from wazuh_cluster.pathrules import (MTIME_SLACK_NS, ROLES, TEMP_PATTERN, check_mtime,
                                     clamp_mtime, escape, in_future, locate)

SYNCHRONIZED = "synchronized"
FAILED = "failed"
INVALID = "invalid"

LOG_DETAIL_LINES = 20
FSYNC_EACH_UP_TO = 8

_HEX64 = re.compile(u"^[0-9a-f]{64}$")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC


class Incoming(collections.namedtuple("Incoming", ("name", "data", "sha256", "mtime_ns",
                                                   "meta_only"))):
    """One file of a batch: text name, data, SHA-256 hex, mtime in ns, meta_only flag.

    data: bytes, bytearray or memoryview (a slice of a received buffer: nothing is copied),
    or a source whose chunks() yields the bytes (inflated as they are written, hashed on the
    way: a file is never whole in memory).

    meta_only=True means "same content as you have, only the mtime changed" (an agent-info
    keepalive): `data` is ignored and may be None.
    """
    __slots__ = ()

    def __new__(cls, name, data, sha256, mtime_ns, meta_only=False):
        return super(Incoming, cls).__new__(cls, name, data, sha256, mtime_ns, meta_only)


# -- the receiver -----------------------------------------------------------------------------

class Receiver(object):
    """Applies batches of files from one peer under the installation directory `home`.

    `items`/`exclude` come from the items table (config.load_items); `log` is a
    logging.Logger; `owner_gid` is the group given to written files and created folders when
    running as root (the `ossec` group). `role` is this node's role ("master" or "client").
    `newer_only` (default: true on a master) applies an item whose mtime is data (agent-info)
    only when the incoming mtime is newer than the local file's: when two clients report the
    same agent the newest keepalive wins, and an older one is answered `synchronized` without
    writing (the master's copy is the better one; nothing to retry).

    `staging_dir` is where temporary files are written (default PREFIX/queue/cluster-staging,
    see staging.py). `max_future_seconds` bounds how far ahead of `clock()` (epoch seconds) a
    peer's mtime may be (see the module docstring).

    Thread-safe: batches from several peers are applied at once; a name is claimed by one
    batch from its check until its rename (claims.py: on the master several client sessions
    may report the same agent, and "newest wins" needs its check and its rename together).
    """

    def __init__(self, home, items, exclude, log, owner_gid=None, role=None, newer_only=None,
                 staging_dir=None, max_future_seconds=peertimes.DEFAULT_MAX_FUTURE_SECONDS,
                 clock=time.time):
        if role not in ROLES:
            raise ValueError("role must be 'master' or 'client'")
        self.home = compat.native_str(os.path.abspath(home))
        self.items = tuple(items)
        # Our own temporary names are never a file to synchronise, whatever the items table says.
        self.exclude = tuple(compat.to_text(p) for p in exclude) + (compat.to_text(TEMP_PATTERN),)
        self.log = log
        self.owner_gid = owner_gid
        self.role = role
        self.newer_only = (role == "master") if newer_only is None else bool(newer_only)
        self.staging = staging.Staging(staging_dir or paths.Paths(home).staging_dir, log)
        self.times = peertimes.FutureTimes(log, max_future_seconds, clock)
        # Guards what batches share (staging, the clamp log) and start-up cleanup; the files
        # themselves are guarded per name by the claims.
        self._lock = threading.Lock()
        self.claims = claims.Claims()
        # proven(incoming): True when the caller checked this very data against its checksum
        # (a delta's result, deltarx.Expander.proves): not hashed a second time
        self.proven = None

    def apply_batch(self, files=(), deletes=(), deleted_dirs=(), sender_role=None, peer=None,
                    known=None, learned=None, fence=None, replace=None, serial=None):
        """Apply one batch from a peer; return (states, reasons).

        files: iterable of Incoming (a generator is fine: each file's data is written to its
            temporary file and not kept; a generator that waits on a slow peer delays only
            the batches that want a name it staged); deletes: file names; deleted_dirs:
            folder names inside a delete_dirs item (a group folder), removed recursively.
        sender_role: the peer's role; by default the other role than ours. peer: the peer's
            node name, for log lines only.
        states: {name: "synchronized" | "failed" | "invalid"} for every name given.
        reasons: {name: one-line reason} for every name not simply applied (failed, invalid,
            and an agent-info kept because the local one is newer).
        Order: folders removed, files deleted, files written. Refused and failed names are
        logged here (at most LOG_DETAIL_LINES lines and a count per batch), mtimes clamped
        once an hour per peer.
        known: {name: (size, mtime_ns, ino, ctime_ns, sha256 hex)}, the internal daemon's
            record of files (keepalive.py): a meta-only update of a file whose lstat still
            matches its record, announced with the recorded checksum, gets its mtime without
            the file being read again.
        learned: a list; for each meta-only update done in place, (name, the file's
            scanner.FINGERPRINT record after it: size, mtime_ns, ino, ctime_ns, mode and
            digest, packed) is appended (what the internal daemon may take instead of
            hashing the file again; keepalive.tell sends the records as they are).
        fence: with failover (failover.Failover.fence), run(change) -> False when the
            sender no longer leads its term: each rename, unlink, folder removal and mtime
            set in place goes through it, and what it refuses is `invalid`, logged in one
            line for the batch.
        replace: with failover on a node that does not act as leader,
            localedits.LocalEdits.replacer: replace(temp, target) instead of os.rename puts
            each file in place (and keeps what it replaced for a check); its
            remove(target), when it has one, deletes a file instead of os.unlink.
        serial: a lock held while a batch of meta-only updates alone is set in place
            (touches.touch_all), released before the batch is flushed: batches that wait
            for each other's syncfs would queue behind a busy disk, where concurrent ones
            share a journal commit.
        """
        sender = sender_role or ("client" if self.role == "master" else "master")
        return self._apply(files, deletes, deleted_dirs, sender, peer, known, learned, fence,
                           replace, serial)

    def _apply(self, files, deletes, deleted_dirs, sender, peer, known, learned, fence=None,
               replace=None, serial=None):
        batch = _Batch(self, sender, len(files) if hasattr(files, "__len__") else None)
        batch.fence = fence
        batch.replace = replace or os.rename
        batch.remove = getattr(replace, "remove", os.unlink)
        batch.known = known or {}
        batch.learned = learned if learned is not None else []
        try:
            if touches.touches_only(files, deletes, deleted_dirs, batch.known, Incoming):
                with serial or compat.NO_LOCK:
                    touches.touch_all(batch, files)
            for name in deleted_dirs:
                self._claim(batch, name)
                batch.run(name, batch.remove_dir, name)
            for name in deletes:
                self._claim(batch, name)
                batch.run(name, batch.delete, name)
            for incoming in files if not batch.touching else ():
                name = getattr(incoming, "name", None)
                self._claim(batch, name)
                batch.run(name, batch.stage, incoming)
                if self.claims.wanted(batch):
                    self._finish(batch)  # another batch waits for one of our names
            self._finish(batch)
        except BaseException:
            # A bug or a signal (SIGTERM at stop): no temporary file outlives the batch.
            batch.abandon()
            self.claims.release(batch, batch.claimed)
            raise
        total = time.time() - batch.started
        self.log.debug("Batch of %d names: written in %.3f s, flushed %.3f s, renamed %.3f s, "
                       "folders flushed %.3f s.", len(batch.states), total - sum(batch.laps),
                       *batch.laps)
        self._report(batch, peer)
        return batch.states, batch.reasons

    def _claim(self, batch, name):
        """Claim a name for `batch`; when another batch holds it, finish ours, then wait."""
        if not isinstance(name, compat.string_types):
            return  # refused by batch.run before any system call
        if not self.claims.try_claim(name, batch):
            self._finish(batch)  # a waiting batch holds no claim: no deadlock
            self.claims.claim(name, batch)
        batch.claimed.add(name)

    def _finish(self, batch):
        """Flush, rename and flush the folders of what `batch` staged; release its names."""
        marks = [time.time()]
        batch.flush()
        marks.append(time.time())
        batch.commit()
        marks.append(time.time())
        batch.sync_folders()
        marks.append(time.time())
        for index in range(3):
            batch.laps[index] += marks[index + 1] - marks[index]
        self.claims.release(batch, batch.claimed)
        batch.claimed = set()

    def cleanup_temp_files(self):
        """Remove every leftover temporary file (staging.Staging.cleanup); return the count.

        Call it at start, before any batch: a batch in progress owns such files.
        """
        with self._lock:
            removed = self.staging.cleanup(self.home, self.items)
        if removed:
            self.log.info("removed %d leftover temporary files", removed)
        return removed

    def _report(self, batch, peer):
        bad = [(name, state) for name, state in batch.states.items() if state != SYNCHRONIZED]
        sender = batch.sender if peer is None else "%s %s" % (batch.sender, escape(peer))
        if batch.clamped:
            with self._lock:
                self.times.tell(sender, batch.clamped, batch.clamp_example)
        if batch.fenced:
            self.log.warning("refused %d change(s) from %s: it no longer leads its term (a "
                             "higher term became known while the batch was received), e.g. %s",
                             len(batch.fenced), sender, escape(batch.fenced[0]))
            fenced = set(batch.fenced)
            bad = [(name, state) for name, state in bad if name not in fenced]
        for name, state in sorted(bad)[:LOG_DETAIL_LINES]:
            word = "refused" if state == INVALID else "failed to apply"
            self.log.warning("%s %s from %s: %s", word, escape(name), sender,
                             batch.reasons.get(name, "?"))
        if len(bad) > LOG_DETAIL_LINES:
            self.log.warning("... and %d more files refused or failed in this batch",
                             len(bad) - LOG_DETAIL_LINES)


class _Fenced(Exception):
    """A change refused by the batch's fence (see Receiver.apply_batch)."""


FENCED = "refused: the sender no longer leads its term"
# Reasons of an agent-info kept because ours is the newer keepalive: strictly newer (beyond
# MTIME_SLACK_NS), or the same. The sender of a strictly older one is told (sync_files'
# "kept_newer"), so that it leaves its stale copy out of its rounds (an agent that moved).
KEPT_NEWER = "kept: the local file has a newer mtime"
KEPT_SAME = "kept: the local file has the same mtime"


class _Staged(collections.namedtuple("_Staged", ("name", "temp", "target", "folder", "dev",
                                                 "staged"))):
    """A file waiting for the flush: temp is None for a meta-only (mtime) update done in
    place; `staged` is True when temp is in the staging folder (not next to the target)."""
    __slots__ = ()


class _Batch(object):
    """The state of one apply_batch call (see Receiver.apply_batch)."""

    def __init__(self, receiver, sender, expected=None):
        self.rx = receiver
        self.sender = sender
        self.states = {}
        self.reasons = {}
        self.staged = []
        self.touched = {}      # folder path -> names whose outcome depends on its fsync
        self.folders = {}      # tuple of components -> (path, st_dev), verified this batch
        self.fsynced = 0       # files fsync'd one by one (the first few, or all without syncfs)
        # A batch known to be large goes straight to syncfs: fsyncs of its first files
        # would only add to the one flush it needs anyway.
        self.fsync_budget = FSYNC_EACH_UP_TO if expected is None or \
            expected <= FSYNC_EACH_UP_TO else 0
        self.unflushed = {}    # st_dev -> a folder on it: written, waiting for syncfs
        self.as_root = _running_as_root(receiver.owner_gid)
        self.now_ns = receiver.times.now_ns()
        self.clamped = 0       # mtimes beyond now + max_future_ns, applied as now
        self.clamp_example = None
        self.staging_checked = False
        self.claimed = set()   # names this batch holds (claims.py) until its next _finish
        self.known = {}        # see Receiver.apply_batch
        self.learned = []
        self.started = time.time()
        self.laps = [0.0, 0.0, 0.0]  # flushed, renamed, folders flushed (for the log)
        self.fence = None      # see Receiver.apply_batch
        self.replace = os.rename
        self.remove = os.unlink
        self.fenced = []       # names it refused
        self.touching = False  # a batch of keepalives alone (touch_all)
        self.left_counts = None  # [no record, another checksum, other] left to stage()
        self.in_place = {}     # st_dev -> names touched in place by touch_all, until flushed

    def run(self, name, action, arg):
        key = name if isinstance(name, compat.string_types) else escape(name)
        try:
            action(arg)
        except _Fenced:
            self._refuse_fenced(key)
        except PathRefused as exc:
            self._set(key, INVALID, exc.message)
        except TransferError as exc:
            self._set(key, FAILED, exc.message)
        except (OSError, IOError) as exc:
            self._set(key, FAILED, fsops.why(exc))

    def _change(self, change, *args):
        """change(*args), a change of a target, through the fence; _Fenced when refused."""
        if self.fence is None:
            change(*args)
        elif not self.fence(lambda: change(*args)):
            raise _Fenced()

    def _refuse_fenced(self, name):
        self.fenced.append(name)
        self._set(name, INVALID, FENCED)

    def _set(self, name, state, reason=None):
        self.states[name] = state
        if reason is not None:
            self.reasons[name] = reason
        else:
            self.reasons.pop(name, None)

    def _locate(self, name):
        return locate(name, self.rx.items, self.sender, self.rx.role, self.rx.exclude)

    def _folder(self, parts, item, create):
        """(path, st_dev) of home/parts, walked with lstat; missing folders created if asked.

        A symlink or a non-folder on the way is refused. Without `create`, a missing folder
        raises OSError(ENOENT).
        """
        key = tuple(parts)
        known = self.folders.get(key)
        if known is not None:
            return known
        path = self.rx.home
        dev = None
        for index, part in enumerate(parts):
            parent = path
            path = os.path.join(path, compat.native_str(part))
            cached = self.folders.get(key[:index + 1])
            if cached is not None:
                dev = cached[1]
                continue
            try:
                st = os.lstat(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT or not create:
                    raise
                st = self._mkdir(path, item)
                self.touched.setdefault(parent, [])
            if not stat.S_ISDIR(st.st_mode):
                raise PathRefused("%s on the way: %s" % (fsops.kind(st.st_mode),
                                                        "/".join(parts[:index + 1])))
            dev = st.st_dev
            self.folders[key[:index + 1]] = (path, dev)
        if dev is None:
            dev = os.stat(path).st_dev  # home itself
        self.folders[key] = (path, dev)
        return path, dev

    def _mkdir(self, path, item):
        try:
            os.mkdir(path, item.dir_mode)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            return os.lstat(path)  # raced with another writer: checked by the caller
        # By descriptor: a name swapped for a symlink meanwhile is not followed (ELOOP).
        fd = fsops.open_folder(path)
        try:
            os.fchmod(fd, item.dir_mode)  # the umask narrowed mkdir's mode
            if self.as_root:
                os.fchown(fd, -1, self.rx.owner_gid)
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _target(self, parts, item, create):
        """(folder path, dev, target path, lstat of the target or None)."""
        folder, dev = self._folder(parts[:-1], item, create)
        target = os.path.join(folder, compat.native_str(parts[-1]))
        try:
            st = os.lstat(target)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return folder, dev, target, None
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused("target is %s" % fsops.kind(st.st_mode))
        return folder, dev, target, st

    # -- a batch of keepalives (touches.py) ----------------------------------------------------

    SYNCHRONIZED = SYNCHRONIZED

    def left(self, incoming):
        """stage() decides a keepalive touches.touch_all did not set (counted for the debug
        log)."""
        record = self.known.get(incoming.name)
        self.left_counts = self.left_counts or [0, 0, 0]
        self.left_counts[0 if record is None else 1 if record[4] != incoming.sha256 else 2] += 1
        self.run(incoming.name, self.stage, incoming)

    def set_in_place(self, fd, mtime_ns, name):
        """Give an open file its time through the fence: True when set, False on an OSError
        (EPERM: stage() copies; another error fails there), None when the fence refused it
        (its state set)."""
        try:
            self._change(fsops.set_mtime, fd, None, mtime_ns)
        except _Fenced:
            self._refuse_fenced(name)
            return None
        except OSError:
            return False
        return True

    def failed(self, name, reason):
        self._set(name, FAILED, reason)

    # -- the three kinds of work --------------------------------------------------------------

    def remove_dir(self, name):
        item, parts = self._locate(name)
        if item.kind != "dir" or not item.delete_dirs:
            raise PathRefused("item '%s' does not allow removing folders" % item.name)
        try:
            folder, _ = self._folder(parts[:-1], item, create=False)
            target = os.path.join(folder, compat.native_str(parts[-1]))
            st = os.lstat(target)
        except OSError as exc:
            if exc.errno not in fsops.GONE:
                raise
            self._set(name, SYNCHRONIZED)  # already gone
            return
        if not stat.S_ISDIR(st.st_mode):
            raise PathRefused("target is %s" % fsops.kind(st.st_mode))
        self.folders.clear()  # verified folders below it are gone
        self._change(fsops.rmtree, target)
        self.touched.setdefault(folder, []).append(name)
        self._set(name, SYNCHRONIZED)

    def delete(self, name):
        # A file item (client.keys) is deleted too, as SPEC section 4 says of every
        # master-owned file; holding back a mass agent removal is the caller's guard's job.
        item, parts = self._locate(name)
        try:
            folder, _, target, st = self._target(parts, item, create=False)
        except OSError as exc:
            if exc.errno not in fsops.GONE:
                raise
            st = None
        if st is None:
            self._set(name, SYNCHRONIZED)
            return
        try:
            self._change(self.remove, target)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        self.touched.setdefault(folder, []).append(name)
        self._set(name, SYNCHRONIZED)

    def stage(self, incoming):
        if not isinstance(incoming, Incoming):
            raise PathRefused("not a file record")
        name = incoming.name
        item, parts = self._locate(name)
        sha = _check_fields(incoming)
        streamed = _is_source(incoming.data)
        if not incoming.meta_only and not streamed and \
                not (self.rx.proven is not None and self.rx.proven(incoming)) and \
                compat.sha256(incoming.data).hexdigest() != sha:
            raise TransferError("checksum mismatch")
        mtime_ns = self._sane_mtime(name, incoming.mtime_ns)
        if incoming.meta_only:
            # No lstat first: _touch's open and fstat see all it would (a keepalive is ten
            # thousand of these a second on a master of 100 000 agents).
            folder, dev = self._folder(parts[:-1], item, create=False)
            target = os.path.join(folder, compat.native_str(parts[-1]))
            entry = self._touch((folder, dev), parts[-1], target, sha, mtime_ns, item,
                                self.known.get(name), name)
            if entry is None:
                return
            if entry[0] is None:
                self.learned.append((name, scanner.packed_record(entry[2], sha)))
            entry = entry[:2]
        else:
            folder, dev, target, st = self._target(parts, item, create=True)
            if st is not None and self._kept(name, st, item, mtime_ns, target, sha):
                return
            entry = self._write_temp((folder, dev), parts[-1], mtime_ns, item,
                                     _write_checked(sha) if streamed else fsops.write_all,
                                     incoming.data)
        temp, staged = entry
        self.staged.append(_Staged(name, temp, target, folder, dev, staged))
        self._set(name, SYNCHRONIZED)

    def _sane_mtime(self, name, mtime_ns):
        """The mtime to apply: a time beyond now + the allowed slack becomes now."""
        applied, clamped = clamp_mtime(mtime_ns, self.now_ns, self.rx.times.max_future_ns)
        if clamped:
            self.clamped += 1
            if self.clamp_example is None:
                self.clamp_example = (name, mtime_ns)
        return applied

    def _kept(self, name, st, item, mtime_ns, target=None, sha=None):
        """True (and the name's state set) when the local file is newer and stays.

        With the `target` path and `sha` of a whole file sent: at the same mtime, other
        content is no older than ours, and is taken (an edit in place that kept the
        file's time must reach us, SPEC section 8: it was refused in every round)."""
        if not (self.rx.newer_only and item.mtime_is_data):
            return False
        local_ns = compat.stat_mtime_ns(st)
        # A local mtime beyond the bound is no keepalive anyone gave: it never wins.
        if mtime_ns <= local_ns + MTIME_SLACK_NS and \
                not in_future(local_ns, self.now_ns, self.rx.times.max_future_ns):
            newer = mtime_ns + MTIME_SLACK_NS < local_ns
            if not newer and target is not None and _sha256_of(target) != sha:
                return False
            self._set(name, SYNCHRONIZED, KEPT_NEWER if newer else KEPT_SAME)
            return True
        return False

    def _touch(self, where, base, target, sha, mtime_ns, item, record, name):
        """Give the sender's mtime to a file whose content is the sender's.

        Returns None when the local file is newer and stays (_kept), else (temp path or
        None when set in place, staged flag, fingerprint after: size, mtime_ns, ino,
        ctime_ns, mode). In place only on a file with a single name and by descriptor (see
        "Hard links" in the module docstring). The content is read and hashed unless
        `record` (size, mtime_ns, ino, ctime_ns, sha256) proves it: the same checksum, and
        the file's fstat still the one recorded when it was last hashed or given its time
        (the ctime moves with every write, and nobody can set it).
        """
        try:
            fd = os.open(target, touches.READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise TransferError("meta-only update of a file we do not have")
            st = os.lstat(target)  # a symlink (ELOOP) or a socket: refused, as by _target
            if not stat.S_ISREG(st.st_mode):
                raise PathRefused("target is %s" % fsops.kind(st.st_mode))
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PathRefused("target is %s" % fsops.kind(st.st_mode))
            if self._kept(name, st, item, mtime_ns):
                return None
            if st.st_nlink == 1 and fsops.utime_by_fd():
                if not _proven(st, record, sha) and fsops.sha256_of_fd(fd) != sha:
                    raise TransferError("meta-only update but the local content differs")
                try:
                    self._change(fsops.set_mtime, fd, None, mtime_ns)
                    after = os.fstat(fd)
                    if after.st_nlink != 1:  # the name is another file's now: tried again
                        raise TransferError("replaced while its time was set")
                    self._make_durable(fd, where)
                    return None, False, scanner.fingerprint(after)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EACCES):
                        raise
                # Another user's file (Wazuh's remoted writes agent-info as ossecr): only
                # its owner may set its times, so a copy with the new mtime replaces it.
                os.lseek(fd, 0, os.SEEK_SET)
            return self._write_temp(where, base, mtime_ns, item, _copy_checked(sha), fd) + (None,)
        finally:
            os.close(fd)

    def _write_temp(self, where, base, mtime_ns, item, fill, source):
        """A complete temporary file for the target: fill(fd, source) writes the data.

        Returns (its path, True when in the staging folder).
        """
        with self.rx._lock:  # the staging folder is every batch's
            if not self.staging_checked:  # once a batch, when it first writes a file
                self.rx.staging.check()
                self.staging_checked = True
            temp, staged = self.rx.staging.temp_path(where[0], where[1], base)
        fd = self._create(temp, staged)
        try:
            fill(fd, source)
            os.fchmod(fd, item.mode)
            if self.as_root:
                os.fchown(fd, -1, self.rx.owner_gid)
            fsops.set_mtime(fd, temp, mtime_ns)
            self._make_durable(fd, where)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        os.close(fd)
        return temp, staged

    def _create(self, temp, staged):
        """Open a new temporary file; an in-place name left over by a crash is replaced."""
        try:
            return os.open(temp, _TEMP_FLAGS, 0o600)
        except OSError as exc:
            if staged or exc.errno != errno.EEXIST:
                raise
        if any(entry.temp == temp for entry in self.staged):
            raise TransferError("the same file twice in one batch")
        if not stat.S_ISDIR(os.lstat(temp).st_mode):
            _unlink_quietly(temp)  # only that name goes, never what a symlink points to
        return os.open(temp, _TEMP_FLAGS, 0o600)

    def _make_durable(self, fd, where):
        """fsync the first FSYNC_EACH_UP_TO files of a batch, leave the rest to one syncfs.

        A push of one or two files (a client.keys edit) then costs an fsync or two instead
        of flushing everything else dirty on the file system (alerts, archives).
        """
        if fsops.SYNCFS is None or self.fsynced < self.fsync_budget:
            os.fsync(fd)
            self.fsynced += 1
        else:
            self.unflushed.setdefault(where[1], where[0])

    # -- the end of a batch -------------------------------------------------------------------

    def flush(self):
        """One syncfs per file system holding files not fsync'd one by one."""
        failed_devs = {}
        for dev, folder in self.unflushed.items():
            try:
                fsops.syncfs_folder(folder)
            except OSError as exc:
                failed_devs[dev] = "flush failed: %s" % fsops.why(exc)
        for dev, names in self.in_place.items():
            for name in names if dev in failed_devs else ():
                self._set(name, FAILED, failed_devs[dev])
        self.in_place = {}
        if failed_devs:
            kept = []
            for entry in self.staged:
                if entry.dev in failed_devs:
                    self._fail(entry, failed_devs[entry.dev])
                else:
                    kept.append(entry)
            self.staged = kept
        self.unflushed = {}

    def commit(self):
        """Rename each temporary file over its target."""
        for index, entry in enumerate(self.staged):
            if entry.temp is None:
                continue
            # Once renamed by an exchange (localedits) the temporary name holds the replaced
            # file, which abandon() must not remove if this loop breaks off: it is no longer
            # abandon()'s from here (a temporary file left by a break-off before the rename
            # goes at the next start, with the other temporary files: staging.cleanup).
            self.staged[index] = entry._replace(temp=None)
            try:
                self._change(self.replace, entry.temp, entry.target)
            except _Fenced:
                _unlink_quietly(entry.temp)
                self._refuse_fenced(entry.name)
                continue
            except OSError as exc:
                if exc.errno == errno.EXDEV and entry.staged:
                    # Same st_dev but another mount (a bind mount): written in place from
                    # now on; this file travels again at the next round.
                    with self.rx._lock:
                        self.rx.staging.cross_device(entry.folder)
                self._fail(entry, "rename failed: %s" % fsops.why(exc))
                continue
            self.touched.setdefault(entry.folder, []).append(entry.name)
        self.staged = []

    def sync_folders(self):
        """Make the renames durable; a file fails when its folder's flush fails.

        Up to FSYNC_EACH_UP_TO folders are fsync'd one by one; beyond that (a change spread
        over many group folders) one syncfs per file system costs less than a journal commit
        per folder.
        """
        if fsops.SYNCFS is None or len(self.touched) <= FSYNC_EACH_UP_TO:
            groups = [([folder], folder, fsops.fsync_folder) for folder in sorted(self.touched)]
        else:
            by_dev = {}
            for folder in sorted(self.touched):
                try:
                    by_dev.setdefault(os.stat(folder).st_dev, []).append(folder)
                except OSError:
                    by_dev.setdefault(None, []).append(folder)  # fails below, named
            groups = [(folders, folders[0], fsops.syncfs_folder) for folders in by_dev.values()]
        for folders, opened, flush in groups:
            try:
                flush(opened)
            except OSError as exc:
                for folder in folders:
                    for name in self.touched[folder]:
                        self._set(name, FAILED, "folder flush failed: %s" % fsops.why(exc))
        self.touched = {}

    def abandon(self):
        """Remove the temporary files of everything staged; the old files stay."""
        for entry in self.staged:
            if entry.temp is not None:
                _unlink_quietly(entry.temp)
        self.staged = []

    def _fail(self, entry, reason):
        if entry.temp is not None:
            _unlink_quietly(entry.temp)
        self._set(entry.name, FAILED, reason)


def _running_as_root(owner_gid):
    """True when written files get `owner_gid` (we run as root and a group was given)."""
    return owner_gid is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _check_fields(incoming):
    sha = incoming.sha256
    if isinstance(sha, compat.binary_type) and not isinstance(sha, compat.text_type):
        sha = sha.decode("ascii", "replace")
    if not isinstance(sha, compat.text_type) or not _HEX64.match(sha.lower()):
        raise PathRefused("bad sha256 field")
    check_mtime(incoming.mtime_ns)
    if not incoming.meta_only and not _is_source(incoming.data) and \
            not isinstance(incoming.data, (bytes, bytearray, memoryview)):
        raise PathRefused("bad data field")
    return sha.lower()


def _sha256_of(path):
    """SHA-256 hex of the regular file at `path` (not followed), or None."""
    try:
        fd = os.open(path, touches.READ_FLAGS)
    except OSError:
        return None
    try:
        return fsops.sha256_of_fd(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _proven(st, record, sha):
    """True when `record` (size, mtime_ns, ino, ctime_ns, sha256) is `st`'s and says `sha`."""
    return record is not None and record[4] == sha and \
        tuple(scanner.fingerprint(st)[:4]) == tuple(record[:4])


def _copy_checked(sha):
    """A fill function for _write_temp: copy a descriptor, which must hash to `sha`."""
    def fill(fd, source):
        if fsops.copy_fd(fd, source) != sha:
            raise TransferError("meta-only update but the local content differs")
    return fill


def _is_source(data):
    return callable(getattr(data, "chunks", None))


def _write_checked(sha):
    """A fill function for _write_temp: write a source's chunks, which must hash to `sha`."""
    def fill(fd, source):
        digest = compat.sha256()
        for chunk in source.chunks():
            fsops.write_all(fd, chunk)
            digest.update(chunk)
        if digest.hexdigest() != sha:
            raise TransferError("checksum mismatch")
    return fill


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
