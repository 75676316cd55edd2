"""Hostile insiders for memory tests: peers holding the cluster key that send as fast as they can.

A Flooder connects from a listed loopback address, completes the handshake and the hello as a
client, then, from one thread, pipelines requests without waiting for any answer (a second
thread reads and discards what the master sends, and answers each of its requests with a
zip bomb). The requests rotate through:

* zip bombs: sync_files requests of a few kilobytes that inflate to BOMB_BYTES of zeros,
  one claiming a file of that size, one claiming a file within the client message limit;
* large compressed requests: BIG_BYTES and SMALL_BIG_BYTES of random data (incompressible,
  beyond and within the limit), in 1 MiB frames, and an uncompressed one;
* a header bomb: a compressed request whose JSON header is HEADER_BOMB_BYTES of "[]," (each
  three bytes become a list object when decoded);
* a burst of small requests.

Used by tests/integration/test_memory_flood.py and tests/bench/bench_flood.py.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import os
import socket
import struct
import threading
import zlib

from wazuh_cluster import channel, protocol
from wazuh_cluster.errors import ProtocolError

BOMB_BYTES = 60 << 20
BIG_BYTES = 12 << 20
SMALL_BIG_BYTES = 6 << 20
HEADER_BOMB_BYTES = 6 << 20
FRAME_BYTES = 4 << 20


def _bomb_body(size=BOMB_BYTES):
    header = {"cmd": "sync_files", "args": {
        "files": [{"name": "queue/agent-info/bomb-any", "size": size, "mtime_ns": 1,
                   "sha256": hashlib.sha256(b"").hexdigest()}],
        "meta": [], "delete": [], "delete_dirs": []}}
    head = protocol.encode_body(header)
    zobj = zlib.compressobj(9)
    parts = [zobj.compress(head)]
    zeros = b"\0" * (1 << 20)
    for _ in range(BOMB_BYTES >> 20):
        parts.append(zobj.compress(zeros))
    parts.append(zobj.flush())
    return b"".join(parts)


def _big_body(size=BIG_BYTES, compressed=True):
    data = os.urandom(size)
    header = {"cmd": "sync_files", "args": {
        "files": [{"name": "queue/agent-info/big-any", "size": len(data), "mtime_ns": 1,
                   "sha256": hashlib.sha256(data).hexdigest()}],
        "meta": [], "delete": [], "delete_dirs": []}}
    body = protocol.encode_body(header, data)
    return protocol.compress(body) if compressed else body


def _header_bomb_body():
    head = b'{"cmd":"cluster_nodes","args":{"x":[' + b"[]," * (HEADER_BOMB_BYTES // 3) + b'[]]}}'
    return protocol.compress(struct.pack(">I", len(head)) + head)


def _small_body():
    return protocol.encode_body({"cmd": "cluster_nodes", "args": {}})


def _plan():
    """(body, flags) of each request of one round of the flood."""
    zipped = protocol.FLAG_COMPRESSED
    # what gets a session closed comes last
    return ([(_bomb_body(), zipped)] * 2 + [(_small_body(), 0)] * 16 +
            [(_bomb_body(4 << 20), zipped)] * 2 +
            [(_big_body(SMALL_BIG_BYTES), zipped), (_big_body(SMALL_BIG_BYTES, False), 0)] * 2 +
            [(_header_bomb_body(), zipped), (_big_body(), zipped)])


_BODIES = {}
_BODIES_LOCK = threading.Lock()


def bodies():
    """The flood's (body, flags) plan, built once per process (a bomb takes a second)."""
    with _BODIES_LOCK:
        if not _BODIES:
            _BODIES["all"] = _plan()
        return _BODIES["all"]


class Flooder(object):
    """One hostile session; start() runs it in threads until stop()."""

    def __init__(self, name, address, master_address, port, key, cluster="wazuh"):
        self.name = name
        self.address = address
        self.target = (master_address, port)
        self.key = key
        self.cluster = cluster
        self.stopped = threading.Event()
        self.sent = 0          # requests sent
        self.answers = 0       # frames received
        self.sessions = 0      # sessions opened (the master may close a flooder: it comes back)
        self.errors = []
        self.thread = threading.Thread(target=self.run, name="flood-%s" % name)
        self.thread.daemon = True
        self.rid = 0

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()
        self.thread.join(20)

    def run(self):
        while not self.stopped.is_set():
            try:
                ch = self.connect()
            except (socket.error, OSError, ProtocolError) as exc:
                self.errors.append("connect: %s" % exc)
                self.stopped.wait(0.2)
                continue
            self.sessions += 1
            reader = threading.Thread(target=self.read, args=(ch,))
            reader.daemon = True
            reader.start()
            try:
                self.flood(ch)
            except (socket.error, OSError, ProtocolError) as exc:
                self.errors.append("send: %s" % exc)
            ch.close()
            reader.join(10)

    def connect(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.address, 0))
        sock.settimeout(10)
        sock.connect(self.target)
        hs = channel.client_handshake(sock, self.key, self.name, self.cluster, "client", 10.0,
                                      FRAME_BYTES, channel.NonceBook())
        ch = channel.SecureChannel(sock, hs.codec, hs.peer_name, hs.peer_role, 30.0)
        ch.send_frame(protocol.HELLO_INFO, 0, 0, protocol.encode_body(
            {"name": self.name, "role": "client", "version": "3.0.0"}))
        frame = ch.recv_frame(10.0)
        if frame is None or frame[0] != protocol.HELLO_INFO:
            ch.close()
            raise ProtocolError("no hello from the master")
        return ch

    def send_message(self, ch, msg_type, rid, body, flags):
        chunk = protocol.CHUNK_SIZE
        if len(body) <= chunk:
            ch.send_frame(msg_type, flags, rid, body)
            return
        ch.send_frame(msg_type, flags | protocol.FLAG_MORE, rid, body[:chunk])
        cont = protocol.FLAG_RESPONSE_CHUNK if msg_type == protocol.RESPONSE else 0
        for pos in range(chunk, len(body), chunk):
            more = protocol.FLAG_MORE if pos + chunk < len(body) else 0
            ch.send_frame(protocol.FILE_CHUNK, cont | more, rid, body[pos:pos + chunk])

    def next_rid(self):
        self.rid = self.rid % 0xFFFFFFF0 + 1
        return self.rid

    def flood(self, ch):
        plan = bodies()
        while not self.stopped.is_set() and not ch.closed:
            for body, flags in plan:
                if self.stopped.is_set():
                    return
                self.send_message(ch, protocol.REQUEST, self.next_rid(), body, flags)
                self.sent += 1

    def read(self, ch):
        bomb = bodies()[0][0]
        while not self.stopped.is_set() and not ch.closed:
            try:
                frame = ch.recv_frame(0.5)
            except ProtocolError:
                return
            if frame is None:
                continue
            self.answers += 1
            if frame[0] == protocol.REQUEST:
                # answer the master's calls with a bomb too (a response it must not hoard)
                try:
                    self.send_message(ch, protocol.RESPONSE, frame[2], bomb,
                                      protocol.FLAG_COMPRESSED)
                except ProtocolError:
                    return


def memory_of(pid):
    """{"VmRSS": kB, "VmHWM": kB} of a process from /proc (empty when it is gone)."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
    except (IOError, OSError, ValueError):
        pass
    return out


class RssSampler(object):
    """Samples a process's VmRSS every `step` seconds in a thread; keeps the peak (kB)."""

    def __init__(self, pid, step=0.05):
        self.pid = pid
        self.step = step
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="rss-sampler")
        self.thread.daemon = True

    def start(self):
        self.thread.start()
        return self

    def run(self):
        while not self.stopped.wait(self.step):
            self.peak = max(self.peak, memory_of(self.pid).get("VmRSS", 0))

    def stop(self):
        self.stopped.set()
        self.thread.join(5)
        return self.peak
