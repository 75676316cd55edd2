"""Length-prefixed JSON over local UNIX sockets: the internal daemon's API and cluster_control's.

A frame is a 4-byte big-endian length and a UTF-8 JSON object. Requests are
{"id", "cmd", "args"}; replies {"id", "ok", "result"} or {"id", "ok": false, "error": {code,
message}}; pushed events carry "event" instead of "id".
A reply may announce raw bytes with "data": N; the next frame then holds those N bytes as they
are (not JSON). This lets wazuh-clusterd relay a large answer, such as a manifest of tens of
thousands of files, to a peer without parsing it into Python objects and encoding it again.
A reply may instead announce "chunks": true: raw frames follow, each of 1..MAX_CHUNK bytes, in
order, and a frame of length 0 ends them (Chunked); or the header ERROR_MARK ends them, followed
by a frame of {"code", "message"}: the source failed midway (a client's master sent a bad
page), and the reader raises that error. The answer is then streamed: the agent
listing (cluster_control -a) leaves the internal daemon a chunk of rows at a time, wazuh-clusterd
relays each as it arrives and cluster_control decodes each meanwhile, so the three processes work
at once and neither daemon holds the whole answer.

A server Connection may also speak a text protocol on the same socket (Wazuh 3.0's commands on
queue/ossec/cluster_db, legacy_db.py): our frames always start with a 0 byte (the high byte of
a length of at most MAX_MESSAGE), so the server hands a predicate on the first byte
(`text_start`); when it matches, the connection is in text mode for good and each "message" is
one burst: the bytes the client sent until nothing more was waiting (3.0's clients send one
command, then wait for its reply). The transport knows nothing about the commands themselves.
"""
from __future__ import absolute_import, division, print_function

import errno
import json
import os
import socket
import struct

from wazuh_cluster import compat, protocol
from wazuh_cluster.errors import ProtocolError, RequestError

HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 20
MAX_REPLY = 256 << 20
# Largest frame of a streamed answer (a reader refuses a longer one: the stream is broken).
MAX_CHUNK = 4 << 20
END_OF_CHUNKS = b"\0\0\0\0"
# Above MAX_CHUNK: an older reader refuses it as a broken stream.
ERROR_MARK = 0xFFFFFFFF


def encode(obj):
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return HEADER.pack(len(data)) + data


# The most a request to the internal daemon may take once decoded (protocol.json_cost,
# counted before it is parsed): a daemon with no budget handles one message at a time, and
# a local client's 1 MiB of "[{},{},...]" held 97 MB on 2.7 (an honest request of 1 MiB:
# under 17 MB there, a list of file entries as objects). A message short enough that no
# text of its length could cost more is not counted (protocol.json_cost_at_most: up to
# ~100 KB on 2.7, ~300 KB on 3.9+; a keepalive batch's requests are ~200 KB).
MAX_REQUEST_COST = 32 << 20


def decode(data, max_cost=None):
    """The JSON object of a message; ProtocolError when it is malformed or, with
    `max_cost`, would take more than that decoded (protocol.json_cost)."""
    if max_cost is not None and protocol.json_cost_at_most(len(data)) > max_cost:
        cost = protocol.json_cost(data)
        if cost > max_cost:
            raise ProtocolError("message of %d bytes would take about %d bytes decoded, "
                                "more than the %d allowed" % (len(data), cost, max_cost))
    try:
        obj = compat.json_loads(data)
    except ValueError as err:
        raise ProtocolError("message is not UTF-8 JSON%s" % protocol.number_too_long(err))
    except RuntimeError:  # nested deeper than the recursion limit (3.x: RecursionError)
        raise ProtocolError("message is nested too deep")
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    return obj


class WithData(object):
    """A command result followed by raw bytes (see the module docstring)."""
    __slots__ = ("result", "data")

    def __init__(self, result, data):
        self.result = result
        self.data = data


class Chunked(object):
    """A command result followed by raw frames streamed in order (see the module docstring):
    `chunks` is an iterable of non-empty bytes of at most MAX_CHUNK each."""
    __slots__ = ("result", "chunks")

    def __init__(self, result, chunks):
        self.result = result
        self.chunks = chunks


def chunk_frame(chunk):
    """One frame of a streamed answer; ProtocolError for a chunk no reader would take."""
    if not chunk or len(chunk) > MAX_CHUNK:
        raise ProtocolError("chunk of %d bytes outside 1..%d" % (len(chunk), MAX_CHUNK))
    return HEADER.pack(len(chunk)) + chunk


def error_frames(code, message):
    """What ends a streamed answer whose source failed (see the module docstring)."""
    return HEADER.pack(ERROR_MARK) + encode({"code": code, "message": message})


def error_reply(request_id, code, message):
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def bind_unix(path, mode=0o660, gid=None):
    """Listen on a UNIX socket path; a stale socket (nobody answers) is replaced.

    A live socket means another daemon is running: that is an error, not something to steal.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except socket.error as err:
        if err.args[0] in (errno.ECONNREFUSED, errno.ENOTSOCK):
            os.unlink(path)
        elif err.args[0] != errno.ENOENT:
            raise
    else:
        raise RequestError("%s is in use by a running daemon" % path, "busy")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    compat.set_cloexec(sock.fileno())
    # The mode is set on the path before anyone can connect: bind under a restrictive umask
    # of our own (this process only creates sockets here; files are written with explicit modes).
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


class Connection(object):
    """One client of a select() server: non-blocking, with input and output buffers."""

    def __init__(self, sock, max_message=MAX_MESSAGE, text_start=None):
        self.sock = sock
        self.sock.setblocking(False)
        compat.set_cloexec(sock.fileno())
        self.max_message = max_message
        self.text_start = text_start
        self.text = False
        self.inbuf = b""
        self.outbuf = b""
        self.closed = False
        self.closing = False       # close once outbuf is sent (set by the server)
        self.subscribed = False
        self._fresh = True

    def fileno(self):
        return self.sock.fileno()

    def _recv(self):
        """Bytes waiting now; b"" when none are; None at the end of the connection."""
        try:
            data = self.sock.recv(65536)
        except socket.error as err:
            if err.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return b""
            return None
        return data or None

    def read_messages(self):
        """Read what is there; return complete messages. Raises ProtocolError on bad framing.

        In text mode (see the module docstring) the one message is the burst of bytes sent.
        """
        data = self._recv()
        if data is None:
            self.closed = True
            return []
        if not data:
            return []
        if self._fresh:
            self._fresh = False
            self.text = self.text_start is not None and self.text_start(data[:1])
        if self.text:
            return self._read_burst(data)
        self.inbuf += data
        messages = []
        while len(self.inbuf) >= HEADER.size:
            (length,) = HEADER.unpack(self.inbuf[:HEADER.size])
            if length > self.max_message or length == 0:
                self.inbuf = b""
                raise ProtocolError("message length %d outside 1..%d" % (length, self.max_message))
            if len(self.inbuf) < HEADER.size + length:
                break
            body = self.inbuf[HEADER.size:HEADER.size + length]
            self.inbuf = self.inbuf[HEADER.size + length:]
            messages.append(body)
        return messages

    def _read_burst(self, data):
        while data and len(data) <= self.max_message:
            more = self._recv()
            if more is None:
                self.closing = True  # the client is done sending: answer, then close
                break
            if not more:
                break
            data += more
        if len(data) > self.max_message:
            raise ProtocolError("text command longer than %d bytes" % self.max_message)
        return [data]

    def send_raw(self, data):
        """Queue bytes as they are (a text-mode reply)."""
        self.outbuf += data
        self.flush()

    def send(self, obj, data=None):
        """Queue one message (and, when `data` is not None, the raw frame it announces)."""
        self.outbuf += encode(obj)
        if data is not None:
            self.outbuf += HEADER.pack(len(data)) + data
        self.flush()

    def send_chunk(self, chunk):
        """Queue one frame of a streamed answer (b"" ends it) and send what the socket takes."""
        self.outbuf += chunk_frame(chunk) if chunk else END_OF_CHUNKS
        self.flush()

    def flush(self):
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf[:1 << 20])
            except socket.error as err:
                if err.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return
                self.closed = True
                return
            self.outbuf = self.outbuf[sent:]

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except socket.error:
            pass


class Client(object):
    """A blocking client: `call(cmd, args)` returns the result or raises RequestError."""

    def __init__(self, path, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self.sock = None
        self.next_id = 1

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        compat.set_cloexec(sock.fileno())
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except socket.error as err:
            sock.close()
            raise RequestError("cannot connect to %s: %s" % (self.path, err.args[-1]),
                               "unreachable")
        self.sock = sock
        return self

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def shutdown(self):
        """End the connection both ways without closing it: another thread waiting on it
        (wait_readable, receive) wakes up and sees its end."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except socket.error:
                pass

    def __enter__(self):
        return self.connect() if self.sock is None else self

    def __exit__(self, *exc):
        self.close()

    def call(self, cmd, args=None):
        """Run `cmd` on the server; its result, or RequestError."""
        return self.call_data(cmd, args)[0]

    def call_data(self, cmd, args=None):
        """(result, raw bytes announced by the reply or None), or RequestError."""
        result, chunks = self.call_chunks(cmd, args)
        if isinstance(chunks, list):
            return result, chunks[0] if chunks else None
        self.close()  # the frames were not read: the connection is out of step
        raise ProtocolError("a streamed answer to '%s', which streams nothing" % cmd)

    def call_chunks(self, cmd, args=None):
        """(result, chunks), or RequestError. chunks: the frames of a streamed answer as an
        iterator, to be read to its end before the next call (reading may raise RequestError
        or ProtocolError); a list holding the raw bytes announced by "data"; or []."""
        if self.sock is None:
            self.connect()
        request_id = self.next_id
        self.next_id += 1
        try:
            self.sock.sendall(encode({"id": request_id, "cmd": cmd, "args": args or {}}))
            while True:
                reply = self.receive()
                if reply.get("id") == request_id:
                    break
            data = []
            if reply.get("chunks") is True and reply.get("ok"):
                data = self._chunks(cmd)
            elif reply.get("data") is not None:
                data = [self._read_raw(reply["data"])]
        except socket.error as err:  # socket.timeout too
            raise self._lost(cmd, err)
        if reply.get("ok"):
            return reply.get("result"), data
        error = reply.get("error") or {}
        raise RequestError(error.get("message", "request failed"), error.get("code", "error"))

    def _chunks(self, cmd):
        try:
            while True:
                (length,) = HEADER.unpack(self._read_exact(HEADER.size))
                if length == 0:
                    return
                if length == ERROR_MARK:
                    error = self.receive()  # the stream ended here: the connection is in step
                    raise RequestError(compat.text_type(error.get("message")),
                                       compat.text_type(error.get("code")))
                if length > MAX_CHUNK:
                    raise ProtocolError("chunk of %d bytes (at most %d)" % (length, MAX_CHUNK))
                yield self._read_exact(length)
        except socket.error as err:
            raise self._lost(cmd, err)
        except ProtocolError:
            self.close()
            raise

    def _lost(self, cmd, err):
        """The RequestError for a timeout or a lost connection, which is closed."""
        self.close()
        if isinstance(err, socket.timeout):
            return RequestError("%s did not answer %r in %.0f s" % (self.path, cmd,
                                                                    self.timeout), "timeout")
        return RequestError("%s: %s" % (self.path, err.args[-1]), "unreachable")

    def wait_readable(self, timeout):
        """True when a message (or the end of the connection) is waiting."""
        import select
        return bool(select.select([self.sock], [], [], timeout)[0])

    def receive(self):
        """One message (a reply or a pushed event); blocks up to the timeout."""
        header = self._read_exact(HEADER.size)
        (length,) = HEADER.unpack(header)
        if length > MAX_REPLY:
            raise ProtocolError("reply of %d bytes is too large" % length)
        return decode(self._read_exact(length))

    def _read_raw(self, announced):
        """The raw frame that follows a reply announcing `announced` bytes."""
        (length,) = HEADER.unpack(self._read_exact(HEADER.size))
        if length != announced or length > MAX_REPLY:
            raise ProtocolError("raw frame of %d bytes, %r announced" % (length, announced))
        return self._read_exact(length)

    def _read_exact(self, size):
        chunks = []
        while size:
            data = self.sock.recv(min(size, 1 << 20))
            if not data:
                raise socket.error(errno.ECONNRESET, "connection closed")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)
