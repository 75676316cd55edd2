"""cluster_control: the command line of the cluster (SPEC section 6).

It reads the configuration, then talks to the local wazuh-clusterd over
queue/ossec/cluster_control; on a client, wazuh-clusterd asks the master for the cluster-wide
views (nodes, agents, health). Exit status: 0 on success; 1 with one line on stderr when
something is wrong (daemon not running, cluster disabled, master unreachable, unknown node,
nothing held, configuration error); 2 for a usage error (argparse).

JSON output (-j): one object per command, always with these keys (values from the daemon;
a key the daemon did not send is null, a count it did not send is 0). Times are epoch seconds
(float) or null; "ago" values are seconds (float) or null.

  -l  {"files":  [{"node": str, "file": str, "status": str}]}
          status: "pending" | "synchronized" | "failed" | "invalid"
  -a  {"agents": [{"id": str, "name": str, "ip": str, "status": str,
                   "node_name": str|null, "last_keepalive": float|null}]}
          status: "Active" | "Pending" | "Disconnected" | "Never connected"
  -n  {"nodes":  [{"name": str, "type": "master"|"client"|null,
                   "status": "connected"|"disconnected", "address": str|null,
                   "version": str|null, "last_keepalive": float|null,
                   "connected_since": float|null}]}
  -i  {"nodes":  [{"node": str, "type": str|null, "connected": bool, "agents": int,
                   "pending": int, "failed": int, "invalid": int, "synchronized": int,
                   "last_sync_ago": float|null, "last_sync_ok": bool|null}],
       "held":   [{"node": str, "message": str, "since": float|null}]}
  With cluster.failover=1 (the daemon's failover status): -n adds "failover": true and
  per node "role": "master"|"acting master"|"client"|"candidate"|null and "term": int|null;
  -i adds "failover": {"role", "term", "leader", "preferred", "lease_remaining",
  "failovers": [{"time", "term", "leader"}], "last": [term, seq]} (this node's view) and
  "backups": [{"path": str, "file": str, "term": int, "time": float|null}] with
  "backups_more": int (unacknowledged backups of local edits on this node; also shown with
  failover off while any is left). With failover off and no backup, -n and -i are unchanged.
  --ack-backups [PATH...]  {"acknowledged": [str]}   backups recorded as acknowledged
  -p, -f  {"scheduled": [str]}        the peers told to push / to run a full round
  -s      {"scheduled": bool}
  --confirm-removals  {"removed": [str]}   names of the agents removed
  -V      {"version": str}

Everything the tables show may come from a peer (a node's version, a refused file name, an
agent's node_name, what the master relays to a client): text output escapes every character
that is not printable ASCII (text.printable: \\xNN), so no terminal escape or newline gets
through, and cuts a cell at CELL_LIMIT characters. -j stays exact: json.dumps writes every
such character as a \\u escape.
"""
from __future__ import absolute_import, division, print_function

import argparse
import collections
import errno
import json
import os
import socket
import sys
import time

from wazuh_cluster import (__version__, agentpages, agentrows, compat, config, localsock, paths,
                           text)
from wazuh_cluster.errors import ConfigError, ProtocolError, RequestError

PROG = "cluster_control"

# Error codes of the daemon's replies -> what the operator is told first.
CODE_TEXT = {
    "unreachable": "master unreachable",
    "unknown_node": "unknown node",
    "nothing_held": "nothing to confirm",
    "unknown_backup": "unknown backup",
    "timeout": "no answer",
}

# (key, default) of every row of a listing: the stable JSON shape documented above.
FILE_KEYS = (("node", None), ("file", None), ("status", None))
AGENT_KEYS = (("id", None), ("name", None), ("ip", None), ("status", None),
              ("node_name", None), ("last_keepalive", None))
NODE_KEYS = (("name", None), ("type", None), ("status", None), ("address", None),
             ("version", None), ("last_keepalive", None), ("connected_since", None))
HEALTH_KEYS = (("node", None), ("type", None), ("connected", False), ("agents", 0),
               ("pending", 0), ("failed", 0), ("invalid", 0), ("synchronized", 0),
               ("last_sync_ago", None), ("last_sync_ok", None))
HELD_KEYS = (("node", None), ("message", None), ("since", None))
ROLE_KEYS = (("role", None), ("term", None))
BACKUP_KEYS = (("path", None), ("file", None), ("term", None), ("time", None))
FAILOVER_KEYS = (("role", None), ("term", None), ("leader", None), ("preferred", None),
                 ("lease_remaining", None), ("failovers", []), ("last", None))
FAILOVER_EVENT_KEYS = (("time", None), ("term", None), ("leader", None))
# Failovers shown by -i (the newest; -j has them all).
SHOWN_FAILOVERS = 5
# Longest cell of a text table (a file name is at most 1024 characters).
CELL_LIMIT = 1024
# Lines of a table written at once (~0.5 MB of agents).
EMIT_LINES = 5000


class Failure(Exception):
    """Something the operator must be told in one line; main() returns 1."""


# -- formatting ------------------------------------------------------------------------------

def table(headers, rows):
    """Left-aligned columns two spaces apart, header first; no trailing blanks.

    Cells are escaped (cell_text) before the columns are measured, a column at a time
    (column_text).
    """
    return column_table(headers, list(zip(*rows)))


def column_table(headers, columns):
    """table() of the cells given a column at a time (a listing's rows transposed once, in C,
    instead of a tuple built per row)."""
    columns = [column_text(cells) for cells in columns] or [([], 0) for _ in headers]
    widths = [max(len(h), width) for h, (_, width) in zip(headers, columns)]
    # One %-format per line (cheaper than str.format), mapped in C: no Python step per row.
    line = u"  ".join(u"%%-%ds" % width for width in widths)
    rows = zip(*[cells for cells, _ in columns])
    return [(line % tuple(headers)).rstrip()] + list(map(compat.text_type.rstrip,
                                                         map(line.__mod__, rows)))


def column_text(cells):
    """(the cells as cell_text makes them, "-" for None; the longest one's length). A column
    of text that is all printable and short, as nearly every column is, is checked as one
    string: one search instead of a call per cell (0.6 s of the 1.6 s cluster_control took
    for 100 000 agents); any other column is escaped a cell at a time."""
    joined = _joined(cells)
    # Looked for only when the join failed: on 2.7 `None in cells` compares None with each
    # text cell the slow way (0.9 s of the 2 s cluster_control took for 100 000 agents).
    if joined is None and None in cells:
        cells = [u"-" if cell is None else cell for cell in cells]
        joined = _joined(cells)
    if joined is not None and text.is_printable(joined):
        width = max(map(len, cells)) if cells else 0
        if width <= CELL_LIMIT:
            return cells, width
    cells = [cell_text(cell) for cell in cells]
    return cells, max(map(len, cells)) if cells else 0


def _joined(cells):
    """The cells as one text, or None when one is no text (None, a number; on 2.7 a byte
    string that is not ASCII)."""
    try:
        return u"".join(cells)
    except (TypeError, UnicodeDecodeError):
        return None


def cell_text(value):
    """A value of the daemon's answer as printable text for a table."""
    if not isinstance(value, (compat.text_type, compat.binary_type)):
        value = compat.text_type(value)
    return text.printable(value, CELL_LIMIT)


def _number(value):
    return isinstance(value, compat.integer_types + (float,)) and not isinstance(value, bool)


def when(epoch):
    """Epoch seconds as local 'YYYY/MM/DD HH:MM:SS'; '-' for None, '?' for what is no time."""
    if epoch is None:
        return u"-"
    try:
        return compat.to_text(time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(epoch)))
    except (TypeError, ValueError, OverflowError, OSError):  # a master relayed nonsense
        return u"?"


def ago(seconds, ok=None):
    """'12 s ago' ('never' for None), with ' (failed)' when the round did not end clean."""
    if seconds is None:
        return u"never"
    if not _number(seconds) or seconds != seconds or abs(seconds) > 1e15:
        return u"?"
    return u"%d s ago%s" % (int(round(seconds)), u" (failed)" if ok is False else u"")


def yes_no(value):
    return u"yes" if value else u"no"


def pick(rows, keys):
    """Rows reduced to the documented keys (stable JSON, whatever else the daemon sends)."""
    return [collections.OrderedDict((k, row.get(k, d)) for k, d in keys)
            for row in (rows if isinstance(rows, list) else []) if isinstance(row, dict)]


def id_order(values):
    """Sort key of an agent row (Rows values): numeric IDs in numeric order, others after."""
    value = values[0] if isinstance(values[0], compat.string_types) else u""
    ascii_digits = value.isdigit() and text.is_printable(value)  # int(u"\xb2") fails
    return (0, int(value), value) if ascii_digits else (1, 0, value)


# -- per command: request, JSON shape, text ---------------------------------------------------

def shape_files(result):
    rows = pick(result.get("files"), FILE_KEYS)
    rows.sort(key=lambda r: (r["node"] or "", r["file"] or ""))
    return {"files": rows}


def text_files(data):
    return table(("Manager", "Filename", "Status"),
                 [(r["node"], r["file"], r["status"]) for r in data["files"]])


class Rows(object):
    """A listing's rows as value lists in the order of `keys`, for listings as long as the
    agents: the text table needs no object per row (a 2.7 OrderedDict costs ~30 us, 3 s for
    100 000 agents); JSON output (jsonable) turns them into objects."""

    def __init__(self, keys, values):
        self.keys = [k for k, _ in keys]
        self.values = values

    def as_dicts(self):
        return [collections.OrderedDict(zip(self.keys, v)) for v in self.values]


def json_text(data):
    """json.dumps(jsonable(data), indent=2, separators=(",", ": ")), the same text. A listing
    that is Rows alone (-a) is encoded a column at a time by json's C encoder (the indented
    encoder is pure Python: 1.5 s for 100 000 agents on 3.13, 6 s on 2.7)."""
    rows = list(data.values())[0] if len(data) == 1 else None
    if isinstance(rows, Rows) and rows.values:
        columns = [_json_cells(column) for column in zip(*rows.values)]
        if None not in columns:
            item = u"    {\n%s\n    }" % u",\n".join(u"      %s: %%s" % json.dumps(k)
                                                     for k in rows.keys)
            return u"{\n  %s: [\n%s\n  ]\n}" % (
                json.dumps(list(data)[0]), u",\n".join(item % cells for cells in zip(*columns)))
    return compat.to_text(json.dumps(jsonable(data), indent=2, separators=(",", ": ")))


_SCALARS = agentrows.CELL_TYPES


def _json_cells(column):
    """The JSON text of each value of a column, or None when one is no scalar (a container
    is indented over lines). One encoder call with a newline between items: ensure_ascii
    escapes every newline inside a value, so the split is exact."""
    if not set(map(type, column)) <= _SCALARS:
        return None
    return compat.to_text(json.dumps(list(column), separators=("\n", ":")))[1:-1].split(u"\n")


def jsonable(data):
    """`data` with its Rows as lists of objects (the documented JSON shape)."""
    if not any(isinstance(v, Rows) for v in data.values()):
        return data
    return dict((k, v.as_dicts() if isinstance(v, Rows) else v) for k, v in data.items())


def shape_agents(result):
    # Rows (lists in agentrows.COLUMNS order) after the reply, or objects from older daemons.
    rows = result.get("agents")
    width = len(AGENT_KEYS)
    if agentrows.all_rows(rows, width):
        values = rows  # agentrows.decode's rows: checked there, in C (no step per row here)
    else:
        values = [row if isinstance(row, list) else [row.get(k, d) for k, d in AGENT_KEYS]
                  for row in (rows if isinstance(rows, list) else [])
                  if isinstance(row, dict) or (isinstance(row, list) and len(row) == width)]
    sort_by_id(values)
    return {"agents": Rows(AGENT_KEYS, values)}


def ascii_numbers(ids):
    """The IDs as numbers when every one is ASCII digits (checked as one string), or None."""
    joined = _joined(ids)
    if joined is None:
        return None
    if joined.isdigit() and text.is_printable(joined) and u"" not in ids:
        return list(map(int, ids))
    return None


def sort_by_id(values):
    """Sort agent rows as id_order does; when every ID is ASCII digits (checked as one
    string), by a cheaper key that orders them the same."""
    ids = [v[0] for v in values]
    numbers = ascii_numbers(ids)
    if numbers is not None:
        if len(set(numbers)) == len(numbers) and numbers == sorted(numbers):
            return  # client.keys order is nearly always ID order already
        # Tuples made and compared in C; the position keeps the sort stable.
        order = sorted(zip(numbers, ids, range(len(ids))))
        values[:] = [values[i] for _, _, i in order]
    else:
        values.sort(key=id_order)


AGENT_HEADERS = ("ID", "IP", "Name", "Status", "Node name")
AGENT_COLUMNS = (0, 2, 1, 3, 4)  # of a row: id, name, ip, status, node, keepalive


def text_agents(data):
    columns = list(zip(*data["agents"].values))
    return column_table(AGENT_HEADERS, [columns[k] for k in AGENT_COLUMNS] if columns else [])


class AgentTable(object):
    """-a's text table made while the rows stream in (agentrows): each chunk's cells are
    escaped and measured a column at a time (column_text) as it arrives, while the daemons
    make the next; only the padding waits for the last chunk, when the widths are known.
    The same text as text_agents (then emit_printable: the cells are escaped already) as
    long as the IDs arrive in increasing numeric order, as client.keys nearly always has
    them; otherwise (`in_order` false) the caller sorts all the rows the old way."""

    def __init__(self):
        self.parts = []  # per chunk: its cells, a column at a time
        self.widths = [len(h) for h in AGENT_HEADERS]
        self.last = -1   # the greatest ID so far
        self.in_order = True
        self.used = False

    def add(self, rows):
        """Take one chunk of rows (lists in agentrows.COLUMNS order)."""
        self.used = True
        if not self.in_order or not rows:
            return
        numbers = ascii_numbers([row[0] for row in rows])
        if numbers is None or numbers[0] <= self.last or sorted(set(numbers)) != numbers:
            self.in_order, self.parts = False, []
            return
        self.last = numbers[-1]
        columns = list(zip(*rows))
        cells = []
        for k, index in enumerate(AGENT_COLUMNS):
            column, width = column_text(columns[index])
            cells.append(column)
            self.widths[k] = max(self.widths[k], width)
        self.parts.append(cells)

    def write(self, out):
        out.write((_line(self.widths) % AGENT_HEADERS).rstrip() + u"\n")
        while self.parts:
            out.write(padded_lines(self.parts.pop(0), self.widths))


def padded_lines(columns, widths):
    """The lines that `line % row` and rstrip make (AgentTable.write's header) of cells given
    a column at a time, as one text ending in a newline. On 3.x the cells of every column
    but the last are padded by str.ljust a column at a time, in C, and each line joined by
    "  ".join: a %-format per line cost twice as much. The last column needs no padding:
    rstrip would take it off again. 2.7 (where a cell may be a byte string, and a map of
    ljust cost more) keeps the %-format."""
    if compat.PY2:
        lines = map(_line(widths).__mod__, zip(*columns))
    else:
        padded = [list(map(str.ljust, cells, [width] * len(cells)))
                  for cells, width in zip(columns[:-1], widths)] + [columns[-1]]
        lines = map(u"  ".join, zip(*padded))
    return u"\n".join(map(compat.text_type.rstrip, lines)) + u"\n"


def _line(widths):
    """The %-format of a line of columns this wide."""
    return u"  ".join(u"%%-%ds" % width for width in widths)


def shape_nodes(result):
    if result.get("failover") is not True:
        return {"nodes": pick(result.get("nodes"), NODE_KEYS)}
    return {"nodes": pick(result.get("nodes"), NODE_KEYS + ROLE_KEYS), "failover": True}


def text_nodes(data):
    headers = ("Node", "Status", "Address", "Type", "Version", "Last keepalive")
    rows = [(n["name"], n["status"], n["address"], n["type"], n["version"],
             when(n["last_keepalive"])) for n in data["nodes"]]
    if data.get("failover"):
        headers += ("Role", "Term")
        rows = [row + (n["role"], n["term"]) for row, n in zip(rows, data["nodes"])]
    return table(headers, rows)


def shape_health(result):
    data = {"nodes": pick(result.get("nodes"), HEALTH_KEYS),
            "held": pick(result.get("held"), HELD_KEYS)}
    status = result.get("failover")
    if isinstance(status, dict) and status.get("failover") is True:
        data["failover"] = shape_failover(status)
    if "failover" in data or "backups" in result:
        data["backups"] = pick(result.get("backups"), BACKUP_KEYS)
        more = result.get("backups_more")
        data["backups_more"] = more if _number(more) else 0
    return data


def shape_failover(status):
    """The daemon's failover status reduced to the documented keys; a list that is no list
    becomes empty, so that a relayed oddity cannot break the view."""
    shaped = pick([status], FAILOVER_KEYS)[0]
    shaped["failovers"] = pick(shaped["failovers"], FAILOVER_EVENT_KEYS)
    return shaped


def text_failover(status):
    """-i's failover lines (values escaped by emit_printable)."""
    lease = status["lease_remaining"]
    lines = [u"Failover: this node is %s in term %s; leader: %s%s; preferred master: %s." % (
        shown(status["role"]), shown(status["term"]),
        u"none known" if status["leader"] is None else shown(status["leader"]),
        u" (lease %.1f s left)" % lease if _number(lease) and lease == lease else u"",
        shown(status["preferred"]))]
    events = status["failovers"]
    lines.append(u"Failovers: %d%s" % (len(events), u"" if not events else u", newest first:"))
    for event in list(reversed(events))[:SHOWN_FAILOVERS]:
        lines.append(u"  %s  term %s  leader %s" % (when(event["time"]), shown(event["term"]),
                                                   shown(event["leader"])))
    return lines


def shown(value):
    """A value of a status line: '-' for None, escaped and cut otherwise."""
    return u"-" if value is None else cell_text(value)


def text_backups(data):
    if not data["backups"]:
        return []
    lines = [u"WARNING: local edits replaced by the leader's files, kept as backups until "
             u"acknowledged ('%s --ack-backups [PATH...]'):" % PROG]
    lines.extend(table(("Backup", "Original file", "Term", "Time"),
                       [(b["path"], b["file"], b["term"], when(b["time"]))
                        for b in data["backups"]]))
    if data["backups_more"]:
        lines.append(u"... and %s more backups" % cell_text(data["backups_more"]))
    return lines


def text_health(data):
    lines = table(("Node", "Type", "Connected", "Last sync", "Pending", "Failed", "Invalid",
                   "Agents"),
                  [(n["node"], n["type"], yes_no(n["connected"]),
                    u"-" if n["type"] == "master" and n["last_sync_ago"] is None
                    else ago(n["last_sync_ago"], n["last_sync_ok"]),
                    n["pending"], n["failed"], n["invalid"], n["agents"])
                   for n in data["nodes"]])
    for held in data["held"]:
        lines.append(u"WARNING: %s: %s (held since %s; confirm with '%s --confirm-removals' "
                     u"on that node)" % (held["node"], held["message"], when(held["since"]),
                                         PROG))
    if "failover" in data:
        lines.extend(text_failover(data["failover"]))
    if "backups" in data:
        lines.extend(text_backups(data))
    return lines


def shape_scheduled(result):
    value = result.get("scheduled")
    return {"scheduled": sorted(value) if isinstance(value, list) else bool(value)}


def text_push(data):
    peers = data["scheduled"]
    return [u"Push scheduled to: %s." % u", ".join(peers) if peers
            else u"Push scheduled (no connected peer right now)."]


def text_force(data):
    peers = data["scheduled"]
    return [u"Full resync scheduled with: %s." % u", ".join(peers) if peers
            else u"Full resync scheduled (no connected peer right now)."]


def text_scan(data):
    return [u"Scan scheduled." if data["scheduled"] else u"Scan not scheduled."]


def shape_removed(result):
    removed = result.get("removed")
    return {"removed": list(removed) if isinstance(removed, list) else []}


def text_removed(data):
    names = data["removed"]
    return [u"Held agent removal confirmed: %d agent(s) removed%s" % (
        len(names), (u": " + u", ".join(names)) if names else u".")]


def shape_acked(result):
    acked = result.get("acknowledged")
    return {"acknowledged": list(acked) if isinstance(acked, list) else []}


def text_acked(data):
    return [u"Acknowledged %d backup(s); the files are kept." % len(data["acknowledged"])
            if data["acknowledged"] else u"No backup to acknowledge."]


def file_name(home, name):
    """A file as the cluster names it: relative to the installation, '/'-separated.

    Accepts 3.0's '/etc/client.keys' and absolute paths inside the installation too.
    """
    name = name.replace(os.sep, "/")
    prefix = home.rstrip("/") + "/"
    if name.startswith(prefix):
        name = name[len(prefix):]
    return name.lstrip("/")


Action = collections.namedtuple("Action", "dest command args shape text")

# The order is the order of precedence when argparse lets two through (it does not).
ACTIONS = (
    Action("files", "files",
           lambda o, home: {"nodes": o.managers,
                            "files": [file_name(home, f) for f in o.files] or None},
           shape_files, text_files),
    # The text table shows no keepalive: asked without them (agentrows.keepalives).
    Action("agents", "agents", lambda o, home: {} if o.json else {"keepalives": False},
           shape_agents, text_agents),
    Action("nodes", "nodes", lambda o, home: {"names": o.nodes or None}, shape_nodes,
           text_nodes),
    Action("health", "health", lambda o, home: {}, shape_health, text_health),
    Action("push", "push", lambda o, home: {}, shape_scheduled, text_push),
    Action("force", "force", lambda o, home: {"nodes": o.managers}, shape_scheduled,
           text_force),
    Action("scan", "scan", lambda o, home: {}, shape_scheduled, text_scan),
    Action("confirm_removals", "confirm_removals", lambda o, home: {}, shape_removed,
           text_removed),
    Action("ack_backups", "ack_backups", lambda o, home: {"paths": o.ack_backups or None},
           shape_acked, text_acked),
)


# -- command line ----------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Wazuh cluster control: ask the local wazuh-clusterd about the "
        "cluster, or tell it to push, resync or scan now.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-l", "--list-files", dest="files", nargs="*", metavar="FILE",
                       help="status of the cluster files (all, or these), per node")
    group.add_argument("-a", "--list-agents", dest="agents", action="store_true",
                       help="agents, their status and the node they report to")
    group.add_argument("-n", "--list-nodes", dest="nodes", nargs="*", metavar="NODE",
                       help="nodes of the cluster (all, or these)")
    group.add_argument("-i", "--health", dest="health", action="store_true",
                       help="per node: connected, last sync, pending/failed/invalid files, "
                       "agents; and any agent removal held back")
    group.add_argument("-p", "--push", dest="push", action="store_true",
                       help="push pending changes now")
    group.add_argument("-f", "--force", dest="force", action="store_true",
                       help="force a full resync now (with -m, with those nodes only)")
    group.add_argument("-s", "--scan", dest="scan", action="store_true",
                       help="scan the cluster files for changes now")
    group.add_argument("--confirm-removals", dest="confirm_removals", action="store_true",
                       help="apply an agent removal held back by the mass-removal guard")
    group.add_argument("--ack-backups", dest="ack_backups", nargs="*", metavar="PATH",
                       help="acknowledge backups of local edits listed by -i (all, or these); "
                       "the files are kept")
    group.add_argument("-V", "--version", dest="version", action="store_true",
                       help="print the version and exit")
    parser.add_argument("-m", "--manager", dest="managers", nargs="+", metavar="NODE",
                        help="restrict -l and -f to these nodes")
    parser.add_argument("-j", "--json", dest="json", action="store_true",
                        help="JSON output (shapes in the module documentation)")
    parser.add_argument("-D", dest="home", metavar="DIR",
                        help="installation directory (default: the one this script is in, "
                        "else DIRECTORY of /etc/ossec-init.conf, else /var/ossec)")
    return parser


def chosen_action(options):
    for action in ACTIONS:
        value = getattr(options, action.dest)
        if value is not None and value is not False:
            return action
    return None


def connect(path, timeout):
    """A localsock.Client already connected to wazuh-clusterd, or Failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    compat.set_cloexec(sock.fileno())
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except socket.error as err:
        sock.close()
        if err.args[0] in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            raise Failure("wazuh-clusterd is not running (no daemon at %s)" % path)
        if err.args[0] in (errno.EACCES, errno.EPERM):
            raise Failure("permission denied on %s: run as root or as a member of the ossec "
                          "group" % path)
        raise Failure("cannot connect to wazuh-clusterd at %s: %s" % (path, err.args[-1]))
    client = localsock.Client(path, timeout)
    client.sock = sock
    return client


def request(client, command, args, each=None):
    """The daemon's result; its errors (and a lost connection) become Failure. Agent rows
    after the reply are handed to each(rows) too as they are decoded, a chunk at a time."""
    try:
        result, chunks = client.call_chunks(command, args)
        if isinstance(result, dict) and result.get("rows_in_chunks"):
            source = result.get("source")  # a client's master (agentpages)
            try:
                rows = agentrows.from_chunks(chunks, each, result.get("count"))  # streamed
            except ProtocolError as err:
                if not isinstance(source, compat.string_types):
                    raise
                raise Failure(agentpages.bad_page(source, err.message))
            result = dict(result, agents=rows)
        elif chunks and isinstance(result, dict):
            rows = agentrows.decode(result, chunks[0])  # one array after the reply
            if each is not None:
                each(rows)
            result = dict(result, agents=rows)
    except ProtocolError as err:
        raise Failure("wazuh-clusterd sent a malformed answer to '%s': %s" % (command, err))
    except RequestError as err:
        if client.sock is None:
            # localsock.Client drops the socket only on local trouble, never on an error reply.
            if err.code == "timeout":
                raise Failure("wazuh-clusterd did not answer in %.0f s" % client.timeout)
            raise Failure("wazuh-clusterd closed the connection (is it stopping?)")
        label = CODE_TEXT.get(err.code)
        raise Failure("%s: %s" % (label, err.message) if label
                      else "%s (%s)" % (err.message, err.code))
    finally:
        client.close()
    if not isinstance(result, dict):
        raise Failure("wazuh-clusterd sent an unexpected answer to '%s'" % command)
    return result


def load_config(home):
    try:
        cfg = config.load(paths.Paths(home))
    except ConfigError as err:
        raise Failure("configuration error: %s" % err.message)
    if cfg.disabled:
        raise Failure("cluster is disabled in %s" % paths.Paths(home).ossec_conf)
    return cfg


def emit(lines, out):
    for line in lines:
        out.write(line + u"\n" if isinstance(line, compat.text_type)
                  else compat.to_text(line) + u"\n")


def run(options, script, out):
    """Carry out the parsed command line; returns the exit code or raises Failure."""
    if options.version:
        if options.json:
            emit([compat.to_text(json.dumps({"version": __version__}))], out)
        else:
            emit([u"%s (wazuh-cluster) %s" % (PROG, __version__)], out)
        return 0
    action = chosen_action(options)
    if action is None:
        raise Failure("nothing to do: give one of -l, -a, -n, -i, -p, -f, -s, "
                      "--confirm-removals, --ack-backups (see -h)")
    if options.managers is not None and action.dest not in ("files", "force"):
        raise Failure("-m applies to -l and -f only")
    home = paths.find_home(options.home, script)
    cfg = load_config(home)
    client = connect(paths.Paths(home).control_socket, cfg.options.request_timeout + 10)
    table = AgentTable() if action.dest == "agents" and not options.json else None
    result = request(client, action.command, action.args(options, home),
                     table.add if table is not None else None)
    if table is not None and table.used and table.in_order:
        table.write(out)
        return 0
    data = action.shape(result)
    if options.json:
        emit([json_text(data)], out)
    else:
        emit_printable(action.text(data), out)
    return 0


def emit_printable(lines, out):
    """Write lines escaped (text.printable: table cells are already, this catches every
    other line, such as held warnings), EMIT_LINES at a time: one check and one write per
    chunk, not per line."""
    for start in range(0, len(lines), EMIT_LINES):
        chunk = lines[start:start + EMIT_LINES]
        try:
            clean = text.is_printable(u"".join(chunk))
        except (TypeError, UnicodeDecodeError):  # 2.7: a byte string that is not ASCII
            clean = False
        if not clean:
            chunk = [text.printable(line, None) for line in chunk]
        out.write(u"\n".join(chunk) + u"\n")


def main(argv=None, script=None, out=None, err=None):
    """cluster_control's entry point; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # -h (0) or a usage error (2): argparse printed why
        return exc.code if isinstance(exc.code, int) else 2
    err = TextOut(err)
    try:
        return run(options, script, TextOut(out))
    except Failure as exc:
        err.write(u"%s: %s\n" % (PROG, text.printable(u" ".join(
            compat.to_text(exc.args[0]).split()), CELL_LIMIT)))
        return 1
    except KeyboardInterrupt:
        err.write(u"%s: interrupted\n" % PROG)
        return 130


class TextOut(object):
    """Writes text to a stream that takes native str (2.7 stdout) or text (3.x, StringIO)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            self.stream.write(text)
        except TypeError:
            self.stream.write(compat.native_str(text))
        except UnicodeEncodeError:  # an ASCII-only terminal or pipe
            self.stream.write(text.encode("ascii", "replace").decode("ascii"))
