"""The agent listing on the wire (cluster_control -a): rows as raw bytes, not 100 000 dicts.

The internal daemon answers "agents" with {"count": n, "rows_in_data": true} and, after the
reply (localsock's "data" frame, a peer message's data), one JSON array of rows, each
[id, name, ip, status, node_name, last_keepalive] (COLUMNS). wazuh-clusterd relays those bytes
as they are; only cluster_control turns them into objects. The daemon (agentlist) encodes
ROWS_PER_CHUNK rows at a time, so the answer costs the bytes themselves and leaves no lasting
growth behind (building every row as a dict and one JSON string of them kept +160 MB on 3.x,
+335 MB on 2.7, in the internal daemon after one listing of 100 000 agents).
"""
from __future__ import absolute_import, division, print_function

import json

from wazuh_cluster import compat
from wazuh_cluster.errors import ProtocolError

COLUMNS = ("id", "name", "ip", "status", "node_name", "last_keepalive")
ROWS_PER_CHUNK = 1000


def result(count):
    """The reply's result that announces `count` rows after it."""
    return {"count": count, "rows_in_data": True, "columns": list(COLUMNS)}


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
