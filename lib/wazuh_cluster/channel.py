"""The encrypted channel between cluster nodes (SPEC s.5): handshake, key schedule, AEAD frames.

Three modules import `cryptography` (3.3.x on Python 2.7, any recent one on 3.x): this one
for our channel, legacy_node.py for the Fernet tokens of Wazuh 3.0's `node` request, which
exists only to answer 3.0's framework, and compat.sha256 for large inputs where hashlib has no
OpenSSL (the 2.7 we run on).

Handshake (messages carry a 2-byte big-endian length prefix and are at most 512 bytes):

    lp(x)   = u16 BE length | x
    CH      = "WZC1" | 0x01 | role | client_nonce[32] | lp(node_name) | lp(cluster_name)
    SH_body = "WZC1" | 0x02 | role | server_nonce[32] | lp(node_name) | lp(cluster_name)
    TH      = SHA-256(CH || SH_body)
    OKM     = HKDF-SHA256(key, salt="wzc1 salt"||lp(cluster), info="wzc1 keys"||TH, 128)
              -> k_c2s | k_s2c | fk_c | fk_s
    SH      = SH_body | HMAC-SHA256(fk_s, "server finished" || TH)
    CF      = 0x03 | HMAC-SHA256(fk_c, "client finished" || TH)

Frames after it: u32 BE length L | AES-256-GCM(k_dir, nonce = 0^4 | u64 counter, aad = the 4 length
bytes) over type(1) | flags(1) | request_id(u32) | body. One implicit counter per direction.

Re-keying (our choice among "re-handshake or close+reconnect", documented in README): an in-place
key update in the style of TLS 1.3 KeyUpdate. When a direction has sealed REKEY_AFTER (2^20) frames
the sender sets FLAG_KEY_UPDATE on the next frame (authenticated, inside the ciphertext); after that
frame both sides replace that direction's key by HMAC-SHA256(old_key, "wzc1 key update") and restart
its counter at 0. It needs no round trip, keeps the session and its pending requests alive, and no
(key, nonce) pair is ever used twice. A codec refuses to go past HARD_LIMIT frames under one key.
"""
from __future__ import absolute_import, division, print_function

import collections
import errno
import hashlib
import hmac
import math
import os
import re
import select
import socket
import struct
import threading
import warnings

with warnings.catch_warnings():
    # cryptography 3.3 warns on import under Python 2.7, which we support on purpose: the
    # warning would be the first line an operator sees from every command.
    warnings.simplefilter("ignore")
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.exceptions import InvalidTag

from wazuh_cluster import compat
from wazuh_cluster.errors import HandshakeError, ProtocolError

MAGIC = b"WZC1"
MSG_CH = 1
MSG_SH = 2
MSG_CF = 3
NONCE_BYTES = 32
MAC_BYTES = 32
TAG_BYTES = 16
HANDSHAKE_MAX = 512
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

ROLE_CODES = {"master": 1, "client": 2}
ROLE_NAMES = dict((v, k) for k, v in ROLE_CODES.items())

FRAME_HEADER = struct.Struct(">BBI")     # type, flags, request_id (inside the ciphertext)
LENGTH = struct.Struct(">I")
MIN_FRAME = FRAME_HEADER.size + TAG_BYTES
FLAG_KEY_UPDATE = 0x80                   # reserved for the channel; protocol flags use the low bits

REKEY_AFTER = 1 << 20                    # frames per direction and key before a key update
HARD_LIMIT = 1 << 24                     # never seal or open more than this under one key

_NAME_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")


def valid_node_name(name):
    """True when `name` (text) matches [A-Za-z0-9._-]{1,64}."""
    return isinstance(name, compat.string_types) and bool(_NAME_RE.match(name))


def lp(data):
    """2-byte big-endian length, then `data` (bytes)."""
    if len(data) > 0xFFFF:
        raise ValueError("field too long")
    return struct.pack(">H", len(data)) + data


class _Reader(object):
    """Cursor over a handshake message; any overrun is a HandshakeError."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise HandshakeError("malformed handshake message (truncated)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def take_lp(self):
        (n,) = struct.unpack(">H", self.take(2))
        return self.take(n)


# A parsed CH or SH_body; `raw` is its exact bytes (they enter the transcript hash).
Hello = collections.namedtuple("Hello", "msg_type role nonce node_name cluster_name raw")


def build_hello(msg_type, role, nonce, node_name, cluster_name):
    """CH (msg_type 1) or SH_body (msg_type 2) as bytes."""
    if role not in ROLE_CODES:
        raise ValueError("role must be 'master' or 'client'")
    return (MAGIC + struct.pack(">BB", msg_type, ROLE_CODES[role]) + nonce +
            lp(compat.to_bytes(node_name)) + lp(compat.to_bytes(cluster_name)))


def parse_hello(data, expected_type):
    """Parse CH/SH_body from the start of `data`; returns (Hello, rest of data)."""
    r = _Reader(data)
    if r.take(4) != MAGIC:
        raise HandshakeError("not a cluster hello (bad magic)")
    msg_type, role_code = struct.unpack(">BB", r.take(2))
    if msg_type != expected_type:
        raise HandshakeError("unexpected handshake message type %d" % msg_type)
    if role_code not in ROLE_NAMES:
        raise HandshakeError("unknown role code %d" % role_code)
    nonce = r.take(NONCE_BYTES)
    raw_name = r.take_lp()
    raw_cluster = r.take_lp()
    raw = data[:r.pos]
    try:
        name = raw_name.decode("ascii")
        cluster = raw_cluster.decode("utf-8")
    except UnicodeDecodeError:
        raise HandshakeError("invalid node name syntax")
    if not valid_node_name(name):
        raise HandshakeError("invalid node name syntax")
    return Hello(msg_type, ROLE_NAMES[role_code], nonce, name, cluster, raw), data[r.pos:]


class Keys(object):
    """The four 32-byte keys of a session. repr never shows them."""
    __slots__ = ("k_c2s", "k_s2c", "fk_c", "fk_s", "th")

    def __init__(self, k_c2s, k_s2c, fk_c, fk_s, th):
        self.k_c2s, self.k_s2c, self.fk_c, self.fk_s, self.th = k_c2s, k_s2c, fk_c, fk_s, th

    def __repr__(self):
        return "<Keys (hidden)>"

    def server_finished(self):
        return hmac.new(self.fk_s, b"server finished" + self.th, hashlib.sha256).digest()

    def client_finished(self):
        return hmac.new(self.fk_c, b"client finished" + self.th, hashlib.sha256).digest()


def derive_keys(key, cluster_name, ch, sh_body):
    """Key schedule of SPEC s.5 from the shared key (text or bytes) and both hellos."""
    th = hashlib.sha256(ch + sh_body).digest()
    hkdf = HKDF(algorithm=hashes.SHA256(), length=128,
                salt=b"wzc1 salt" + lp(compat.to_bytes(cluster_name)),
                info=b"wzc1 keys" + th, backend=default_backend())
    okm = hkdf.derive(compat.to_bytes(key))
    return Keys(okm[0:32], okm[32:64], okm[64:96], okm[96:128], th)


def next_key(key):
    """The key that follows `key` after a key update."""
    return hmac.new(key, b"wzc1 key update", hashlib.sha256).digest()


class _Direction(object):
    """One direction of a session: AES-GCM key, its counter, and how many updates happened."""
    __slots__ = ("aead", "key", "counter", "epoch", "_block")

    def __init__(self, key):
        self.key = key
        self.aead = AESGCM(key)
        self.counter = 0
        self.epoch = 0
        self._block = None

    def keystream(self):
        """The GCM keystream of the next frame's first plaintext bytes (its header).

        GCM encrypts block i of the plaintext with AES(key, nonce | u32 BE (i + 2)).
        """
        if self._block is None:
            self._block = Cipher(algorithms.AES(self.key), modes.ECB(),
                                 backend=default_backend()).encryptor()
        return self._block.update(self.nonce() + b"\x00\x00\x00\x02")[:FRAME_HEADER.size]

    def nonce(self):
        if self.counter >= HARD_LIMIT:
            raise ProtocolError("frame counter exhausted for this key")
        return b"\x00\x00\x00\x00" + struct.pack(">Q", self.counter)

    def advance(self, key_update):
        self.counter += 1
        if key_update:
            self.key = next_key(self.key)
            self.aead = AESGCM(self.key)
            self._block = None
            self.counter = 0
            self.epoch += 1


class FrameCodec(object):
    """Socket-free sealing and opening of frames with implicit per-direction counters.

    `send_key`/`recv_key` are the 32-byte AES keys for each direction; `max_frame_bytes` bounds L
    (the ciphertext length announced by the 4-byte prefix). Not thread-safe by itself: one sender
    and one receiver, each serialised by its owner (SecureChannel does it).
    """

    def __init__(self, send_key, recv_key, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
        self._send = _Direction(send_key)
        self._recv = _Direction(recv_key)
        self.max_frame_bytes = max_frame_bytes
        self.broken = False

    def __repr__(self):
        return "<FrameCodec sent=%d received=%d>" % (self._send.counter, self._recv.counter)

    @classmethod
    def for_role(cls, keys, is_server, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
        """The codec of the server (is_server=True) or the client side of a handshake."""
        if is_server:
            return cls(keys.k_s2c, keys.k_c2s, max_frame_bytes)
        return cls(keys.k_c2s, keys.k_s2c, max_frame_bytes)

    @property
    def send_counter(self):
        return self._send.counter

    @property
    def recv_counter(self):
        return self._recv.counter

    @property
    def send_epoch(self):
        return self._send.epoch

    @property
    def recv_epoch(self):
        return self._recv.epoch

    @property
    def rekey_needed(self):
        """True when the next sealed frame will carry a key update (handled automatically)."""
        return self._send.counter >= REKEY_AFTER - 1

    def max_body(self):
        """Largest body that fits in one frame."""
        return self.max_frame_bytes - MIN_FRAME

    def seal(self, msg_type, flags, request_id, body):
        """Return the wire bytes (4-byte length + ciphertext) of one frame."""
        prefix, ciphertext = self.seal_parts(msg_type, flags, request_id, body)
        return prefix + ciphertext

    def seal_parts(self, msg_type, flags, request_id, body):
        """(4-byte length prefix, ciphertext) of one frame, for a scatter-gather send."""
        if self.broken:
            raise ProtocolError("channel is closed after an error")
        flags &= ~FLAG_KEY_UPDATE
        update = self.rekey_needed
        if update:
            flags |= FLAG_KEY_UPDATE
        plain = FRAME_HEADER.pack(msg_type, flags, request_id) + compat.to_bytes(body)
        length = len(plain) + TAG_BYTES
        if length > self.max_frame_bytes:
            raise ProtocolError("frame of %d bytes exceeds the maximum %d" %
                                (length, self.max_frame_bytes))
        prefix = LENGTH.pack(length)
        d = self._send
        ciphertext = d.aead.encrypt(d.nonce(), plain, prefix)
        d.advance(update)
        return prefix, ciphertext

    def check_length(self, prefix):
        """Validate a 4-byte length prefix before anything else is read; returns L."""
        (length,) = LENGTH.unpack(bytes(prefix))
        if length < MIN_FRAME or length > self.max_frame_bytes:
            self.broken = True
            raise ProtocolError("bad frame length %d (allowed %d..%d)" %
                                (length, MIN_FRAME, self.max_frame_bytes))
        return length

    def peek(self, head):
        """(type, flags, request_id) of the next frame from its first ciphertext bytes.

        NOT authenticated: only to decide how much room to make for the frame before it is
        read (session.py); open() authenticates the same bytes afterwards, so a frame that
        lied here fails there.
        """
        if self.broken:
            raise ProtocolError("channel is closed after an error")
        plain = bytearray(a ^ b for a, b in zip(bytearray(head[:FRAME_HEADER.size]),
                                                bytearray(self._recv.keystream())))
        msg_type, flags, request_id = FRAME_HEADER.unpack(bytes(plain))
        return msg_type, flags & ~FLAG_KEY_UPDATE, request_id

    def open(self, prefix, ciphertext):
        """Authenticate and decrypt one frame; returns (type, flags, request_id, body bytes).

        Any failure marks the codec broken: the session must be closed.
        """
        if self.broken:
            raise ProtocolError("channel is closed after an error")
        length = self.check_length(prefix)
        if len(ciphertext) != length:
            self.broken = True
            raise ProtocolError("frame truncated or extended")
        d = self._recv
        try:
            plain = d.aead.decrypt(d.nonce(), bytes(ciphertext), bytes(prefix))
        except InvalidTag:
            self.broken = True
            raise ProtocolError("frame failed authentication (tampered, replayed, reordered "
                                "or reflected)")
        msg_type, flags, request_id = FRAME_HEADER.unpack(plain[:FRAME_HEADER.size])
        d.advance(bool(flags & FLAG_KEY_UPDATE))
        return msg_type, flags & ~FLAG_KEY_UPDATE, request_id, plain[FRAME_HEADER.size:]

    def open_frame(self, wire):
        """`open` for a whole frame given as one byte string (tests, benchmarks)."""
        if len(wire) < 4:
            self.broken = True
            raise ProtocolError("frame truncated")
        return self.open(wire[:4], wire[4:])


class NonceBook(object):
    """Remembers the nonces this process generated recently, to detect a reflected hello."""

    def __init__(self, size=4096):
        self._lock = threading.Lock()
        self._order = collections.deque()
        self._set = set()
        self._size = size

    def new_nonce(self):
        nonce = os.urandom(NONCE_BYTES)
        with self._lock:
            self._order.append(nonce)
            self._set.add(nonce)
            while len(self._order) > self._size:
                self._set.discard(self._order.popleft())
        return nonce

    def __contains__(self, nonce):
        with self._lock:
            return nonce in self._set


NONCE_BOOK = NonceBook()


class _Deadline(object):
    """Remaining time of a handshake on the monotonic clock."""

    def __init__(self, seconds):
        self.end = compat.monotonic() + seconds

    def remaining(self):
        left = self.end - compat.monotonic()
        if left <= 0:
            raise HandshakeError("handshake deadline expired")
        return left


def _recv_exact_deadline(sock, n, deadline):
    buf = b""
    while len(buf) < n:
        sock.settimeout(deadline.remaining())
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise HandshakeError("handshake deadline expired")
        except socket.error as exc:
            if exc.args and exc.args[0] == errno.EINTR:
                continue
            raise HandshakeError("connection error during handshake: %s" % _errname(exc))
        if not chunk:
            raise HandshakeError("peer closed the connection during the handshake "
                                 "(wrong key or cluster name, or not admitted)")
        buf += chunk
    return buf


def _errname(exc):
    code = exc.args[0] if exc.args else None
    return errno.errorcode.get(code, str(code)) if isinstance(code, int) else type(exc).__name__


def _send_msg(sock, msg, deadline):
    if len(msg) > HANDSHAKE_MAX:
        raise HandshakeError("handshake message too long")
    sock.settimeout(deadline.remaining())
    try:
        sock.sendall(struct.pack(">H", len(msg)) + msg)
    except socket.timeout:
        raise HandshakeError("handshake deadline expired")
    except socket.error as exc:
        raise HandshakeError("connection error during handshake: %s" % _errname(exc))


def _recv_msg(sock, deadline):
    (n,) = struct.unpack(">H", _recv_exact_deadline(sock, 2, deadline))
    if n == 0 or n > HANDSHAKE_MAX:
        raise HandshakeError("bad handshake message length %d (not a cluster peer?)" % n)
    return _recv_exact_deadline(sock, n, deadline)


class HandshakeResult(object):
    """What a completed handshake yields: the authenticated peer and the frame codec."""

    def __init__(self, peer_name, peer_role, peer_cluster, codec):
        self.peer_name = peer_name
        self.peer_role = peer_role
        self.peer_cluster = peer_cluster
        self.codec = codec

    def __repr__(self):
        return "<HandshakeResult peer=%s role=%s>" % (self.peer_name, self.peer_role)


def client_handshake(sock, key, node_name, cluster_name, role,
                     timeout=DEFAULT_HANDSHAKE_TIMEOUT, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                     nonce_book=None):
    """Run the dialing side of the handshake on a connected socket.

    Returns a HandshakeResult once the server proved it holds the key; raises HandshakeError
    (the caller closes the socket and logs). The server's role is in result.peer_role.
    """
    book = nonce_book if nonce_book is not None else NONCE_BOOK
    deadline = _Deadline(timeout)
    ch = build_hello(MSG_CH, role, book.new_nonce(), node_name, cluster_name)
    _send_msg(sock, ch, deadline)
    sh_msg = _recv_msg(sock, deadline)
    hello, rest = parse_hello(sh_msg, MSG_SH)
    if len(rest) != MAC_BYTES:
        raise HandshakeError("malformed server hello")
    if hello.cluster_name != compat.to_text(cluster_name):
        raise HandshakeError("peer belongs to another cluster")
    if hello.nonce in book:
        raise HandshakeError("server hello reflects one of our own nonces")
    keys = derive_keys(key, cluster_name, ch, hello.raw)
    if not compat.hmac_compare(keys.server_finished(), rest):
        raise HandshakeError("server failed to prove the key (wrong key or cluster name)")
    _send_msg(sock, struct.pack(">B", MSG_CF) + keys.client_finished(), deadline)
    codec = FrameCodec.for_role(keys, False, max_frame_bytes)
    return HandshakeResult(hello.node_name, hello.role, hello.cluster_name, codec)


def server_handshake(sock, key, node_name, cluster_name, role,
                     timeout=DEFAULT_HANDSHAKE_TIMEOUT, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                     nonce_book=None):
    """Run the listening side of the handshake on an accepted socket.

    Checks role code, cluster name, the peer's node-name syntax, that the name is not ours and that
    the client nonce is not one we generated. The peer is authenticated only when CF verifies.
    Raises HandshakeError with a reason for the log; the peer is told nothing (just close).
    """
    book = nonce_book if nonce_book is not None else NONCE_BOOK
    deadline = _Deadline(timeout)
    ch = _recv_msg(sock, deadline)
    hello, rest = parse_hello(ch, MSG_CH)
    if rest:
        raise HandshakeError("malformed client hello (trailing bytes)")
    if hello.cluster_name != compat.to_text(cluster_name):
        raise HandshakeError("peer belongs to another cluster (%r)" % hello.cluster_name[:64])
    if hello.node_name == compat.to_text(node_name):
        raise HandshakeError("peer uses our own node name")
    if hello.nonce in book:
        raise HandshakeError("client hello reflects one of our own nonces")
    sh_body = build_hello(MSG_SH, role, book.new_nonce(), node_name, cluster_name)
    keys = derive_keys(key, cluster_name, ch, sh_body)
    _send_msg(sock, sh_body + keys.server_finished(), deadline)
    cf = _recv_msg(sock, deadline)
    if len(cf) != 1 + MAC_BYTES or cf[:1] != struct.pack(">B", MSG_CF):
        raise HandshakeError("malformed client finished")
    if not compat.hmac_compare(keys.client_finished(), cf[1:]):
        raise HandshakeError("client failed to prove the key (wrong key or replayed handshake)")
    codec = FrameCodec.for_role(keys, True, max_frame_bytes)
    return HandshakeResult(hello.node_name, hello.role, hello.cluster_name, codec)


class ChannelClosed(ProtocolError):
    """The peer closed the connection cleanly between frames."""
    code = "closed"


def wait_readable(sock, timeout):
    """True when `sock` is readable within `timeout` seconds (None = forever); retries EINTR.

    Raises ChannelClosed when the socket was closed meanwhile (by another thread).
    """
    try:
        fd = sock.fileno()
    except (socket.error, OSError, ValueError):   # 2.7: a closed socket raises EBADF
        fd = -1
    if fd < 0:
        raise ChannelClosed("channel is closed")
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        # rounded up: 0.4 ms left made poll(0), and a session's reader spun ~30 times
        # before each keepalive it sends
        ms = None if timeout is None else max(0, int(math.ceil(timeout * 1000)))
        while True:
            try:
                return bool(poller.poll(ms))
            except (OSError, select.error) as exc:
                if exc.args and exc.args[0] == errno.EINTR:
                    continue
                raise
    while True:  # pragma: no cover - platforms without poll
        try:
            return bool(select.select([sock], [], [], timeout)[0])
        except (OSError, select.error) as exc:
            if exc.args and exc.args[0] == errno.EINTR:
                continue
            raise


_SMALL_BUFFER = 1 << 16


def _send_parts(sock, parts):
    """Send the byte strings in `parts` in order, without joining them when sendmsg exists."""
    if not hasattr(sock, "sendmsg"):          # 2.7: one copy is cheaper than two packets
        sock.sendall(b"".join(parts))
        return
    views = [memoryview(p) for p in parts]
    while views:
        try:
            sent = sock.sendmsg(views)
        except socket.error as exc:
            if exc.args and exc.args[0] == errno.EINTR:
                continue
            raise
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class SecureChannel(object):
    """Blocking frames over a connected socket after a handshake.

    `io_timeout` bounds a send that makes no progress and the time to receive the rest of a frame
    once its first byte arrived (a peer stalling mid-frame is dropped). send_frame is thread-safe;
    recv_frame must be called from one thread only.
    """

    def __init__(self, sock, codec, peer_name, peer_role, io_timeout=30.0):
        self.sock = sock
        self.codec = codec
        self.peer_name = peer_name
        self.peer_role = peer_role
        self.io_timeout = io_timeout
        self._send_lock = threading.Lock()
        self._closed = False
        self._send_failed = False
        self._buf = bytearray(_SMALL_BUFFER)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, socket.error):
            pass
        sock.settimeout(io_timeout)

    def __repr__(self):
        return "<SecureChannel peer=%s role=%s>" % (self.peer_name, self.peer_role)

    @property
    def closed(self):
        return self._closed

    def send_frame(self, msg_type, flags, request_id, body=b"", block=True):
        """Seal and send one frame; raises ProtocolError (channel closed) on any failure.

        With block=False nothing is sent (and False returned) when another thread is sending.
        """
        if not self._send_lock.acquire(block):
            return False
        try:
            if self._closed or self._send_failed:
                raise ChannelClosed("channel is closed")
            parts = self.codec.seal_parts(msg_type, flags, request_id, body)
            try:
                _send_parts(self.sock, parts)
            except socket.timeout:
                self.close()
                raise ProtocolError("send stalled for %ss" % self.io_timeout)
            except (socket.error, OSError) as exc:
                # The connection is gone, but what the peer sent before it went (its CLOSE
                # and the reason) may still wait to be read: stop sending only, and let the
                # reader meet the end. Closed here, the reader found a closed socket and
                # the session ended "connection lost: EBADF", the peer's reason lost.
                self._send_failed = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except (OSError, socket.error):
                    pass
                raise ChannelClosed("connection lost while sending: %s" % _errname(exc))
        finally:
            self._send_lock.release()
        return True

    def _recv_into(self, view, deadline_end):
        got = 0
        n = len(view)
        while got < n:
            left = deadline_end - compat.monotonic()
            if left <= 0 or not wait_readable(self.sock, left):
                raise ProtocolError("peer stalled in the middle of a frame")
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                continue
            except (socket.error, OSError) as exc:
                if exc.args and exc.args[0] in (errno.EINTR, errno.EAGAIN):
                    continue
                raise ChannelClosed("connection lost: %s" % _errname(exc))
            if not k:
                raise ProtocolError("connection closed in the middle of a frame")
            got += k

    def recv_frame(self, timeout=None, admit=None):
        """Next frame as (type, flags, request_id, body), or None when `timeout` passes first.

        admit(length, (type, flags, request_id)): called once the frame's length and its
        (unauthenticated, see FrameCodec.peek) header are known and before the rest of it is
        read; it may block (nothing more is read from the socket meanwhile: backpressure) and
        raise to refuse the frame. Raises ChannelClosed when the peer closed between frames,
        ProtocolError on anything else (the channel is then closed).
        """
        if self._closed:
            raise ChannelClosed("channel is closed")
        try:
            if not wait_readable(self.sock, timeout):
                # idle: give back a big receive buffer (the master holds one session per
                # client); reusing it while data flows avoids a fresh mmap per 1 MiB frame
                if len(self._buf) > _SMALL_BUFFER:
                    self._buf = bytearray(_SMALL_BUFFER)
                return None
            prefix = bytearray(4)
            try:
                k = self.sock.recv_into(prefix, 4)
            except socket.timeout:
                return None
            except (socket.error, OSError) as exc:
                if exc.args and exc.args[0] in (errno.EINTR, errno.EAGAIN):
                    return None
                raise ChannelClosed("connection lost: %s" % _errname(exc))
            if k == 0:
                raise ChannelClosed("peer closed the connection")
            deadline_end = compat.monotonic() + self.io_timeout
            if k < 4:
                self._recv_into(memoryview(prefix)[k:], deadline_end)
            length = self.codec.check_length(prefix)
            if len(self._buf) < length:
                self._buf = bytearray(length)
            view = memoryview(self._buf)[:length]
            if admit is None:
                self._recv_into(view, deadline_end)
            else:
                head = FRAME_HEADER.size
                self._recv_into(view[:head], deadline_end)
                try:
                    admit(length, self.codec.peek(view[:head].tobytes()))
                except ChannelClosed:
                    raise
                except ProtocolError:
                    # The refusal rests on a header not authenticated yet: a reordered or
                    # tampered frame decrypts to any type, and must be reported as failing
                    # authentication, not as what its garbled header seemed to say. Its
                    # buffer is already there (at most max_frame_bytes).
                    self._recv_into(view[head:], compat.monotonic() + self.io_timeout)
                    self.codec.open(bytes(prefix), view.tobytes())
                    raise
                self._recv_into(view[head:], compat.monotonic() + self.io_timeout)
            frame = self.codec.open(bytes(prefix), view.tobytes())
            if admit is not None and len(self._buf) > _SMALL_BUFFER:
                # the frame's room in the budget ends with it: keep no big buffer beyond it
                self._buf = bytearray(_SMALL_BUFFER)
            return frame
        except ProtocolError:
            self.close()
            raise

    def close(self):
        """Close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, socket.error):
            pass
        try:
            self.sock.close()
        except (OSError, socket.error):
            pass
