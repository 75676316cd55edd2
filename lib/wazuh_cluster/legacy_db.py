"""Wazuh 3.0's text commands on queue/ossec/cluster_db (SPEC section 11), over our database.

Plan. The 3.0 framework (get_file_status_json behind the API's /cluster/files, and
`cluster_control.py -l`) and 3.0's tools talk to the internal daemon's socket in ASCII:

    count NODE                      -> the number of rows of NODE, e.g. "42"
    select NODE LIMIT OFFSET        -> " " then "FILE*STATUS " per row (sorted by file)
    insert NODE FILE [NODE FILE..]  -> rows that do not exist yet are added, pending
    update1 FILE [FILE..]           -> every node's row of FILE becomes pending
    update2 STATUS NODE FILE [..]   -> existing rows take STATUS (no row is added)
    delete1 FILE [FILE..]           -> the rows of FILE are forgotten
    clear                           -> every row becomes pending
Every reply is exactly REPLY_BYTES (10000) bytes, NUL padded: 3.0's clients read each answer
with one recv(10000) and drop the NULs. Accepted writes answer "Command OK" (SPEC 11; 3.0's own
C daemon only wrote it for `clear` and answered its other writes with 10000 NULs, which its
clients never read). Arguments are separated by spaces; like 3.0's strtok() several spaces count
as one, so 3.0's "clear " (with its trailing space) is a clear.

How 3.0 delimits commands on the stream: it does not. Its daemon took each recv() of up to
1 000 000 bytes as one command, and its clients work in lock step (send one command, read its
10000-byte reply, send the next). localsock.Connection does the same, a little more robustly:
a command is everything the client sent up to the moment nothing more is waiting (one burst);
the next command is read only once the reply has left (internal.py), and a command longer than
MAX_COMMAND gets an empty reply and the connection closes (nothing would resynchronise it).

Malformed commands (unknown word, wrong number of arguments, a NODE that is not an address or
host name, a FILE without its leading "/" or outside SPEC 4's name rules, a STATUS that is not
one of ours, LIMIT/OFFSET that are not whole numbers, any byte outside printable ASCII) get the
empty reply (10000 NULs, what 3.0 answered to a command it did not know) and change nothing.

Keys. NODE is the peer's address as listed in <nodes> (3.0 keyed its rows by address); our rows
are keyed by node name. The peers table holds the address each peer was last seen at
(wazuh-clusterd records it with peer_seen when a session starts); NODE maps to the most recently
seen peer whose address is NODE itself or, when NODE is one of the <nodes> entries, one of the
addresses it resolves to (cached for RESOLVE_TTL seconds). A NODE that maps to no peer has no
rows: count is 0, select is empty, writes about it are skipped. FILE is our name with a leading
"/" ("/etc/client.keys").

Meaning of the writes here: rows are a cache of outcomes, so "pending" means "send it again":
files made pending are announced to wazuh-clusterd as changed (a change event; it sends them
again to its peers), `clear` asks for a full integrity round with every peer (an overflow
event), and `delete1` also schedules a rescan (a deletion on disk is found and propagated).
A select page that does not fit in 10000 bytes is cut after the last whole row (3.0 overflowed
its buffer); a warning says so, once and then every 100th time.
"""
from __future__ import absolute_import, division, print_function

import re

from wazuh_cluster import compat, config, db as db_mod, pathrules
from wazuh_cluster.errors import PathRefused

REPLY_BYTES = 10000
MAX_COMMAND = 1 << 20
EMPTY = b"\0" * REPLY_BYTES
COMMAND_OK = "Command OK"
RESOLVE_TTL = 60.0
# More names than this in one event become a full round (a frame of megabytes helps nobody).
MAX_EVENT_NAMES = 5000
_PRINTABLE = re.compile(b"\\A[\\x20-\\x7e]*\\Z")


class Malformed(Exception):
    """The command is not one we answer; args[0] says why."""


def is_text_start(first):
    """True when the first byte of a connection starts a 3.0 text command (an ASCII letter)."""
    return first[:1].isalpha() and first[:1] < b"\x80"


def pad(text):
    """The 10000-byte reply holding `text` (ASCII), NUL padded."""
    data = compat.to_bytes(text)[:REPLY_BYTES]
    return data + b"\0" * (REPLY_BYTES - len(data))


class NodeAddresses(object):
    """NODE (an address as listed in <nodes>) -> the name of the peer seen there, or None.

    `nodes` are the <nodes> entries; `db` has peers(); `resolver(host)` returns addresses
    (config.resolve); `clock` monotonic seconds for the resolution cache.
    """

    def __init__(self, nodes, db, resolver=config.resolve, clock=compat.monotonic):
        self.nodes = frozenset(nodes)
        self.db = db
        self.resolver = resolver
        self.clock = clock
        self._resolved = {}   # entry -> (when, addresses)

    def name_of(self, node):
        """The node name behind address `node`, or None when no peer was seen there."""
        addresses = set([node])
        if node in self.nodes:
            addresses.update(self._resolve(node))
        seen = [(p["last_seen"], p["node"]) for p in self.db.peers()
                if p.get("address") in addresses]
        return max(seen)[1] if seen else None

    def _resolve(self, entry):
        now = self.clock()
        cached = self._resolved.get(entry)
        if cached is None or now - cached[0] > RESOLVE_TTL:
            cached = (now, tuple(self.resolver(entry)))
            self._resolved[entry] = cached
        return cached[1]


class LegacyCommands(object):
    """Answers one 3.0 text command: answer(command bytes) -> (10000-byte reply, event or None).

    The event, when there is one, is for wazuh-clusterd's subscription (see the module doc).
    `catalog` is the internal daemon's catalog.Catalog (for "rescan"); `log` a logging.Logger.
    """

    def __init__(self, db, addresses, catalog, log):
        self.db = db
        self.addresses = addresses
        self.catalog = catalog
        self.log = log
        self.cut_pages = 0
        self._commands = {
            "count": self._count,
            "select": self._select,
            "insert": self._insert,
            "update1": self._update1,
            "update2": self._update2,
            "delete1": self._delete1,
            "clear": self._clear,
        }

    def answer(self, command):
        """(reply bytes, event or None) for one command; malformed ones change nothing."""
        try:
            words = _words(command)
            func = self._commands.get(words[0]) if words else None
            if func is None:
                raise Malformed("unknown command")
            return func(words[1:])
        except Malformed as exc:
            self.log.debug("Wazuh 3.0 command on cluster_db refused (%s): %s", exc.args[0],
                           pathrules.escape(command, 80))
            return EMPTY, None
        except db_mod.Error as exc:
            self.log.error("cluster database error in a Wazuh 3.0 command: %s", exc)
            return EMPTY, None

    # -- reads --------------------------------------------------------------------------------

    def _count(self, args):
        _arity(args, 1, 1)
        name = self.addresses.name_of(_node(args[0]))
        return pad(str(self.db.count_states(name) if name else 0)), None

    def _select(self, args):
        _arity(args, 3, 3)
        node, limit, offset = _node(args[0]), _number(args[1]), _number(args[2])
        name = self.addresses.name_of(node)
        rows = self.db.states_page(name, limit, offset) if name else []
        out = [b" "]
        used = 1
        for index, (file_name, state) in enumerate(rows):
            row = compat.to_bytes("/%s*%s " % (file_name, state))
            if used + len(row) > REPLY_BYTES:
                self._cut(node, len(rows) - index, len(rows))
                break
            out.append(row)
            used += len(row)
        return pad(b"".join(out)), None

    def _cut(self, node, left_out, total):
        self.cut_pages += 1
        if self.cut_pages == 1 or self.cut_pages % 100 == 0:
            self.log.warning("Wazuh 3.0 select of %s: %d of %d rows do not fit in one 10000-"
                             "byte reply and were left out (%d page(s) cut so far); ask for "
                             "fewer rows at a time", pathrules.escape(node, 80), left_out,
                             total, self.cut_pages)

    # -- writes -------------------------------------------------------------------------------

    def _insert(self, args):
        _arity(args, 2, None, 2)
        pairs = [(_node(args[i]), _file(args[i + 1])) for i in range(0, len(args), 2)]
        names = self._map(node for node, _name in pairs)
        rows = [(names[node], name) for node, name in pairs if names[node]]
        self.db.add_pending(rows)
        return pad(COMMAND_OK), _changed(name for _node_name, name in rows)

    def _update1(self, args):
        _arity(args, 1, None)
        names = [_file(arg) for arg in args]
        self.db.reset_states(names)
        return pad(COMMAND_OK), _changed(names)

    def _update2(self, args):
        _arity(args, 3, None, 3)
        triples = [(_state(args[i]), _node(args[i + 1]), _file(args[i + 2]))
                   for i in range(0, len(args), 3)]
        names = self._map(node for _state, node, _name in triples)
        rows = [(names[node], name, state) for state, node, name in triples if names[node]]
        self.db.update_states(rows)
        return pad(COMMAND_OK), _changed(name for _n, name, state in rows if state == "pending")

    def _delete1(self, args):
        _arity(args, 1, None)
        self.db.forget_states([_file(arg) for arg in args])
        self.catalog.handle("rescan", {})
        return pad(COMMAND_OK), None

    def _clear(self, args):
        _arity(args, 0, 0)
        self.db.reset_states(None)
        return pad(COMMAND_OK), _full_round()

    def _map(self, nodes):
        """{address: node name or None} for the addresses of one command (rows of an
        address that maps to no peer are skipped)."""
        return dict((node, self.addresses.name_of(node)) for node in set(nodes))


# -- parsing (pure) ---------------------------------------------------------------------------

def _words(command):
    """The command's words (text); Malformed when it is not printable ASCII."""
    command = command.rstrip(b"\0")  # a C client may send its string's terminator
    if not _PRINTABLE.match(command):
        raise Malformed("not printable ASCII")
    return [w for w in command.decode("ascii").split(" ") if w]


def _arity(args, least, most, step=1):
    if len(args) < least or (most is not None and len(args) > most) or len(args) % step:
        raise Malformed("wrong number of arguments")


def _node(text):
    try:
        return config.to_host(text)
    except ValueError:
        raise Malformed("NODE is not an address or a host name")


def _file(text):
    if not text.startswith("/"):
        raise Malformed("FILE must start with '/'")
    try:
        pathrules.check_name(text[1:])
    except PathRefused:
        raise Malformed("FILE is not a valid cluster file name")
    return text[1:]


def _state(text):
    if text not in db_mod.STATES:
        raise Malformed("STATUS must be one of %s" % ", ".join(db_mod.STATES))
    return text


def _number(text):
    # 3.0's own client asks for offsets such as "0100" (it appends to its query): a whole
    # number with leading zeros is that number, as SQLite read it.
    if not text.isdigit() or len(text) > 18:
        raise Malformed("LIMIT and OFFSET must be whole numbers")
    return int(text)


# -- events for wazuh-clusterd (the shape of catalog.Catalog.tick's) -------------------------

def _changed(names):
    names = sorted(set(names))
    if not names:
        return None
    if len(names) > MAX_EVENT_NAMES:
        return _full_round()
    return {"event": "changes", "changed": names, "touched": [], "deleted": [],
            "deleted_dirs": []}


def _full_round():
    return {"event": "changes", "overflow": True, "changed": [], "touched": [], "deleted": [],
            "deleted_dirs": []}
