"""The agent listing of the internal daemon (cluster_control -a): rows from the database.

At 100 000 agents whatever is done per agent at listing time is what the listing costs, so
the per-agent work is done before, when its input changes, and kept in the database (not in
memory: a cache of 100 000 entries would be lasting growth):
- client.keys is parsed into agent_keys once per change of its stat fingerprint, each row
  holding its JSON prefix ["ID","NAME","IP" (refresh_keys; called by the scan that sees the
  file change and, to be exact, by every listing, which then only compares the fingerprint;
  lines appended to the file add their rows only);
- the node_name line of an agent-info file is read when the scanner sees its content change
  (note_changed, from catalog._store) into agent_files, so that no listing reads the files
  (a first listing after a start read all 100 000: 2.5-3.9 s). A file the database knows
  nothing about (a database from before this) is read by the listing once and recorded.
A listing is then one query joining agent_keys, agent_files and agents (the node that sent
the file), one lstat per agent (the status needs the keepalive as it is now, not as the last
poll saw it) and a string format per row. The rows are agentrows.COLUMNS in JSON, streamed
ROWS_PER_CHUNK rows at a time (agentrows).
"""
from __future__ import absolute_import, division, print_function

import json
import os
import stat

from wazuh_cluster import agentrows, compat

ACTIVE_SECONDS = 1830  # SPEC section 2: keepalive age up to which an agent is Active
NODE_LINE = '#"node_name":'
NODE_LINE_BYTES = 65536  # the node_name line is near the start of a small file
# The meta key of "SIZE:SHA256" of the client.keys text agent_keys was parsed from.
AGENT_KEYS_TEXT = "agent_keys.text"

# Files read for their node name since the start (tests: a listing reads none it knows).
READS = [0]


class _NodeJSON(dict):
    """node name -> its JSON text ("null" for None), encoded once per distinct name."""

    def __missing__(self, node):
        value = self[node] = json.dumps(node)
        return value


def read_node_name(path):
    """(True, the #"node_name": value of agent-info file `path` or None), or (False, None)
    when it cannot be read."""
    READS[0] += 1
    try:
        with open(path, "rb") as handle:
            data = compat.to_text(handle.read(NODE_LINE_BYTES), errors="replace")
    except (IOError, OSError):
        return False, None
    node = None
    for line in data.splitlines():
        if line.startswith(NODE_LINE):
            node = line[len(NODE_LINE):].strip().strip('"') or None
    return True, node


def note_changed(db, folder, changed, deleted):
    """Record the node name of the agent-info files (names in `folder`, absolute) whose
    content changed; forget those deleted or unreadable. Inside the scan's transaction."""
    rows, gone = [], list(deleted)
    for name in changed:
        ok, node = read_node_name(os.path.join(folder, name))
        if ok:
            rows.append((name, node))
        else:
            gone.append(name)
    if rows:
        db.record_agent_file_nodes(rows)
    if gone:
        db.forget_agent_files(gone)


def keys_fingerprint(path):
    """client.keys' stat fingerprint as text; "none" when it is missing or no regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return u"none"
    if not stat.S_ISREG(st.st_mode):
        return u"none"
    return u"%d:%d:%d:%d" % (st.st_size, compat.stat_mtime_ns(st), st.st_ino,
                             compat.stat_ctime_ns(st))


def refresh_keys(db, path):
    """Parse client.keys into agent_keys when its fingerprint changed; True when it did.

    A file that only grew by whole lines (an agent appended: once a second on a busy master,
    then on every client) adds the rows of its new lines only: every node re-parsing and
    rewriting 100 000 rows per append (0.9 s of CPU each on 3.13) took more than the
    machine's two cores under churn. "Only grew" is proven by the size and SHA-256 of the
    text the rows were parsed from (meta AGENT_KEYS_TEXT), compared with the file's start.
    """
    source = keys_fingerprint(path)  # before reading: a write meanwhile is seen next time
    if db.agent_keys_source() == source:
        return False
    try:
        handle = open(path, "rb")
    except (IOError, OSError):
        with db.transaction():
            db.replace_agent_keys((), source)
            db.set_meta(AGENT_KEYS_TEXT, None)
        return True
    with handle:
        digest, grown = _grown_from(handle, db.get_meta(AGENT_KEYS_TEXT))
        read = [digest, handle.tell()]
        with db.transaction():
            db.replace_agent_keys(_key_rows(handle, read), source, append=grown)
            db.set_meta(AGENT_KEYS_TEXT, u"%d:%s" % (read[1], read[0].hexdigest()))
    return True


def _grown_from(handle, parsed):
    """(sha256 object of what was read, True) when the file at `handle` starts with the text
    `parsed` ("SIZE:SHA256" of what agent_keys holds) and that text ended a line: `handle`
    is then after it. Otherwise (a new sha256 object, False) and `handle` at the start."""
    digest = compat.sha256()
    size, _, sha = (parsed or u"").partition(u":")
    if not size.isdigit() or int(size) == 0:
        return digest, False
    left, last = int(size), b""
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))  # not 9.4 MB at once in the daemon
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
        last = chunk[-1:]
    if left == 0 and last == b"\n" and digest.hexdigest() == sha:
        return digest, True
    handle.seek(0)
    return compat.sha256(), False


def _key_rows(handle, read):
    """Yield (agent-info file name, JSON prefix) per agent of the client.keys lines read from
    binary `handle`, a line at a time; blank, comment, malformed and removed entries are left
    out. `read`: [sha256 object, byte count], updated with every line read."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for raw in handle:
        read[0].update(raw)
        read[1] += len(raw)
        parts = compat.to_text(raw, errors="replace").split()
        if len(parts) < 4 or parts[0].startswith("#") or parts[1][:1] in ("!", "#"):
            continue
        agent_id, name, ip = parts[:3]
        yield (u"%s-%s" % (name, ip.split("/")[0]),
               compat.to_text(dumps([agent_id, name, ip])[:-1]))


def listing(db, keys_path, folder, now, record, keepalives=True):
    """(count, chunks) of the agents of client.keys at epoch seconds `now`; `folder` is the
    agent-info folder (absolute). chunks yields the rows (agentrows.COLUMNS) as JSON bytes,
    ROWS_PER_CHUNK rows at a time separated by commas, without the brackets (agentrows), read
    and encoded as the chunks are taken: no more than a chunk is held. Files the database
    knows no node name of are read, and record([(file name, node)]) called once the rows are
    all taken (not to write under the query). Without `keepalives` every last_keepalive is
    null: a text table shows none, and writing the float of each (repr) was a fifth of the
    listing's CPU."""
    refresh_keys(db, keys_path)
    return db.agent_key_count(), _chunks(db, folder, now, record, keepalives)


def _chunks(db, folder, now, record, keepalives):
    with compat.FolderLstat(folder) as in_folder:
        learned = []
        for chunk in _listing(db, os.path.join(folder, ""), in_folder.lstat, now, learned,
                              keepalives):
            yield chunk
    if learned:
        record(learned)


def _listing(db, folder, lstat, now, learned, keepalives):
    """The chunks; a row's sender is there only where no node name is known
    (db.agent_listing): a file emptied or removed since the scan asks db.agent_sender."""
    nodes = _NodeJSON({None: "null"})
    never = u',"Never connected",%s,null]'
    row, bare = u'%s,"%s",%s,%r]', u'%s,"%s",%s,null]'
    kind, regular = stat.S_IFMT(0o177777), stat.S_IFREG
    cursor = db.agent_listing()
    while True:
        batch = cursor.fetchmany(agentrows.ROWS_PER_CHUNK)
        if not batch:
            return
        part = []
        add = part.append
        for prefix, name, known, file_node, sender in batch:
            try:
                st = lstat(name)
            except OSError:
                st = None
            regular_file = st is not None and st.st_mode & kind == regular  # no call per row
            if file_node is not None and not (regular_file and st.st_size):
                sender = db.agent_sender(name)
            if not regular_file:
                add(prefix + never % nodes[sender])
                continue
            keepalive = st.st_mtime
            late = now - keepalive > ACTIVE_SECONDS
            if not st.st_size:
                status, node = "Disconnected" if late else "Pending", sender
            else:
                status = "Disconnected" if late else "Active"
                if known:
                    node = file_node
                else:
                    ok, node = read_node_name(folder + name)
                    if ok:
                        learned.append((name, node))
                node = sender if node is None else node
            if keepalives:
                add(row % (prefix, status, nodes[node], keepalive))
            else:
                add(bare % (prefix, status, nodes[node]))
        yield u",".join(part).encode("utf-8")
