"""A real PeerServer on loopback under attack, while a legitimate client session keeps working.

Every attack comes from its own 127.0.0.x source address so that its log line can be found: each
must produce exactly one WARNING/ERROR line naming the peer address and the reason, and the key
must never appear in any log line. Waits poll a condition with a bounded timeout.
"""
from __future__ import absolute_import, division, print_function

import logging
import os
import socket
import struct
import threading

import pytest

from wazuh_cluster import channel, compat, peers, protocol
from wazuh_cluster.channel import NonceBook
from wazuh_cluster.errors import HandshakeError

KEY = "Sup3rS3cretClusterKey0123456789a"
OTHER_KEY = "Wr0ngKeyWr0ngKeyWr0ngKeyWr0ngKe"
MAX_FRAME = 2 * 1024 * 1024
MASTER_IP = "127.0.0.2"
CLIENT_IP = "127.0.0.3"


def wait_for(predicate, timeout=15.0, step=0.01):
    """Poll `predicate` until true or `timeout` passes; returns its last value."""
    end = compat.monotonic() + timeout
    while True:
        value = predicate()
        if value or compat.monotonic() > end:
            return value
        threading.Event().wait(step)


class Capture(logging.Handler):
    """Keeps every record of the "wazuh_cluster" logger."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []
        self.guard = threading.Lock()

    def emit(self, record):
        with self.guard:
            self.records.append(record)

    def lines(self, min_level=logging.WARNING):
        with self.guard:
            return [r.getMessage() for r in self.records if r.levelno >= min_level]

    def about(self, ip, min_level=logging.WARNING):
        """Lines at min_level or above naming source address `ip`."""
        return [m for m in self.lines(min_level) if (ip + ":") in m]


class Ctx(object):
    pass


def ping(session, args, data):
    return {"pong": args.get("n"), "from": session.peer_name}, data


@pytest.fixture
def ctx():
    cap = Capture()
    logger = logging.getLogger("wazuh_cluster")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(cap)
    c = Ctx()
    c.cap = cap
    c.settings = peers.make_settings(
        node_name="master01", cluster_name="wazuh", key=KEY, role="master",
        bind_addr=MASTER_IP, port=0, nodes=[MASTER_IP, CLIENT_IP], own_addresses=[MASTER_IP],
        keepalive=1.0, handshake_timeout=1.0, io_timeout=1.0, max_frame_bytes=MAX_FRAME,
        allow_unlisted_peers=True, max_connections=64, max_pending_handshakes=32)
    c.server = peers.PeerServer(c.settings, {"ping": ping}, nonce_book=NonceBook()).start()
    c.port = c.server.address[1]
    c.client_settings = peers.make_settings(
        node_name="client01", cluster_name="wazuh", key=KEY, role="client", bind_addr=CLIENT_IP,
        port=c.port, nodes=[MASTER_IP, CLIENT_IP], own_addresses=[CLIENT_IP], keepalive=1.0,
        handshake_timeout=2.0, max_frame_bytes=MAX_FRAME, reconnect_min=0.05, reconnect_max=0.5)
    c.dialer = peers.Dialer(c.client_settings, {"ping": ping}, nonce_book=NonceBook()).start()
    assert c.dialer.wait_connected(15)
    c.first_session = c.dialer.session
    yield c
    c.dialer.stop()
    c.server.stop()
    logger.removeHandler(cap)
    logger.setLevel(old_level)
    for r in cap.records:
        text = r.getMessage() + (r.exc_text or "")
        assert KEY not in text and OTHER_KEY not in text


def legit_works(c):
    """The legitimate session is the same one and answers, both ways."""
    assert c.dialer.session is c.first_session and not c.first_session.closed
    n = os.urandom(4)
    assert c.first_session.call("ping", {"n": 7}, n, timeout=10) == ({"pong": 7,
                                                                      "from": "client01"}, n)
    master_side = c.server.registry.get("client01")
    assert master_side is not None
    assert master_side.call("ping", {"n": 8}, timeout=10)[0] == {"pong": 8, "from": "master01"}


def connect_from(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ip, 0))
    s.settimeout(10)
    s.connect((MASTER_IP, port))
    return s


def read_raw_frame(sock):
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("closed")
            buf += chunk
        return buf
    head = exact(4)
    return head + exact(struct.unpack(">I", head)[0])


def peer_closed(sock, timeout=15.0):
    """True once the server closed `sock` (EOF or reset), draining whatever it sent."""
    sock.settimeout(0.1)
    end = compat.monotonic() + timeout
    while compat.monotonic() < end:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except (socket.error, OSError):
            return True
    return False


def authed(c, ip, name, role="client"):
    """A key-holding peer that completed handshake + hello.

    Returns (sock, codec, the server's raw answer frame, that frame opened).
    """
    sock = connect_from(ip, c.port)
    hs = channel.client_handshake(sock, KEY, name, "wazuh", role, 5, MAX_FRAME, NonceBook())
    sock.sendall(hs.codec.seal(protocol.HELLO_INFO, 0, 0, protocol.encode_body(
        {"name": name, "role": role, "version": "x"})))
    raw = read_raw_frame(sock)
    return sock, hs.codec, raw, hs.codec.open_frame(raw)


def request(codec, rid=1):
    return codec.seal(protocol.REQUEST, 0, rid, protocol.encode_body(
        {"cmd": "ping", "args": {"n": rid}}))


def expect_one_line(c, ip, reason):
    assert wait_for(lambda: any(reason in m for m in c.cap.about(ip))), c.cap.lines()
    assert wait_for(lambda: c.server.counts()[1] == 0)
    lines = c.cap.about(ip)
    assert len(lines) == 1, lines
    assert reason in lines[0]


# -- before the key is proven --------------------------------------------------------------

def test_settings_and_objects_never_show_the_key(ctx):
    for obj in (ctx.settings, ctx.client_settings, ctx.first_session, ctx.first_session.channel,
                ctx.first_session.channel.codec):
        assert KEY not in repr(obj) and KEY not in str(obj)
    assert "<hidden>" in repr(ctx.settings)


def test_wrong_key(ctx):
    sock = connect_from("127.0.0.10", ctx.port)
    with pytest.raises(HandshakeError) as info:
        channel.client_handshake(sock, OTHER_KEY, "intruder", "wazuh", "client", 5, MAX_FRAME,
                                 NonceBook())
    assert "wrong key" in info.value.message
    sock.close()
    expect_one_line(ctx, "127.0.0.10", "wrong key")
    legit_works(ctx)


def test_other_cluster_same_key(ctx):
    sock = connect_from("127.0.0.11", ctx.port)
    with pytest.raises(HandshakeError):
        channel.client_handshake(sock, KEY, "other01", "other", "client", 5, MAX_FRAME,
                                 NonceBook())
    sock.close()
    expect_one_line(ctx, "127.0.0.11", "another cluster")
    legit_works(ctx)


@pytest.mark.parametrize("ip,payload,reason", [
    ("127.0.0.12", b"\x8a\x01\xff garbage \x00\x13" * 7, "handshake failed"),
    ("127.0.0.13", b"GET / HTTP/1.1\r\nHost: master01\r\n\r\n", "handshake failed"),
    ("127.0.0.14", b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + b"\x11" * 190,
     "handshake failed"),
])
def test_garbage_http_tls_instead_of_hello(ctx, ip, payload, reason):
    sock = connect_from(ip, ctx.port)
    sock.sendall(payload)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, reason)
    legit_works(ctx)


def test_silent_connection_closed_at_deadline(ctx):
    sock = connect_from("127.0.0.15", ctx.port)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, "127.0.0.15", "deadline")
    legit_works(ctx)


@pytest.mark.parametrize("ip,name", [("127.0.0.16", b"evil/../x"), ("127.0.0.17", b"evil\nx")])
def test_node_name_with_slash_or_newline(ctx, ip, name):
    sock = connect_from(ip, ctx.port)
    ch = (b"WZC1\x01\x02" + os.urandom(32) + channel.lp(name) + channel.lp(b"wazuh"))
    sock.sendall(struct.pack(">H", len(ch)) + ch)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "invalid node name")
    assert "\n" not in "".join(ctx.cap.about(ip))
    legit_works(ctx)


def test_recorded_session_replayed_into_new_one(ctx):
    class Recorder(object):
        def __init__(self, sock):
            self.sock, self.sent = sock, []

        def sendall(self, data):
            self.sent.append(data)
            return self.sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self.sock, name)
    sock = Recorder(connect_from("127.0.0.18", ctx.port))
    hs = channel.client_handshake(sock, KEY, "rec01", "wazuh", "client", 5, MAX_FRAME,
                                  NonceBook())
    sock.sendall(hs.codec.seal(protocol.HELLO_INFO, 0, 0, protocol.encode_body(
        {"name": "rec01", "role": "client", "version": "x"})))
    read_raw_frame(sock.sock)
    sock.sendall(request(hs.codec, 1))
    sock.sock.close()
    assert wait_for(lambda: ctx.server.registry.get("rec01") is None)
    replay = connect_from("127.0.0.19", ctx.port)
    replay.sendall(b"".join(sock.sent))
    assert peer_closed(replay)
    replay.close()
    expect_one_line(ctx, "127.0.0.19", "client failed to prove the key")
    legit_works(ctx)


def test_200_idle_connections_from_one_address_one_line_and_a_summary(ctx):
    ip = "127.0.0.20"
    socks = []
    try:
        for _ in range(200):
            socks.append(connect_from(ip, ctx.port))
        legit_works(ctx)
        assert ctx.server.admission.counts_of(ip)[1] <= 4     # its own share, no more
        for s in socks:
            assert peer_closed(s)
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: ctx.server.counts() == (1, 0))
    lines = ctx.cap.about(ip)
    assert len(lines) == 1 and "too many pending handshakes from this address" in lines[0]
    ctx.server.refusals.flush()
    summary = ctx.cap.about(ip)[1:]
    # 196 refused at once, 4 admitted and closed at the handshake deadline: 200 refusals.
    assert len(summary) == 1 and "199 more refusal(s)" in summary[0], summary
    legit_works(ctx)


def test_unlisted_address_refused(ctx):
    settings = ctx.settings._replace(allow_unlisted_peers=False, bind_addr="127.0.0.4")
    server = peers.PeerServer(settings, {}, nonce_book=NonceBook()).start()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.21", 0))
        s.connect(server.address)
        assert peer_closed(s)
        s.close()
        assert wait_for(lambda: len(ctx.cap.about("127.0.0.21")) == 1)
        assert "not in <nodes>" in ctx.cap.about("127.0.0.21")[0]
    finally:
        server.stop()
    legit_works(ctx)


# -- after the key is proven: frames -------------------------------------------------------

def flip(wire, index, bit=0):
    b = bytearray(wire)
    b[index] ^= 1 << bit
    return bytes(b)


@pytest.mark.parametrize("ip,where", [("127.0.0.30", "header"), ("127.0.0.31", "ciphertext"),
                                      ("127.0.0.32", "tag")])
def test_flipped_bit(ctx, ip, where):
    sock, codec, _, _ = authed(ctx, ip, "flip%s" % ip.split(".")[-1])
    frame = request(codec)
    index = {"header": 3, "ciphertext": 4 + 3, "tag": len(frame) - 1}[where]
    sock.sendall(flip(frame, index, 1))
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "protocol error")
    legit_works(ctx)


def test_frame_replayed_in_same_session(ctx):
    ip = "127.0.0.33"
    sock, codec, _, _ = authed(ctx, ip, "replay01")
    frame = request(codec, 5)
    sock.sendall(frame)
    answer = codec.open_frame(read_raw_frame(sock))
    assert answer[0] == protocol.RESPONSE and answer[2] == 5
    sock.sendall(frame)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "failed authentication")
    legit_works(ctx)


def test_frame_reflected_to_its_sender(ctx):
    ip = "127.0.0.34"
    sock, codec, raw_hello, _ = authed(ctx, ip, "reflect01")
    sock.sendall(raw_hello)           # the server's own frame, sent back
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "failed authentication")
    legit_works(ctx)


def test_reordered_frames(ctx):
    ip = "127.0.0.35"
    sock, codec, _, _ = authed(ctx, ip, "reorder01")
    f1, f2 = request(codec, 1), request(codec, 2)
    sock.sendall(f2 + f1)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "failed authentication")
    legit_works(ctx)


def test_truncated_frame_then_close(ctx):
    ip = "127.0.0.36"
    sock, codec, _, _ = authed(ctx, ip, "trunc01")
    sock.sendall(request(codec)[:-5])
    sock.shutdown(socket.SHUT_WR)
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "middle of a frame")
    legit_works(ctx)


def test_stall_mid_frame(ctx):
    ip = "127.0.0.37"
    sock, codec, _, _ = authed(ctx, ip, "stall01")
    sock.sendall(request(codec)[:10])
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "stalled")
    legit_works(ctx)


@pytest.mark.parametrize("ip,length", [("127.0.0.38", 0), ("127.0.0.39", MAX_FRAME + 1),
                                       ("127.0.0.40", 0xFFFFFFFF)])
def test_bad_length_prefix(ctx, ip, length):
    sock, codec, _, _ = authed(ctx, ip, "len%s" % ip.split(".")[-1])
    sock.sendall(struct.pack(">I", length))
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "bad frame length")
    legit_works(ctx)


def test_bad_length_prefix_before_hello(ctx):
    ip = "127.0.0.41"
    sock = connect_from(ip, ctx.port)
    channel.client_handshake(sock, KEY, "early01", "wazuh", "client", 5, MAX_FRAME, NonceBook())
    sock.sendall(b"\xff\xff\xff\xff")
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "bad frame length")
    legit_works(ctx)


# -- after the key is proven: admission ----------------------------------------------------

def test_duplicate_node_name_refused_and_told(ctx):
    ip = "127.0.0.42"
    sock, codec, raw, opened = authed(ctx, ip, "client01")
    msg_type, _, _, body = opened
    assert msg_type == protocol.ERROR
    assert protocol.decode_body(body)[0]["code"] == "duplicate_name"
    assert peer_closed(sock)
    sock.close()
    expect_one_line(ctx, ip, "already connected")
    legit_works(ctx)


def test_second_master_refused_and_logged_on_both_sides(ctx):
    ip = "127.0.0.43"
    settings = ctx.client_settings._replace(node_name="master02", role="master", bind_addr=ip,
                                            own_addresses=[ip])
    dialer = peers.Dialer(settings, {}, nonce_book=NonceBook())
    assert dialer._try(MASTER_IP) is None
    expect_one_line(ctx, ip, "second master")
    mine = [m for m in ctx.cap.lines(logging.ERROR) if "refused us" in m]
    assert len(mine) == 1 and "already the master" in mine[0]
    legit_works(ctx)


def test_client_listener_answers_handshake_but_accepts_no_session(ctx):
    settings = ctx.settings._replace(role="client", node_name="client02", bind_addr="127.0.0.5")
    server = peers.PeerServer(settings, {"ping": ping}, nonce_book=NonceBook()).start()
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.44", 0))
        sock.connect(server.address)
        hs = channel.client_handshake(sock, KEY, "client03", "wazuh", "client", 5, MAX_FRAME,
                                      NonceBook())
        assert hs.peer_role == "client" and hs.peer_name == "client02"
        assert peer_closed(sock)
        sock.close()
        assert server.registry.sessions() == []
        assert ctx.cap.about("127.0.0.44") == []
    finally:
        server.stop()
    legit_works(ctx)


# -- the dialer ----------------------------------------------------------------------------

def test_dialer_reconnects_after_the_master_drops_it(ctx):
    old = ctx.first_session
    ctx.server.registry.get("client01").close("test drop")
    assert wait_for(lambda: ctx.dialer.session is not old and ctx.dialer.session is not None
                    and not ctx.dialer.session.closed)
    assert ctx.dialer.session.call("ping", {"n": 1}, timeout=10)[0]["pong"] == 1
    ctx.first_session = ctx.dialer.session


def test_dialer_skips_a_client_node_and_finds_the_master(ctx):
    settings = ctx.settings._replace(role="client", node_name="client02", bind_addr="127.0.0.6",
                                     port=ctx.port)
    other = peers.PeerServer(settings, {}, nonce_book=NonceBook()).start()
    try:
        cs = ctx.client_settings._replace(node_name="client04", bind_addr="127.0.0.45",
                                          nodes=["127.0.0.6", MASTER_IP], own_addresses=[])
        d = peers.Dialer(cs, {}, nonce_book=NonceBook()).start()
        try:
            assert d.wait_connected(15)
            assert d.master_name == "master01"
        finally:
            d.stop()
    finally:
        other.stop()


def test_dialer_backs_off_and_stops_promptly_when_master_unreachable(ctx):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.7", 0))
    port = lsock.getsockname()[1]
    lsock.close()                       # nothing listens there now
    cs = ctx.client_settings._replace(node_name="client05", bind_addr="127.0.0.46", port=port,
                                      nodes=["127.0.0.7"], own_addresses=[],
                                      reconnect_min=0.01, reconnect_max=0.2)
    d = peers.Dialer(cs, {}, nonce_book=NonceBook()).start()
    assert wait_for(lambda: d.attempts >= 4)
    delays = [d.backoff() for _ in range(50)]
    assert max(delays) <= 0.2 and min(delays) >= 0.1 * 0.5
    d.stop(timeout=10)
    assert not d._thread.is_alive()
    warns = [m for m in ctx.cap.lines() if "no master reachable" in m and "127.0.0.7" in m]
    assert len(warns) == 1


# -- the same server in its own process ----------------------------------------------------

SERVER_SCRIPT = r"""
import json, logging, sys, threading
sys.path.insert(0, sys.argv[1])
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="%(levelname)s %(message)s")
from wazuh_cluster import peers
cfg = json.loads(sys.stdin.readline())          # the key never travels in argv or environment
settings = peers.make_settings(**cfg)
def ping(session, args, data):
    return {"pong": args.get("n"), "from": session.peer_name}, data
server = peers.PeerServer(settings, {"ping": ping}).start()
sys.stdout.write("PORT %d\n" % server.address[1])
sys.stdout.flush()
sys.stdin.read()                                 # EOF: stop
server.stop()
"""


def test_server_in_its_own_process(ctx):
    import json
    import subprocess
    import sys
    lib = os.path.dirname(os.path.dirname(os.path.abspath(peers.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, lib], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []

    def pump():
        for raw in iter(proc.stderr.readline, b""):
            lines.append(raw.decode("utf-8", "replace"))
    reader = threading.Thread(target=pump)
    reader.daemon = True
    reader.start()
    try:
        cfg = {"node_name": "master09", "cluster_name": "wazuh", "key": KEY, "role": "master",
               "bind_addr": "127.0.0.8", "port": 0, "nodes": ["127.0.0.8"],
               "allow_unlisted_peers": True, "keepalive": 1.0, "handshake_timeout": 1.0}
        proc.stdin.write((json.dumps(cfg) + "\n").encode("utf-8"))
        proc.stdin.flush()
        port = int(proc.stdout.readline().split()[1])
        cs = ctx.client_settings._replace(node_name="client09", bind_addr="127.0.0.47",
                                          port=port, nodes=["127.0.0.8"], own_addresses=[])
        d = peers.Dialer(cs, {}, nonce_book=NonceBook()).start()
        try:
            assert d.wait_connected(15)
            bad = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bad.bind(("127.0.0.48", 0))
            bad.connect(("127.0.0.8", port))
            with pytest.raises(HandshakeError):
                channel.client_handshake(bad, OTHER_KEY, "intruder", "wazuh", "client", 5,
                                         MAX_FRAME, NonceBook())
            bad.close()
            assert wait_for(lambda: any("127.0.0.48:" in m and "wrong key" in m
                                        for m in lines)), lines
            assert d.session.call("ping", {"n": 3}, timeout=10)[0] == {"pong": 3,
                                                                       "from": "client09"}
        finally:
            d.stop()
    finally:
        proc.stdin.close()
        if not wait_for(lambda: proc.poll() is not None, timeout=20):
            proc.kill()                      # bounded: a hung server fails the test below
            proc.wait()
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, "".join(lines)
    assert len([m for m in lines if "127.0.0.48:" in m]) == 1
    assert not [m for m in lines if KEY in m or OTHER_KEY in m]


def test_dialer_with_a_wrong_key_logs_its_failure_once_then_counts(ctx):
    cs = ctx.client_settings._replace(node_name="client06", bind_addr="127.0.0.49",
                                      key=OTHER_KEY, own_addresses=[], reconnect_min=0.01,
                                      reconnect_max=0.05)
    d = peers.Dialer(cs, {}, nonce_book=NonceBook()).start()
    try:
        assert wait_for(lambda: d._repeats >= 3)
    finally:
        d.stop()
    mine = [m for m in ctx.cap.lines() if m.startswith("handshake with 127.0.0.2:")]
    assert len(mine) == 1 and "wrong key" in mine[0]
    assert len(ctx.cap.about("127.0.0.49")) == 1      # the master logs the first one...
    ctx.server.refusals.flush()                       # ...and counts the others
    summary = ctx.cap.about("127.0.0.49")[1:]
    assert len(summary) == 1 and "more refusal(s)" in summary[0]
    legit_works(ctx)
