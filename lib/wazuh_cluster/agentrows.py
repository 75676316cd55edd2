"""The agent listing on the wire (cluster_control -a): rows as raw bytes, not 100 000 dicts.

A row is [id, name, ip, status, node_name, last_keepalive] (COLUMNS) in JSON. The internal
daemon answers "agents" with {"count": n, "rows_in_chunks": true, "columns"} (streamed) and the
rows in localsock chunks after the reply: each chunk is ROWS_PER_CHUNK rows (the last fewer)
separated by commas, without brackets. wazuh-clusterd relays each chunk to cluster_control as
it arrives, never parsed; cluster_control decodes each chunk while the next is being made
(decode_chunk). Neither daemon holds more than a few chunks (building every row as a dict and
one JSON string of them kept +160 MB on 3.x, +335 MB on 2.7, in the internal daemon after one
listing of 100 000 agents).

A request with {"keepalives": false} gets null for every last_keepalive (keepalives()): the
text table shows none, and the float of each cost the internal daemon a fifth of a listing
and cluster_control part of its decoding. Older daemons ignore the argument.

Between nodes (a client asking its master, one peer message) the rows travel as before, as one
JSON array in the message's data after {"count", "rows_in_data": true, "columns"} (result,
joined), which older nodes send and read too.
"""
from __future__ import absolute_import, division, print_function

import json

from wazuh_cluster import compat
from wazuh_cluster.errors import ProtocolError

COLUMNS = ("id", "name", "ip", "status", "node_name", "last_keepalive")
ROWS_PER_CHUNK = 1000
# What a cell of a chunk may be: no list or object (one would be indented over lines in -j).
CELL_TYPES = frozenset(compat.string_types + compat.integer_types + (float, bool, type(None)))


def keepalives(args):
    """Whether an "agents" request (its args; a peer's too) wants each agent's last_keepalive:
    all but {"keepalives": false}, which gets null instead (cluster_control's text table
    shows none, -i only counts)."""
    return not (isinstance(args, dict) and args.get("keepalives") is False)


def result(count):
    """The reply's result that announces `count` rows after it, as one JSON array."""
    return {"count": count, "rows_in_data": True, "columns": list(COLUMNS)}


def streamed(count, source=None):
    """The reply's result that announces `count` rows in chunks after it; `source`: the
    master whose rows a client relays (cluster_control names it when they are bad)."""
    result = {"count": count, "rows_in_chunks": True, "columns": list(COLUMNS)}
    if source is not None:
        result["source"] = source
    return result


def joined(chunks):
    """The rows of streamed chunks as one JSON array (bytes)."""
    return b"[" + b",".join(chunks) + b"]"


def from_chunks(chunks, each=None, count=None):
    """The rows of a streamed answer, decoded a chunk at a time as they arrive; each(rows)
    is called with every chunk's rows meanwhile. ProtocolError for a bad chunk, and for
    other than `count` rows when it is a number (the announced count: on a client the
    master's, so more rows than announced stop an endless stream early)."""
    rows = []
    counted = isinstance(count, compat.integer_types) and not isinstance(count, bool)
    for chunk in chunks:
        part = decode_chunk(chunk)
        if counted and len(rows) + len(part) > count:
            raise ProtocolError("more rows than the %d announced" % count)
        if each is not None:
            each(part)
        rows.extend(part)
    if counted and len(rows) != count:
        raise ProtocolError("%d rows, %d announced" % (len(rows), count))
    return rows


def decode_chunk(chunk):
    """The rows of one chunk; ProtocolError unless it is rows of len(COLUMNS) values
    (CELL_TYPES), one row at least."""
    try:
        rows = json.loads(compat.to_text(b"[" + chunk + b"]"))
    except ValueError:  # UnicodeDecodeError too
        raise ProtocolError("a chunk of agent rows is not JSON")
    if not all_rows(rows, len(COLUMNS)) or not rows:
        raise ProtocolError("a chunk of agent rows holds something else than rows of %d "
                            "values" % len(COLUMNS))
    for k, column in enumerate(zip(*rows)):
        if not set(map(type, column)) <= CELL_TYPES:  # in C: no Python step per cell
            raise ProtocolError("a value of column '%s' is a list or an object" % COLUMNS[k])
    return rows


def decode(result, data):
    """[[id, name, ip, status, node_name, last_keepalive]] from an "agents" answer: the rows
    after it, or an "agents" list of objects (older daemons). ProtocolError when the rows are
    malformed; a row of another length is left out."""
    if not (isinstance(result, dict) and result.get("rows_in_data")):
        agents = result.get("agents") if isinstance(result, dict) else None
        return [[a.get(k) for k in COLUMNS] for a in agents or [] if isinstance(a, dict)]
    try:
        rows = json.loads(compat.to_text(data or b"[]"))
    except ValueError:
        raise ProtocolError("the agent rows are not JSON")
    if not isinstance(rows, list):
        raise ProtocolError("the agent rows are not a list")
    if all_rows(rows, len(COLUMNS)):
        return rows
    return [row for row in rows if isinstance(row, list) and len(row) == len(COLUMNS)]


def all_rows(rows, width):
    """True when `rows` is a list of lists of `width` items each (checked in C: the map()
    calls take no Python step per row, which a filter of 100 000 rows did, twice)."""
    return isinstance(rows, list) and set(map(type, rows)) <= {list} and \
        set(map(len, rows)) <= {width}
