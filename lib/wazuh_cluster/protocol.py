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
    """The most bytes json.loads(raw) holds at once, its text's copy included (raw: bytes;
    `start`, `end`: of the text within raw, which is not copied).

    JSON text of a few bytes can become tens of bytes of objects ("[[],[],...]": 30 times
    its size): every structure, string, member and element is counted at what this
    interpreter spends on it at most (_weights), from the characters that open them, before
    anything is parsed. A text character is counted at what a decoded one may take, and
    what only parsing holds (the text's copy, the pieces of strings with escapes) apart
    (_text_cost): the lines a header's packed updates may be split into, at LINE_COST each
    (_packed_lines), come once it is parsed, so only the larger of the two is counted. What
    splitting packed names copies out of their text is counted once they are parsed
    (metapack.split_copy). tests/unit/header_shapes.py measures the peak of each hostile
    shape against it (test_header_peaks).
    """
    end = len(raw) if end is None else min(end, len(raw))

    def count(char):
        return raw.count(char, start, end)
    length = max(0, end - start)
    backslashes, quotes = count(b"\\"), count(b'"')
    kept, parsing, split = _text_cost(raw, start, end, length, backslashes, quotes)
    return (kept + max(parsing, split + LINE_COST * _packed_lines(backslashes, length)) +
            _DICT * count(b"{") + _LIST * count(b"[") + _QUOTE * quotes +
            _COLON * count(b":") + _COMMA * count(b",") + _BASE)


def _weights():
    """(dict, list, quote, colon, comma, slot, piece, base): the most bytes json.loads holds
    for each "{", "[", '"', ":" and "," of its text beyond the text's own characters, for
    each piece of a string with escapes (_pieces) and for any text (the decoder's own
    objects), here (measured by tests/unit/header_shapes.py, every shape's peak, rounded
    up):
    - a "[" is a list grown to its first element (88 bytes on 3.11, 130 on 2.7);
    - a "{" a dict (64 bytes on 3.9+, 240 on 3.6-3.7, 280 on 2.7 with its list of pairs);
    - a ":" its key and its entries in the object's dict and the decoder's memo of keys,
      both just grown (the most a key takes: 177 bytes on 3.11, 217 on 3.6, 2.7's pair
      and dict 370); a "," an element's slot or a member;
    - a piece: 3.6-3.8 and 2.7 build a string with escapes as a list of pieces, the text
      before each escape and the escape, each a string but a single Latin-1 character
      (cached): its slot in the list (9 bytes, twice that while the list grows) and its
      string (3.x: 49-76 bytes beyond its characters; 2.7: unicode, 88). "ab\\n" repeated
      peaked at 18.8 MB for 1 MB of text on 3.6; 3.9+ write the string in place.
    A "{" is counted at a dict with its first member's table on 3.9+ too (232 bytes on 3.9,
    184 on 3.11): "[{"0":0},{"1":0},...]", a key of its own in each object, peaked at 1.5
    times its charge on 3.9-3.10 and 1.2 times on 3.11-3.13 at 64."""
    if compat.PY2:
        return 300, 136, 30, 256, 40, 20, 120, 32768
    if compat.JSON_PIECES:
        return 256, 112, 30, 112, 36, 20, 96, 4096
    return 256, 96, 30, 72, 36, 0, 0, 4096


_DICT, _LIST, _QUOTE, _COLON, _COMMA, _SLOT, _PIECE, _BASE = _weights()


def _pieces(raw, start, end, length, backslashes, quotes, width, wide):
    """What the pieces of strings with escapes take at most (3.6-3.8, 2.7): the text of the
    longest such string (one is built at a time: _longest_escaped) at `width` a character
    (on 2.7 with what unicode.join allocates beyond the string it makes, doubling until the
    pieces fit: up to the string again), a slot for every escape and every piece of text
    between them, and a string for a piece of text of two bytes or more (one byte is a
    cached character) and, `wide`, for a \\u escape beyond U+00FF. An escape takes two
    bytes or more ("\\\\" is two backslashes, any other one backslash), so a text of
    escapes alone (a hostile name of a million newlines) has no piece of text."""
    if not _PIECE:
        return 0
    doubled = raw.count(b"\\\\", start, end)   # within a run: its "\\\\" escapes
    plain = max(0, length - 2 * backslashes + 2 * doubled)
    texts = min(backslashes + 1, plain // 2)
    # each \u escape beyond U+00FF may be a string (below, a cached character)
    escapes = raw.count(b"\\u", start, end) - raw.count(b"\\u00", start, end) if wide else 0
    longest = _longest_escaped(raw, start, end, quotes)
    return (width * (min(plain, longest) + _JOIN * longest) +
            _SLOT * (backslashes + texts) + _PIECE * (texts + escapes))


# Strings with escapes are looked for one by one in a text of at most this many quotes: a
# rogue's answer of 3 000 refused names beside a 1 MiB plain one, kept answerable on 2.7.
_QUOTES_LOOKED_AT = 1 << 16


def _longest_escaped(raw, start, end, quotes):
    """The most bytes of text one string holding an escape has: the longest run between an
    opening quote and the next one that holds a backslash, when the text is known to pair
    its quotes (no escaped quote) and has few; else the whole text."""
    if quotes > _QUOTES_LOOKED_AT or raw.find(b'\\"', start, end) >= 0:
        return end - start
    longest, find = 0, raw.find
    opening = find(b'"', start, end)
    while opening >= 0:
        closing = find(b'"', opening + 1, end)
        if closing < 0:
            closing = end
        if closing - opening - 1 > longest and find(b"\\", opening + 1, closing) >= 0:
            longest = closing - opening - 1
        opening = find(b'"', closing + 1, end) if closing < end else -1
    # a backslash outside any string (not JSON) fails the parse where it stands
    return longest


def json_cost_at_most(length):
    """The most json_cost gives any text of `length` bytes, without reading it (a caller
    whose bound this is under needs not count): every byte the dearest structure or escape
    with its packed line's share, and text at its widest, with what splitting copies."""
    per_byte = max(_DICT, _LIST, _QUOTE, _COLON, _COMMA,
                   _SLOT + LINE_COST // _PACKED_LINE_TEXT + 1, (_SLOT + _PIECE) // 2 + 1)
    return length * (per_byte + _PIECE // 6 + 1 + 5 * 4) + _BASE


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


def _text_cost(raw, start, end, length, backslashes, quotes):
    """(kept, parsing, split): what the strings and numbers json.loads makes of `length`
    bytes of JSON text may take, what parsing them holds besides (the text's copy: 2.7's
    bytes, 3.x's decoded str; the pieces of strings with escapes on 3.6-3.8 and 2.7) and
    what splitting packed names may copy of them beyond split_copy, for wide characters.
    One byte of text is at most one character."""
    if _is_ascii(raw, start, end):
        if not backslashes or not _WIDE_ESCAPE.search(raw, start, end):
            # every string narrow (1 byte a character on 3.x; on 2.7 unicode, then str): a
            # split copies no more than what metapack.split_copy counts once it is parsed.
            # Parsing holds the copy, a number's own copy (its int is 0.42 bytes a digit),
            # 2.7's str of a string next to its unicode, and the pieces.
            pieces = _pieces(raw, start, end, length, backslashes, quotes,
                             compat.TEXT_CHAR_BYTES, False) if backslashes else 0
            return compat.TEXT_CHAR_BYTES * length, _NARROW * length // 2 + pieces, 0
        width, decoded = compat.TEXT_CHAR_BYTES, 2 * length
        if not compat.PY2:
            width = 4 if _SURROGATE_ESCAPE.search(raw, start, end) else 2
            # the text decoded (a byte a character), and a string's buffer before an
            # escape widens it, kept next to the wider one while the decoder widens it,
            # both over-allocated by a quarter: a string widened to 2 bytes a character
            # peaked at 4.75 times its text, one widened to 2 then 4 at 8.5 times
            decoded = (1 + width) * length
    elif compat.PY2:   # the text's copy, and what its encoding as ASCII made before failing
        width, decoded = compat.TEXT_CHAR_BYTES, 2 * length
    else:   # 3.x decodes the whole text first, at the width of its widest character
        width, decoded = 4, 4 * length
    if not backslashes:
        return width * length, decoded, 0
    # the wide lines a split copies out of a string (it needs a newline: an escape)
    return (width * length,
            decoded + _pieces(raw, start, end, length, backslashes, quotes, width, True),
            width * length)


# What parsing holds beyond the strings, in halves of a byte a byte of ASCII text: the
# copy (1) and a number's (1, of which its int keeps 0.42) on 3.x; on 2.7 the copy and
# the str that replaces a string's unicode (1 each)
_NARROW = 2 * 2 if compat.PY2 else 3
_JOIN = 1 if compat.PY2 else 0   # see _pieces


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
    except UnicodeDecodeError:
        raise ProtocolError("header is not valid JSON")
    except ValueError as err:
        raise ProtocolError("header is not valid JSON%s" % number_too_long(err))
    except RuntimeError:  # nested deeper than the recursion limit (3.x: RecursionError)
        raise ProtocolError("header is nested too deep")
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header


def number_too_long(err):
    """What to add to "not valid JSON" when a number was refused for its digits
    (compat.MAX_INT_DIGITS; 3.7.14+ refuse it themselves): the error's own text holds
    the peer's digit count, nothing of its text."""
    if "digits" not in str(err):
        return ""
    return ": a number of more than %d digits" % compat.MAX_INT_DIGITS


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
