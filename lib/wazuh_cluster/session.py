"""One long-lived session with a peer over a SecureChannel: keepalives, requests and responses.

The session knows nothing about commands: its owner hands it a `dispatcher`, a mapping
cmd -> callable(session, args, data) returning (result, data) or (result, data, compress).
A callable raising ClusterError answers {"ok": false, "error": {"code": exc.code, ...}}.

Threads: one reader thread per session (it also sends the keepalives) and up to `max_handlers`
worker threads that serve incoming requests from a bounded queue. A handler must not wait for
an answer from the same peer: with every worker waiting and the queue full, the reader stops
reading that peer (see Memory below). The reader never blocks on sending: a keepalive is skipped
while another frame is being sent (that frame proves we are alive), so two peers pushing bulk
data at each other at once cannot deadlock with both readers waiting to write.
Messages larger than one chunk travel as a REQUEST/RESPONSE frame with FLAG_MORE followed by
FILE_CHUNK frames of the same request id.

Memory (issue 12): every byte a peer makes us hold is granted by the process's budget.Budget
before it is read. When a message starts, its worst case (twice the message limit: the frames
and their inflated or joined form; for a message in one uncompressed frame, SMALL_MESSAGE_COST
times the frame) is granted at once, in the budget's fair order, and the frames that follow
draw on it without waiting; once it is decoded the unused part goes back, and the rest is held
until its handler returned (a request) or our caller took it (an answer). The reader does not
read a session that waits for room, nor one whose queue of requests is full: backpressure, not
decoded requests piling up. Answers to our own calls are granted ahead of the peers' requests
(see budget.py); so are the copies a frame takes while it is read and decrypted.
A compressed request whose handler has `streams_data = True` is not inflated here: the
handler gets a protocol.Inflater and inflates as it writes (sync_files: into the receiver).
A request in one frame (a keepalive batch) is read under a grant of its frame
alone when the budget can park it (budget.py: Parking) and is decoded by a worker once its
window is granted: the reader goes on meanwhile, so an answer behind it in the stream is not
held back by a window that may wait for every other session's.
"""
from __future__ import absolute_import, division, print_function

import collections
import logging
import threading
import time

from wazuh_cluster import budget as budgets
from wazuh_cluster import compat, protocol, text
from wazuh_cluster.channel import MIN_FRAME, ChannelClosed
from wazuh_cluster.errors import ClusterError, ProtocolError, RequestError

log = logging.getLogger("wazuh_cluster")

FLAG_OF_RESPONSE = protocol.FLAG_RESPONSE_CHUNK
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
MISSED_KEEPALIVES = 3
# Frames without a message (keepalive, close, error) up to this size need no grant: one at a
# time per session, and a keepalive must not wait behind the peers' requests.
CONTROL_FRAME_FREE = 64 << 10
MIN_COST = 4096      # what a queued request costs at least (its header dict, its tuple)
# The window of a message that fits in one uncompressed frame: this many times the frame, at
# least SMALL_WINDOW (protocol.json_cost of an honest header is at most 17 times its text:
# 2.7, file entries as objects; a denser one, never an honest peer's, may cost up to ~110
# times, "[{},{},...]" on 2.7, and is then refused as too large).
SMALL_MESSAGE_COST = 40
SMALL_WINDOW = 64 << 10
FRAME_COPIES = 2     # copies of a frame besides its body while it is read (see _admit)


class _ClosedMeanwhile(Exception):
    """The reader found the session closed by another thread while it waited for room.

    Not a ProtocolError: recv_frame would close the channel on one, before the closer's CLOSE
    frame, and the peer would never learn the reason. The closer closes the channel itself.
    """


class _Pending(object):
    __slots__ = ("event", "header", "data", "error", "held")

    def __init__(self):
        self.event = compat.Event()
        self.header = None
        self.data = b""
        self.error = None
        self.held = 0


class _Assembly(object):
    __slots__ = ("msg_type", "flags", "parts", "size", "held")

    def __init__(self, msg_type, flags, held):
        self.msg_type = msg_type
        self.flags = flags
        self.parts = []
        self.size = 0
        self.held = held


class Session(object):
    """A session over an authenticated SecureChannel.

    channel: channel.SecureChannel; dispatcher: mapping of commands (see module doc);
    keepalive: seconds between keepalives (the peer is dead after three silent intervals);
    on_close: callable(session, reason) called once when the session ends;
    address: the peer's (host, port); version: the peer's software version (from HELLO_INFO);
    max_message_bytes: the largest message accepted, on the wire and inflated;
    budget: the process's budget.Budget (a private one sized for one message when None);
    share: the most this session may hold of it (the budget's share when None);
    max_handlers: worker threads; max_queued: requests waiting for one before the peer is no
    longer read.
    """

    features = frozenset()  # what the peer announced in HELLO_INFO (peers.KNOWN_FEATURES)
    # callable(session, header) taking ELECTION frames (failover.py); None: they are refused
    on_election = None

    def __init__(self, channel, dispatcher, keepalive=30.0, on_close=None, address=None,
                 version=None, max_message_bytes=DEFAULT_MAX_MESSAGE, max_handlers=8,
                 max_queued=8, budget=None, share=None):
        self.channel = channel
        self.dispatcher = dispatcher if dispatcher is not None else {}
        self.keepalive = float(keepalive)
        self.on_close = on_close
        self.peer_name = channel.peer_name
        self.peer_role = channel.peer_role
        self.address = address
        self.version = version
        self.max_message_bytes = max_message_bytes
        self.max_header_bytes = min(protocol.MAX_HEADER_BYTES, max_message_bytes)
        if budget is None:
            total = 2 * max_message_bytes + 2 * CONTROL_FRAME_FREE
            budget = budgets.Budget(total, share=total)
        self.budget = budget
        self.holder = budget.holder(self.peer_name or "?", share)
        self.connected_since = time.time()              # display only
        self.connected_since_mono = compat.monotonic()
        # the hello exchange that opened the session counts as the first keepalive
        self.last_keepalive = self.connected_since      # wall time, display only
        self.last_keepalive_mono = self.connected_since_mono
        self.last_received_mono = self.connected_since_mono
        self.close_reason = None
        self._lock = threading.Lock()
        self._pending = {}
        self._next_rid = 0
        self._assemblies = {}
        self._window = 0         # granted to the reader, not used yet (see _admit)
        self._loose = 0          # taken from it by the frame being read, not owned yet
        self._copies = 0         # taken from it for that frame's copies while it is opened
        self._parked = 0         # the frame being read is parked: its bytes (budget.park)
        self._max_handlers = max_handlers
        self._max_queued = max_queued
        self._requests = collections.deque()
        self._decoded_queued = 0  # requests in _requests that hold their window (not parked)
        self._room = compat.Condition(self._lock)   # a worker took a queued request
        self._workers = 0
        self._closed = compat.Event()
        self._reader = None
        self._last_sent = compat.monotonic()

    def __repr__(self):
        return "<Session %s %s %s>" % (self.peer_name, self.peer_role, self.describe_address())

    # -- public -----------------------------------------------------------------------------

    def describe_address(self):
        """'host:port' of the peer for log lines."""
        if not self.address:
            return "?"
        return "%s:%s" % (self.address[0], self.address[1])

    @property
    def closed(self):
        return self._closed.is_set()

    def info(self):
        """Peer information for cluster_control (-n): plain JSON-able values."""
        return {
            "name": self.peer_name, "role": self.peer_role,
            "address": self.address[0] if self.address else None,
            "version": self.version, "connected_since": self.connected_since,
            "connected_since_mono": self.connected_since_mono,
            "last_keepalive": self.last_keepalive,
            "last_keepalive_mono": self.last_keepalive_mono,
            "connected": not self.closed,
        }

    def start(self):
        """Start the reader thread."""
        self._reader = threading.Thread(target=self._run, name="session-%s" % self.peer_name)
        self._reader.daemon = True
        self._reader.start()
        return self

    def run(self):
        """Run the reader loop in the calling thread until the session ends."""
        self._run()

    def call(self, cmd, args=None, data=b"", timeout=60.0, compress=False, grant=None):
        """Ask the peer to run `cmd`; returns (result, data) or raises RequestError.

        RequestError.code is the peer's error code, "timeout" or "closed". `data` may be a list
        of byte strings: it is emptied as the message is encoded. `grant` (outbox.Grant): the
        budget the data was read under; told what the encoded message keeps, and closed once
        it is on the wire, before the answer is waited for.
        """
        rid, slot = self._register()
        try:
            try:
                self._send_message(protocol.REQUEST, rid, {"cmd": cmd, "args": args or {}},
                                   data, compress, grant)
            except ProtocolError as exc:
                raise RequestError("session with %s closed: %s" % (self.peer_name, exc.message),
                                   "closed")
            finally:
                if grant is not None:
                    grant.close()
            if not slot.event.wait(timeout):
                raise RequestError("no answer from %s to %s within %ss" %
                                   (self.peer_name, cmd, timeout), "timeout")
        finally:
            with self._lock:
                self._pending.pop(rid, None)
                held, slot.held = slot.held, 0
            # the caller owns the answer from here: it leaves the budget
            self.budget.release(self.holder, held)
        if slot.error is not None:
            raise slot.error
        try:
            return protocol.unwrap(slot.header), slot.data
        except RequestError as exc:
            # The peer's words: they reach our logs, and cluster_control on a client.
            raise RequestError(_text(exc.message), _code(exc.code))

    def close(self, reason="closed locally", notify=True):
        """End the session: tell the peer (when `notify`), close the socket, fail pending calls."""
        with self._lock:
            if self._closed.is_set():
                return
            # the reason first: whoever sees the session closed may read it at once
            self.close_reason = reason
            self._closed.set()
            pending = list(self._pending.values())
            self._pending.clear()
            held = sum(r[3] for r in self._requests if r[1] is not None)
            parked = sum(r[3] for r in self._requests if r[1] is None)
            self._requests.clear()
            self._decoded_queued = 0
            self._room.notify_all()
        # what the callers, the workers and the reader hold, they give back themselves
        self.budget.release(self.holder, held)
        self.budget.release_parked(self.holder, parked)
        if notify:
            try:
                self.channel.send_frame(protocol.CLOSE, 0, 0,
                                        protocol.encode_body({"reason": reason}))
            except ProtocolError:
                pass
        self.channel.close()
        for slot in pending:
            slot.error = RequestError("session with %s closed: %s" % (self.peer_name, reason),
                                      "closed")
            slot.event.set()
        if self.on_close is not None:
            try:
                self.on_close(self, reason)
            except Exception:  # the owner's callback must not kill the reader thread
                log.exception("on_close callback failed for %s", self.peer_name)

    # -- sending ----------------------------------------------------------------------------

    def _register(self):
        slot = _Pending()
        with self._lock:
            if self._closed.is_set():
                raise RequestError("session with %s is closed" % self.peer_name, "closed")
            while True:
                self._next_rid = (self._next_rid % 0xFFFFFFFF) + 1
                if self._next_rid not in self._pending:
                    break
            rid = self._next_rid
            self._pending[rid] = slot
        return rid, slot

    def _send_message(self, msg_type, rid, header, data, compress, grant=None):
        parts = protocol.body_parts(header, data)
        flags = 0
        if compress:
            body = protocol.compress_parts(parts)
            flags |= protocol.FLAG_COMPRESSED
        else:
            body = b"".join(parts)
        del parts[:]   # from here the message is held once, as `body`
        if grant is not None:
            grant.keep(len(body))
        chunk = min(protocol.CHUNK_SIZE, self.channel.codec.max_body())
        if len(body) <= chunk:
            self.channel.send_frame(msg_type, flags, rid, body)
            return
        view = memoryview(body)
        self.channel.send_frame(msg_type, flags | protocol.FLAG_MORE, rid,
                                view[:chunk].tobytes())
        cont = FLAG_OF_RESPONSE if msg_type == protocol.RESPONSE else 0
        pos = chunk
        while pos < len(body):
            end = min(pos + chunk, len(body))
            more = protocol.FLAG_MORE if end < len(body) else 0
            self.channel.send_frame(protocol.FILE_CHUNK, cont | more, rid,
                                    view[pos:end].tobytes())
            pos = end

    def _reply(self, rid, envelope, data=b"", compress=False):
        try:
            try:
                self._send_message(protocol.RESPONSE, rid, envelope, data, compress)
            except (TypeError, ValueError) as exc:   # a result JSON cannot carry
                log.error("answer to %s is not serialisable: %s", self.peer_name, exc)
                self._send_message(protocol.RESPONSE, rid, protocol.error_envelope(
                    "internal", "unserialisable result"), b"", False)
        except ProtocolError as exc:
            log.debug("could not answer %s: %s", self.peer_name, exc.message)

    # -- receiving --------------------------------------------------------------------------

    def _run(self):
        try:
            while not self._closed.is_set():
                now = compat.monotonic()
                wait = max(0.0, min(self._last_sent + self.keepalive - now,
                                    self.last_received_mono + MISSED_KEEPALIVES * self.keepalive
                                    - now))
                frame = self.channel.recv_frame(wait, admit=self._admit)
                now = compat.monotonic()
                if frame is not None:
                    self.last_received_mono = now
                    self._handle(frame)
                elif now - self.last_received_mono >= MISSED_KEEPALIVES * self.keepalive:
                    log.warning("session with %s (%s) closed: peer missed %d keepalives",
                                self.peer_name, self.describe_address(), MISSED_KEEPALIVES)
                    self.close("peer missed keepalives", notify=False)
                    return
                self._keepalive_if_due()
        except _ClosedMeanwhile:
            pass
        except ChannelClosed as exc:
            if not self._closed.is_set():
                log.info("session with %s (%s) closed: %s", self.peer_name,
                         self.describe_address(), exc.message)
            self.close(exc.message, notify=False)
        except ProtocolError as exc:
            if not self._closed.is_set():
                log.warning("session with %s (%s) closed: protocol error: %s", self.peer_name,
                            self.describe_address(), exc.message)
            self.close("protocol error: %s" % exc.message, notify=False)
        except Exception:  # a bug here must still close the session and fail pending calls
            log.exception("session with %s (%s) failed", self.peer_name, self.describe_address())
            self.close("internal error", notify=False)
        finally:
            self._drop_reader_room()

    def _drop_reader_room(self):
        """The reader ended: give back its window, its frame and its partial messages."""
        held = self._take_loose() + self._window + self._copies + \
            sum(a.held for a in self._assemblies.values())
        self._window = self._copies = 0
        self._assemblies.clear()
        self.budget.release(self.holder, held)
        parked, self._parked = self._parked, 0
        self.budget.release_parked(self.holder, parked)

    def _keepalive_if_due(self):
        now = compat.monotonic()
        if now - self._last_sent >= self.keepalive and not self._closed.is_set():
            # never wait for the writer here (see the module doc)
            self.channel.send_frame(protocol.KEEPALIVE, 0, 0, b"", block=False)
            self._last_sent = now

    # -- room for what the peer sends -------------------------------------------------------

    def _admit(self, length, peeked):
        """Make room for the frame about to be read (channel.recv_frame's `admit`).

        Room comes from the session's window: bytes granted by the budget and not used yet.
        A session that holds no partial message may wait for a window; one that does must not
        wait (the rest of that message is behind this frame), so a frame beyond its window is
        refused.
        """
        msg_type, flags, rid = peeked
        body = length - MIN_FRAME
        if msg_type == protocol.FILE_CHUNK:
            key = (protocol.RESPONSE if flags & FLAG_OF_RESPONSE else protocol.REQUEST, rid)
            asm = self._assemblies.get(key)
            if asm is None:
                raise ProtocolError("chunk for no open message")
            if asm.size + body > self.max_message_bytes:
                raise ProtocolError("message larger than %d bytes" % self.max_message_bytes)
            need = body
            urgent = False
        elif msg_type in (protocol.REQUEST, protocol.RESPONSE):
            with self._lock:
                urgent = msg_type == protocol.RESPONSE and rid in self._pending
            need = body
            if not urgent:
                self._wait_until(self._queue_has_room)
        else:
            if length > CONTROL_FRAME_FREE:
                raise ProtocolError("%s frame of %d bytes" % (protocol.type_name(msg_type),
                                                              length))
            return
        # while it is read and decrypted the frame is there three times (buffer, ciphertext,
        # plaintext): room for the copies too, given back once it is open (_handle)
        copies = FRAME_COPIES * need
        if self._window < need + copies and self._park(msg_type, flags, need, copies):
            self._copies = copies
            return
        if self._window < need + copies:
            if self._assemblies:
                self._too_large()
            want = max(need + copies, self._window_for(msg_type, flags, body))
            try:
                self._wait_until(lambda step: self.budget.acquire(self.holder, want, step,
                                                                  urgent))
            except budgets.Refused as exc:
                raise ProtocolError("message refused: %s, this session's share of "
                                    "cluster.max_inflight_bytes" % exc.message)
            self._window += want
        self._window -= need + copies
        self._loose += need
        self._copies = copies

    def _window_for(self, msg_type, flags, body):
        """The window of a message whose first frame has a `body` of this size: room for the
        largest message's frames and for decoding it (joined or inflated next to its frames);
        given back once no partial message is left."""
        want = 2 * self.max_message_bytes
        if msg_type != protocol.FILE_CHUNK and \
                not flags & (protocol.FLAG_MORE | protocol.FLAG_COMPRESSED):
            # a whole message in this frame: room for it and its decoded header
            want = min(want, max(SMALL_WINDOW, SMALL_MESSAGE_COST * body))
        return self.budget.grantable(self.holder, want)

    def _parked_window(self, parked, wire):
        """(window, header cost or None) of a parked request: the window is what an
        uncompressed one needs, counted from its header's text (a keepalive batch of 320 KB of names needs about 1.2 MB, where its
        worst case, SMALL_MESSAGE_COST times the frame, is 12.7 MB); the worst case for a
        compressed one."""
        window = self._window_for(parked.msg_type, parked.flags, wire)
        if parked.flags & protocol.FLAG_COMPRESSED:
            return window, None
        cost = protocol.header_cost(parked.body, self.max_header_bytes)
        if cost is None:   # refused when it is decoded
            return min(window, wire + MIN_COST), None
        # decoding holds the body, its data copied out of it (at most the body) and the header
        return min(window, 2 * wire + max(MIN_COST, cost)), cost

    def _park(self, msg_type, flags, need, copies):
        """Read a request in one frame under a grant of the frame alone, when the budget can
        park it (see the module doc); its window is waited for by a worker (_unpark)."""
        if msg_type != protocol.REQUEST or self._assemblies or flags & protocol.FLAG_MORE:
            return False
        if not self.budget.park(self.holder, need, copies):
            return False
        self._parked = need
        return True

    def _queue_has_room(self, step):
        with self._lock:
            if len(self._requests) >= self._max_queued and not self._closed.is_set():
                self._room.wait(step)
            return len(self._requests) < self._max_queued

    def _wait_until(self, ready):
        """Call ready(seconds) until it returns True, sending keepalives meanwhile."""
        while True:
            if self._closed.is_set():
                raise _ClosedMeanwhile()
            step = max(0.05, self._last_sent + self.keepalive - compat.monotonic())
            if ready(min(step, self.keepalive)):
                return
            self._keepalive_if_due()

    def _take_loose(self):
        held, self._loose = self._loose, 0
        return held

    def _too_large(self):
        raise ProtocolError("message needs more room than this session may hold (%d bytes, "
                            "its share of cluster.max_inflight_bytes)" % self.holder.share)

    def _close_window(self):
        """Give back the unused window once no partial message is held."""
        if not self._assemblies and self._window:
            window, self._window = self._window, 0
            self.budget.release(self.holder, window)

    # -- messages -----------------------------------------------------------------------------

    def _handle(self, frame):
        self._window += self._copies
        self._copies = 0
        try:
            self._dispatch_frame(frame)
        finally:
            self._close_window()

    def _dispatch_frame(self, frame):
        msg_type, flags, rid, body = frame
        if msg_type == protocol.KEEPALIVE:
            self.last_keepalive_mono = compat.monotonic()
            self.last_keepalive = time.time()
        elif msg_type in (protocol.REQUEST, protocol.RESPONSE):
            self._start_message(msg_type, flags, rid, body)
        elif msg_type == protocol.FILE_CHUNK:
            self._continue_message(flags, rid, body)
        elif msg_type == protocol.ERROR:
            header, _ = protocol.decode_body(body)
            log.error("session with %s (%s) refused by the peer: %s", self.peer_name,
                      self.describe_address(), _text(header.get("message")))
            self.close("refused by the peer: %s" % _code(header.get("code")), notify=False)
        elif msg_type == protocol.CLOSE:
            header, _ = protocol.decode_body(body)
            log.info("session with %s (%s) closed by the peer: %s", self.peer_name,
                     self.describe_address(), _text(header.get("reason")))
            self.close("closed by the peer", notify=False)
        elif msg_type == protocol.ELECTION and self.on_election is not None:
            self.on_election(self, protocol.decode_body(body)[0])
        else:
            raise ProtocolError("unexpected %s frame" % protocol.type_name(msg_type))

    def _start_message(self, msg_type, flags, rid, body):
        if self._parked:
            parked, self._parked = self._parked, 0
            self._queue_request(rid, None, _Parked(msg_type, flags, body), parked)
            return
        if flags & protocol.FLAG_MORE:
            key = (msg_type, rid)
            if key in self._assemblies or len(self._assemblies) >= 64:
                raise ProtocolError("too many or duplicate partial messages")
            asm = _Assembly(msg_type, flags, 0)
            self._assemblies[key] = asm
            self._add_part(asm, body)
            return
        self._complete(msg_type, flags, rid, [body], self._take_loose())

    def _continue_message(self, flags, rid, body):
        msg_type = protocol.RESPONSE if flags & FLAG_OF_RESPONSE else protocol.REQUEST
        asm = self._assemblies.get((msg_type, rid))
        if asm is None:
            raise ProtocolError("chunk for no open message")
        self._add_part(asm, body)
        if not flags & protocol.FLAG_MORE:
            del self._assemblies[(msg_type, rid)]
            parts, asm.parts = asm.parts, None
            held, asm.held = asm.held, 0
            self._complete(msg_type, asm.flags, rid, parts, held)

    def _add_part(self, asm, body):
        asm.size += len(body)
        asm.held += self._take_loose()
        asm.parts.append(body)

    def _complete(self, msg_type, flags, rid, parts, held):
        """Decode a whole message (its `parts` are taken) holding `held` bytes of budget."""
        room = held + self._window
        self._window = 0
        try:
            header, data, cost = self._decode(msg_type, flags, parts, room)
            if cost > room:
                self._too_large()
        except BaseException:
            self.budget.release(self.holder, room)
            raise
        self._window = room - cost
        if msg_type == protocol.RESPONSE:
            with self._lock:
                slot = self._pending.get(rid)
                if slot is not None:
                    slot.header, slot.data, slot.held = header, data, cost
            if slot is None:
                self.budget.release(self.holder, cost)
                log.debug("late answer %d from %s ignored", rid, self.peer_name)
                return
            slot.event.set()
            return
        self._queue_request(rid, header, data, cost)

    def _queue_request(self, rid, header, data, held):
        """Queue a request for the workers (header None: a _Parked one, `held` parked)."""
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._requests.append((rid, header, data, held))
                if header is not None:
                    self._decoded_queued += 1
                if self._workers >= self._max_handlers:
                    return
                self._workers += 1
        if closed:   # close() gave back what was queued before: this one gives back itself
            if header is None:
                self.budget.release_parked(self.holder, held)
            else:
                self.budget.release(self.holder, held)
            return
        worker = threading.Thread(target=self._work, name="request-%s" % self.peer_name)
        worker.daemon = True
        worker.start()

    def _unpark(self, parked, wire):
        """(header, data, bytes held) of a parked request once its window is granted;
        _GIVE_WAY when a decoded request was queued meanwhile (its parked frame is still
        held: the caller queues it again); None when the session closed meanwhile or the
        request was refused (it closes).

        A worker waits here at the session's share for the session's own releases; a request
        decoded meanwhile holds its window in the queue until a worker serves it, so when
        every worker waited here none would, and the session's bytes and parked frames
        would be stuck for good (review of the ninth round)."""
        window, counted = self._parked_window(parked, wire)
        extra = max(0, window - wire)
        try:
            if not self.budget.acquire(self.holder, extra, abandon=self._give_way,
                                       unpark=wire):
                if not self._closed.is_set():
                    return _GIVE_WAY
                self.budget.release_parked(self.holder, wire)
                return None
        except budgets.Refused as exc:   # its frame is larger than this session's share
            self.budget.release_parked(self.holder, wire)
            self.close("protocol error: %s" % exc.message)
            return None
        room = wire + extra
        try:
            header, data, cost = self._decode(parked.msg_type, parked.flags, [parked.body],
                                              room, counted)
            if cost > room:
                self._too_large()
        except BaseException as exc:
            self.budget.release(self.holder, room)
            if not isinstance(exc, ProtocolError):
                raise
            log.warning("session with %s (%s) closed: protocol error: %s", self.peer_name,
                        self.describe_address(), exc.message)
            self.close("protocol error: %s" % exc.message)
            return None
        self.budget.release(self.holder, room - cost)
        return header, data, cost

    def _give_way(self):
        """_unpark's wait ends: the session closed, or a decoded request waits (an int read
        without the lock: the budget's lock is held here)."""
        return self._closed.is_set() or self._decoded_queued > 0

    def _next_request(self):
        """Under the lock: the first queued request that holds its window (serving it frees
        room a parked one may wait for), else the oldest."""
        requests = self._requests
        if self._decoded_queued:
            for i, item in enumerate(requests):
                if item[1] is not None:
                    del requests[i]
                    self._decoded_queued -= 1
                    return item
        return requests.popleft()

    def _park_again(self, rid, parked, wire):
        """A parked request that gave way goes back to the head of the queue."""
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._requests.appendleft((rid, None, parked, wire))
        if closed:   # close() gave back what was queued: this one gives back itself
            self.budget.release_parked(self.holder, wire)

    def _decode(self, msg_type, flags, parts, room, counted=None):
        """(header, data, bytes held from now on) of a message; `parts` is emptied.

        `room`: the bytes granted for it; what it needs on the way (parts joined or inflated
        next to the frames) must fit. `counted`: the header's protocol.header_cost when the
        caller counted it already (a parked request: counted once, 0.3 ms a keepalive batch).
        """
        wire = sum(len(p) for p in parts)
        if flags & protocol.FLAG_COMPRESSED:
            source = protocol.Inflater(parts, min(self.max_message_bytes, max(0, room - wire)))
            del parts[:]
            header, head_cost = protocol.decode_header_stream(source, self.max_header_bytes,
                                                              room - wire)
            if msg_type == protocol.REQUEST and self._streams(header):
                return header, source, max(MIN_COST, wire + head_cost)
            data = source.read_all()
            return header, data, max(MIN_COST, len(data) + head_cost)
        if len(parts) > 1 and 2 * wire > room:
            self._too_large()
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        del parts[:]
        header, data, head_cost = protocol.decode_costed(body, self.max_header_bytes,
                                                         room - len(body), counted)
        return header, data, max(MIN_COST, len(data) + head_cost)

    def _streams(self, header):
        cmd = header.get("cmd")
        handler = self.dispatcher.get(cmd) if isinstance(cmd, compat.string_types) else None
        return bool(getattr(handler, "streams_data", False))

    def _work(self):
        while True:
            with self._lock:
                if not self._requests or self._closed.is_set():
                    self._workers -= 1
                    return
                rid, header, data, held = self._next_request()
                self._room.notify_all()
            try:
                if header is None:
                    decoded = self._unpark(data, held)
                    if decoded is _GIVE_WAY:
                        self._park_again(rid, data, held)
                        continue
                    if decoded is None:
                        continue
                    header, data, held = decoded
                self._serve(rid, header, data, held)
            except Exception:  # keep the worker count right whatever a handler did
                log.exception("request %d from %s failed", rid, self.peer_name)

    def _serve(self, rid, header, data, held):
        """Run the request's handler, give back what the request held, then answer.

        The request's bytes leave the budget before the answer is sent: a send waits for the
        peer to read, and the peer may itself wait for room that our answer would hold.
        """
        cmd = header.get("cmd")
        args = header.get("args") or {}
        handler = self.dispatcher.get(cmd) if isinstance(cmd, compat.string_types) else None
        try:
            envelope = self._run_handler(handler, cmd, args, data)
        finally:
            del header, args, data
            self.budget.release(self.holder, held)
        if isinstance(envelope, tuple):
            self._reply(rid, *envelope)
        else:
            self._reply(rid, envelope)

    def _run_handler(self, handler, cmd, args, data):
        """The answer to a request: an error envelope, or (envelope, data, compress)."""
        if handler is None:
            return protocol.error_envelope("unknown_command",
                                           "unknown command %r" % (_text(cmd)[:64],))
        try:
            answer = handler(self, args, data)
        except ClusterError as exc:
            return protocol.error_envelope(exc.code, exc.message)
        except Exception as exc:  # a handler bug must not kill the session
            log.exception("command %s from %s failed", cmd, self.peer_name)
            return protocol.error_envelope("internal", type(exc).__name__)
        if not isinstance(answer, tuple) or len(answer) not in (2, 3):
            log.error("command %s returned %r, not (result, data)", cmd, type(answer).__name__)
            return protocol.error_envelope("internal", "malformed handler answer")
        compress = bool(answer[2]) if len(answer) > 2 else False
        return protocol.ok_envelope(answer[0]), answer[1] or b"", compress


_GIVE_WAY = object()  # _unpark: a decoded request goes first


class _Parked(object):
    """A request read in one frame, waiting for its window (Session._unpark)."""
    __slots__ = ("msg_type", "flags", "body")

    def __init__(self, msg_type, flags, body):
        self.msg_type = msg_type
        self.flags = flags
        self.body = body


def _text(value):
    """A reason or message from the peer: escaped and bounded (text.printable)."""
    if value is None:
        return ""
    return text.printable(value, text.REASON_LIMIT)


def _code(value):
    """An error code from the peer: a short word, or "error"."""
    if isinstance(value, compat.string_types) and value and len(value) <= 32 and \
            value.replace("_", "").isalnum() and text.is_printable(value):
        return compat.to_text(value)
    return u"error"
