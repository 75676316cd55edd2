"""The receiving side of a transfer: the security boundary (SPEC section 4).

Everything a peer sends is untrusted input, even after the channel authenticated it: a shared
key only proves "a member of the cluster". So, for every name, in this order:

1. `check_name`: the text is split on "/" and each component checked before any system call.
2. `item_for`: the name must fall inside an item that the sender's role may write, and must
   not be excluded; a master never takes a master-owned file from a client.
3. `Receiver`: destination folders are walked from the installation directory with lstat,
   never following a symlink; the target must be absent or a regular file; the data goes to
   `.NAME.RANDOM.tmp` in the same folder and is renamed over the target only after it was
   written fully, checked against its SHA-256 and flushed.

Durability without a per-file fsync bill (SPEC section 8): a batch writes all its temporary
files, flushes them at once, then renames each over its target and flushes the folders
touched. Only then is a file reported `synchronized`. Small batches (up to FSYNC_EACH_UP_TO
files, or folders) fsync one by one, so a push of a file or two stays cheap on a busy manager;
larger ones use one syncfs(2) per file system (through ctypes) for the data, and another
after the renames. syncfs also flushes other writers' dirty data and, before Linux 5.8, does
not report writeback errors; where the C library lacks it (CentOS 6's glibc 2.12) every file
and folder is fsync'd.

States returned per name: "synchronized", "failed" (an I/O error, a full disk, a checksum
mismatch: retrying may work, the old file is intact) and "invalid" (refused by the rules:
retrying will not help).

Modification times are compared with a slack of MTIME_SLACK_NS: Python 2.7 sets and reads
mtimes through floats and utimes(2), which keep about a microsecond, so a 2.7 node reads back
a slightly different mtime than it was given; without the slack a full round would re-send
the same touch forever.
"""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import errno
import hashlib
import os
import re
import stat
import threading
import time

from wazuh_cluster import compat, fsops
from wazuh_cluster.errors import PathRefused, TransferError
from wazuh_cluster.pathrules import MAX_COMPONENT, MTIME_SLACK_NS, ROLES, escape, locate

SYNCHRONIZED = "synchronized"
FAILED = "failed"
INVALID = "invalid"

LOG_DETAIL_LINES = 20
FSYNC_EACH_UP_TO = 8

_HEX64 = re.compile(u"^[0-9a-f]{64}$")
# .NAME.RANDOM.tmp; NAME may be cut short so that the whole name fits in MAX_COMPONENT.
_TEMP_RE = re.compile(u"^\\.(.+)\\.[0-9a-f]{12}\\.tmp$")
_TEMP_OVERHEAD = len(".") + len(".") + 12 + len(".tmp")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_TEMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC


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


# -- temporary files ---------------------------------------------------------------------------

def _temp_name(base):
    random = binascii.hexlify(os.urandom(6)).decode("ascii")
    return "." + base[:MAX_COMPONENT - _TEMP_OVERHEAD] + "." + random + ".tmp"


def _temp_of(stem, base):
    """True when a temporary file's stem is `base`, or `base` cut short by _temp_name."""
    if stem == base:
        return True
    return len(stem) == MAX_COMPONENT - _TEMP_OVERHEAD and base.startswith(stem)


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

    Thread-safe: batches are applied one at a time (on the master several client sessions
    may report the same agent; "newest wins" needs its check and its rename together).
    """

    def __init__(self, home, items, exclude, log, owner_gid=None, role=None, newer_only=None):
        if role not in ROLES:
            raise ValueError("role must be 'master' or 'client'")
        self.home = compat.native_str(os.path.abspath(home))
        self.items = tuple(items)
        self.exclude = tuple(compat.to_text(p) for p in exclude)
        self.log = log
        self.owner_gid = owner_gid
        self.role = role
        self.newer_only = (role == "master") if newer_only is None else bool(newer_only)
        self._lock = threading.Lock()

    def apply_batch(self, files=(), deletes=(), deleted_dirs=(), sender_role=None, peer=None):
        """Apply one batch from a peer; return (states, reasons).

        files: iterable of Incoming (a generator is fine: each file's data is written to its
            temporary file and not kept; but it runs under the Receiver's lock, so one that
            waits on a slow peer delays other peers' batches); deletes: file names;
            deleted_dirs: folder names
            inside a delete_dirs item (a group folder), removed recursively.
        sender_role: the peer's role; by default the other role than ours. peer: the peer's
            node name, for log lines only.
        states: {name: "synchronized" | "failed" | "invalid"} for every name given.
        reasons: {name: one-line reason} for every name not simply applied (failed, invalid,
            and an agent-info kept because the local one is newer).
        Order: folders removed, files deleted, files written. Refused and failed names are
        logged here (at most LOG_DETAIL_LINES lines and a count per batch).
        """
        with self._lock:
            sender = sender_role or ("client" if self.role == "master" else "master")
            return self._apply(files, deletes, deleted_dirs, sender, peer)

    def _apply(self, files, deletes, deleted_dirs, sender, peer):
        batch = _Batch(self, sender, len(files) if hasattr(files, "__len__") else None)
        clock = [time.time()]

        def lap():
            clock.append(time.time())
            return clock[-1] - clock[-2]
        try:
            for name in deleted_dirs:
                batch.run(name, batch.remove_dir, name)
            for name in deletes:
                batch.run(name, batch.delete, name)
            for incoming in files:
                batch.run(getattr(incoming, "name", None), batch.stage, incoming)
            staged = lap()
            batch.flush()
        except BaseException:
            # A bug or a signal (SIGTERM at stop): no temporary file outlives the batch.
            batch.abandon()
            raise
        flushed = lap()
        batch.commit()
        renamed = lap()
        batch.sync_folders()
        self.log.debug("Batch of %d names: written in %.3f s, flushed %.3f s, renamed %.3f s, "
                       "folders flushed %.3f s.", len(batch.states), staged, flushed, renamed,
                       lap())
        self._report(batch, peer)
        return batch.states, batch.reasons

    def cleanup_temp_files(self):
        """Remove our leftover `.NAME.RANDOM.tmp` files under every item; return the count.

        Call it at start, before any batch: a batch in progress owns such files.
        """
        removed = 0
        for item in self.items:
            parts = [compat.native_str(p) for p in item.path.split("/")]
            if item.kind == "file":
                folder, only, deep = parts[:-1], parts[-1], False
            else:
                folder, only, deep = parts, None, item.recursive
            path = self._existing_folder(folder)
            if path is not None:
                removed += self._clean_folder(path, only, deep)
        if removed:
            self.log.info("removed %d leftover temporary files", removed)
        return removed

    # -- helpers shared with _Batch -----------------------------------------------------------

    def _existing_folder(self, parts):
        """Path of home/parts when every component is a real folder (no symlink), else None."""
        path = self.home
        for part in parts:
            path = os.path.join(path, part)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return None
            except OSError:
                return None
        return path

    def _clean_folder(self, path, only, deep):
        """Remove our temporary files in `path` (and below when `deep`).

        Entries are taken one at a time and a name is matched before anything is stat-ed:
        queue/agent-info may hold 100 000 files, and listing them all with their stat results
        at start would double the daemon's memory.
        """
        removed = 0
        try:
            entries = compat.scandir(path)
        except OSError as exc:
            self.log.warning("cannot list %s: %s", escape(path), fsops.why(exc))
            return 0
        for entry in entries:
            match = _TEMP_RE.match(compat.to_text(entry.name, errors="replace"))
            if match is None:
                if deep and self._is_folder(entry):
                    removed += self._clean_folder(entry.path, only, deep)
                continue
            if only is not None and not _temp_of(match.group(1), compat.to_text(only)):
                continue
            try:
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    continue
                os.unlink(entry.path)
                removed += 1
            except OSError as exc:
                if exc.errno not in fsops.GONE:
                    self.log.warning("cannot remove %s: %s", escape(entry.path), fsops.why(exc))
        return removed

    @staticmethod
    def _is_folder(entry):
        try:
            return entry.is_dir(follow_symlinks=False)
        except OSError:
            return False

    def _report(self, batch, peer):
        bad = [(name, state) for name, state in batch.states.items() if state != SYNCHRONIZED]
        sender = batch.sender if peer is None else "%s %s" % (batch.sender, escape(peer))
        for name, state in sorted(bad)[:LOG_DETAIL_LINES]:
            word = "refused" if state == INVALID else "failed to apply"
            self.log.warning("%s %s from %s: %s", word, escape(name), sender,
                             batch.reasons.get(name, "?"))
        if len(bad) > LOG_DETAIL_LINES:
            self.log.warning("... and %d more files refused or failed in this batch",
                             len(bad) - LOG_DETAIL_LINES)


class _Staged(collections.namedtuple("_Staged", ("name", "temp", "target", "folder", "dev"))):
    """A file waiting for the flush: temp is None for a meta-only (mtime) update."""
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

    def run(self, name, action, arg):
        key = name if isinstance(name, compat.string_types) else escape(name)
        try:
            action(arg)
        except PathRefused as exc:
            self._set(key, INVALID, exc.message)
        except TransferError as exc:
            self._set(key, FAILED, exc.message)
        except (OSError, IOError) as exc:
            self._set(key, FAILED, fsops.why(exc))

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
        os.chmod(path, item.dir_mode)  # the umask narrowed mkdir's mode
        if self.as_root:
            os.chown(path, -1, self.rx.owner_gid)
        return os.lstat(path)

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
        fsops.rmtree(target)
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
            os.unlink(target)
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
                hashlib.sha256(incoming.data).hexdigest() != sha:
            raise TransferError("checksum mismatch")
        folder, dev, target, st = self._target(parts, item, create=not incoming.meta_only)
        if (st is not None and self.rx.newer_only and item.mtime_is_data
                and incoming.mtime_ns <= compat.stat_mtime_ns(st) + MTIME_SLACK_NS):
            self._set(name, SYNCHRONIZED, "kept: the local file has a newer mtime")
            return
        if incoming.meta_only:
            if st is None:
                raise TransferError("meta-only update of a file we do not have")
            temp = self._touch((folder, dev), parts[-1], target, sha, incoming.mtime_ns, item)
        else:
            temp = self._write_temp((folder, dev), parts[-1], incoming.mtime_ns, item,
                                    _write_checked(sha) if streamed else fsops.write_all,
                                    incoming.data)
        self.staged.append(_Staged(name, temp, target, folder, dev))
        self._set(name, SYNCHRONIZED)

    def _touch(self, where, base, target, sha, mtime_ns, item):
        """Set the mtime of a file whose content is the sender's; a temp file path or None."""
        fd = os.open(target, _READ_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathRefused("target is not a regular file")
            if fsops.sha256_of_fd(fd) != sha:
                raise TransferError("meta-only update but the local content differs")
            try:
                fsops.set_mtime(fd, target, mtime_ns)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EACCES):
                    raise
                # Another user's file (Wazuh's remoted writes agent-info as ossecr): only
                # its owner may set its times, so a copy with the new mtime replaces it.
                os.lseek(fd, 0, os.SEEK_SET)
                return self._write_temp(where, base, mtime_ns, item, fsops.copy_fd, fd)
            self._make_durable(fd, where)
            return None
        finally:
            os.close(fd)

    def _write_temp(self, where, base, mtime_ns, item, fill, source):
        """A complete temporary file next to the target: fill(fd, source) writes the data."""
        temp = os.path.join(where[0], compat.native_str(_temp_name(base)))
        fd = os.open(temp, _TEMP_FLAGS, 0o600)
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
        return temp

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
        if failed_devs:
            kept = []
            for entry in self.staged:
                if entry.dev in failed_devs:
                    self._fail(entry, failed_devs[entry.dev])
                else:
                    kept.append(entry)
            self.staged = kept

    def commit(self):
        """Rename each temporary file over its target."""
        for entry in self.staged:
            if entry.temp is None:
                continue
            try:
                os.rename(entry.temp, entry.target)
            except OSError as exc:
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
    mtime = incoming.mtime_ns
    if isinstance(mtime, bool) or not isinstance(mtime, compat.integer_types) or mtime < 0:
        raise PathRefused("bad mtime_ns field")
    if not incoming.meta_only and not _is_source(incoming.data) and \
            not isinstance(incoming.data, (bytes, bytearray, memoryview)):
        raise PathRefused("bad data field")
    return sha.lower()


def _is_source(data):
    return callable(getattr(data, "chunks", None))


def _write_checked(sha):
    """A fill function for _write_temp: write a source's chunks, which must hash to `sha`."""
    def fill(fd, source):
        digest = hashlib.sha256()
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
