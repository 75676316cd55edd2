"""Manifest summaries: a checksum per bucket of names, compared before any manifest travels.

An integrity round used to exchange and hold two whole manifests per peer (10 000 shared
files; 10 000 agent-info files per client on a master) every interval, to find nothing
changed. Now each side first summarises its manifest in BUCKETS buckets (a name's bucket is
fixed by its CRC-32, so both sides agree without talking); only the buckets whose summaries
differ are then compared entry by entry, a slice at a time.

A bucket's summary is [count, digest]: the digest is the sum modulo 2**128 of the first 16
bytes of SHA-256(name NUL sha256 [NUL mtime seconds]) of its entries, so it is built in one
pass over rows in any order with BUCKETS integers of memory, and cached by the internal
daemon until something changes. The mtime is part of it only for items whose mtime is data
(agent-info), in whole seconds: a 2.7 receiver sets mtimes through a float (a few hundred
nanoseconds off, manifest.diff tolerates MTIME_SLACK_NS), and only a value within that of a
second's boundary makes its bucket be compared for nothing.

A peer's summary decides only what is compared next; what is sent or deleted is still
decided from the entries, as before. A peer lying in its summary can only hide its own drift.

Two forms, which differ only for items whose mtime is data. Form 1 hashes the mtime with the
name and checksum. Form 2 (FORM) hashes the name and checksum alone into a "base" and mixes
the mtime in by one multiplication, base * (2 * mtime seconds + 1) modulo 2**128: a keepalive
changes the mtime only, and the base kept with the file's record (Scanner.summary_sums)
still holds, so the summary after every agent kept alive costs a multiplication a file, not a
SHA-256 (the master sums 10 000 agent-info files per client after each wave). An entry changed
alone always moves its bucket's sum (the factor is odd, so invertible modulo 2**128), and
changes cancel only if the bases, 128 random bits each, make their weighted sum vanish. A round
asks for FORM and takes the form the peer answers in (a peer of an older version answers in
form 1, without saying so): both sides' summaries are then made in it.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import re
import zlib

from wazuh_cluster import compat
from wazuh_cluster.errors import ProtocolError

BUCKETS = 256
# Buckets compared per step of a round: a round holds the entries of that many buckets of
# both sides at most (1/8 of each manifest), not two whole manifests.
BUCKETS_PER_STEP = 32
FORM = 2      # the newest form (see above); a request without "form" is of form 1
FORMS = (1, 2)
_MASK = (1 << 128) - 1
_HEX32 = re.compile(u"^[0-9a-f]{32}$")
_NUL = b"\0"


def bucket_of(name):
    """The bucket (0 .. BUCKETS - 1) of a file name, the same on every node and interpreter."""
    return zlib.crc32(compat.to_bytes(name)) % BUCKETS


def entry_value(name, sha256, mtime_ns):
    """The integer an entry adds to its bucket's digest, of bytes (the name, the checksum's
    hex digits); mtime_ns None when the item's mtime is no data."""
    text = name + _NUL + sha256
    if mtime_ns is not None:
        text += b"\0%d" % (mtime_ns // 1000000000)
    # Not through hex digits: a master sums 10 000 of these per client at its first round
    # after their keepalives (2.3 against 1.5 us each on 3.11).
    return compat.uint_be(hashlib.sha256(text).digest()[:16])


def mixed(base, mtime_ns):
    """Form 2's value of an entry whose mtime is data, from its base (entry_value of the
    name and checksum alone)."""
    return (base * (2 * (mtime_ns // 1000000000) + 1)) & _MASK


class Summary(object):
    """Counts and digests of BUCKETS buckets, filled entry by entry, in `form`."""

    def __init__(self, form=1):
        self.counts = [0] * BUCKETS
        self.sums = [0] * BUCKETS
        self.form = form

    def add(self, name, sha256, mtime_ns, mtime_is_data):
        self.add_raw(compat.to_bytes(name), compat.to_bytes(sha256 or ""),
                     (mtime_ns or 0) if mtime_is_data else None)

    def add_raw(self, name, sha256, mtime_ns):
        """add() of bytes, as entry_value takes them."""
        bucket = zlib.crc32(name) % BUCKETS
        self.counts[bucket] += 1
        if self.form == 1 or mtime_ns is None:
            value = entry_value(name, sha256, mtime_ns)
        else:
            value = mixed(entry_value(name, sha256, None), mtime_ns)
        self.sums[bucket] = (self.sums[bucket] + value) & _MASK

    def to_wire(self):
        """[[count, 32 hex digits], ...] of every bucket, in bucket order (~11 KB of JSON);
        the sums reduced modulo 2**128 here (Scanner.summary_sums adds without)."""
        return [[count, "%032x" % (total & _MASK)] for count, total in
                zip(self.counts, self.sums)]


def of_rows(rows, mtime_is_data, form=1):
    """The wire summary of scanner rows (name, item, size, mtime_ns, ino, ctime, mode, sha);
    `mtime_is_data(item name)` tells whether an item's mtime counts. The definition, entry by
    entry: the internal daemon sums the values its records keep (Scanner.summary_sums), and
    the tests hold it to this."""
    summary = Summary(form)
    for row in rows:
        summary.add(row[0], row[7], row[3], mtime_is_data(row[1]))
    return summary.to_wire()


def entry(name, sha256, mtime_ns):
    """(bucket, entry_value) of an entry, of bytes as entry_value takes them."""
    return zlib.crc32(name) % BUCKETS, entry_value(name, sha256, mtime_ns)


def parse_form(value):
    """A request's or answer's "form": FORMS, 1 when absent; ProtocolError otherwise."""
    if value is None:
        return 1
    if not isinstance(value, compat.integer_types) or isinstance(value, bool) or \
            value not in FORMS:
        raise ProtocolError("'form' must be one of %s" % ", ".join(str(f) for f in FORMS))
    return value


def parse(value):
    """A wire summary checked field by field: a list of BUCKETS (count, digest) tuples.
    ProtocolError names what is wrong."""
    if not isinstance(value, list) or len(value) != BUCKETS:
        raise ProtocolError("summary: a list of %d buckets expected" % BUCKETS)
    out = []
    for bucket in value:
        if not isinstance(bucket, list) or len(bucket) != 2:
            raise ProtocolError("summary: a bucket is [count, digest]")
        count, digest = bucket
        if not isinstance(count, compat.integer_types) or isinstance(count, bool) or \
                count < 0:
            raise ProtocolError("summary: a bucket's count is a non-negative integer")
        if not isinstance(digest, compat.string_types) or not _HEX32.match(digest):
            raise ProtocolError("summary: a bucket's digest is 32 lowercase hex digits")
        out.append((count, compat.native_str(digest)))
    return out


def differing(mine, theirs):
    """Sorted buckets whose summaries differ (both already parsed or built by to_wire)."""
    return [b for b in range(BUCKETS) if tuple(mine[b]) != tuple(theirs[b])]


def steps(buckets, size=BUCKETS_PER_STEP):
    """The buckets to compare, `size` at a time."""
    return [buckets[i:i + size] for i in range(0, len(buckets), size)]


def parse_buckets(value):
    """A request's "buckets" list: None when absent; ProtocolError unless unique bucket
    numbers."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > BUCKETS or not all(
            isinstance(b, compat.integer_types) and not isinstance(b, bool) and
            0 <= b < BUCKETS for b in value):
        raise ProtocolError("'buckets' must be a list of bucket numbers below %d" % BUCKETS)
    return frozenset(value)
