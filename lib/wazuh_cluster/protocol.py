"""Message types and frame bodies of a cluster session (STYLE s.6). A leaf: no socket, no crypto.

A frame's plaintext is type(1) | flags(1) | request_id(u32) | body (see channel.py). A body is

    u32 BE header length | header (UTF-8 JSON object) | raw data

and the whole body is one zlib stream when FLAG_COMPRESSED is set, inflated with a bound as it
is read (Inflater).
Requests carry {"cmd": NAME, "args": {...}}; responses carry the envelope
{"ok": bool, "result": ..., "error": {"code", "message"}}.
"""
from __future__ import absolute_import, division, print_function

import collections
import json
import re
import struct
import zlib

from wazuh_cluster import compat, compresscache, metapack
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
    "ELECTION": 8,     # cluster.failover=1 only: an election message (election.py), header only
}
TYPE_NAMES = dict((v, k) for k, v in MESSAGE_TYPES.items())
HELLO_INFO = MESSAGE_TYPES["HELLO_INFO"]
KEEPALIVE = MESSAGE_TYPES["KEEPALIVE"]
REQUEST = MESSAGE_TYPES["REQUEST"]
RESPONSE = MESSAGE_TYPES["RESPONSE"]
ERROR = MESSAGE_TYPES["ERROR"]
FILE_CHUNK = MESSAGE_TYPES["FILE_CHUNK"]
CLOSE = MESSAGE_TYPES["CLOSE"]
ELECTION = MESSAGE_TYPES["ELECTION"]

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
    return b"".join(body_parts(header, data))


def body_parts(header, data=b""):
    """The body as a list of byte strings (joined, it is encode_body's); `data` may be a list
    of byte strings, which is emptied: its parts are in the list returned, not copied."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True)
    head = compat.to_bytes(head)
    parts = [_U32.pack(len(head)) + head]
    if isinstance(data, list):
        parts.extend(data)
        del data[:]
    else:
        parts.append(compat.to_bytes(data))
    return parts


def decode_body(body, max_header=MAX_HEADER_BYTES):
    """(header dict, raw bytes) from a body; ProtocolError when malformed."""
    if len(body) < 4:
        raise ProtocolError("body too short")
    (n,) = _U32.unpack(body[:4])
    if n > max_header or 4 + n > len(body):
        raise ProtocolError("bad header length %d" % n)
    return _parse_header(body[4:4 + n]), body[4 + n:]


def json_cost(raw, start=0, end=None):
    """About the most bytes of Python objects that json.loads(raw) can make (raw: bytes;
    `start`, `end`: of the text within raw, which is not copied).

    JSON text of a few bytes can become tens of bytes of objects ("[[],[],...]": 24 times
    its size): every structure, string, member and element is counted at what CPython
    spends on it, from the characters that open them, before anything is parsed, and the
    lines a header's packed updates may be split into at LINE_COST each (_packed_lines). A text
    character is counted at what a decoded one may take (_text_cost). What splitting packed
    names copies out of their text is counted once they are parsed (metapack.split_copy).
    """
    end = len(raw) if end is None else min(end, len(raw))

    def count(char):
        return raw.count(char, start, end)
    length = max(0, end - start)
    backslashes = count(b"\\")
    return (_text_cost(raw, start, end, length, backslashes) +
            64 * (count(b"{") + count(b"[")) + 30 * count(b'"') + 40 * count(b":") +
            36 * count(b",") + LINE_COST * _packed_lines(backslashes, length))


# A string holds its characters at the width of its widest one: on 2.7 a non-ASCII one is
# unicode (compat.TEXT_CHAR_BYTES, as every character is counted there); on 3.x (PEP 393) a
# character beyond U+00FF makes the whole string 2 bytes a character, beyond U+FFFF 4,
# ASCII ones included, and one beyond U+007F has the decoder build its string again (a
# megabyte string ending in an escaped "\u00e9" peaked at 3.5 times its text). Such a
# character comes as raw UTF-8 (a byte >= 0x80) or as a \u escape of one: an honest peer's
# header is ASCII (json.dumps) and its names hold no \u escape, so the search costs it one
# scan of a regular expression that finds nothing.
_WIDE_ESCAPE = re.compile(br"\\u(?!00[0-7])")
_SURROGATE_ESCAPE = re.compile(br"\\u[dD][89abAB]")   # half of one beyond U+FFFF
_ASCII_BYTES = bytes(bytearray(range(128)))


def _text_cost(raw, start, end, length, backslashes):
    """What the strings json.loads makes of `length` bytes of JSON text may take, their
    text's decoded copy (3.x) and what splitting packed names may copy of them, for wide
    characters: one byte of text is at most one character."""
    if _is_ascii(raw, start, end):
        if not backslashes or not _WIDE_ESCAPE.search(raw, start, end):
            # every string narrow (1 byte a character on 3.x, ASCII str on 2.7): a split
            # copies no more than what metapack.split_copy counts once it is parsed
            return compat.TEXT_CHAR_BYTES * length
        width, decoded = compat.TEXT_CHAR_BYTES, 0
        if not compat.PY2:
            width = 4 if _SURROGATE_ESCAPE.search(raw, start, end) else 2
            # the text decoded (a byte a character), and a string's buffer at its width
            # before the escape, kept next to the wider one while the decoder widens it,
            # both over-allocated by a quarter ("a" * 10 ** 6 + "\u0100" escaped peaked at
            # 4.75 times its text, against 4 counted)
            decoded = length + width * length // 2
    elif compat.PY2:
        width, decoded = compat.TEXT_CHAR_BYTES, 0
    else:   # 3.x decodes the whole text first, at the width of its widest character
        width, decoded = 4, 4 * length
    # the strings, and the wide lines a split copies out of one (it needs a newline: an escape)
    copies = 2 if backslashes else 1
    return width * length * copies + decoded


if hasattr(bytes, "isascii"):
    def _is_ascii(raw, start, end):
        text = raw if start == 0 and end == len(raw) else raw[start:end]
        return text.isascii()
else:  # 2.7 and 3.6: deleting the ASCII bytes leaves nothing (no decoded copy)
    def _is_ascii(raw, start, end):
        return not bytes(raw[start:end]).translate(None, _ASCII_BYTES)


# What a line of the packed form of a batch's metadata updates (metapack.py) may become once
# split: a name, a checksum in hex, their record and a receive.Incoming (~450 bytes on 3.11).
# A newline in JSON text is escaped \n or \u000a (either case): every escape starts with a
# backslash, so the backslashes bound the newlines whatever their spelling (a hostile peer
# may join its names with the longer escape), in one count of one byte where the three
# spellings took three searches of the text (a keepalive batch's 190 KB: 0.33 of 0.56 ms).
LINE_COST = 480
# Text a packed line takes at least: its escaped newline and its record's base64.
_PACKED_LINE_TEXT = 2 + metapack.RECORD.size * 4 // 3


def _packed_lines(newlines, length):
    """The most lines splitting can make of a text of `length` bytes holding at most
    `newlines` escaped newlines (its backslashes): metapack.decode splits only a header's
    one list of names, of at most metapack.MAX_NAMES names with a record each. Any other string's newlines stay in it, so
    a hostile peer's string of a million of them costs at most those lines (~2 MB), not
    LINE_COST each, and a text's cost stays within a few times its length."""
    if not newlines:
        return 0
    # n newlines make n + 1 lines
    return min(newlines + 1, metapack.MAX_NAMES, length // _PACKED_LINE_TEXT)


def header_cost(body, max_header=MAX_HEADER_BYTES):
    """json_cost of the header of an uncompressed body (see decode_costed), counted in place
    before anything is copied or parsed; None when its length is malformed (decode_costed
    refuses it)."""
    if len(body) < 4:
        return None
    (n,) = _U32.unpack(body[:4])
    if n > max_header or 4 + n > len(body):
        return None
    return json_cost(body, 4, 4 + n)


def decode_costed(body, max_header=MAX_HEADER_BYTES, max_cost=None, cost=None):
    """(header, raw data, cost of the header) of a body: its json_cost, checked first, and
    what splitting its packed names will copy (metapack.split_copy).
    `cost`: header_cost(body) when the caller counted it already (a parked request's window)."""
    if len(body) < 4:
        raise ProtocolError("body too short")
    (n,) = _U32.unpack(body[:4])
    if n > max_header or 4 + n > len(body):
        raise ProtocolError("bad header length %d" % n)
    cost = _check_cost(body, max_cost, cost, 4, 4 + n)
    header = _parse_header(_text_of(body, 4 + n))
    return header, body[4 + n:], cost + metapack.split_copy(header)


def _check_cost(raw, max_cost, cost=None, start=0, end=None):
    if cost is None:
        cost = json_cost(raw, start, end)
    if max_cost is not None and cost > max_cost:
        raise ProtocolError("header of %d bytes would take about %d bytes decoded, more than "
                            "the %d allowed" % ((len(raw) if end is None else end) - start,
                                                cost, max_cost))
    return cost


if compat.PY2:
    def _text_of(body, end):
        return bytes(body[4:end])   # 2.7's json reads a str
else:
    def _text_of(body, end):
        """The header's text, decoded where it lies (one copy fewer of a 190 KB batch)."""
        return memoryview(body)[4:end]


def _parse_header(raw):
    try:
        header = compat.json_loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not valid JSON")
    except RuntimeError:  # nested deeper than the recursion limit (3.x: RecursionError)
        raise ProtocolError("header is nested too deep")
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header


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


def compress_parts(parts):
    """compress(b"".join(parts)) without joining them (see compresscache)."""
    return _SHARED.compress_parts(parts)


def bound_compression_cache(nbytes):
    """Keep at most `nbytes` in the shared compression cache (the memory budget's part)."""
    _SHARED.resize(nbytes)


INFLATE_CHUNK = 256 << 10   # bytes inflated at a time by Inflater


class Inflater(object):
    """The inflated bytes of a zlib stream given as compressed `parts`, read as they are needed.

    Nothing is inflated ahead of a read, and a read inflates at most what it returns plus one
    INFLATE_CHUNK: a bomb costs its compressed size in memory, not its inflated size. More than
    `max_length` inflated bytes in all, a corrupt or (on 3.x) truncated stream, or data after
    its end raise ProtocolError when they are reached.
    """

    def __init__(self, parts, max_length):
        self._parts = collections.deque(parts)
        self._z = zlib.decompressobj()
        self._pending = b""          # inflated; returned up to _pos
        self._pos = 0
        self._fed = b""              # compressed input not consumed yet (unconsumed_tail)
        self._ended = False
        self.max_length = max_length
        self.inflated = 0            # bytes returned so far

    def compressed_size(self):
        """Bytes of compressed input still held."""
        return sum(len(p) for p in self._parts) + len(self._fed)

    def _inflate_some(self):
        """Inflate up to INFLATE_CHUNK more bytes into _pending; False at the stream's end."""
        while not self._ended:
            if not self._fed:
                if not self._parts:
                    self._finish()
                    return False
                self._fed = self._parts.popleft()
            try:
                out = self._z.decompress(self._fed, INFLATE_CHUNK)
            except zlib.error:
                raise ProtocolError("corrupt compressed data")
            self._fed = self._z.unconsumed_tail
            if getattr(self._z, "eof", False) or self._z.unused_data:
                self._check_end()
            if out:
                self._count(len(out))
                self._pending += out
                return True
        return False

    def _count(self, n):
        if self.inflated + len(self._pending) - self._pos + n > self.max_length:
            raise ProtocolError("compressed data inflates beyond %d bytes" % self.max_length)

    def _check_end(self):
        if self._z.unused_data or self._fed or any(self._parts):
            raise ProtocolError("data after the end of the compressed stream")
        self._ended = True

    def _finish(self):
        try:
            tail = self._z.flush()
        except zlib.error:
            raise ProtocolError("corrupt compressed data")
        if tail:
            self._count(len(tail))
            self._pending += tail
        if not getattr(self._z, "eof", True):  # 2.7's decompressobj cannot tell; 3.x can
            raise ProtocolError("compressed data truncated")
        self._ended = True

    def read(self, n):
        """Up to `n` inflated bytes (fewer only at the end of the stream)."""
        if len(self._pending) - self._pos < n:
            self._pending = self._pending[self._pos:]
            self._pos = 0
            while len(self._pending) < n and self._inflate_some():
                pass
        out = self._pending[self._pos:self._pos + n]
        self._pos += len(out)
        self.inflated += len(out)
        return out

    def read_exact(self, n, what="data"):
        """Exactly `n` inflated bytes, or ProtocolError naming `what`."""
        out = self.read(n)
        if len(out) != n:
            raise ProtocolError("compressed %s truncated" % what)
        return out

    def read_all(self):
        """Everything left, as one byte string (bounded by max_length)."""
        parts = [self.read(INFLATE_CHUNK)]
        while parts[-1]:
            parts.append(self.read(INFLATE_CHUNK))
        return b"".join(parts)

    def at_end(self):
        """True when nothing is left to read (the whole stream checked)."""
        return not self.read(1) and self._ended


def decode_header_stream(inflater, max_header=MAX_HEADER_BYTES, max_cost=None):
    """(header dict, its cost) at the start of an inflated body (see decode_costed).

    The Inflater is left at the body's data.
    """
    (n,) = _U32.unpack(inflater.read_exact(4, "body"))
    if n > max_header:
        raise ProtocolError("header of %d bytes (limit %d)" % (n, max_header))
    raw = inflater.read_exact(n, "header")
    cost = _check_cost(raw, max_cost)
    header = _parse_header(bytes(raw))
    return header, cost + metapack.split_copy(header)


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
