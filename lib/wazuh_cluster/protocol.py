"""Message types and frame bodies of a cluster session (STYLE s.6). A leaf: no socket, no crypto.

A frame's plaintext is type(1) | flags(1) | request_id(u32) | body (see channel.py). A body is

    u32 BE header length | header (UTF-8 JSON object) | raw data

where the raw data is zlib-compressed when FLAG_COMPRESSED is set and inflated with a bound.
Requests carry {"cmd": NAME, "args": {...}}; responses carry the envelope
{"ok": bool, "result": ..., "error": {"code", "message"}}.
"""
from __future__ import absolute_import, division, print_function

import json
import struct
import zlib

from wazuh_cluster import compat, compresscache
from wazuh_cluster.errors import ProtocolError, RequestError

# One table of message types: name -> code. Codes never change once released.
MESSAGE_TYPES = {
    "HELLO_INFO": 1,   # first frame each way after the handshake: name, role, version; or refusal
    "KEEPALIVE": 2,    # liveness, no body
    "REQUEST": 3,      # header {"cmd", "args"}, raw data
    "RESPONSE": 4,     # header = envelope, raw data
    "ERROR": 5,        # session-level error {"code", "message"}; the sender closes afterwards
    "FILE_CHUNK": 6,   # continuation of the raw data of the REQUEST/RESPONSE with the same id
    "CLOSE": 7,        # orderly goodbye {"reason"}
}
TYPE_NAMES = dict((v, k) for k, v in MESSAGE_TYPES.items())
HELLO_INFO = MESSAGE_TYPES["HELLO_INFO"]
KEEPALIVE = MESSAGE_TYPES["KEEPALIVE"]
REQUEST = MESSAGE_TYPES["REQUEST"]
RESPONSE = MESSAGE_TYPES["RESPONSE"]
ERROR = MESSAGE_TYPES["ERROR"]
FILE_CHUNK = MESSAGE_TYPES["FILE_CHUNK"]
CLOSE = MESSAGE_TYPES["CLOSE"]

COMPRESS_FROM = 64 << 10  # bytes of data from which a message is compressed
FLAG_COMPRESSED = 0x01   # the raw data (all chunks together) is a zlib stream
FLAG_MORE = 0x02         # more FILE_CHUNK frames follow for this request id
FLAG_RESPONSE_CHUNK = 0x04   # on FILE_CHUNK: continues a RESPONSE (else a REQUEST)
# 0x80 is reserved by channel.py (key update)

CHUNK_SIZE = 1024 * 1024          # file data travels in chunks of at most 1 MiB
# A JSON header larger than this is refused. Headers carry manifests and file lists (a
# 10 000-file round is ~2 MB of JSON); the whole message is bounded by the session anyway.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_U32 = struct.Struct(">I")


def type_name(code):
    """Readable name of a message type code (for logs)."""
    return TYPE_NAMES.get(code, "type%d" % code)


def encode_body(header, data=b""):
    """Body bytes for a JSON-able `header` dict and raw `data` bytes."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True)
    head = compat.to_bytes(head)
    return _U32.pack(len(head)) + head + compat.to_bytes(data)


def decode_body(body):
    """(header dict, raw bytes) from a body; ProtocolError when malformed."""
    if len(body) < 4:
        raise ProtocolError("body too short")
    (n,) = _U32.unpack(body[:4])
    if n > MAX_HEADER_BYTES or 4 + n > len(body):
        raise ProtocolError("bad header length %d" % n)
    try:
        header = json.loads(compat.to_text(body[4:4 + n]))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not valid JSON")
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header, body[4 + n:]


def worth_compressing(data):
    """True when a message's data is large enough for zlib to pay (below, framing dominates)."""
    return len(data) >= COMPRESS_FROM


def _zlib_fast(data):
    return zlib.compress(data, 1)


# Large bodies sent to several peers are compressed once (compresscache).
_SHARED = compresscache.CompressedCache(_zlib_fast)


def compress(data, level=1):
    """zlib stream of `data` (level 1: compression is the main cost of a bulk push); a large
    body another session sent already comes from the shared cache."""
    if level == 1:
        return _SHARED.compress(data)
    return zlib.compress(data, level)


def inflate_bounded(data, max_length):
    """Inflate a zlib stream to at most `max_length` bytes; a bigger output is a ProtocolError."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_length + 1)
    except zlib.error:
        raise ProtocolError("corrupt compressed data")
    if len(out) > max_length or d.unconsumed_tail:
        raise ProtocolError("compressed data inflates beyond %d bytes" % max_length)
    try:
        tail = d.flush()
    except zlib.error:
        raise ProtocolError("corrupt compressed data")
    if len(out) + len(tail) > max_length:
        raise ProtocolError("compressed data inflates beyond %d bytes" % max_length)
    if not getattr(d, "eof", True):  # 2.7's decompressobj cannot tell; 3.x can
        raise ProtocolError("compressed data truncated")
    return out + tail if tail else out  # no copy of megabytes for nothing


def iter_chunks(data, chunk_size=CHUNK_SIZE):
    """Slices of `data` of at most `chunk_size` bytes (one empty chunk for empty data)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if not data:
        yield b""
        return
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield view[start:start + chunk_size].tobytes()


def iter_file_chunks(fileobj, chunk_size=CHUNK_SIZE):
    """Read an open binary file in chunks of at most `chunk_size` bytes."""
    while True:
        chunk = fileobj.read(chunk_size)
        if not chunk:
            return
        yield chunk


def ok_envelope(result):
    """Successful response envelope."""
    return {"ok": True, "result": result, "error": None}


def error_envelope(code, message):
    """Failed response envelope (code is a short stable word)."""
    return {"ok": False, "result": None, "error": {"code": compat.to_text(code),
                                                  "message": compat.to_text(message)}}


def unwrap(envelope):
    """The result of an envelope, or RequestError(message, code) when it reports a failure."""
    if not isinstance(envelope, dict) or "ok" not in envelope:
        raise RequestError("malformed response envelope", "protocol")
    if envelope.get("ok") is True:
        return envelope.get("result")
    err = envelope.get("error") or {}
    if not isinstance(err, dict):
        err = {}
    raise RequestError(compat.to_text(err.get("message") or "request failed"),
                       compat.to_text(err.get("code") or "error"))
