"""Deltas of big files: a new version as (what it shares with the base, what is new).

Design. A master-owned file that changes (client.keys: an agent appended, a key line edited
or removed) mostly keeps its beginning and its end. The delta is the longest common prefix
(`head` bytes), the longest common suffix that does not overlap it (`tail` bytes) and the
bytes in between (`middle`):  new = base[:head] + middle + base[len(base) - tail:].
Finding both is O(n) memcmp (blocks compared as byte strings, then a binary search inside
the first block that differs), about 10 ms for a 9.4 MB client.keys; an append, one edited or
removed line costs one line on the wire. Anything else (two distant edits, a rewrite) still
works, only the middle grows; the sender then sends the whole file when the middle is not
clearly smaller (worth()). Block or rolling-hash deltas would cover distant edits too, at
the cost of a second algorithm nobody here needs.

Trust. The receiver applies a delta only to a base whose size and SHA-256 are what the sender
named, checks every offset and length here (parse_entry, apply) before slicing, and the
result's SHA-256 against the announced checksum of the whole new file; anything else is
refused and the sender sends the whole file at once (sync.py). A leaf: standard library only.
"""
from __future__ import absolute_import, division, print_function

import collections
import re

from wazuh_cluster import compat

BLOCK = 1 << 16
_HEX64 = re.compile(u"^[0-9a-f]{64}$")


class DeltaError(ValueError):
    """A delta that cannot be applied; the message names the field or the mismatch."""


class Delta(collections.namedtuple("Delta", ("base_size", "head", "tail", "middle"))):
    """new = base[:head] + middle + base[base_size - tail:]."""
    __slots__ = ()

    def result_size(self):
        return self.head + len(self.middle) + self.tail


def _first_difference(a, b, n, block):
    """How many leading positions (at most n) a and b agree on, read through `block`.

    `block(x, lo, hi)` returns the bytes of x at positions lo..hi (counted from the start
    for a prefix, from the end for a suffix): equal blocks are skipped whole, the first
    unequal one is halved until a single position differs.
    """
    lo = 0
    while lo < n:
        hi = min(n, lo + BLOCK)
        if block(a, lo, hi) != block(b, lo, hi):
            break
        lo = hi
    else:
        return n
    # block(lo, hi) differs somewhere: keep the invariant "equal before lo, differs before hi".
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if block(a, lo, mid) == block(b, lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _forward(x, lo, hi):
    return x[lo:hi]


def _backward(x, lo, hi):
    return x[len(x) - hi:len(x) - lo]


def common_prefix(a, b):
    """Length of the longest common prefix of byte strings a and b.

    One of them whole at the start of the other (an append: every client.keys change on a
    busy master) is one comparison without copies (0.3 ms at 9.4 MB); the blocks below are
    slices of both (2.4 ms)."""
    if len(a) <= len(b) and b.startswith(a):
        return len(a)
    if len(b) < len(a) and a.startswith(b):
        return len(b)
    return _first_difference(a, b, min(len(a), len(b)), _forward)


def common_suffix(a, b, limit):
    """Length of the longest common suffix of a and b, at most `limit`."""
    return _first_difference(a, b, min(len(a), len(b), limit), _backward)


def make(base, new):
    """The Delta turning `base` into `new` (both bytes)."""
    head = common_prefix(base, new)
    tail = common_suffix(base, new, min(len(base), len(new)) - head)
    return Delta(len(base), head, tail, new[head:len(new) - tail])


def worth(delta, new_size):
    """True when sending `delta` beats sending the whole file of `new_size` bytes.

    At most half the file: a delta refused by the receiver costs its bytes on top of the
    whole file, so a nearly complete rewrite goes whole at once.
    """
    return len(delta.middle) <= new_size // 2


def apply(base, head, tail, middle, result_size):
    """base[:head] + middle + base[-tail:], every bound checked first; DeltaError if not."""
    if head + tail > len(base):
        raise DeltaError("head %d + tail %d past the base of %d bytes"
                         % (head, tail, len(base)))
    if head + len(middle) + tail != result_size:
        raise DeltaError("head %d + %d bytes + tail %d do not make %d bytes"
                         % (head, len(middle), tail, result_size))
    return b"".join((base[:head], middle, base[len(base) - tail:]))


# -- on the wire --------------------------------------------------------------------------------

def entry(name, sha256, mtime_ns, base_sha256, delta):
    """The header entry of one delta in a sync_files batch; its middle travels in the data."""
    return {"name": name, "sha256": sha256, "mtime_ns": mtime_ns,
            "base_sha256": base_sha256, "base_size": delta.base_size, "head": delta.head,
            "tail": delta.tail, "size": len(delta.middle), "result_size": delta.result_size()}


_INT_FIELDS = ("mtime_ns", "base_size", "head", "tail", "size", "result_size")


def parse_entry(value, max_result):
    """Check one header entry from a peer (hostile); return it, or raise DeltaError.

    Every integer is a non-negative int (never a bool), head + tail within base_size,
    head + size + tail == result_size <= max_result, both checksums 64 lowercase hex.
    """
    if not isinstance(value, dict):
        raise DeltaError("a delta entry is not an object")
    if not isinstance(value.get("name"), compat.string_types):
        raise DeltaError("a delta entry has no name")
    for field in ("sha256", "base_sha256"):
        if not isinstance(value.get(field), compat.string_types) or \
                not _HEX64.match(value[field]):
            raise DeltaError("bad %s" % field)
    for field in _INT_FIELDS:
        number = value.get(field)
        if not isinstance(number, compat.integer_types) or isinstance(number, bool) or \
                number < 0:
            raise DeltaError("bad %s" % field)
    if value["head"] + value["tail"] > value["base_size"]:
        raise DeltaError("head + tail past the base (%d bytes)" % value["base_size"])
    if value["head"] + value["size"] + value["tail"] != value["result_size"]:
        raise DeltaError("head + size + tail differ from result_size")
    if value["result_size"] > max_result:
        raise DeltaError("result of %d bytes over the limit of %d"
                         % (value["result_size"], max_result))
    return value
