"""The receiving side of deltas (delta.py): turn them into whole files before anything else.

A sync_files batch may carry, after its files, "deltas": entries (delta.entry) whose middles
follow the files' data. `expand` checks each one as hostile input (delta.parse_entry: types,
bounds, result size), reads our copy of the base without following a symlink and checks its
size and SHA-256, builds the result and checks its SHA-256 against the sender's checksum of
the whole file. What passes becomes an ordinary file entry of the batch: the receiver
(receive.py: staging, atomic rename, hard-link rule) and, for client.keys, the mass-removal
guard and agent cleanup (inbox.py) see exactly what a whole file would have brought.
A refused delta writes nothing; its name is answered in "delta_refused" and the sender sends
the whole file at once (sync.py), one log line naming the peer, the file and the reason.
"""
from __future__ import absolute_import, division, print_function

import errno
import os
import stat

from wazuh_cluster import compat, delta, protocol
from wazuh_cluster.errors import PathRefused
from wazuh_cluster.pathrules import escape, locate
from wazuh_cluster.sync import MAX_FILE_BYTES

FEATURE = "delta"
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def _size(value):
    return isinstance(value, compat.integer_types) and not isinstance(value, bool) and \
        value >= 0


class Refused(Exception):
    """This delta cannot be applied here (the reason, one line)."""


def read_base(home, parts, size, sha256, known=None):
    """Our file home/parts when it is exactly `size` bytes hashing to `sha256`; else Refused.

    Folders are walked with lstat (no symlink followed), the file opened with O_NOFOLLOW and
    checked to be regular, as receive.py does for what it writes. `known`: (fingerprint,
    sha256[, bytes]) of the file as we wrote it (fingerprint() of its stat): while its fstat
    is that, its content is not hashed again (9.4 MB per append, on every client), nor read
    when its bytes are kept.
    """
    path = home
    try:
        for part in parts[:-1]:
            path = os.path.join(path, compat.native_str(part))
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise Refused("not a folder on the way: %s" % escape(part))
        fd = os.open(os.path.join(path, compat.native_str(parts[-1])), _READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise Refused("we do not have the base")
        raise Refused("cannot open the base: %s" % (exc.strerror or exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("the base is not a regular file")
        if st.st_size != size:
            raise Refused("our copy has %d bytes, the base %d" % (st.st_size, size))
        if known is not None and len(known) > 2 and known[:2] == (fingerprint(st), sha256):
            return known[2]
        chunks, left = [], size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise Refused("cannot read the base: %s" % (exc.strerror or exc))
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size:
        raise Refused("our copy is not the base")
    if (known or ())[:2] != (fingerprint(st), sha256) and \
            compat.sha256(data).hexdigest() != sha256:
        raise Refused("our copy is not the base")
    return data


def fingerprint(st):
    """What must stay equal for a file we wrote to hold what we wrote (as scanner.py)."""
    return (st.st_size, compat.stat_mtime_ns(st), st.st_ino, compat.stat_ctime_ns(st))


def as_bytes(data):
    """`data` as bytes: the object a memoryview of all of it shows, not a copy, when it can."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview):
        whole = getattr(data, "obj", None)  # 2.7's memoryview does not show it
        if isinstance(whole, bytes) and len(whole) == len(data):
            return whole
        return data.tobytes()  # bytes(view) is a repr on 2.7
    return bytes(data)


def written_row(home, name, sha256):
    """[name, size, mtime_ns, ino, ctime_ns, mode, sha256] of a file we just renamed into
    place with this content, for the internal daemon ("received", Scanner.hint): it need not
    read a big client.keys again to learn its hash. None when it cannot be stat-ed."""
    try:
        st = os.lstat(os.path.join(compat.native_str(home), *compat.native_str(name).split("/")))
    except OSError:
        return None
    return [name, st.st_size, compat.stat_mtime_ns(st), st.st_ino, compat.stat_ctime_ns(st),
            st.st_mode, sha256]


def _checked(entry, base, known, middle, result):
    """A SHA-256 object given exactly `result`'s bytes, to check it against the sender's.

    An append (the whole base, then the middle) to the bytes we kept of the file we wrote,
    with the SHA-256 object that hashed them (`known`: Expander.written's entry): a copy of
    that object is given the middle only. The checksum is the same function of the same
    bytes; the 9.4 MB of client.keys were hashed once more per append on every client (10 ms
    each; 20 clients on 2 cores, issue 11). Anything else is hashed whole."""
    if entry["head"] == len(base) and entry["tail"] == 0 and known is not None and \
            len(known) > 3 and known[3] is not None and known[2] is base and \
            known[1] == entry["base_sha256"]:
        hashed = known[3].copy()
        hashed.update(middle)
        return hashed
    return compat.sha256(result)


class Expander(object):
    """Applies the deltas of batches from peers under `home` (see the module docstring)."""

    def __init__(self, home, items, exclude, role, log, max_result=MAX_FILE_BYTES):
        self.home = compat.native_str(os.path.abspath(home))
        self.items = tuple(items)
        self.exclude = tuple(exclude)
        self.role = role
        self.max_result = max_result
        self.log = log
        self.applied = 0      # deltas applied since start (cluster_control -i / tests)
        self.refused = 0
        # name -> (fingerprint, sha256[, bytes, hashed]) of the file we last wrote; hashed:
        # a SHA-256 object that was given exactly those bytes, or None (see _checked)
        self.written = {}
        self.results = {}     # name -> (bytes, sha256, hashed) of the last batch's results

    def note_written(self, row, data=None):
        """A written_row() of a file just renamed into place: its next base is not hashed.
        With its bytes `data` (bytes or a memoryview of them) they are kept too: the next
        delta, and the client.keys checks of the same batch (kept()), read nothing. Each
        client read its 9.4 MB client.keys twice per append (the base, then the removal
        guard's old text): with 20 clients on one host the reads and their page faults were
        a third of the CPU of every append. A SHA-256 object that hashed them is kept too
        (_checked: the next append): the very one _apply checked `data` with, else one made
        now, for a file that came whole (a first sync: all clients would hash it at once at
        the first append, under its latency)."""
        if row is None:
            return
        if data is None:
            self.written[row[0]] = (tuple(row[1:5]), row[6])
            return
        data = as_bytes(data)
        made = self.results.get(row[0])
        if made is not None and made[0] is data and made[1] == row[6]:
            hashed = made[2]
        else:
            hashed = compat.sha256(data)
            hashed = hashed if hashed.hexdigest() == row[6] else None
        self.written[row[0]] = (tuple(row[1:5]), row[6], data, hashed)

    def moved(self, row):
        """The file we last wrote, `row`'s checksum, got the stat of written_row() `row` (a
        metadata-only update): what we keep of it holds for that stat."""
        known = self.written.get(row[0])
        if known is not None and known[1] == row[6]:
            self.written[row[0]] = (tuple(row[1:5]),) + known[1:]

    def proves(self, incoming):
        """True when `incoming` (receive.Incoming) carries the very bytes object of a result
        whose SHA-256 _apply checked against this same checksum: the receiver need not hash
        it again (10 ms of 9.4 MB, on every client, per append). Identity, not equality:
        bytes cannot change, and no peer can make an object ours. A result alone in its
        batch is the batch's data, which inbox.parse_batch passes on as that object (a
        memoryview of it would hide it on 2.7)."""
        made = self.results.get(incoming.name)
        return made is not None and made[1] == incoming.sha256 and incoming.data is made[0]

    def kept(self, name, st):
        """The bytes we last wrote to `name` while lstat `st` is still the file we wrote
        (size, mtime, inode and ctime unchanged), else None."""
        known = self.written.get(name)
        if known is None or len(known) < 3 or known[0] != fingerprint(st):
            return None
        return known[2]

    def expand(self, header, data, sender_role, peer):
        """(header, data, refused names) with every applicable delta made a whole file.

        `data`: bytes or a protocol.Inflater (read whole: a batch with deltas is small but
        for the files it carries, bounded by the message limit). A header without deltas is
        returned as it is. Malformed "deltas" (not a list, sizes that do not add up) refuse
        them all; the files of the batch are then checked as usual by the caller.
        """
        entries = header.get("deltas") if isinstance(header, dict) else None
        if not entries:
            return header, data, []
        if isinstance(data, protocol.Inflater):
            data = data.read_all()
        header = dict(header)
        del header["deltas"]
        files = header.get("files") if isinstance(header.get("files"), list) else []
        files_end = sum(f["size"] for f in files if isinstance(f, dict) and
                        _size(f.get("size")))
        try:
            entries = self._parse(entries, len(data) - files_end)
        except delta.DeltaError as exc:
            names = [e.get("name") for e in entries if isinstance(e, dict)] \
                if isinstance(entries, list) else []
            names = [n for n in names if isinstance(n, compat.string_types)]
            self._refuse(peer, names[0] if len(names) == 1 else "%d files" % len(names),
                         str(exc))
            return header, data[:files_end], names
        offset = files_end
        results, refused = [], []
        for entry in entries:
            middle = data[offset:offset + entry["size"]]
            offset += entry["size"]
            try:
                results.append((entry, self._apply(entry, middle, sender_role)))
            except (delta.DeltaError, Refused, PathRefused) as exc:
                self._refuse(peer, entry["name"], exc.message if isinstance(exc, PathRefused)
                             else str(exc))
                refused.append(entry["name"])
        self.applied += len(results)
        # replaced, not changed: a batch of another session at once only misses it
        self.results = dict((entry["name"], (result[0], entry["sha256"], result[1]))
                            for entry, result in results)
        # The results become files of the batch, after its own files.
        header["files"] = list(files) + [
            {"name": entry["name"], "sha256": entry["sha256"], "mtime_ns": entry["mtime_ns"],
             "size": len(result[0])} for entry, result in results]
        parts = ([data[:files_end]] if files_end else []) + [r[0] for _, r in results]
        # one part (a push of client.keys alone) is not copied: 9.4 MB on every client
        return header, parts[0] if len(parts) == 1 else b"".join(parts), refused

    def _parse(self, entries, data_left):
        """The checked entries; DeltaError when one is malformed or their sizes do not add
        up to the data after the files (then no offset can be trusted: all are refused)."""
        if not isinstance(entries, list):
            raise delta.DeltaError("'deltas' is not a list")
        parsed = [delta.parse_entry(entry, self.max_result) for entry in entries]
        if sum(entry["size"] for entry in parsed) != data_left:
            raise delta.DeltaError("delta sizes do not add up to the data sent")
        return parsed

    def _apply(self, entry, middle, sender_role):
        """(the result's bytes, a SHA-256 object given exactly them), checked."""
        _item, parts = locate(entry["name"], self.items, sender_role, self.role, self.exclude)
        known = self.written.get(entry["name"])
        base = read_base(self.home, parts, entry["base_size"], entry["base_sha256"], known)
        result = delta.apply(base, entry["head"], entry["tail"], middle, entry["result_size"])
        hashed = _checked(entry, base, known, middle, result)
        if hashed.hexdigest() != entry["sha256"]:
            raise Refused("the result does not match the sender's checksum")
        self.log.debug("Delta of %s applied: %d bytes sent for a file of %d.",
                       escape(entry["name"]), entry["size"], len(result))
        return result, hashed

    def _refuse(self, peer, name, reason):
        self.refused += 1
        self.log.warning("refused a delta of %s from %s: %s; the whole file is asked for",
                         escape(name), peer, reason)
