"""What peers send us: our manifest on request, and batches of files to check and apply.

The sender is only "a member of the cluster": every header field is checked here, every name
by receive.Receiver (SPEC section 4). On a client, client.keys passes the mass-removal guard and
the agents it drops are backed up and cleaned; on the master, agent-info records which node
reports each agent.
"""
from __future__ import absolute_import, division, print_function

import base64
import functools
import itertools
import json
import operator
import os
import threading
import time

from wazuh_cluster import (agents, background, compat, deltarx, fairlock, keepalive, keyids,
                           localedits, logs, metapack, protocol, receive, staterows, summary,
                           text)
from wazuh_cluster.errors import ProtocolError, RequestError

HELD_KEY = "held_client_keys"
_UNKNOWN = object()  # Inbox._held before it is read
# Bytes of names per "manifest" request to the internal daemon (its requests are at most
# localsock.MAX_MESSAGE; JSON may escape a name to more than its length).
NAMES_BYTES_PER_QUERY = 256 << 10


def _bad(message):
    return RequestError(message, "bad_request")


def _check_list(header, key, fields):
    value = header.get(key, [])
    if not isinstance(value, list):
        raise _bad("'%s' must be a list" % key)
    for entry in value:
        if fields is None:
            if not isinstance(entry, compat.string_types):
                raise _bad("'%s' entries must be names" % key)
            continue
        if not isinstance(entry, dict):
            raise _bad("'%s' entries must be objects" % key)
        for field, kind in fields:
            if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                raise _bad("'%s' entries need '%s'" % (key, field))
    return value


class _Stream(object):
    """The files of a compressed batch, inflated in order as the receiver writes them."""

    def __init__(self, source):
        self.source = source        # a protocol.Inflater positioned at the batch's data
        self.position = 0           # bytes of data inflated so far

    def skip_to(self, offset):
        """Inflate and drop the data before `offset` (of files the receiver did not read)."""
        if offset < self.position:
            raise ProtocolError("batch data read out of order")
        while self.position < offset:
            self.read(min(protocol.INFLATE_CHUNK, offset - self.position))

    def read(self, n):
        chunk = self.source.read(n)
        if len(chunk) != n:
            raise _bad("file sizes do not add up to the data sent")
        self.position += n
        return chunk

    def finish(self, total):
        """Check that the data held exactly `total` bytes (what the sizes add up to)."""
        self.skip_to(total)
        if not self.source.at_end():
            raise _bad("file sizes do not add up to the data sent")


class _StreamedFile(object):
    """One file's data in a _Stream: receive.Incoming data with chunks() (see receive.py)."""
    __slots__ = ("stream", "offset", "size")

    def __init__(self, stream, offset, size):
        self.stream, self.offset, self.size = stream, offset, size

    def chunks(self):
        self.stream.skip_to(self.offset)
        left = self.size
        while left > 0:
            n = min(left, protocol.INFLATE_CHUNK)
            yield self.stream.read(n)
            left -= n

    def tobytes(self):
        return b"".join(self.chunks())


_META_FIELDS = (("name", compat.string_types), ("sha256", compat.string_types),
                ("mtime_ns", compat.integer_types))
_INTEGERS = frozenset(compat.integer_types)  # exactly: a bool is no mtime
_new_incoming = functools.partial(tuple.__new__, receive.Incoming)
_NAME_OF = operator.attrgetter("name")
_FIRST = operator.itemgetter(0)
# Keepalive batches are applied one at a time, in the order they came (see Inbox.sync_files).
_TOUCHING = fairlock.FairLock()
_NOT_PACKED = ("files", "meta", "delete", "delete_dirs", "deltas")


def _meta_updates(header):
    """The "meta" entries as meta-only receive.Incoming, checked as _check_list checks them,
    in one pass (a keepalive batch has 2 000)."""
    meta = header.get("meta", [])
    if not isinstance(meta, list):
        raise _bad("'meta' must be a list")
    incoming, strings = [], compat.string_types
    for entry in meta:
        try:
            name, sha, mtime_ns = entry["name"], entry["sha256"], entry["mtime_ns"]
        except (KeyError, TypeError):
            _check_list(header, "meta", _META_FIELDS)  # raises the reason
            raise  # pragma: no cover - _check_list raised
        if type(mtime_ns) not in _INTEGERS or not isinstance(name, strings) or \
                not isinstance(sha, strings):
            _check_list(header, "meta", _META_FIELDS)  # raises the reason, or it was fine
        incoming.append(_new_incoming((name, None, sha, mtime_ns, True)))
    # and those of the packed form (metapack.py), checked there as these are here
    packed = metapack.decode(header)
    if packed is not None:
        names, shas, mtimes = packed
        incoming.extend(map(_new_incoming, zip(names, itertools.repeat(None), shas, mtimes,
                                                itertools.repeat(True))))
    return incoming


def parse_batch(header, data):
    """(incoming files, deletes, deleted folders) of a sync_files request, or RequestError.

    `data`: the files' bytes, or a protocol.Inflater over them: each file then reads its data
    from it as it is written (see _StreamedFile), and the caller checks the end with
    stream_end(incoming, data) once the batch was applied.
    """
    if not isinstance(header, dict):
        raise _bad("the request must be an object")
    files = _check_list(header, "files", (("name", compat.string_types),
                                          ("sha256", compat.string_types),
                                          ("mtime_ns", compat.integer_types),
                                          ("size", compat.integer_types)))
    meta = _meta_updates(header)
    deletes = _check_list(header, "delete", None)
    dirs = _check_list(header, "delete_dirs", None)
    total = sum(entry["size"] for entry in files)
    streamed = isinstance(data, protocol.Inflater)
    if any(entry["size"] < 0 for entry in files) or \
            total > (data.max_length if streamed else len(data)) or \
            (not streamed and total != len(data)):
        raise _bad("file sizes do not add up to the data sent")
    incoming = []
    offset = 0
    # slices of the data, not copies: a batch may be megabytes
    source = _Stream(data) if streamed else memoryview(data)
    for entry in files:
        if streamed:
            chunk = _StreamedFile(source, offset, entry["size"])
        elif entry["size"] == len(data) and isinstance(data, bytes):
            chunk = data    # the very object (a delta's checked result: Expander.proves)
        else:
            chunk = source[offset:offset + entry["size"]]
        offset += entry["size"]
        incoming.append(receive.Incoming(entry["name"], chunk, entry["sha256"],
                                         entry["mtime_ns"], False))
    incoming.extend(meta)
    return incoming, deletes, dirs


def stream_end(incoming):
    """For a streamed batch: drain what the receiver did not read and check the data's end."""
    last = None
    for f in incoming:  # parse_batch's: the files with data first, then the meta-only ones
        if not isinstance(f.data, _StreamedFile):
            break
        last = f.data
    if last is not None:
        last.stream.finish(last.offset + last.size)


def manifest_queries(source, names, as_data, buckets=None):
    """The internal daemon's "manifest" requests for a peer's query (of some summary
    buckets only, when `buckets` is a list).

    A request to the internal daemon is at most localsock.MAX_MESSAGE: a long list of names
    (a client with tens of thousands of agents) is asked for in slices.
    """
    base = {"source": source}
    if buckets is not None:
        base["buckets"] = buckets
    if as_data:
        base["as_data"] = True
    if names is None:
        yield base
        return
    start = 0
    while True:
        end, size = start, 0
        while end < len(names) and (end == start or size < NAMES_BYTES_PER_QUERY):
            size += len(names[end]) + 4
            end += 1
        query = dict(base)
        query["names"] = names[start:end]
        yield query
        if end >= len(names):
            return
        start = end


class Inbox(object):
    """Dispatcher entries sync_manifest and sync_files, and the held client.keys change."""

    def __init__(self, cfg, layout, link):
        self.cfg = cfg
        self.home = layout.home
        self.link = link
        # a client.keys batch's few calls, not behind the other sessions' bulk ones
        self.urgent = link.urgent()
        # the hash of the client.keys we wrote, told without waiting for the answer
        self.teller = background.Latest(self._tell, "tell-written")
        self.log = logs.get("inbox")
        self.receiver = receive.Receiver(layout.home, cfg.items, cfg.exclude, self.log,
                                         role=cfg.node_type, staging_dir=layout.staging_dir,
                                         max_future_seconds=cfg.options.max_future_seconds)
        self.guard = agents.RemovalGuard(cfg.options.max_removed_agents_ratio)
        self.deltas = deltarx.Expander(layout.home, cfg.items, cfg.exclude, cfg.node_type,
                                       self.log)
        self.receiver.proven = self.deltas.proves  # a delta's result: hashed once
        self.lock = threading.Lock()
        self.known_ids = keyids.KnownIds()
        keys = [item for item in cfg.items if item.name == "client.keys"]
        self.keys_name = keys[0].path if keys else None
        self.info_dir = dict((i.name, i.path) for i in cfg.items).get("agent-info")
        self.edits = localedits.LocalEdits(layout.home, os.path.dirname(layout.db_file),
                                           cfg.items, cfg.exclude, self.log,
                                           cfg.options.failover, self.acting,
                                           voters=len(set(cfg.nodes)))

    def acting(self):
        """True while this node acts as the leader: the configured master with failover off,
        the leader holding its lease with it on (the local-edit backups ask it per batch)."""
        if self.failover is None:
            return self.cfg.is_master
        return self.failover.is_acting()

    def start(self):
        self.edits.start()
        removed = self.receiver.cleanup_temp_files()
        if removed:
            self.log.info("Removed %d temporary file(s) left by an interrupted transfer.",
                          removed)

    def stop(self):
        pass

    failover = None     # failover.Failover with cluster.failover=1
    _held = _UNKNOWN    # the held client.keys change, once read (held())
    _role = None        # the elected role with cluster.failover=1 (set_role)

    @property
    def role(self):
        return self._role or self.cfg.node_type

    def set_role(self, role):
        """cluster.failover=1: this node now receives as a `role` (failover_roles.py)."""
        self._role = self.receiver.role = self.deltas.role = role

    def sender_role(self, session, args):
        """The role a sync_files batch is sent in. With cluster.failover=1 a batch carrying
        {term} holds master-owned files: allowed only from the leader of the highest term
        known (fencing, failover.check_transfer raises stale_term otherwise)."""
        if self.failover is None:
            return session.peer_role
        if "term" not in args and "version" not in args:
            self.check_acting(session)
            return "client"
        try:
            self.failover.check_transfer(session, args)
        except RequestError as err:
            self.failover.refused(session.peer_name, "batch refused: %s" % err)
            raise
        return "master"

    def check_source(self, session, source):
        """A peer compares only the items of its role. With cluster.failover=1 a new leader
        may ask before this node learned of the election: it is told to try again later."""
        if source == session.peer_role:
            if source == "client":
                self.check_acting(session)
            return
        if self.failover is not None and source == "master":
            raise RequestError("%s does not lead yet as far as this node knows"
                               % session.peer_name, "not_leader")
        raise RequestError("a %s may only compare its own items" % session.peer_role,
                           "forbidden")

    def check_acting(self, session):
        """With cluster.failover=1 only the acting master takes what clients send (their
        agent-info) and compares it with them: the others say so, and the client retries."""
        if self.failover is not None and not self.failover.is_acting():
            raise RequestError("node %s is not the acting master" % self.cfg.node_name,
                               "not_master")

    def handlers(self):
        found = {"sync_manifest": self.sync_manifest, "sync_files": self.sync_files}
        if self.cfg.options.round_summaries:
            found["sync_summary"] = self.sync_summary
        return found

    # -- requests from peers --------------------------------------------------------------------

    def sync_manifest(self, session, args, data):
        """Our copy of the items the asking peer owns, to compare with its own.

        With "manifest_in_data": true the mapping travels as the raw data of the answer
        (compressed), relayed from the internal daemon without being parsed here: four
        clients asking for 12 500 agent-info files each at once would otherwise hold tens of
        megabytes of dicts and JSON text in this process. Otherwise it is the "files" field.
        """
        source = args.get("source")
        self.check_source(session, source)
        names = args.get("names")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, compat.string_types)
                                                      for n in names):
                raise _bad("'names' must be a list of names")
            # No file we send has a longer name or another character; a huge one, or one that
            # JSON writes six times longer (\u0000), must not overflow the internal daemon's
            # bounded requests. Each once: one name repeated made an entry of the answer per
            # repeat (3 MB of names, 18 MB held by both daemons).
            names = sorted(set(n for n in names if staterows.is_plain(n)))
        try:
            buckets = summary.parse_buckets(args.get("buckets"))
        except ProtocolError as err:
            raise _bad(err.message)
        buckets = sorted(buckets) if buckets is not None else None
        if args.get("manifest_in_data") is not True:
            files = {}
            for query in manifest_queries(source, names, False, buckets):
                files.update(self.link.call("manifest", query)["files"])
            return {"files": files}, b""
        # The answer's data as a list of pieces: the session compresses them as they are,
        # without joining megabytes of them first (ten clients ask at once).
        data = [b"{"]
        for query in manifest_queries(source, names, True, buckets):
            part = self.link.call_data("manifest", query)[1] or b"{}"
            if len(part) > 2:
                data.extend([b","] if len(data) > 1 else [])
                data.append(part[1:-1])  # the entries of the JSON object
            del part
        data.append(b"}")
        return {"files_in_data": True}, data, sum(len(p) for p in data) >= protocol.COMPRESS_FROM

    def sync_summary(self, session, args, data):
        """The summary (summary.py) of our copy of the items the asking peer owns: on a
        master, of the agent-info files that client reports."""
        source = args.get("source")
        self.check_source(session, source)
        try:
            form = summary.parse_form(args.get("form"))
        except ProtocolError as err:
            raise _bad(err.message)
        query = {"source": source}
        if form != 1:
            query["form"] = form   # and said in the answer: an older node answers form 1
        if self.role == "master":
            query["node"] = session.peer_name
        answer = {"buckets": self.link.call("summary", query)["buckets"]}
        if form != 1:
            answer["form"] = form
        return answer, b""

    def sync_files(self, session, args, data):
        """Apply a batch of files from a peer; its data is inflated as it is written."""
        started = time.time()
        sender_role = self.sender_role(session, args)
        fence = None
        if sender_role == "master" and self.failover is not None:
            if "version" in args:
                return self.confirmation(session, args)
            fence = self.failover.fence(self.voter(session), args["term"])
        # Deltas become whole files first: everything below sees what a whole file brings.
        args, data, delta_refused = self.deltas.expand(args, data, sender_role,
                                                       session.peer_name)
        incoming, deletes, dirs = parse_batch(args, data)
        # every name came packed (a keepalive batch): see _TOUCHING and compact_states
        packed_only = metapack.NAMES in args and not any(args.get(key) for key in _NOT_PACKED)
        if isinstance(data, protocol.Inflater) and sender_role == "master" and \
                self.touches_keys(incoming, deletes):
            # the removal guard compares the whole new client.keys with ours first
            incoming, deletes, dirs = parse_batch(args, data.read_all())
        parsed = incoming
        peer = session.peer_name
        refused = {}
        if sender_role == "client":
            refused = self.refuse_deletes(peer, deletes + dirs)
            deletes, dirs = [], []
        known = keepalive.records(self.link, incoming) if any(
            f.meta_only for f in incoming) else None
        learned = []
        # Only a client.keys change needs the batch alone (its guard and agent cleaning);
        # other batches are applied alongside each other (the receiver claims names).
        # asked once of a keepalive batch's 2 000 names (each ask walks them all)
        keys = self.touches_keys(incoming, deletes)
        with (self.lock if keys else compat.NO_LOCK):
            hold = None
            guarded = self.guards_removals(session, sender_role, incoming, deletes)
            retouched = self.keys_retouched(incoming, deletes) if keys else None
            # client.keys as it is, read once (not at all while it is the file we wrote):
            # the append check, the guard and the agent cleanup all compare it
            current = self.read_keys_stable() if not retouched and keys else None
            appended = guarded and self.only_appended(incoming, current)
            old = compat.to_text(current[1], errors="replace") \
                if current is not None and not appended else None
            if guarded:
                incoming, deletes, hold = self.guard_keys(
                    incoming, deletes, (self.voter(session), args.get("term")), appended, old)
            written = None
            before = old if hold is None else None
            edits = self.edits.before(incoming, deletes, dirs)
            try:
                # Two keepalive batches applied at once handed the GIL to each other at each
                # of their system calls (five a keepalive): on a master taking 3 000
                # keepalives a second, 230-1300 context switches a second, 150-170 one at a
                # time, and an eighth less CPU (README). A batch holds no claim (receive.py)
                # while it waits for the lock: it waits for the batches before it, no batch
                # for it. Held while setting times in place, not while flushing (syncfs).
                states, reasons = self.receiver.apply_batch(
                    incoming, deletes, dirs, sender_role=sender_role, peer=peer,
                    known=known, learned=learned, fence=fence,
                    replace=self.edits.replacer(edits),
                    serial=_TOUCHING if packed_only else None)
            except BaseException:
                self.edits.after(edits, None)
                raise
            self.edits.after(edits, states)
            if hold is not None:
                states[self.keys_name] = "pending"
            if (before is not None or appended) and states.get(self.keys_name) == "synchronized":
                written = self.written_keys(incoming)
                self.deltas.note_written(written, self.keys_data(incoming))
                fingerprint = written and tuple(written[1:5])
                if not (appended and self.known_ids.written(fingerprint)):
                    kept = self.deltas.written.get(self.keys_name) if written else None
                    self.known_ids.prime(fingerprint, kept[2] if kept and len(kept) > 2
                                         else None)
                if before is not None:
                    self.drop_agents(before, self.read_keys())
            if retouched and states.get(self.keys_name) == "synchronized":
                self.note_retouched(retouched)
        stream_end(parsed)
        if written is not None:
            self.tell_written(written)
        agents, reporter = [], None
        if self.role == "master" and self.info_dir:
            # the files touched in place are told with their records: the internal daemon
            # takes their agent rows from those (keepalive.tell's node)
            reporter, told = peer, set(map(_FIRST, learned))
            if len(told) < len(states):  # else every name was touched in place
                agents = self.agent_rows(peer, states, reasons,
                                         self.applied_mtimes(incoming, told), told)
        # One call for a keepalive batch: its fingerprints and the agents it reported.
        keepalive.tell(self.link, learned, agents, reporter, known)
        states.update(refused)
        # Names the peer chose: escaped, cut and bounded in number (see staterows).
        invalid = dict((name, state) for name, state in states.items() if state == "invalid")
        for request in staterows.requests(staterows.rows(peer, invalid)):
            self.link.call("set_states", request)
        self.log.debug("Applied %d files, %d deletions and %d folders from %s in %.3f s.",
                       len(incoming), len(deletes), len(dirs), peer, time.time() - started)
        answer = {"states": states}
        if metapack.NAMES in args:
            # a peer that sends the packed form reads the compact answer (metapack.py)
            answer = {"states": metapack.compact_states(
                states, None if packed_only else (f.name for f in parsed if f.meta_only)),
                metapack.COMPACT: True}
        if delta_refused:
            answer["delta_refused"] = delta_refused
        if sender_role == "client":
            # Reports older than ours (an agent that moved to another node): the client
            # leaves its copy out of its rounds until it is newer (sync.PeerSync.kept_newer);
            # else it sent it again, whole, in every round.
            kept = [name for name, why in reasons.items() if why == receive.KEPT_NEWER]
            if kept:
                answer["kept_newer"] = kept
        return answer, b""

    sync_files.streams_data = True   # session.py: hand it the compressed data, not inflated

    def confirmation(self, session, args):
        """Failover: the leader says we hold all of its state up to args["version"] (checked
        by check_transfer). Only an empty batch is one: files never come with a version."""
        if any(args.get(key) for key in ("files", "meta", "delete", "delete_dirs", "deltas",
                                         metapack.NAMES, metapack.RECORDS)):
            raise _bad("a batch with files carries no version")
        self.failover.confirm(session, args)
        return {"states": {}}, b""

    def refuse_deletes(self, peer, names):
        """{name: "invalid"} for deletions a client asked of us; logged (bounded).

        No client deletes on its master (PeerSync sends none): an agent's agent-info goes
        only when the master's own manager removes the agent. A peer holding the key must not
        erase what the other clients reported.
        """
        for name in names[:receive.LOG_DETAIL_LINES]:
            self.log.warning("refused deletion of %s from client %s: a client never deletes "
                             "files on the master", receive.escape(name), peer)
        if len(names) > receive.LOG_DETAIL_LINES:
            self.log.warning("... and %d more deletions refused from client %s",
                             len(names) - receive.LOG_DETAIL_LINES, peer)
        return dict((name, "invalid") for name in names)

    # -- client.keys on a client ----------------------------------------------------------------

    def guards_removals(self, session, sender_role, incoming, deletes):
        """True when a client.keys change in this batch from `session` goes through the removal
        guard: it comes from the master to a client. With cluster.failover=1 that is decided
        now, from the election (the sender leads the highest term known and this node does
        not act as leader), not from this inbox's role: the role follows the election a
        moment later (failover_roles.py), and a node deposed a moment ago, still receiving
        as a master when the batch began, would otherwise take the leader's removals
        unguarded once its role switched mid-batch. A client.keys change from a sender that
        is not that leader any more is refused (RequestError stale_term: the leader retries;
        removals come only from the master)."""
        if self.failover is None:
            return self.role != "master" and sender_role == "master"
        if sender_role != "master" or not self.touches_keys(incoming, deletes):
            return False
        if not self.failover.follows(session):
            raise RequestError("a client.keys change from %s refused: it does not lead the "
                               "highest term known, or this node acts as leader"
                               % text.printable(session.peer_name), "stale_term")
        return True

    def touches_keys(self, incoming, deletes):
        # a C loop over the names: asked three times of every 2 000-keepalive batch
        return self.keys_name in deletes or self.keys_name in map(_NAME_OF, incoming)

    def new_keys(self, incoming):
        """The batch's client.keys with content (whole or a delta's result), else None."""
        for f in incoming:
            if f.name == self.keys_name and not f.meta_only:
                return f
        return None

    def written_keys(self, incoming):
        """The internal daemon's "received" row of the client.keys just written whole."""
        new = self.new_keys(incoming)
        return deltarx.written_row(self.home, self.keys_name, new.sha256) if new else None

    def keys_retouched(self, incoming, deletes):
        """The checksum of client.keys when this batch brings it as a metadata-only update
        (its content stays: the receiver proves that checksum before it sets the mtime),
        else None. No agent can leave then: neither the guard nor the agent cleanup reads
        it (each such update had every client read and decode 9.4 MB twice, and the new
        mtime made it parse every agent ID again at the next append)."""
        if not self.touches_keys(incoming, deletes):
            return None
        entries = [f for f in incoming if f.name == self.keys_name]
        if len(entries) != 1 or not entries[0].meta_only or self.keys_name in deletes:
            return None
        return entries[0].sha256

    def note_retouched(self, sha256):
        """client.keys got a new mtime, its content proven the same: what we know of the
        bytes we wrote and of their agent IDs holds for its new stat fingerprint."""
        known = self.deltas.written.get(self.keys_name)
        row = deltarx.written_row(self.home, self.keys_name, sha256)
        if known is None or known[1] != sha256 or row is None:
            return
        self.deltas.moved(row)
        self.known_ids.moved(known[0], tuple(row[1:5]))

    def keys_data(self, incoming):
        """The bytes of the client.keys of this batch, when they came whole in memory (not
        streamed), else None."""
        new = self.new_keys(incoming)
        return new.data if new and isinstance(new.data, (bytes, memoryview)) else None

    def tell_written(self, row):
        """Tell our internal daemon the row of the client.keys we wrote, from a thread of
        its own: the answer is not needed, and under churn a client's daemon, storing a
        pass, kept the master's push waiting for it up to 3.8 s (20 clients, issue 11).
        The daemon takes a row only while the file's fingerprint is the row's; the newest
        row is the one told (background.Latest)."""
        self.teller.put(row)

    def _tell(self, row):
        try:
            self.urgent.call("received", {"rows": [row]})
        except RequestError as err:  # only a saving: the internal daemon hashes it itself
            self.log.debug("Could not tell the internal daemon about %s: %s", row[0], err)

    def read_keys(self):
        return compat.to_text(self.read_keys_data(), errors="replace")

    def read_keys_data(self):
        try:
            with open(os.path.join(self.home, *self.keys_name.split("/")), "rb") as handle:
                return handle.read()
        except (IOError, OSError):
            return b""

    def only_appended(self, incoming, current=None):
        """True when the batch brings our client.keys with agents of new IDs appended (what
        manage_agents -a does on the master, an agent a second on a busy one): then no agent
        leaves, and neither the guard nor the agent cleanup needs the text of either file
        (each read and decoded 9.4 MB, and compared them twice, on every client).
        `current`: read_keys_stable() when the caller has it."""
        new = self.new_keys(incoming)
        if new is None:
            return False
        fingerprint, old = current or self.read_keys_stable()
        return self.known_ids.only_appended(fingerprint, old, deltarx.as_bytes(new.data))

    def read_keys_stable(self):
        """(stat fingerprint as deltarx.written_row has it, or None when the file changed
        while read or is gone; its bytes)."""
        path = os.path.join(self.home, *self.keys_name.split("/"))
        try:
            before = os.lstat(path)
        except OSError:
            return None, b""
        kept = self.deltas.kept(self.keys_name, before)
        if kept is not None:  # the file as we wrote it, not read again
            return deltarx.fingerprint(before), kept
        data = self.read_keys_data()
        try:
            after = os.lstat(path)
        except OSError:
            return None, data
        fingerprint = deltarx.fingerprint(after)
        same = fingerprint == deltarx.fingerprint(before) and len(data) == after.st_size
        return (fingerprint if same else None), data

    def guard_keys(self, incoming, deletes, source=(None, None), appended=False, old=None):
        """Hold back a client.keys change whose agent lines vanish en masse (agents.RemovalGuard);
        agents marked removed pass, and agents `appended` with new IDs (only_appended).
        `source`: (voter, term) of the batch with failover (Inbox.voter), (None, None)
        without; `old`: our client.keys as text when the caller read it already."""
        if not self.touches_keys(incoming, deletes):
            return incoming, deletes, None
        new = self.new_keys(incoming)
        if new is None and self.keys_name not in deletes:
            return incoming, deletes, None
        if appended:
            self.store_held(None)
            return incoming, deletes, None
        new_data = deltarx.as_bytes(new.data) if new else b""
        new_text = compat.to_text(new_data, errors="replace")
        ok, message = self.guard.check(self.read_keys() if old is None else old, new_text)
        if ok:
            if message:  # agents marked removed (manage_agents -r) or a few lines gone
                self.log.info("%s", message)
            self.store_held(None)
            return incoming, deletes, None
        held = {"data": base64.b64encode(new_data).decode("ascii") if new else None,
                "sha256": new.sha256 if new else None,
                "mtime_ns": new.mtime_ns if new else None,
                "message": message, "since": time.time(),
                "from": source[0], "term": source[1]}
        if self.held() is None or self.held().get("sha256") != held["sha256"]:
            self.log.warning("%s", message)
        self.store_held(held)
        return ([f for f in incoming if f.name != self.keys_name],
                [d for d in deletes if d != self.keys_name], held)

    def held(self):
        """The held change (None: none). Only this process writes it: read once, then known
        here, so that an append does not wait for a busy internal daemon before it is written
        (at 10 clients under churn a client's internal daemon, storing a pass, made each
        client.keys delta wait up to 2 s for this answer)."""
        if self._held is _UNKNOWN:
            self._held = self.urgent.call("meta_get", {"key": HELD_KEY})["value"]
        return self._held

    def store_held(self, value):
        if value is not None or self.held() is not None:
            self._held = _UNKNOWN  # until the daemon confirms it stored the new value
            self.urgent.call("meta_set", {"key": HELD_KEY, "value": value})
            self._held = json.loads(json.dumps(value))  # as meta_get would give it

    def held_summary(self):
        held = self.held() if self.role != "master" else None
        return {"message": held["message"], "since": held["since"]} if held else None

    def confirm_removals(self):
        """Apply the held client.keys change (operator's decision) and clean its agents."""
        if self.role == "master":
            raise RequestError("nothing is held on a master: the guard protects clients",
                               "nothing_held")
        with self.lock:
            held = self.held()
            if held is None:
                raise RequestError("no agent removal is held back", "nothing_held")
            before = self.read_keys()
            if held["data"] is None:
                files, deletes = [], [self.keys_name]
            else:
                data = base64.b64decode(held["data"])
                files, deletes = [receive.Incoming(self.keys_name, data,
                                                   compat.sha256(data).hexdigest(),
                                                   held["mtime_ns"], False)], []
            edits = self.edits.before(files, deletes, [])
            states, reasons = self.receiver.apply_batch(files, deletes, [], sender_role="master",
                                                        fence=self.held_fence(held),
                                                        replace=self.edits.replacer(edits))
            self.edits.after(edits, states)
            if states.get(self.keys_name) != "synchronized":
                raise RequestError("could not apply the held client.keys: %s"
                                   % reasons.get(self.keys_name, "unknown error"), "failed")
            removed = self.drop_agents(before, self.read_keys())
            self.store_held(None)
        self.log.warning("Held agent removal confirmed by the operator: %d agent(s) removed.",
                         len(removed))
        return {"removed": [a.name for a in removed]}

    def voter(self, session):
        """With failover, the <nodes> entry of the node at the other end of `session` (its
        identity for fencing: never its node name, see failover.Failover._live_voter)."""
        return None if self.failover is None else self.failover.voter_of(session)

    def held_fence(self, held):
        """Failover: the held change is applied only while its sender (held["from"], a
        <nodes> entry) still leads the term it came in (failover.fence), as any master-owned
        file; None with failover off."""
        if self.failover is None:
            return None
        if not isinstance(held.get("from"), compat.string_types) or \
                not isinstance(held.get("term"), compat.integer_types):
            raise RequestError("the held client.keys came from no known leader: not applied; "
                               "the leader sends its own again", "stale_term")
        return self.failover.fence(held["from"], held["term"])

    def drop_agents(self, old_text, new_text):
        """Back up and remove the files of agents that left client.keys (logged there)."""
        results = agents.clean_removed_agents(self.home, old_text, new_text, time.time(),
                                              self.log)
        return [agent for agent, _folder, _error in results]

    # -- bookkeeping ----------------------------------------------------------------------------

    def applied_mtimes(self, incoming, told=()):
        """{name: mtime the receiver applied} (a time too far ahead is applied as now), but
        for the names `told` otherwise."""
        now_ns = self.receiver.times.now_ns()
        limit = now_ns + self.receiver.times.max_future_ns
        # pathrules.clamp_mtime's rule, inline: 2 000 names a keepalive batch
        return dict((f.name, f.mtime_ns if f.mtime_ns <= limit else now_ns)
                    for f in incoming
                    if isinstance(f.mtime_ns, compat.integer_types) and f.name not in told)

    def agent_rows(self, peer, states, reasons, mtimes=None, told=()):
        """The peer reports these agents now: agent_nodes rows (keepalive.tell; a report
        older than ours is not applied), but for the names `told` otherwise.

        `mtimes` {name: applied mtime} go with the rows: batches of two peers about the same
        agent may be recorded in either order, the newest keepalive keeps its node.
        """
        mtimes = mtimes or {}
        rows = []
        for name, state in states.items():
            if state != "synchronized" or name in told:
                continue
            folder, _, base = name.rpartition("/")  # dirname and basename
            # the same keepalive as ours (KEPT_SAME) is a report too (PeerSync.reported)
            if folder == self.info_dir and reasons.get(name, receive.KEPT_SAME) == \
                    receive.KEPT_SAME:
                rows.append([base, peer, mtimes[name]] if name in mtimes else [base, peer])
        return rows
