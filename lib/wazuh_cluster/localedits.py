"""Local edits on a node that is not the leader: backed up before the leader's files replace
them (SPEC section 10, "Local edits on a node that is not the leader"). Only with
cluster.failover=1; with it off nothing here runs (no record, no backup, no log line).

What counts as a local edit: a master-owned file whose current content is neither what the
leader sends now nor what this node last received from a leader. That record,
var/db/cluster-received.json ({name: sha256}), is wazuh-clusterd's own (like the election
record): it is seeded from the files as they are the first time the daemon starts with
failover on (a node's state before it ever took part counts as received), then updated after
every batch applied from a leader, and after every change this node pushed while it acted as
leader once a majority of the listed nodes holds it (the cluster's state, not a local edit: an
ex-leader following a new leader must not back up and warn about its own files of the time it
led). Before a majority holds it, the change may be one the next leader never saw (a leader cut
off with a minority still acts until its lease runs out, and its peers there apply its pushes):
it stays a local edit here, so the next leader's version backs it up instead of dropping the
only copy without a word. An unreadable
record is never guessed from the disk: everything that differs is then backed up. So an
operator's edit on a client, and the state a node made while it did not act (the old master
in a minority: it pushes nothing), are both kept.

The backup of a batch is one folder, backup/cluster/TERM-YYYYmmddHHMMSS (local time; -2, -3...
when taken), with the files under their relative paths. It is built under a temporary name,
every file and folder fsync'd, then renamed into place and its parent fsync'd: after a crash
it is complete or absent, and the files it protects are replaced only after that (the batch
is refused when the backup cannot be made; the leader sends it again). An edit made while the
batch is applied, after before() looked, is caught from what each rename actually replaced
(LocalEdits.replacer) and backed up in a folder of its own right after the rename. When that
backup fails (a full disk, EIO), the file is already replaced: the edit is then renamed, in
its folder, to a held name that no cleanup removes (staging.held_name), listed in
var/db/cluster-held.json, and its backup is retried with each batch and at start.
cluster_control -i lists the backed-up files until they are acknowledged
(cluster_control --ack-backups): acknowledged paths are recorded in
var/db/cluster-backups-acked.json, the files stay.
"""
from __future__ import absolute_import, division, print_function

import binascii
import errno
import json
import os
import re
import stat
import threading
import time

from wazuh_cluster import agents, compat, electionstore, fsops, staging
from wazuh_cluster.errors import PathRefused, RequestError
from wazuh_cluster.pathrules import escape, locate
from wazuh_cluster.scanner import Scanner

RECORD_NAME = "cluster-received.json"
ACKED_NAME = "cluster-backups-acked.json"
HELD_NAME = "cluster-held.json"
BACKUP_DIR = ("backup", "cluster")
FOLDER_RE = re.compile(r"^([0-9]{1,16})-([0-9]{14})(-[0-9]{1,4})?$")
TEMP_PREFIX = ".partial-"
MAX_SUFFIX = 9999
LISTED_MAX = 1000        # backups shown by cluster_control -i (the count says the rest)
WARNED_PER_BATCH = 20    # warning lines per backup folder, then one line with the count
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


def backups_wanted(failover, acting):
    """THE seam of the decision: back up local edits only with failover on, on a node that
    is not acting as leader. Until the election is wired, `acting` is "this node is the
    configured master" (Inbox.acting); the wiring passes Election.is_acting(now) instead."""
    return bool(failover) and not acting


def save_json(path, value):
    """Write `value` as JSON to `path` durably and atomically (temporary file, fsync, rename,
    folder fsync): a crash leaves the old or the new file."""
    electionstore.write_durably(compat.to_bytes(json.dumps(value, sort_keys=True)), path)


def load_json(path):
    """The JSON value of `path`; None when it does not exist; ValueError when unusable."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except (IOError, OSError) as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise ValueError(fsops.why(exc))
    return json.loads(compat.to_text(raw))


def election_term(db_folder):
    """The term of the election record (electionstore), 0 when there is none or it cannot
    be read (a backup's name must not wait on it). Read, never loaded: FileStore.load()
    removes temporary files, which a concurrent save may be writing."""
    path = electionstore.path_in(db_folder)
    try:
        with open(path, "rb") as handle:
            return electionstore.decode(handle.read(), path)[0]
    except (IOError, OSError, electionstore.ElectionStoreError):
        return 0


class LocalEdits(object):
    """Backups of local edits for the Inbox: before(...) ahead of a batch from a leader,
    after(...) once it is applied; listing() and acknowledge(...) for cluster_control.

    `acting`: callable, True while this node acts as leader (see backups_wanted); `term`:
    callable giving the term for a backup's name; `clock`: epoch seconds.
    """

    def __init__(self, home, db_folder, items, exclude, log, failover, acting, term=None,
                 clock=time.time, voters=3):
        self.home = compat.native_str(os.path.abspath(home))
        self.items = tuple(items)
        self.master_items = tuple(i for i in self.items if i.source == "master")
        self.exclude = tuple(exclude)
        self.log = log
        self.failover = failover
        self.acting = acting
        self.term = term or (lambda: election_term(db_folder))
        self.clock = clock
        self.record_path = os.path.join(db_folder, RECORD_NAME)
        self.acked_path = os.path.join(db_folder, ACKED_NAME)
        self.held_path = os.path.join(db_folder, HELD_NAME)
        # {held file path: its name relative to home}: replaced edits whose backup failed
        self.held = {}
        self.retrying = threading.Lock()
        self.root = os.path.join(self.home, *BACKUP_DIR)
        self.received = {}
        self.majority = voters // 2 + 1
        # {name: (SHA-256 or None, set of peers)}: what this node pushed as leader and which
        # peers applied it, until a majority (this node included) holds it; one entry per name
        self.applied = {}
        # {name: SHA-256} of the local versions already backed up: a batch that fails after
        # its backup is retried every few seconds and must not make a folder each time
        self.backed_up = {}
        self.lock = threading.Lock()

    # -- the record of what was received ------------------------------------------------------

    def start(self):
        """Load (or seed) the record and remove partial backups a crash left; only with
        failover on; edits held by an earlier run are backed up whatever the setting."""
        self._load_held()
        self._retry_held()
        if not self.failover:
            return
        self._remove_partials()
        try:
            record = load_json(self.record_path)
            if record is not None and not _valid_record(record):
                raise ValueError("not an object of names and SHA-256 digests")
        except ValueError as exc:
            self.log.warning("%s unusable (%s): every master-owned file that differs from "
                             "the leader's will be backed up before it is replaced",
                             self.record_path, exc)
            return
        if record is None:
            record = self._seed()
            try:
                save_json(self.record_path, record)
            except (IOError, OSError) as exc:  # kept in memory; saved with the next batch
                self.log.warning("cannot save %s: %s", self.record_path, fsops.why(exc))
        self.received = record

    def _seed(self):
        scanner = Scanner(self.home, self.master_items, self.exclude)
        scanner.full_pass()
        return dict((compat.to_text(row[0]), row[7]) for row in scanner.rows())

    # -- one batch ----------------------------------------------------------------------------

    def before(self, incoming, deletes, dirs):
        """Back up the local edits this batch would replace or delete; return what after()
        needs, or None when nothing is to be done. RequestError when a backup is needed and
        cannot be made (the batch is then refused: nothing replaced, the leader retries)."""
        if not backups_wanted(self.failover, self.acting()):
            return None
        # (name, local path, the leader's SHA-256 or None for a deletion), master-owned only
        written = [(f.name, self._master_path(f.name), f.sha256, f.meta_only) for f in incoming
                   if isinstance(f.sha256, compat.string_types)]
        written = [entry for entry in written if entry[1] is not None]
        changes = [(name, path, sha) for name, path, sha, meta_only in written if not meta_only]
        deleted = [(name, self._master_path(name), None) for name in deletes]
        changes.extend(deleted)
        for folder in dirs:
            changes.extend((name, path, None) for name, path in self._files_below(folder))
        changes = [change for change in changes if change[1] is not None]
        token = _Batch([(name, sha) for name, _path, sha in changes],
                       dict((path, (name, sha)) for name, path, sha, _meta in written))
        token.targets.update((path, (name, None)) for name, path, _sha in deleted
                             if path is not None)
        at_risk = {}
        for name, path, sha in changes:
            local, token.seen[path] = _read(path)
            if self._is_edit(name, local, sha):
                at_risk[path] = (name, local)
        if at_risk:
            try:
                self._back_up([(path, os.path.relpath(path, self.home))
                               for path in sorted(at_risk)])
            except (IOError, OSError) as exc:
                self.log.error("cannot back up local edits before applying the leader's "
                               "files: %s; the batch is refused", fsops.why(exc))
                raise RequestError("local edits could not be backed up", "failed")
            self.backed_up.update(at_risk.values())
        return token

    def _is_edit(self, name, local, sha):
        """A local version `local` of `name` is an edit to keep when the leader's `sha`
        replaces it: neither that, nor what was received, nor backed up already."""
        return local is not None and local != sha and local != self.received.get(name) \
            and local != self.backed_up.get(name)

    def replacer(self, token):
        """For receive.Receiver.apply_batch(replace=): how the files of the batch before()
        returned `token` for are put in place; None when it returned None.

        before() hashed each local file, but the batch's rename comes later (its files are
        received and flushed first): an operator's edit in between (manage_agents appending
        to client.keys) would be replaced unseen. So the rename is an exchange,
        renameat2(RENAME_EXCHANGE) (Linux 3.15+; ext4, xfs, btrfs, tmpfs): in one atomic
        step the leader's file takes the name and the temporary name takes exactly the file
        that was there, whatever happened to it since before() looked; after() hashes that
        and backs it up if it is an edit nobody kept. Where the kernel or the file system
        cannot exchange, a hard link to the current file is taken right before a plain
        rename: edits made in place (appends, writes through an open descriptor) land in
        the linked file and are caught the same way, and only a file put there by another
        rename within the microseconds between the link and the rename goes unseen."""
        if token is None:
            return None
        return _Replacer(self, token)

    def _replace(self, token, temp, target):
        if target not in token.targets:
            os.rename(temp, target)
            return
        try:
            kept = temp if fsops.swap_in(temp, target) else None
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            kept = _link_and_rename(temp, target, (token.seen.get(target) or (None, None))[1])
        if kept is not None:
            token.replaced.append((kept, target))

    def _remove(self, token, target):
        """Delete a file of the batch: renamed aside in its folder first (atomic, the file
        there now whatever happened since before() looked), checked and backed up like
        what a rename replaced, then removed (after())."""
        if target not in token.targets:
            os.unlink(target)
            return
        base = compat.to_text(os.path.basename(target), errors="replace")
        side = os.path.join(os.path.dirname(target), compat.native_str(staging.side_name(base)))
        os.rename(target, side)
        token.replaced.append((side, target))

    def _check_replaced(self, token):
        """Back up what the batch's renames replaced (replacer) when it is an edit made
        after before() looked; then remove it."""
        at_risk = []
        for kept, target in token.replaced:
            name, sha = token.targets[target]
            seen = token.seen.get(target)
            if seen is not None and _fingerprint(kept) == seen[1]:
                continue       # the very file before() read, not written since
            try:
                local = _sha_of(kept)
            except (IOError, OSError):
                at_risk.append((kept, target, name, None))   # unreadable: kept, unjudged
                continue
            if local != (seen or (sha,))[0] and self._is_edit(name, local, sha):
                at_risk.append((kept, target, name, local))
        if at_risk:
            try:
                self._back_up([(kept, os.path.relpath(target, self.home))
                               for kept, target, _name, _local in at_risk])
                self.backed_up.update((name, local) for _k, _t, name, local in at_risk
                                      if local is not None)
            except (IOError, OSError) as exc:
                self._hold([(kept, target) for kept, target, _n, _l in at_risk], exc)
                token.replaced = [entry for entry in token.replaced
                                  if entry[0] not in set(a[0] for a in at_risk)]
        for kept, _target in token.replaced:
            _unlink_quietly(kept)

    def _hold(self, replaced, exc):
        """Rename each (kept, target) whose backup failed to a held name in its folder and
        list it in the held record: the file is replaced already, this is its only copy."""
        kept_as = []
        with self.lock:
            for kept, target in replaced:
                base = compat.to_text(os.path.basename(target), errors="replace")
                held = os.path.join(os.path.dirname(kept),
                                    compat.native_str(staging.held_name(base)))
                try:
                    os.rename(kept, held)
                except OSError:
                    held = kept     # a rename in its own folder failed: kept for this run
                try:
                    fsops.fsync_folder(os.path.dirname(held))
                except OSError:
                    pass
                self.held[held] = os.path.relpath(target, self.home)
                kept_as.append(held)
            self._save_held()
        self.log.error("cannot back up local edits replaced by the leader's files while the "
                       "batch was applied: %s; kept as %s, the backup is retried with each "
                       "batch and at start", fsops.why(exc),
                       ", ".join(escape(path) for path in kept_as))

    def _retry_held(self):
        """Back up the held edits (_hold) again; those backed up are removed."""
        if not self.held or not self.retrying.acquire(False):
            return
        try:
            with self.lock:
                pending = sorted(self.held.items())
            present = [(path, name) for path, name in pending if os.path.lexists(path)]
            if present:
                try:
                    self._back_up(present)
                except (IOError, OSError):
                    return      # still held; said once when it was held
                for path, _name in present:
                    _unlink_quietly(path)
            with self.lock:
                for path, _name in pending:
                    self.held.pop(path, None)
                self._save_held()
        finally:
            self.retrying.release()

    def _load_held(self):
        try:
            value = load_json(self.held_path)
        except ValueError as exc:
            self.log.error("%s unusable (%s): local edits held under names ending in %s are "
                           "not backed up by themselves", self.held_path, exc,
                           staging.HELD_SUFFIX)
            return
        if isinstance(value, dict):
            self.held = dict((compat.native_str(path), name) for path, name in value.items()
                             if isinstance(path, compat.string_types) and
                             isinstance(name, compat.string_types) and
                             path.endswith(staging.HELD_SUFFIX))

    def _save_held(self):
        """The held record (the caller holds the lock); a failure is logged: the files stay
        under their held names anyway."""
        try:
            save_json(self.held_path, dict((compat.to_text(path), compat.to_text(name))
                                           for path, name in self.held.items()))
        except (IOError, OSError) as exc:
            self.log.error("cannot save %s: %s", self.held_path, fsops.why(exc))

    def after(self, token, states):
        """Record what the batch applied (token: what before() returned); `states` None
        when the batch broke off: what its renames replaced is still checked and kept."""
        if token is None:
            return
        self._retry_held()
        if getattr(token, "replaced", None):
            self._check_replaced(token)
        if states is None:
            return
        with self.lock:
            changed = False
            for name, sha in token:
                # the files of a removed folder have no state of their own: they went with it
                if states.get(name, "synchronized") != "synchronized" or \
                        self.received.get(name) == sha:
                    continue
                if sha is None:
                    del self.received[name]
                else:
                    self.received[name] = sha
                changed = True
            if changed:
                try:
                    save_json(self.record_path, self.received)
                except (IOError, OSError) as exc:
                    self.log.warning("cannot save %s: %s", self.record_path, fsops.why(exc))

    def pushed(self, peer, sent, states):
        """This node, acting as leader, sent `peer` these (name, SHA-256, or None for a
        deletion) and the peer's `states` say which it applied. A change a majority holds is
        the cluster's state from then on, recorded like what a leader sent us: when this node
        follows another leader later (after a crash, a partition, a handover) its own files of
        the time it led are not local edits, and the new leader's first push replaces them
        without a backup or a warning. A file edited here after it stopped acting differs from
        them, and is backed up; so is a change fewer than a majority took (see the module)."""
        if not self.failover:
            return
        held = []
        with self.lock:
            for name, sha in sent:
                if states.get(name) != "synchronized" or \
                        not (sha is None or isinstance(sha, compat.string_types)):
                    continue
                known, peers = self.applied.get(name, (sha, set()))
                if known != sha:
                    peers = set()
                peers.add(peer)
                if len(peers) + 1 >= self.majority:
                    self.applied.pop(name, None)
                    held.append((name, sha))
                else:
                    self.applied[name] = (sha, peers)
        self.after(held, states)

    def _master_path(self, name):
        """The absolute path of a master-owned name, its folders checked with lstat (no
        symlink on the way), or None for a name that is not one (the receiver refuses it)."""
        try:
            item, parts = locate(name, self.master_items, "master", "client", self.exclude)
        except PathRefused:
            return None
        path = self.home
        for part in parts[:-1]:
            path = os.path.join(path, compat.native_str(part))
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return None
            except OSError:
                return None
        return os.path.join(path, compat.native_str(parts[-1]))

    def _files_below(self, folder_name):
        """(name, path) of the files under a folder the batch removes (a group folder),
        whatever their names: a file made by hand may have one the cluster never sends."""
        # a name inside it, to check the folder as the receiver does
        path = self._master_path(folder_name + "/x")
        if path is None:
            return []
        found = []
        for top, _dirs, files in os.walk(os.path.dirname(path)):
            for base in files:
                full = os.path.join(top, base)
                rel = os.path.relpath(full, self.home).replace(os.sep, "/")
                found.append((compat.to_text(rel, errors="replace"), full))
        return found

    # -- the backup folder --------------------------------------------------------------------

    def _back_up(self, sources):
        """Copy the files (path, name relative to home) into one new backup folder; OSError
        when it cannot be made (nothing left of it)."""
        paths = [path for path, _name in sources]
        names = [name for _path, name in sources]
        term = self.term()
        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(self.clock()))
        with self.lock:
            temp = None
            try:
                agents._makedirs(self.root)
                temp = os.path.join(self.root, "%s%d-%s.%s" % (
                    TEMP_PREFIX, term, stamp, compat.to_text(binascii.hexlify(os.urandom(4)))))
                os.mkdir(temp, agents.BACKUP_MODE)
                folders = set([temp])
                for path, name in zip(paths, names):
                    target = os.path.join(temp, name)
                    agents._makedirs(os.path.dirname(target))
                    folders.add(os.path.dirname(target))
                    agents._copy_durably(path, target)
                for folder in sorted(folders, reverse=True):
                    fsops.fsync_folder(folder)
                final = self._free_name("%d-%s" % (term, stamp))
                os.rename(temp, final)
                temp = None
                fsops.fsync_folder(self.root)
            except (IOError, OSError):
                if temp is not None:
                    fsops.rmtree(temp)
                raise
        shown = os.path.join(os.path.join(*BACKUP_DIR), os.path.basename(final))
        for name in names[:WARNED_PER_BATCH]:
            self.log.warning("local edit of %s replaced by the leader's version; the local "
                             "version is backed up as %s (acknowledge with "
                             "'cluster_control --ack-backups')", escape(name),
                             escape(os.path.join(shown, name)))
        if len(names) > WARNED_PER_BATCH:
            self.log.warning("... and %d more local edits backed up in %s",
                             len(names) - WARNED_PER_BATCH, shown)

    def _free_name(self, base):
        for count in range(1, MAX_SUFFIX + 1):
            candidate = os.path.join(self.root, base if count == 1 else "%s-%d" % (base, count))
            if not os.path.lexists(candidate):
                return candidate
        raise OSError(errno.EEXIST, "every suffix up to -%d is taken" % MAX_SUFFIX, base)

    def _remove_partials(self):
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if name.startswith(TEMP_PREFIX):
                fsops.rmtree(os.path.join(self.root, name))

    # -- cluster_control ----------------------------------------------------------------------

    def _all_backups(self):
        """[{path, file, term, time}] of every backed-up file, sorted by path."""
        try:
            folders = sorted(os.listdir(self.root))
        except OSError:
            return []
        rows = []
        for folder in folders:
            match = FOLDER_RE.match(folder)
            if not match:
                continue
            try:
                taken = time.mktime(time.strptime(match.group(2), "%Y%m%d%H%M%S"))
            except (ValueError, OverflowError):
                taken = None
            base = os.path.join(self.root, folder)
            for top, dirs, files in os.walk(base):
                dirs.sort()
                rel = os.path.relpath(top, base).replace(os.sep, "/")
                for name in sorted(files):
                    original = compat.to_text(name if rel == "." else rel + "/" + name,
                                              errors="replace")
                    rows.append({"path": u"/".join(BACKUP_DIR + (compat.to_text(folder),
                                                                 original)),
                                 "file": original, "term": int(match.group(1)),
                                 "time": taken})
        return rows

    def _acked(self):
        try:
            value = load_json(self.acked_path)
        except ValueError as exc:
            self.log.warning("%s unusable (%s): every backup is listed again",
                             self.acked_path, exc)
            return set()
        return set(v for v in value if isinstance(v, compat.string_types)) \
            if isinstance(value, list) else set()

    def listing(self):
        """For cluster_control -i: {"backups": [...] unacknowledged (at most LISTED_MAX),
        "backups_more": count left out}."""
        acked = self._acked()
        rows = [row for row in self._all_backups() if row["path"] not in acked]
        return {"backups": rows[:LISTED_MAX], "backups_more": max(0, len(rows) - LISTED_MAX)}

    def acknowledge(self, paths):
        """Record these backups (paths of files or of backup folders, relative to the
        installation or absolute; all when None) as acknowledged; return the file paths."""
        with self.lock:
            acked = self._acked()
            pending = [row["path"] for row in self._all_backups() if row["path"] not in acked]
            if paths is None:
                chosen = pending
            else:
                chosen = []
                for given in paths:
                    wanted = self._relative(given)
                    found = [p for p in pending if p == wanted or p.startswith(wanted + "/")]
                    if not found:
                        raise RequestError("no unacknowledged backup at '%s'" % given,
                                           "unknown_backup")
                    chosen.extend(found)
            if chosen:
                existing = set(row["path"] for row in self._all_backups())
                save_json(self.acked_path, sorted((acked & existing) | set(chosen)))
        return sorted(set(chosen))

    def _relative(self, given):
        given = compat.to_text(given).replace(os.sep, "/").rstrip("/")
        prefix = compat.to_text(self.home).rstrip("/") + "/"
        return given[len(prefix):] if given.startswith(prefix) else given.lstrip("/")


def _read(path):
    """(SHA-256, (SHA-256, fingerprint)) of the regular file at `path`, as _sha_of; the
    fingerprint (device, inode, size, mtime) when the file did not change while it was
    read, else None. The check after a rename (LocalEdits._check_replaced) hashes the
    replaced file again only when its fingerprint moved: any write changes the mtime (the
    rename itself moves the ctime, so that cannot serve), and the fstat here makes the
    next write's mtime a fine-grained one on kernels with multigrain timestamps (6.13+);
    before them, a rewrite of the same size within one timestamp tick (a few ms) of the
    write before this read would pass unseen."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None, (None, None)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, (None, None)
        sha = fsops.sha256_of_fd(fd)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    same = (st.st_size, compat.stat_mtime_ns(st), st.st_ctime) == \
        (after.st_size, compat.stat_mtime_ns(after), after.st_ctime)
    return sha, (sha, _stat_fingerprint(st) if same else None)


def _fingerprint(path):
    try:
        return _stat_fingerprint(os.lstat(path))
    except OSError:
        return None


def _stat_fingerprint(st):
    return (st.st_dev, st.st_ino, st.st_size, compat.stat_mtime_ns(st))


def _sha_of(path):
    """SHA-256 of the regular file at `path`; None when absent (nothing to lose) or not a
    regular file (a symlink: the receiver refuses to replace it)."""
    return _read(path)[0]


class _Batch(list):
    """What before() returns: the (name, SHA-256 or None) pairs after() records, with what
    the batch's renames need (LocalEdits.replacer)."""

    def __init__(self, pairs, targets):
        list.__init__(self, pairs)
        self.targets = targets    # {local path: (name, the leader's SHA-256)} of files written
        self.seen = {}            # {local path: (SHA-256, fingerprint)} as before() read it
        self.replaced = []        # (path now naming the file a rename replaced, target path)


class _Replacer(object):
    """What replacer() returns: called as (temp, target) for each rename of the batch;
    remove(target) for each deletion (receive.Receiver.apply_batch)."""

    def __init__(self, edits, token):
        self.edits, self.token = edits, token

    def __call__(self, temp, target):
        self.edits._replace(self.token, temp, target)

    def remove(self, target):
        self.edits._remove(self.token, target)


def _link_and_rename(temp, target, seen):
    """rename(temp, target) keeping the replaced file under a hard link taken just before
    (see LocalEdits.replacer); the link's path, or None when there was nothing to link.
    Without a link, only the file before() read (fingerprint `seen`) may be replaced: the
    OSError otherwise fails this file, which travels again and meets before() then."""
    base = compat.to_text(os.path.basename(target), errors="replace")
    side = os.path.join(os.path.dirname(temp), compat.native_str(staging.side_name(base)))
    try:
        os.link(target, side)
    except OSError as exc:
        side = None     # nothing there, or what before() saw and checked is all there is
        if exc.errno not in fsops.GONE and _fingerprint(target) != seen:
            raise
    try:
        os.rename(temp, target)
    except OSError:
        if side is not None:
            _unlink_quietly(side)
        raise
    return side


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _valid_record(record):
    return isinstance(record, dict) and all(
        isinstance(k, compat.string_types) and isinstance(v, compat.string_types)
        for k, v in record.items())
