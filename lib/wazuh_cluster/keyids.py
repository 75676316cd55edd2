"""The agent IDs of this client's client.keys, kept from one change of the file to the next.

A busy master appends an agent a second, and every client must know before writing the new
file that no agent leaves (agents.only_appended_new_ids: no appended ID is an old line's).
Looking for the new ID in the 9.4 MB of 100 000 agents took 35 ms per ID on 3.13, more
than everything else a client does for an append; with 10 clients on 2 cores under churn
the appends queued. The IDs are kept instead, as a sorted array of numbers (0.8 MB for
100 000 agents, not a set of strings of ten times that), for the file we wrote last, known
by its stat fingerprint; an append then costs a binary search per new ID. Any other change,
an ID that is not 1-8 digits (Wazuh's own rule), or a file that is not the one we wrote,
takes the exact path of agents.py (and the array is built again at the next append).
"""
from __future__ import absolute_import, division, print_function

import array
import bisect
import re

from wazuh_cluster import agents, compat

_NUMBER = re.compile(u"^[0-9]{1,8}$")
TYPECODE = "l"  # codes stay below 2**31: a C long on every platform, 2.7 included


def code(agent_id):
    """An integer for an ID of 1-8 ASCII digits ("01" and "1" differ), None otherwise."""
    if not _NUMBER.match(agent_id):
        return None
    return int(agent_id) * 10 + len(agent_id)


# The bytes of a plain file: printable ASCII, b"\t" and b"\n". Text splits lines and fields
# at those only (str.splitlines and str.split also at \r, \x0b, \x0c, \x1c-\x1f and
# non-ASCII characters).
_PLAIN = bytes(bytearray([9, 10] + list(range(32, 127))))
_PLAIN_IDS = re.compile(b"\n[ \t]*([0-9]{1,8})(?=[ \t\n]|$)")


def first_field_codes(data):
    """Sorted array of the code() of every first field of the lines of `data` (bytes) that
    has one, as agents._first_fields finds them in its text. A plain file (what
    manage_agents writes) by one regular expression over the bytes (0.15 s for 100 000
    agents); any other a line at a time (a line break of the bytes is one of the text)."""
    if not data.translate(None, _PLAIN):
        return array.array(TYPECODE, sorted(int(agent_id) * 10 + len(agent_id)
                                            for agent_id in _PLAIN_IDS.findall(b"\n" + data)))
    codes = array.array(TYPECODE)
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        for agent_id in agents._first_fields(compat.to_text(data[start:end], errors="replace")):
            number = code(agent_id)
            if number is not None:
                codes.append(number)
        start = end + 1
    return array.array(TYPECODE, sorted(codes))


class KnownIds(object):
    """The codes of the first fields of our client.keys, valid while its fingerprint holds."""

    def __init__(self):
        self.fingerprint = None
        self.codes = None
        self._added = None   # codes of the append being applied (only_appended)

    def only_appended(self, fingerprint, old, new):
        """agents.only_appended_new_ids(old, new) for the bytes of our file (`old`, with stat
        `fingerprint`, None when unknown) and the new version."""
        self._added = None
        if fingerprint is None or not new.startswith(old) or \
                (old and not old.endswith(b"\n")):
            return agents.only_appended_new_ids(old, new)
        added = [code(a) for a in
                 agents._first_fields(compat.to_text(new[len(old):], errors="replace"))]
        if None in added:
            return agents.only_appended_new_ids(old, new)
        if self.fingerprint != fingerprint or self.codes is None:
            self.codes, self.fingerprint = first_field_codes(old), fingerprint
        for number in added:
            at = bisect.bisect_left(self.codes, number)
            if at < len(self.codes) and self.codes[at] == number:
                return False
        self._added = added
        return True

    def moved(self, old, new):
        """Our file, at stat fingerprint `old`, got a new one (`new`) with the same content
        (a metadata-only update): its codes still hold."""
        if self.fingerprint is not None and self.fingerprint == old:
            self.fingerprint = new

    def prime(self, fingerprint, data):
        """A whole new file is in place, with stat `fingerprint`, its bytes `data` (None:
        unknown): its IDs are found now, not at the next append. The first append after a
        first sync parsed all 100 000 on every client at once (0.15-0.2 s each: with 20
        clients on 2 cores, that append was the p99 of issue 11)."""
        self._added = None
        if fingerprint is None or data is None:
            self.fingerprint = self.codes = None
            return
        self.codes, self.fingerprint = first_field_codes(data), fingerprint

    def written(self, fingerprint):
        """The new version of the last only_appended() that said True is in place, with stat
        `fingerprint` (None: unknown): its IDs join the known ones (True), or none are known
        (False: an append decided from the text)."""
        added, self._added = self._added, None
        if added is None or fingerprint is None or self.codes is None:
            self.fingerprint = self.codes = None
            return False
        if len(added) <= agents.FEW_APPENDED:
            for number in added:
                bisect.insort(self.codes, number)
        else:  # a first sync, a catch-up: one sort, not an insert (a memmove) per ID
            self.codes = array.array(TYPECODE, sorted(self.codes.tolist() + added))
        self.fingerprint = fingerprint
        return True
