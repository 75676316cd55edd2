"""The [node, file, state] rows wazuh-clusterd stores through set_states, whatever a peer sent.

A peer chooses the names of its batches (the receiver records those it refuses as "invalid")
and the names in its answers. Stored as they are, a 1 MiB name made the set_states request
larger than the internal daemon takes (localsock.MAX_MESSAGE: "internal_unavailable"), and a
million refused names grew var/db/cluster.db. So:

- a name that is not plain (printable ASCII without backslash, at most pathrules.MAX_PATH
  characters) is stored escaped and cut (text.printable, NAME_LIMIT characters). Every valid
  name is plain, so it is stored as it is; an escaped name holds a backslash, which no valid
  name has (a cut one ends in "...(N characters)": it could only meet a valid name spelled
  so, in the rows of the same peer);
- a batch sends at most db.MAX_INVALID_PER_NODE "invalid" rows (the database keeps no more
  per node anyway, the oldest going first);
- rows travel in requests of at most REQUEST_BYTES of JSON, far below MAX_MESSAGE.
"""
from __future__ import absolute_import, division, print_function

from wazuh_cluster import compat, db, pathrules, text

NAME_LIMIT = 256
REQUEST_BYTES = 256 << 10
STATES = db.STATES


def is_plain(name):
    """True for text of printable ASCII without backslash, at most pathrules.MAX_PATH long:
    every valid name is, and JSON writes it in at most twice its length."""
    if text.FAST_TEXT and type(name) is compat.text_type:  # a keepalive batch asks 2 000 times
        return len(name) <= pathrules.MAX_PATH and name.isascii() and name.isprintable() and \
            u"\\" not in name
    return isinstance(name, compat.string_types) and len(name) <= pathrules.MAX_PATH and \
        text.is_printable(name) and u"\\" not in compat.to_text(name, errors="replace")


def stored_name(name):
    """`name` as the states table holds it (see the module doc)."""
    return compat.to_text(name) if is_plain(name) else text.printable(name, NAME_LIMIT)


def rows(node, states):
    """[node, stored name, state] rows of {name: state}; unknown states are left out, and
    "invalid" rows beyond db.MAX_INVALID_PER_NODE (the database would drop them)."""
    out = []
    invalid = 0
    for name in sorted(states, key=_order):
        state = states[name]
        if state not in STATES:
            continue
        if state == "invalid":
            invalid += 1
            if invalid > db.MAX_INVALID_PER_NODE:
                continue
        out.append([node, stored_name(name), state])
    return out


def _order(name):
    return (0, name) if isinstance(name, compat.string_types) else (1, repr(name))


def requests(all_rows, budget=REQUEST_BYTES):
    """Arguments {"rows": [...]} of at most `budget` bytes of JSON each (set_states, and
    agent_nodes: rows of plain text values and integers).

    Stored names and node names are printable ASCII, which JSON writes in at most twice
    their length (a quote or backslash gains one backslash).
    """
    chunk, size = [], 0
    for row in all_rows:
        cost = 2 * sum(len(v) if isinstance(v, compat.string_types) else 20 for v in row) + 12
        if chunk and size + cost > budget:
            yield {"rows": chunk}
            chunk, size = [], 0
        chunk.append(row)
        size += cost
    if chunk:
        yield {"rows": chunk}
