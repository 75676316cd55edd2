"""Keepalives as metadata only, end to end (SPEC section 4; issue 11, "cheap keepalives").

A keepalive touches an agent-info file on a client: same content, new mtime. It travels as a
meta-only update (name, checksum, mtime). The master applies it without reading the file when
the internal daemon's record proves the content: the recorded checksum is the announced one
and the file's stat is still the recorded one (size, mtime, inode, ctime: the ctime moves with
every write and cannot be set). Otherwise the receiver reads and hashes the file as before.
Then the internal daemon learns the file's new stat, so its next pass does not hash it again.

Here: wazuh-clusterd's side of both conversations with the internal daemon ("fingerprints"
before a batch, "received" after it, which also carries the agents the batch reported), in
requests well under localsock.MAX_MESSAGE. A usual batch's "received" refers to the names
its "fingerprints" asked by that answer's ticket and their indexes (catalog._asked_names):
the names travel and are parsed once. The link is shared by the sessions' threads, so other
requests come between the two; a ticket is taken once, the internal daemon keeps the last
few, and a "received" it refuses for its reference (nothing of it is taken then) is sent
again with the names.
"""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import itertools
import operator

from wazuh_cluster import compat, pathrules, scanner, staterows, text
from wazuh_cluster.errors import ProtocolError, RequestError

# A client's keepalive batch (sync.BATCH_FILES = 2 000 agent-info files) asks once and tells
# once: 2 000 names of 40 characters cost 2 * 40 + ROW_COST each (an upper bound of their
# JSON: a plain name writes in at most twice its length), 472 KiB, and their agent rows
# 2 * (30 + 8) + AGENT_ROW_COST, 211 KiB. Under localsock.MAX_MESSAGE (1 MiB) either way.
# The "fingerprints" answer is scanner.FINGERPRINT bytes per name after the reply.
REQUEST_BYTES = 768 << 10
ROW_COST = 160  # JSON of a row's numbers, checksum and punctuation, beyond its name
AGENT_ROW_COST = 32  # an agent row's mtime and punctuation, beyond its two names


_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_NAME, _META_ONLY = operator.attrgetter("name"), operator.attrgetter("meta_only")
_STR = set([str])
# the keys in the order given (a dict keeps it from 3.6 on)
_ONCE_EACH = collections.OrderedDict.fromkeys if compat.PY2 else dict.fromkeys
_PLAIN_BYTES = bytes(bytearray(range(0x20, 0x7f))).replace(b"\\", b"")
_INTEGERS = frozenset(compat.integer_types)  # exact types: True is no ticket


def _plain(names):
    """The plain names among these (staterows.is_plain) as a list. The peer chose them, and
    only plain ones are asked about (every valid name is): a batch's 2 000 names are
    checked as a whole first, each only when some is not plain."""
    names = list(names)
    if text.FAST_TEXT and names and set(map(type, names)) == _STR and \
            max(map(len, names)) <= pathrules.MAX_PATH:
        joined = u"".join(names)
        # printable ASCII without a backslash: nothing left once those bytes are deleted
        if joined.isascii() and not joined.encode("ascii").translate(None, _PLAIN_BYTES):
            return names
    return [name for name in names if staterows.is_plain(name)]


def _chunks(rows, cost_of, total):
    """Lists of rows whose JSON stays under REQUEST_BYTES: all at once when their summed
    bound `total` does (a usual batch), else cut row by row."""
    if total <= REQUEST_BYTES:
        if rows:
            yield rows
        return
    chunk, size = [], 0
    for row in rows:
        cost = cost_of(row)
        if chunk and size + cost > REQUEST_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += cost
    if chunk:
        yield chunk


def _name_cost(name):
    return 2 * len(name) + ROW_COST


def _row_cost(row):
    return _name_cost(row[0])


def _agent_cost(row):
    return 2 * (len(row[0]) + len(row[1])) + AGENT_ROW_COST


def _told_bound(learned, agents):
    """A bound of the JSON of "received" requests of these rows (their names sent)."""
    return 2 * sum(map(len, map(_FIRST, learned))) + ROW_COST * len(learned) + \
        2 * sum(len(row[0]) + len(row[1]) for row in agents) + AGENT_ROW_COST * len(agents)


def _told(learned, agents, node):
    """"received" requests of the learned rows and the agent rows, each under REQUEST_BYTES:
    one request for a usual keepalive batch."""
    if _told_bound(learned, agents) <= REQUEST_BYTES:
        if learned or agents:
            yield _received(learned, agents, node)
        return
    parts, size = ([], []), 0
    for index, rows, cost_of in ((0, learned, _row_cost), (1, agents, _agent_cost)):
        for row in rows:
            cost = cost_of(row)
            if size and size + cost > REQUEST_BYTES:
                yield _received(parts[0], parts[1], node)
                parts, size = ([], []), 0
            parts[index].append(row)
            size += cost
    if size:
        yield _received(parts[0], parts[1], node)


def _received(learned, agents, node):
    """A "received" request (catalog): the learned rows as names and base64 of their
    scanner.FINGERPRINT records (Receiver.apply_batch's rows: packed where they are made),
    and the agents."""
    request = {}
    if learned:
        request["names"] = list(map(_FIRST, learned))
        request["records"] = binascii.b2a_base64(b"".join(
            row[1] for row in learned)).decode("ascii")
        if node is not None:
            request["node"] = node
    if agents:
        request["agents"] = agents
    return request


_NO_RECORD = scanner.FINGERPRINT.unpack(scanner.NO_FINGERPRINT)
# 3.x: one C call unpacks every record of an answer, and gives a digest's hex as text
if hasattr(scanner.FINGERPRINT, "iter_unpack"):
    _records = scanner.FINGERPRINT.iter_unpack
    _hex = bytes.hex
else:  # 2.7
    def _records(data):
        unpack, size = scanner.FINGERPRINT.unpack_from, scanner.FINGERPRINT.size
        return [unpack(data, at) for at in range(0, len(data), size)]
    _hex = binascii.hexlify


class Known(dict):
    """What records() found: {name: (size, mtime_ns, ino, ctime_ns, sha256)}; and when the
    internal daemon answered all the names in one request, the ticket of that answer and
    the names in the order asked, for tell() to refer to."""
    __slots__ = ("ticket", "asked")

    def __init__(self):
        dict.__init__(self)
        self.ticket = None
        self.asked = ()


def records(link, incoming):
    """{name: (size, mtime_ns, ino, ctime_ns, sha256)} the internal daemon holds for the
    meta-only files of a batch (receive.Incoming), for Receiver.apply_batch(known=...).

    The names are the peer's: only plain ones are asked about (no valid name is otherwise;
    the receiver refuses the rest). Without an answer (the internal daemon restarting) the
    files are simply read and hashed; an answer of the wrong size is no answer.
    """
    # each once, in the batch's order: "received" refers to them all at once when every
    # one was set in place (_by_ticket)
    names = _plain(_ONCE_EACH(itertools.compress(map(_NAME, incoming),
                                                 map(_META_ONLY, incoming))))
    known = Known()
    size = scanner.FINGERPRINT.size
    try:
        chunks = list(_chunks(names, _name_cost,
                              2 * sum(map(len, names)) + ROW_COST * len(names)))
        for chunk in chunks:
            result, data = link.call_data("fingerprints", {"names": chunk})
            if data is None or len(data) != size * len(chunk):
                raise ProtocolError("a fingerprints answer of %s bytes for %d names"
                                    % (None if data is None else len(data), len(chunk)))
            for name, record in zip(chunk, _records(data)):
                if record != _NO_RECORD:
                    known[name] = (record[0], record[1], record[2], record[3],
                                   _hex(record[5]))
            ticket = result.get("ticket") if isinstance(result, dict) else None
            if len(chunks) == 1 and type(ticket) in _INTEGERS:
                known.ticket, known.asked = ticket, chunk
    except (RequestError, ProtocolError):
        pass
    return known


def _by_ticket(learned, agents, node, known):
    """The "received" request of a usual batch (one "fingerprints" request, one "received")
    referring to the names asked by their ticket and indexes (catalog): no name sent
    twice; with no file learned but agent rows to tell, it gives the ticket back (the
    internal daemon would keep its names until ASKED_KEPT later ones). None when it cannot:
    no ticket, nothing to tell, a learned name not asked, a batch cut in several requests."""
    ticket = getattr(known, "ticket", None)
    if ticket is None or not (learned or agents) or \
            _told_bound(learned, agents) > REQUEST_BYTES:
        return None
    asked, told = known.asked, list(map(_FIRST, learned))
    # a keepalive batch set in place whole: the names asked, in their order
    at = list(range(len(asked))) if told == asked else \
        list(map(dict(zip(asked, range(len(asked)))).get, told))
    if None in at:
        return None
    request = {"ticket": ticket, "of": len(asked), "at": at, "records": binascii.b2a_base64(
        b"".join(map(_SECOND, learned))).decode("ascii")}
    if node is not None and learned:
        request["node"] = node
    if agents:
        request["agents"] = agents
    return request


def tell(link, learned, agents=(), node=None, known=None):
    """Tell the internal daemon the fingerprints Receiver.apply_batch(learned=...) gathered,
    and the [agent-info base name, node, mtime_ns?] rows of the agents a client's batch
    reported (catalog "agent_nodes"), in the same requests. `node`: the peer whose batch
    it was, on a master: the learned agent-info files are its reports too (their rows are
    not in `agents`; Inbox.agent_rows).

    Untold fingerprints (the internal daemon restarting) only make its next pass hash the
    files; agent rows raise RequestError as agent_nodes would.

    With `known` (records()'s answer for this batch), the names are referred to by its
    ticket; when the internal daemon refuses that (the ticket is no longer kept, or it is
    an older daemon: nothing is taken then), they are sent.
    """
    request = _by_ticket(learned, agents, node, known)
    if request is not None:
        try:
            link.call("received", request)
            return
        except RequestError as err:
            if err.code != "bad_request":
                if agents or node is not None:
                    raise
                return
    for request in _told(learned, agents, node):
        try:
            link.call("received", request)
        except RequestError:
            if request.get("agents") or request.get("node") is not None:
                raise
