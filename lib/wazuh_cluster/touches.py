"""A batch of keepalives applied in place (issue 11: 10 000 a second on a master of 100 000
agents), under the rules of receive.py's module docstring.

A client's keepalive batch is 2 000 meta-only updates of agent-info files of one folder. The
generic per-file path (receive._Batch.stage) locates every name from the root, opens it by
its full path and goes through a dozen calls per file; here the folder is located, checked
and opened once, and each file costs one loop iteration: its last component checked
(pathrules.Locator), opened from the folder's descriptor, fstat'd, given its time by
descriptor and fstat'd again for the fingerprint the internal daemon learns.

Set in place only when the internal daemon's record proves the content (the same checksum,
the file's fstat the recorded one: size, mtime, inode, ctime, the ctime moving with every
write) on a regular file with a single name, with a sane time that is newer than the local
one. Anything else (no record, another checksum, a time to clamp or refuse, a link, not a
regular file, a time only the owner may set, an error) is left to the per-file path, which
decides it as for any batch. Names are claimed TOUCH_CHUNK at a time (claims.py); a name
another batch holds is done last, the usual way, so "newest keepalive wins" keeps its check
and its change under one claim.
"""
from __future__ import absolute_import, division, print_function

import binascii
import operator
import os
import stat

from wazuh_cluster import compat, fsops, scanner
from wazuh_cluster.errors import PathRefused
from wazuh_cluster.pathrules import MAX_MTIME_NS, MTIME_SLACK_NS, Locator

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
# open(name, dir_fd=) (3.3+): a keepalive batch opens its files from its folder's descriptor
_OPEN_AT = os.open in getattr(os, "supports_dir_fd", ())
# A keepalive batch claims its names this many at a time (claims.py): another batch that
# waits for one of them waits for a chunk, not for the rest of the batch.
TOUCH_CHUNK = 256
_NAME = operator.attrgetter("name")
# (size, mtime_ns, ino, ctime_ns) of a stat: what a record says before its checksum
if hasattr(os.stat_result, "st_mtime_ns"):
    _head = operator.attrgetter("st_size", "st_mtime_ns", "st_ino", "st_ctime_ns")
else:  # 2.7: the times through scanner.fingerprint's formula
    def _head(st):
        return scanner.fingerprint(st)[:4]


def touches_only(files, deletes, deleted_dirs, known, incoming_type):
    """True for a batch of meta-only updates alone, with records (see touch_all)."""
    return bool(known) and not deletes and not deleted_dirs and isinstance(files, list) and \
        all(type(f) is incoming_type and f.meta_only and isinstance(f.name, compat.text_type)
            for f in files)


def touch_all(batch, files):
    """Apply a batch (receive._Batch) of meta-only updates alone: in place what the records
    prove, the rest through batch.left() (the per-file path); see the module docstring."""
    batch.touching = True
    rx = batch.rx
    toucher = _Toucher(batch, Locator(rx.items, batch.sender, rx.role, rx.exclude))
    later, waiting = [], set()
    try:
        for start in range(0, len(files), TOUCH_CHUNK):
            chunk = files[start:start + TOUCH_CHUNK]
            names = list(map(_NAME, chunk))
            busy = rx.claims.claim_free(names, batch)
            batch.claimed.update(names)
            if busy:
                waiting.update(busy)
                batch.claimed.difference_update(busy)
            for incoming in toucher.run(chunk, waiting):
                if waiting and incoming.name in waiting:
                    later.append(incoming)  # after what it waits for; in the batch's order
                else:
                    batch.left(incoming)
            if rx.claims.wanted(batch):
                rx._finish(batch)
        for incoming in later:
            rx._claim(batch, incoming.name)
            batch.left(incoming)
            if rx.claims.wanted(batch):
                rx._finish(batch)
    finally:
        toucher.close()
    if batch.left_counts:
        rx.log.debug("Keepalive batch of %d: %d left to the per-file path (%d without a "
                     "record, %d with another checksum).", len(files),
                     sum(batch.left_counts), batch.left_counts[0], batch.left_counts[1])


class _Toucher(object):
    """The loop of touch_all over one batch, with what it looks up once per batch."""

    def __init__(self, batch, locator):
        self.batch = batch
        self.locator = locator
        self.folders = {}  # folder name -> (descriptor or None, path, st_dev), or False

    def run(self, chunk, waiting):
        """Set what the records prove of `chunk` in place; yield the others, in order."""
        batch = self.batch
        rx = batch.rx
        if not fsops.utime_by_fd():
            for incoming in chunk:
                yield incoming  # no time set by descriptor here: stage() copies
            return
        # batch.flush() replaces in_place and unflushed: it runs between chunks, never in one
        known, states, learned, in_place, unflushed = batch.known, batch.states, \
            batch.learned, batch.in_place, batch.unflushed
        folders, fingerprint, is_reg = self.folders, scanner.fingerprint, stat.S_ISREG
        pack, unhexlify = scanner.FINGERPRINT.pack, binascii.unhexlify
        limit = min(MAX_MTIME_NS, batch.now_ns + rx.times.max_future_ns)
        newer_only, fsync_budget = rx.newer_only, batch.fsync_budget
        synchronized, reasons = batch.SYNCHRONIZED, batch.reasons
        # no fence, os.utime by descriptor: the time set without a call in between
        plain, utime, fstat, close, open_ = batch.fence is None and fsops.UTIME_FD, \
            os.utime, os.fstat, os.close, os.open
        integers, slack, known_get = compat.integer_types, MTIME_SLACK_NS, known.get
        names_dev = names = None  # in_place's list of names_dev
        # The folder of the names before: a name that begins with it and whose last
        # component its match takes has that folder (the match takes no "/").
        prefix = cut = match = None
        for incoming in chunk:
            name, _, sha, mtime_ns, _ = incoming
            record = known_get(name)
            # The record's checksum is our internal daemon's: the same, the sender's is valid.
            if record is None or record[4] != sha or type(mtime_ns) not in integers or \
                    not 0 <= mtime_ns <= limit or (waiting and name in waiting):
                yield incoming
                continue
            # the folder's checks once per folder, the last component's here (Locator.folder)
            if prefix is not None and name.startswith(prefix):
                base = name[cut:]
            else:
                folder, _, base = name.rpartition(u"/")
                where = folders.get(folder)
                if where is None:
                    where = folders[folder] = self._open_folder(folder)
                if not where:
                    prefix = None
                    yield incoming  # stage() locates it again and gives the reason
                    continue
                match, item, dir_fd, path, dev = where
                prefix, cut = folder + u"/", len(folder) + 1
            if not match(base):
                yield incoming  # stage() locates it again and gives the reason
                continue
            try:
                fd = open_(base, READ_FLAGS, dir_fd=dir_fd) if dir_fd is not None else \
                    open_(os.path.join(path, compat.native_str(base)), READ_FLAGS)
            except OSError:
                yield incoming
                continue
            row = None  # stays None: left to stage(); False: decided here without a row
            try:
                st = fstat(fd)
                head = _head(st)
                if not is_reg(st.st_mode) or st.st_nlink != 1:
                    pass
                elif newer_only and mtime_ns <= head[1] + slack and \
                        batch._kept(name, st, item, mtime_ns):
                    row = False  # the local file is newer and stays (its state set)
                elif head == record[:4]:
                    if plain:
                        try:
                            utime(fd, ns=(mtime_ns, mtime_ns))
                            done = True
                        except OSError:
                            done = False
                    else:
                        done = batch.set_in_place(fd, mtime_ns, name)
                    if done is None:
                        row = False  # refused by the fence (its state set)
                    elif done:  # else EPERM: stage() copies; another error fails there
                        after = fstat(fd)
                        # Renamed over or removed since the check: the time went to the
                        # inode the name had; stage() decides the name's file now.
                        if after.st_nlink == 1:
                            if fsync_budget and batch.fsynced < fsync_budget:
                                batch._make_durable(fd, (path, dev))
                            elif dev not in unflushed:
                                unflushed[dev] = path
                            # what the internal daemon learns (keepalive.tell), packed here
                            row = (name, pack(*(fingerprint(after) + (unhexlify(sha),))))
            except OSError as exc:
                batch.failed(name, fsops.why(exc))
                row = False
            finally:
                close(fd)
            if row is None:
                yield incoming
            elif row:
                learned.append(row)
                if dev != names_dev:  # one folder, one file system, nearly always
                    names_dev, names = dev, in_place.setdefault(dev, [])
                names.append(name)
                states[name] = synchronized
                if reasons:
                    reasons.pop(name, None)

    def _open_folder(self, folder):
        """(match of a last component, item, descriptor or None where open() takes no
        dir_fd, path, st_dev) of a folder whose files the Locator checks, walked as
        _Batch._folder() walks it; or False (its files are then left to stage())."""
        found = self.locator.folder(folder)
        if not found:
            return False
        item, match = found
        try:
            path, dev = self.batch._folder(folder.split(u"/"), item, create=False)
            if not _OPEN_AT:
                return match, item, None, path, dev
            fd = fsops.open_folder(path)
        except (OSError, PathRefused):
            return False
        try:
            same = os.fstat(fd).st_dev == dev
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return False
        return match, item, fd, path, dev

    def close(self):
        for where in self.folders.values():
            if where and where[2] is not None:
                os.close(where[2])
        self.folders = {}
