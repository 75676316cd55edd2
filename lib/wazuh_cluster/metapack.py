"""The metadata-only updates of a sync_files batch in packed form (issue 11: a client's
keepalive batch is 2 000 of them, 10 000 a second on a master of 100 000 agents).

In JSON each update is an object {"name", "sha256", "mtime_ns"} (~150 bytes, a dict and
three strings to decode, a key sorted and written per field). Between peers that both
announced "meta_packed" in HELLO_INFO (peers.KNOWN_FEATURES) a batch carries them as two
strings of its header instead:

    "meta_names":   the names joined by "\\n" (a name never holds a control character)
    "meta_records": base64 of one RECORD per name, in the same order:
                    mtime_ns (int64 little-endian) | SHA-256 (32 raw bytes)

and the answer may list only the names not synchronized, with "meta_synchronized": true for
the others (COMPACT). An older peer, or one that announced nothing, gets and sends the JSON
form; a receiver takes both. Every field is checked here; the names, times and checksums are
then checked by the receiver as those of the JSON form are (receive.py).
"""
from __future__ import absolute_import, division, print_function

import array
import binascii
import struct
import sys

from wazuh_cluster import compat
from wazuh_cluster.errors import RequestError

FEATURE = "meta_packed"
NAMES = "meta_names"
RECORDS = "meta_records"
COMPACT = "meta_synchronized"
RECORD = struct.Struct("<q32s")
# At most this many names in one packed form (a client's batch has sync.BATCH_FILES = 2 000):
# what splitting them makes is what protocol.json_cost grants for it, whatever the text.
MAX_NAMES = 4096


def _bad(message):
    return RequestError(message, "bad_request")


def encode(meta):
    """{NAMES: ..., RECORDS: ...} of a list of {"name", "sha256" (hex), "mtime_ns"}; {} when
    it is empty or cannot be packed (a name with a newline, a checksum that is not 64 hex
    digits, an mtime beyond 64 bits): the JSON form carries those, the receiver refuses
    them one by one."""
    if not meta or len(meta) > MAX_NAMES:
        return {}
    pack, unhexlify = RECORD.pack, binascii.unhexlify
    try:
        if set(map(len, (entry["sha256"] for entry in meta))) != set([64]):
            return {}  # "32s" would pad or cut another length
        names = u"\n".join(compat.to_text(entry["name"]) for entry in meta)
        records = b"".join(pack(entry["mtime_ns"], unhexlify(entry["sha256"]))
                           for entry in meta)
    except (binascii.Error, struct.error, TypeError, ValueError, UnicodeError):
        return {}
    if names.count(u"\n") != len(meta) - 1 or len(records) != RECORD.size * len(meta):
        return {}
    return {NAMES: names, RECORDS: binascii.b2a_base64(records).decode("ascii").rstrip(u"\n")}


_MTIME = struct.Struct("<q")
_HEX_RECORD = 2 * RECORD.size   # a record's hex digits; its checksum's start within them
_HEX_DIGEST = 2 * _MTIME.size

# The records are read without a tuple per record: a keepalive batch's 2 000 tuples, live
# together, made the cyclic garbage collector run several times a batch (on a master under
# the real keepalive rate, 7 % of wazuh-clusterd's busy samples were on that line). The
# checksums are slices of one hex text, the mtimes every fifth int64 of the records.
if hasattr(array.array, "frombytes"):
    def _mtimes(raw):
        values = array.array("q")
        values.frombytes(raw)
        if sys.byteorder != "little":
            values.byteswap()
        return values[::RECORD.size // _MTIME.size].tolist()
else:  # 2.7 (array "q" is 3.3+)
    def _mtimes(raw):
        unpack = _MTIME.unpack_from
        return [unpack(raw, at)[0] for at in range(0, len(raw), RECORD.size)]


def _digests(raw):
    """The records' SHA-256 in hex, in order."""
    hexed = compat.to_text(binascii.hexlify(raw))
    return [hexed[at:at + 64] for at in range(_HEX_DIGEST, len(hexed), _HEX_RECORD)]


def decode(header):
    """(names, sha256 hex, mtime_ns) of a header's packed updates, three sequences in the
    same order (None when it has none), or RequestError (bad_request) when they are
    malformed: not two strings, base64 that does not decode to one record per name."""
    names, records = header.get(NAMES), header.get(RECORDS)
    if names is None and records is None:
        return None
    if not isinstance(names, compat.string_types) or \
            not isinstance(records, compat.string_types):
        raise _bad("'%s' and '%s' must be strings" % (NAMES, RECORDS))
    try:
        raw = binascii.a2b_base64(compat.to_bytes(records))
    except (binascii.Error, TypeError, ValueError, UnicodeError):
        raise _bad("'%s' is not base64" % RECORDS)
    if compat.PY2 and isinstance(names, compat.text_type):
        try:   # ASCII (every honest name): split into str, a byte a character (split_copy)
            names = names.encode("ascii")
        except UnicodeError:
            pass
    count = names.count("\n") + 1  # counted before anything is split (MAX_NAMES)
    if count > MAX_NAMES:
        raise _bad("'%s' holds %d names, more than %d" % (NAMES, count, MAX_NAMES))
    if len(raw) != RECORD.size * count:
        raise _bad("'%s' holds %d bytes for %d names" % (RECORDS, len(raw), count))
    return names.split("\n"), _digests(raw), _mtimes(raw)


def split_copy(header):
    """Bytes that splitting the packed names of a request `header` ({"cmd", "args"}) copies
    out of their text, which the header keeps: a byte a character (the lines of a name
    stored wider are counted by protocol.json_cost, which cannot tell packed names from any
    other string before they are parsed; their per-line objects too: LINE_COST)."""
    args = header.get("args") if isinstance(header, dict) else None
    names = args.get(NAMES) if isinstance(args, dict) else None
    if not isinstance(names, compat.string_types) or "\n" not in names:
        return 0   # unsplit, a string is its only line (str.split gives the very object)
    return len(names)


def compact_states(states, packed_names=None):
    """The answer's states with the synchronized `packed_names` left out (COMPACT); None:
    every name of the batch came packed (a keepalive batch), the states are theirs alone."""
    if packed_names is None:
        return dict((name, state) for name, state in states.items()
                    if state != u"synchronized")
    packed = set(packed_names)
    return dict((name, state) for name, state in states.items()
                if state != u"synchronized" or name not in packed)


def full_states(result, names, packed_names=()):
    """{name: state} of an answer, only for `names` (what the batch asked about); the
    `packed_names` it left out are synchronized when it says so (COMPACT). None when it
    holds no states."""
    states = result.get("states") if isinstance(result, dict) else None
    if not isinstance(states, dict):
        return None
    full = dict((name, states[name]) for name in names if name in states)
    if result.get(COMPACT) is True:
        for name in packed_names:
            full.setdefault(name, u"synchronized")
    return full
