"""Manifests: {file name: its checksum, mtime and item}, the currency of an integrity round.

The internal daemon writes them (`to_json`, from scanner rows); wazuh-clusterd reads its own
and the peer's (`decode`) and compares them (`diff`). On the wire an entry is the JSON object
{"sha256", "size", "mtime_ns", "mode", "item"}; read back it is an `Entry` tuple of the three
fields a round uses. A dict per entry costs about 1 KB on Python 2.7, and a round holds two
manifests of 10 000 entries or more: a master comparing with its clients peaked above 100 MB.
"""
from __future__ import absolute_import, division, print_function

import collections
import json
import re

from wazuh_cluster import compat
from wazuh_cluster.errors import ProtocolError
from wazuh_cluster.pathrules import MTIME_SLACK_NS, owner

_HEX64 = re.compile(u"^[0-9a-f]{64}$")
_quote = json.JSONEncoder(ensure_ascii=True).encode


class Entry(collections.namedtuple("Entry", ("sha256", "mtime_ns", "item"))):
    """One file of a manifest. A field a peer sent with the wrong type is None: a None
    checksum never equals another, so such a file is simply sent again."""
    __slots__ = ()


def to_json(rows, count=None):
    """JSON bytes of {name: {sha256, size, mtime_ns, mode, item}} from scanner rows.

    Written entry by entry: the same text json.dumps would give for the dict of dicts,
    without building those (12 500 of them are ~7 MB of Python objects). `count`, a
    one-element list, receives the number of entries.
    """
    parts = []
    for name, item, size, mtime_ns, _ino, _ctime, mode, sha in rows:
        parts.append('%s:{"sha256":"%s","size":%d,"mtime_ns":%d,"mode":%d,"item":%s}'
                     % (_quote(compat.to_text(name)), sha, size, mtime_ns, mode,
                        _quote(item)))
    if count is not None:
        count[0] = len(parts)
    return compat.to_bytes("{" + ",".join(parts) + "}")


def _entry(fields):
    sha = fields.get("sha256")
    mtime = fields.get("mtime_ns")
    item = fields.get("item")
    return Entry(
        # Native str: on 2.7 a 64-character unicode object takes 3 times the bytes.
        compat.native_str(sha) if isinstance(sha, compat.string_types) and _HEX64.match(sha)
        else None,
        mtime if isinstance(mtime, compat.integer_types) and not isinstance(mtime, bool)
        else None,
        item if isinstance(item, compat.string_types) else None)


def _object(pairs):
    """json's object_pairs_hook: an entry becomes an Entry as soon as it is parsed."""
    fields = dict(pairs)
    return _entry(fields) if "sha256" in fields else fields


def _checked(files):
    if not isinstance(files, dict) or not all(isinstance(e, Entry) for e in files.values()):
        raise ProtocolError("not a manifest: an object of file entries expected")
    return files


def decode(data):
    """{name: Entry} from a manifest's JSON bytes; ProtocolError when malformed."""
    try:
        files = json.loads(data, object_pairs_hook=_object)  # bytes: 2.7 and 3.6+ read UTF-8
    except (ValueError, UnicodeDecodeError, TypeError):
        raise ProtocolError("manifest data is not valid JSON")
    return _checked(files)


def compact(files):
    """{name: Entry} from a manifest already parsed into dicts; ProtocolError when malformed."""
    if not isinstance(files, dict) or not all(isinstance(e, dict) and "sha256" in e
                                              for e in files.values()):
        raise ProtocolError("not a manifest: an object of file entries expected")
    return _checked(dict((name, _entry(fields)) for name, fields in files.items()))


def diff(sender, local, full, items=()):
    """What a receiver needs, from two manifests {name: Entry}.

    Returns sorted lists (need_data, need_meta, delete):
    - need_data: names the receiver lacks or holds with another SHA-256;
    - need_meta: same SHA-256, mtimes differ by more than MTIME_SLACK_NS, in an item whose
      mtime is data (agent-info keepalives; `items` tells which, by path: never by the
      item a peer names);
    - delete: receiver names the sender does not have, only when `full` is true, i.e. the
      sender's manifest covers all of its own items. The caller passes as `local` only files
      the sender is the source of: on the master, the agent-info files of the agents that
      this client reports (other clients' agents share the folder).
    Pure; names are not checked here (the Receiver does that when applying).
    """
    need_data, need_meta = [], []
    for name, theirs in sender.items():
        mine = local.get(name)
        if mine is None or mine.sha256 is None or mine.sha256 != theirs.sha256:
            need_data.append(name)
            continue
        if abs((mine.mtime_ns or 0) - (theirs.mtime_ns or 0)) <= MTIME_SLACK_NS:
            continue
        item = owner(name.split("/"), items)[0]
        if item is not None and item.mtime_is_data:
            need_meta.append(name)
    delete = [name for name in local if name not in sender] if full else []
    return sorted(need_data), sorted(need_meta), sorted(delete)
