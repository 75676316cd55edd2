"""Peer admission and long-lived node sessions: PeerServer (every node), Dialer (clients).

Settings (build them with `make_settings(**fields)`; the lead fills them from the config):

    node_name               this node's name ([A-Za-z0-9._-]{1,64})
    cluster_name            <cluster><name>
    key                     the 32-character cluster key (text); never logged, hidden in repr
    role                    "master" or "client"
    bind_addr, port         where PeerServer listens; a bind_addr other than 0.0.0.0 is also the
                            source address the Dialer connects from (so a master sees a listed
                            address when several nodes share one host on 127.0.0.x)
    nodes                   the <nodes> entries (IP addresses or host names, resolved each time)
    own_addresses           addresses of this node (the Dialer skips them)
    keepalive               seconds between keepalives; a peer is dead after three silent ones
    handshake_timeout       deadline of the whole handshake + hello exchange (seconds)
    max_frame_bytes         largest frame accepted (ciphertext length), default 4 MiB
    allow_unlisted_peers    accept peers whose address is not in `nodes`
    max_connections         bound on connections (sessions + handshakes) of the PeerServer
    max_pending_handshakes  bound on handshakes in progress
    max_connections_per_address, max_pending_per_address   the same bounds per source address
                            (admission.py: a listed address holding no slot is always admitted)
    legacy_node_requests    answer Wazuh 3.0's Fernet `node` request (legacy_node.py)
    version                 our software version, sent in HELLO_INFO
    io_timeout              a frame stalled midway or a send without progress for this long
                            closes the session (default: 3 * keepalive)
    reconnect_min, reconnect_max   Dialer backoff bounds in seconds (capped exponential + jitter)
    max_client_message_bytes  largest message a master takes from a client (on the wire and
                            inflated); a client takes up to session.DEFAULT_MAX_MESSAGE
    features                optional abilities we announce in HELLO_INFO (KNOWN_FEATURES)

After the handshake the dialing client sends HELLO_INFO {"name","role","version"[,"features"]};
Session.features is what the peer announced (empty for an older peer); the master
answers HELLO_INFO or ERROR {"code","message"} (second master, duplicate name) and closes. A
listener of role client answers the handshake (the dialer learns its role) and then closes.
Refusals are logged through admission.RefusalLog: one line per source address per minute, then
a summary with the count of those not written.
"""
from __future__ import absolute_import, division, print_function

import collections
import logging
import random
import socket
import threading

from wazuh_cluster import budget as budgets
from wazuh_cluster import admission, channel, compat, legacy_node, protocol, quietserve, text
from wazuh_cluster.errors import HandshakeError, ProtocolError
from wazuh_cluster.session import CONTROL_FRAME_FREE, DEFAULT_MAX_MESSAGE, Session

log = logging.getLogger("wazuh_cluster")
# Optional abilities announced in HELLO_INFO: "delta" = sync_files batches with "deltas"
# (delta.py, deltarx.py) and the "delta_refused" answer; "meta_packed" = their metadata-only
# updates in packed form and the compact answer (metapack.py).
KNOWN_FEATURES = ("delta", "meta_packed")

_FIELDS = ("node_name", "cluster_name", "key", "role", "bind_addr", "port", "nodes",
           "own_addresses", "keepalive", "handshake_timeout", "max_frame_bytes",
           "allow_unlisted_peers", "max_connections", "max_pending_handshakes", "version",
           "io_timeout", "reconnect_min", "reconnect_max", "max_connections_per_address",
           "max_pending_per_address", "legacy_node_requests", "max_client_message_bytes",
           "features")
_DEFAULTS = {
    "bind_addr": "0.0.0.0", "port": 1516, "nodes": (), "own_addresses": (), "keepalive": 30.0,
    "handshake_timeout": 10.0, "max_frame_bytes": channel.DEFAULT_MAX_FRAME_BYTES,
    "allow_unlisted_peers": False, "max_connections": 256, "max_pending_handshakes": 32,
    "version": "3.0.0", "io_timeout": None, "reconnect_min": 1.0, "reconnect_max": 60.0,
    "max_connections_per_address": 8, "max_pending_per_address": 4,
    "legacy_node_requests": True, "max_client_message_bytes": 8 << 20, "features": (),
}


class PeerSettings(collections.namedtuple("PeerSettings", _FIELDS)):
    """Frozen settings of PeerServer/Dialer (see the module doc). repr hides the key."""
    __slots__ = ()

    def __repr__(self):
        shown = ", ".join("%s=%r" % (f, "<hidden>" if f == "key" else getattr(self, f))
                          for f in _FIELDS)
        return "PeerSettings(%s)" % shown

    def effective_io_timeout(self):
        return self.io_timeout if self.io_timeout else 3.0 * self.keepalive


def make_settings(**fields):
    """PeerSettings from keyword fields; missing optional ones take the defaults above."""
    values = dict(_DEFAULTS)
    values.update(fields)
    missing = [f for f in _FIELDS if f not in values]
    if missing:
        raise ValueError("missing settings: %s" % ", ".join(missing))
    if values["role"] not in channel.ROLE_CODES:
        raise ValueError("role must be 'master' or 'client'")
    if not channel.valid_node_name(values["node_name"]):
        raise ValueError("invalid node name")
    values["nodes"] = tuple(values["nodes"])
    values["own_addresses"] = tuple(values["own_addresses"])
    return PeerSettings(**values)


def resolve(host, port=None):
    """All IP addresses of `host` (a literal resolves to itself); empty list when unknown."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, socket.error, UnicodeError):
        return []
    out = []
    for info in infos:
        addr = info[4][0]
        if addr not in out:
            out.append(addr)
    return out


class NodeRegistry(object):
    """Live sessions by node name (the master's view of its clients). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sessions = {}

    def register(self, session):
        """(True, None) when registered; (False, existing session) when the name is live."""
        with self._lock:
            current = self._sessions.get(session.peer_name)
            if current is not None and not current.closed:
                return False, current
            self._sessions[session.peer_name] = session
            return True, None

    def unregister(self, session):
        """Forget `session` if it is still the one registered under its name."""
        with self._lock:
            if self._sessions.get(session.peer_name) is session:
                del self._sessions[session.peer_name]

    def get(self, name):
        """The live session of node `name`, or None."""
        with self._lock:
            s = self._sessions.get(name)
        return s if s is not None and not s.closed else None

    def sessions(self):
        """List of the live sessions."""
        with self._lock:
            return [s for s in self._sessions.values() if not s.closed]

    def snapshot(self):
        """List of peer info dicts (name, role, address, version, connected_since, ...)."""
        return [s.info() for s in self.sessions()]

    def close_all(self, reason="shutting down"):
        """Close every session."""
        for s in self.sessions():
            s.close(reason)


class _PeerHandler(compat.socketserver.BaseRequestHandler):
    """Hands the accepted connection to its server (the transport logic lives there)."""

    def handle(self):
        self.server.serve_peer(self.request, self.client_address)


class PeerServer(compat.socketserver.ThreadingTCPServer, quietserve.QuietServe):
    """The cluster port: admits peers, runs the server side of the handshake and the sessions.

    settings: PeerSettings; dispatcher: mapping cmd -> callable(session, args, data);
    registry: NodeRegistry shared with the daemon (a new one when None);
    on_session(session): called when a client session is registered (master only);
    on_close(session, reason): called when such a session ends (after it left the registry);
    budget: the process's budget.Budget for what peers send (a new one when None).
    """
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, settings, dispatcher, registry=None, on_session=None, on_close=None,
                 nonce_book=None, refusals=None, budget=None, failover=None):
        self.settings = settings
        self.failover = failover   # failover.Failover with cluster.failover=1: a full mesh
        self.budget = budget if budget is not None else budgets.Budget()
        self.dispatcher = dispatcher
        self.registry = registry if registry is not None else NodeRegistry()
        self.on_session = on_session
        self.on_close = on_close
        self.nonce_book = nonce_book if nonce_book is not None else channel.NONCE_BOOK
        self.admission = admission.Admission(
            settings.max_connections, settings.max_pending_handshakes,
            settings.max_connections_per_address, settings.max_pending_per_address)
        self.refusals = refusals if refusals is not None else admission.RefusalLog(log)
        self._allowed = None
        self._allowed_at = None
        self._thread = None
        self._stopping = compat.Event()
        if ":" in settings.bind_addr:
            self.address_family = socket.AF_INET6
        compat.socketserver.ThreadingTCPServer.__init__(
            self, (settings.bind_addr, settings.port), _PeerHandler)
        compat.set_cloexec(self.socket.fileno())

    @property
    def address(self):
        """(host, port) actually bound (port 0 in settings picks a free one)."""
        return self.socket.getsockname()[:2]

    def start(self):
        """Serve in a background thread."""
        self.new_waker()
        self._thread = threading.Thread(target=self.serve_quietly, name="peer-server")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        """Stop accepting, close the listening socket and every session."""
        self._stopping.set()
        self.stop_serving(self._thread, 5.0)
        self.server_close()
        self.registry.close_all("shutting down")
        self.refusals.flush()

    def counts(self):
        """(connections, pending handshakes) right now."""
        return self.admission.counts()

    def _refuse(self, address, reason, level=logging.WARNING, who=None):
        """Log a refusal of the peer at `address` (rate-limited per source address)."""
        self.refusals.refused(address[0], level, who or _fmt(address), reason)

    # -- socketserver hooks -----------------------------------------------------------------

    def get_request(self):
        sock, addr = compat.socketserver.ThreadingTCPServer.get_request(self)
        compat.set_cloexec(sock.fileno())
        return sock, addr

    def verify_request(self, request, client_address):
        host = client_address[0]
        listed = host in self._allowed_addresses()
        if not listed and not self.settings.allow_unlisted_peers:
            self._refuse(client_address, "address not in <nodes>")
            return False
        reason = self.admission.admit(request, host, listed)
        if reason is not None:
            self._refuse(client_address, reason)
            return False
        return True

    def shutdown_request(self, request):
        self.admission.release(request)
        compat.socketserver.ThreadingTCPServer.shutdown_request(self, request)

    def handle_error(self, request, client_address):
        log.exception("unexpected error serving peer %s", _fmt(client_address))

    # -- the connection ---------------------------------------------------------------------

    def _allowed_addresses(self):
        # Host names in <nodes> are re-resolved at most every 30 s, not on every accept.
        now = compat.monotonic()
        if self._allowed is None or now - self._allowed_at > 30.0:
            allowed = set()
            for entry in self.settings.nodes:
                allowed.update(resolve(entry))
            self._allowed, self._allowed_at = allowed, now
        return self._allowed

    def serve_peer(self, sock, address):
        """Handshake (or Wazuh 3.0's node request), hello, then the session in this thread."""
        s = self.settings
        peer = _fmt(address)
        deadline = compat.monotonic() + s.handshake_timeout
        if s.legacy_node_requests and legacy_node.looks_legacy(
                legacy_node.peek_first(sock, s.handshake_timeout)):
            self._serve_legacy(sock, address, deadline)
            return
        try:
            hs = channel.server_handshake(sock, s.key, s.node_name, s.cluster_name, s.role,
                                          max(0.001, deadline - compat.monotonic()),
                                          s.max_frame_bytes, self.nonce_book)
        except HandshakeError as exc:
            self.admission.handshake_done(sock)
            self._refuse(address, "handshake failed: %s" % exc.message)
            return
        who = "%s (%s)" % (peer, hs.peer_name)
        ch = channel.SecureChannel(sock, hs.codec, hs.peer_name, hs.peer_role,
                                   s.effective_io_timeout())
        if s.role != "master" and self.failover is None:
            log.debug("peer %s learned that this node is a client; closing", who)
            ch.close()
            return
        try:
            frame = ch.recv_frame(max(0.0, deadline - compat.monotonic()), admit=_small)
            if frame is None:
                self._refuse(address, "no hello before the deadline", who=who)
                return
            if frame[0] == protocol.CLOSE and self.failover is not None:
                log.debug("peer %s dials no node of a lower name (it waits for ours)", who)
                ch.close()
                self.failover.peer_waiting()
                return
            if frame[0] != protocol.HELLO_INFO:
                self._refuse(address, "expected a hello, got %s" % protocol.type_name(frame[0]),
                             who=who)
                return
            hello, _ = protocol.decode_body(frame[3])
            if hs.peer_role == "master" and self.failover is None:
                self._refuse(address, "a second master in cluster %s" % s.cluster_name,
                             logging.ERROR, who)
                _refuse(ch, "second_master", "node %s is already the master of cluster %s"
                        % (s.node_name, s.cluster_name))
                return
            # A client's messages are small (agent-info): each client session may hold two
            # of the largest at once.
            limit = s.max_client_message_bytes if self.failover is None else DEFAULT_MAX_MESSAGE
            session = Session(ch, self.dispatcher, s.keepalive, self._closed, address,
                              _version(hello, who), max_message_bytes=limit,
                              max_handlers=8, budget=self.budget, share=2 * limit)
            session.features = _features(hello)
            mismatch = self.failover and self.failover.check_hello(session, hello)
            if mismatch:
                self._refuse(address, mismatch, logging.ERROR, who)
                _refuse(ch, "failover_mismatch", mismatch)
                return
            ok, other = self.registry.register(session)
            if not ok:
                self._refuse(address, "node name %s already connected from %s"
                             % (hs.peer_name, other.describe_address()), logging.ERROR, who)
                _refuse(ch, "duplicate_name", "node name %s is already connected"
                        % hs.peer_name)
                return
            try:
                ch.send_frame(protocol.HELLO_INFO, 0, 0,
                              protocol.encode_body(_hello(s, self.failover)))
            except ProtocolError:
                session.on_close = None      # never announced: just leave the registry
                session.close("lost before the hello", notify=False)
                self.registry.unregister(session)
                raise
        except ProtocolError as exc:
            self._refuse(address, exc.message, who=who)
            ch.close()
            return
        finally:
            self.admission.handshake_done(sock)
        if self._stopping.is_set():          # stop() ran while this handshake was in flight
            session.close("shutting down")
            return
        log.info("node %s connected from %s (version %s)", hs.peer_name, peer, session.version)
        if self.failover is not None:
            self.failover.session_opened(session, hello)
        if self.on_session is not None:
            try:
                self.on_session(session)
            except Exception:  # the owner's bug must not leave a registered, dead session
                log.exception("on_session callback failed for %s", hs.peer_name)
                session.close("internal error")
                return
        session.run()

    def _serve_legacy(self, sock, address, deadline):
        """Wazuh 3.0's `node` request (legacy_node.py); the connection closes after it."""
        s = self.settings
        try:
            legacy_node.serve(sock, s.key, s.node_name, s.cluster_name, s.role, deadline)
        except legacy_node.Refused as exc:
            self._refuse(address, exc.reason)
            return
        finally:
            self.admission.handshake_done(sock)
        log.debug("answered the Wazuh 3.0 node request of %s", _fmt(address))

    def _closed(self, session, reason):
        self.registry.unregister(session)
        log.info("node %s (%s) disconnected: %s", session.peer_name,
                 session.describe_address(), reason)
        if self.failover is not None:
            self.failover.session_closed(session)
        if self.on_close is not None:
            self.on_close(session, reason)


def _small(length, peeked):
    """recv_frame's admit for a hello: it is a few hundred bytes, never megabytes."""
    if length > CONTROL_FRAME_FREE:
        raise ProtocolError("hello frame of %d bytes" % length)


def _refuse(ch, code, message):
    try:
        ch.send_frame(protocol.ERROR, 0, 0, protocol.encode_body(
            {"code": code, "message": message}))
    except ProtocolError:
        pass
    ch.close()


def _fmt(address):
    return "%s:%s" % (address[0], address[1])


def _hello(settings, failover=None):
    """Our HELLO_INFO. "features" (absent before deltas existed) lists what we understand
    beyond the original protocol; a peer uses only what both announce. With cluster.failover=1
    it also carries the election's fields (failover.HELLO_KEY)."""
    hello = {"name": settings.node_name, "role": settings.role, "version": settings.version}
    if settings.features:
        hello["features"] = list(settings.features)
    if failover is not None:
        hello.update(failover.hello_fields())
    return hello


def _features(hello):
    """The peer's announced features we know of (frozenset; anything else is ignored)."""
    announced = hello.get("features") if isinstance(hello, dict) else None
    if not isinstance(announced, list):
        return frozenset()
    return frozenset(f for f in announced if f in KNOWN_FEATURES)


def _version(hello, who):
    """The peer's version, or text.INVALID_VERSION (logged once, escaped): informational only,
    an odd version does not refuse the session."""
    version = text.peer_version(hello.get("version"))
    if version == text.INVALID_VERSION:
        log.warning("peer %s announced an invalid version %s; shown as %s", who,
                    text.quote(hello.get("version"), 64), version)
    return version


class Dialer(object):
    """A client's link to its master: find it among `nodes`, keep one session, reconnect.

    dispatcher: commands the master may call on us; on_session(session) when a session starts,
    on_close(session, reason) when it ends. `rng` (random.Random-like) and `resolver`
    (host -> list of IPs) are seams for tests; budget: the process's budget.Budget (a new one
    when None; the session with the master may use all of it). start() runs it in a thread;
    stop() returns promptly.
    """

    def __init__(self, settings, dispatcher, on_session=None, on_close=None, nonce_book=None,
                 rng=None, resolver=None, budget=None, failover=None, registry=None):
        self.settings = settings
        # With cluster.failover=1 (failover.Failover): a link to the one node of `nodes`,
        # whoever leads (see mesh_dialers); its sessions go into `registry`.
        self.failover = failover
        self.registry = registry
        self._inbound = None   # the node of a lower name at this entry: it dials us
        self.budget = budget if budget is not None else budgets.Budget()
        self.dispatcher = dispatcher
        self.on_session = on_session
        self.on_close = on_close
        self.nonce_book = nonce_book if nonce_book is not None else channel.NONCE_BOOK
        self.rng = rng if rng is not None else random.Random()
        self.resolver = resolver if resolver is not None else resolve
        self.session = None
        self.attempts = 0
        self._stop = compat.Event()
        self._wake = compat.Event()   # set by wake() and stop(): a backoff ends early
        self._connecting = None
        self._thread = None
        self._last_report = None
        self._repeats = 0

    def _report(self, level, fmt, *args):
        """Log a dial failure once; identical ones that follow only count (STYLE s.9).

        level None marks a success: a pending count is then logged and the memory reset.
        """
        text = fmt % args if args else fmt
        if level is not None and text == self._last_report:
            self._repeats += 1
            log.debug("%s (again)", text)
            return
        if self._repeats:
            log.info("previous message repeated %d more time(s): %s", self._repeats,
                     self._last_report)
        self._last_report, self._repeats = (text if level is not None else None), 0
        if level is not None:
            log.log(level, "%s", text)

    @property
    def master_name(self):
        s = self.session
        return s.peer_name if s is not None and not s.closed else None

    def start(self):
        """Run the dial/keep/reconnect loop in a background thread."""
        self._thread = threading.Thread(target=self.run, name="dialer")
        self._thread.daemon = True
        self._thread.start()
        return self

    def wake(self):
        """Dial now if backing off (mesh: the peer is back and waits for our dial), with the
        backoff reset."""
        self._wake.set()

    def _pause(self, delay):
        if self._wake.wait(delay):
            self._wake.clear()
            self.attempts = 0

    def stop(self, timeout=5.0):
        """Stop dialing and close the session; returns once the thread ended (or timeout)."""
        self._stop.set()
        self._wake.set()
        sock = self._connecting
        if sock is not None:
            _close_sock(sock)
        if self.session is not None:
            self.session.close("shutting down")
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_connected(self, timeout):
        """Poll until a session is up (True) or `timeout` passes (False)."""
        end = compat.monotonic() + timeout
        while compat.monotonic() < end:
            s = self.session
            if s is not None and not s.closed:
                return True
            if self._stop.wait(0.02):
                return False
        return False

    def backoff(self):
        """Next delay: capped exponential in the attempt count, with jitter in [50 %, 100 %]."""
        s = self.settings
        base = min(s.reconnect_max, s.reconnect_min * (2 ** min(self.attempts, 30)))
        return base * (0.5 + 0.5 * self.rng.random())

    def run(self):
        """The loop (blocking): dial, run the session, back off, until stop()."""
        warned = False
        while not self._stop.is_set():
            try:
                session = self._find_master()
            except Exception:  # a bug must not end the client's only link to its master
                log.exception("dialing the master failed")
                session = None
            if session is None and self._inbound is not None:
                # That node dials us (mesh_dialers). Look again now and then, quietly, but
                # not while its session is up: each look is a whole handshake on both nodes,
                # every reconnect_max for every pair (2.7: most of the full mesh's idle cost).
                while not self._stop.wait(self.settings.reconnect_max) and \
                        self.registry.get(self._inbound) is not None:
                    pass
                self._inbound = None
                continue
            if session is None:
                if not warned:
                    log.warning("no %s reachable among %s; retrying with backoff",
                                "node" if self.failover else "master",
                                ", ".join(self.settings.nodes) or "no nodes")
                    warned = True
                self.attempts += 1
                self._pause(self.backoff())
                continue
            warned = False
            self.session = session
            if self._stop.is_set():
                session.close("shutting down")
                break
            lived = compat.monotonic()
            if self.on_session is not None:
                try:
                    self.on_session(session)
                except Exception:  # the owner's bug: drop this session, keep dialing
                    log.exception("on_session callback failed for %s", session.peer_name)
                    session.close("internal error")
            session.run()
            if compat.monotonic() - lived > 3 * self.settings.keepalive:
                self.attempts = 0
            else:
                self.attempts += 1
            if not self._stop.is_set():
                self._pause(self.backoff())

    def _own(self):
        own = set(self.settings.own_addresses)
        for a in self.settings.own_addresses:
            own.update(self.resolver(a))
        return own

    def _find_master(self):
        s = self.settings
        own = self._own()
        for entry in s.nodes:
            if self._stop.is_set():
                return None
            if entry in own:
                continue
            for ip in self.resolver(entry):
                if ip in own or self._stop.is_set():
                    continue
                session = self._try(ip)
                if session is not None:
                    return session
        return None

    def _try(self, ip):
        s = self.settings
        peer = "%s:%s" % (ip, s.port)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        compat.set_cloexec(sock.fileno())
        self._connecting = sock
        try:
            if s.bind_addr not in ("0.0.0.0", "::", "") and family == socket.AF_INET \
                    and ":" not in s.bind_addr:
                sock.bind((s.bind_addr, 0))
            sock.settimeout(s.handshake_timeout)
            sock.connect((ip, s.port))
            deadline = compat.monotonic() + s.handshake_timeout
            hs = channel.client_handshake(sock, s.key, s.node_name, s.cluster_name, s.role,
                                          s.handshake_timeout, s.max_frame_bytes,
                                          self.nonce_book)
            ch = channel.SecureChannel(sock, hs.codec, hs.peer_name, hs.peer_role,
                                       s.effective_io_timeout())
            if self.failover is not None and hs.peer_name <= s.node_name:
                # In the mesh the node of the lower name dials: one session per pair.
                log.debug("node %s at %s dials us; not dialing it", hs.peer_name, peer)
                self._inbound = hs.peer_name
                _refuse_quietly(ch)
                return None
            if hs.peer_role != "master" and self.failover is None:
                log.debug("node %s at %s is a client, not the master", hs.peer_name, peer)
                ch.close()
                return None
            ch.send_frame(protocol.HELLO_INFO, 0, 0,
                          protocol.encode_body(_hello(s, self.failover)))
            frame = ch.recv_frame(max(0.0, deadline - compat.monotonic()), admit=_small)
            if frame is None:
                self._report(logging.WARNING, "master %s at %s did not answer our hello",
                             hs.peer_name, peer)
                ch.close()
                return None
            header, _ = protocol.decode_body(frame[3])
            if frame[0] == protocol.ERROR:
                self._report(logging.ERROR, "master %s at %s refused us: %s", hs.peer_name, peer,
                             text.printable(header.get("message") or header.get("code") or "?",
                                            text.REASON_LIMIT))
                ch.close()
                return None
            if frame[0] != protocol.HELLO_INFO:
                self._report(logging.WARNING, "master %s at %s sent %s instead of a hello",
                             hs.peer_name, peer,
                            protocol.type_name(frame[0]))
                ch.close()
                return None
            self._connecting = None
            session = Session(ch, self.dispatcher, s.keepalive, self._closed, (ip, s.port),
                              _version(header, "%s (%s)" % (peer, hs.peer_name)),
                              budget=self.budget, share=self.budget.total)
            session.features = _features(header)
            if self.failover is not None and not self._join_mesh(session, header, peer):
                ch.close()
                return None
            self._report(None, "")
            log.info("connected to %s %s at %s", "node" if self.failover else "master",
                     hs.peer_name, peer)
            return session
        except HandshakeError as exc:
            self._report(logging.WARNING, "handshake with %s failed: %s", peer, exc.message)
        except ProtocolError as exc:
            self._report(logging.WARNING, "session with %s failed: %s", peer, exc.message)
        except (socket.error, OSError) as exc:
            log.debug("cannot reach %s: %s", peer, exc)
        self._connecting = None
        _close_sock(sock)
        return None

    def _join_mesh(self, session, hello, peer):
        """A dialed session of the mesh: checked, registered, given to the election."""
        mismatch = self.failover.check_hello(session, hello)
        if mismatch:
            self._report(logging.ERROR, "%s; not connecting to %s", mismatch, peer)
            return False
        ok, other = self.registry.register(session)
        if not ok:
            log.debug("node %s already connected from %s", session.peer_name,
                      other.describe_address())
            return False
        self.failover.session_opened(session, hello)
        return True

    def _closed(self, session, reason):
        if self.failover is not None:
            self.registry.unregister(session)
            log.info("node %s (%s) disconnected: %s", session.peer_name,
                     session.describe_address(), reason)
            self.failover.session_closed(session)
        if self.on_close is not None:
            self.on_close(session, reason)


def mesh_dialers(settings, failover, registry, **kwargs):
    """cluster.failover=1: one Dialer per other entry of <nodes>, each keeping a session with
    that node if its name is higher than ours (the lower name dials: one session per pair)."""
    own = set(settings.own_addresses)
    for address in settings.own_addresses:
        own.update(resolve(address))
    dialers = [Dialer(settings._replace(nodes=(entry,)), failover=failover,
                      registry=registry, **kwargs)
               for entry in settings.nodes if entry not in own and not own & set(resolve(entry))]
    failover.dialer_wakers.extend(d.wake for d in dialers)
    return dialers


def _refuse_quietly(ch):
    """Close a dialed channel before the hello: the peer sees a CLOSE, not an error."""
    try:
        ch.send_frame(protocol.CLOSE, 0, 0, protocol.encode_body({"reason": "mesh_direction"}))
    except ProtocolError:
        pass
    ch.close()


def _close_sock(sock):
    try:
        sock.close()
    except (OSError, socket.error):
        pass
