"""Text chosen by an insider (a peer holding the key) never reaches a log or a terminal raw.

Real daemons; the insider is built from the library (peers.Dialer as a rogue client,
peers.PeerServer as a rogue master) and sends a version, a CLOSE reason, an ERROR, an error
answer and file names holding newlines, a forged log line, terminal escape sequences and 1 MiB.
Afterwards every line of cluster.log is one OSSEC line of printable ASCII, no forged line
exists, cluster_control's tables (on the master, and on a client relaying its master) hold no
control character, the refused names in the database are escaped and bounded in number, and
the legitimate client still syncs. Every wait polls a condition with a bound.
"""
from __future__ import absolute_import, division, print_function

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time

import pytest

from harness import (base_install, make_node, new_address, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from test_crash import converge
from test_hostile import still_serves_real_client
from test_sync import FAST, KEYS, put

from wazuh_cluster import channel, db, logs, peers, protocol, staterows
from wazuh_cluster.errors import RequestError

WAIT = 20.0
ROGUE = "rogue01"
FORGED = u"2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged line"
EVIL = u"3.0\n" + FORGED + u"\r\x1b[2J\x1b]0;owned\x07\x00\u00e9\u202e\x85"
LINE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} wazuh-clusterd: "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL): [\x20-\x7e]*$")
HOSTILE_NAMES = [
    u"queue/agent-info/x\n" + FORGED,
    u"queue/agent-info/web01-any\n",  # "$" of a regex matches before a final newline
    u"queue/agent-info/esc\x1b[31m\x1b]0;owned\x07-any",
    u"queue/agent-info/cr\rnul\x00-any",
    u"queue/agent-info/\u202ebidi\u00e9-any",
    u"queue/agent-info/" + u"m" * (1 << 20),
]
INTERNAL_DOWN = ("internal daemon unavailable", "internal_unavailable")


# -- checks -------------------------------------------------------------------------------------

def log_lines(node):
    """The raw lines of logs/cluster.log (bytes: not one is allowed to be anything but ASCII)."""
    with io.open(node.path("logs", "cluster.log"), "rb") as handle:
        return handle.read().split(b"\n")[:-1]


def assert_clean_log(node):
    lines = log_lines(node)
    assert lines
    for raw in lines:
        line = raw.decode("ascii")  # UnicodeDecodeError: a raw non-ASCII byte got through
        assert LINE.match(line), "not one OSSEC line: %r" % (line,)
        assert not line.startswith(u"2031/"), "forged line: %r" % (line,)
    text = b"\n".join(lines).decode("ascii")
    for word in INTERNAL_DOWN:
        assert word not in text, [l for l in text.splitlines() if word in l]
    return text


def terminal_safe(result, node):
    assert result.rc == 0, node.explain("cluster_control failed", result)
    out = result.out
    assert all(0x20 <= ord(c) < 0x7f for c in out.replace(u"\n", u"")), repr(out)
    assert not any(line.startswith(u"2031/") for line in out.split(u"\n"))
    return out


def rows(node, who):
    """{file: state} of node `who` in `node`'s states table."""
    try:
        conn = sqlite3.connect(node.path("var", "db", "cluster.db"), timeout=10)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT file, state FROM states WHERE node = ?", (who,)))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def send(dialer, names, data=b"payload\n"):
    files = [{"name": name, "sha256": hashlib.sha256(data).hexdigest(),
              "mtime_ns": int(time.time()) * 10 ** 9, "size": len(data)} for name in names]
    result, _ = dialer.session.call("sync_files", {"files": files}, data * len(names),
                                    timeout=60)
    return result["states"]


def log_has(node, fragment):
    return fragment in node.log()


# -- a rogue client ------------------------------------------------------------------------------

class RogueClient(object):
    """Handlers of a rogue client: what the master asks it, answered with hostile text."""

    def __init__(self):
        self.manifest_error = False
        self.asked = threading.Event()
        self.deleted = threading.Event()

    def sync_manifest(self, session, args, data):
        if self.manifest_error:
            # Once: the session the master opens next must stay up (the test acts on it)
            self.manifest_error = False
            raise RequestError(EVIL, "bad\ncode\x1b")
        # Thousands of files the master never had, for it to delete.
        entry = {"sha256": "0" * 64, "size": 1, "mtime_ns": 1, "mode": 0o640,
                 "item": "shared"}
        files = dict((u"etc/shared/drift%d/f%d" % (n % 100, n), entry) for n in range(3000))
        return {"files": files}, b""

    def sync_files(self, session, args, data):
        # The real names answered, and thousands it was never asked about.
        names = [f.get("name") for f in args.get("files", []) + args.get("meta", [])] + \
            args.get("delete", []) + args.get("delete_dirs", [])
        states = dict((n, "synchronized") for n in names if n)
        states.update((u"bogus/%d\n%s" % (n, FORGED), "synchronized") for n in range(3000))
        states[u"bogus/" + u"b" * (1 << 20)] = "failed"
        self.asked.set()
        if args.get("delete"):
            self.deleted.set()
        return {"states": states}, b""

    def handlers(self):
        return {"sync_manifest": self.sync_manifest, "sync_files": self.sync_files}


@pytest.fixture
def rogue(make_node, request):
    """A started master (log level 2: tracebacks) and client, and a connected rogue client
    that announced a hostile version."""
    master = make_node("master", "master", configure=False)
    client = make_node("client", "client", configure=False)
    rogue_address = new_address()
    client.port = master.port
    listed = [master.address, client.address, rogue_address]
    for node in (master, client):
        node.configure(node.name, listed, interval="3s")
        write_internal_options(node.prefix, dict(FAST, **{"cluster.log_level": "2"}))
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    master.start()
    client.start()
    converge([master, client])
    settings = peers.make_settings(
        node_name=ROGUE, cluster_name="wazuh", key=master.key, role="client",
        bind_addr=rogue_address, port=master.port, nodes=[master.address],
        own_addresses=[rogue_address], keepalive=1.0, handshake_timeout=5.0,
        reconnect_min=0.05, reconnect_max=0.5, version=EVIL)
    handlers = RogueClient()
    with rogue_log() as lines:
        dialer = peers.Dialer(settings, handlers.handlers()).start()
        try:
            assert dialer.wait_connected(15), master.explain("the rogue could not connect")
            yield master, client, dialer, handlers
        finally:
            dialer.stop()
            failed = getattr(request.node, "rep_call", None)
            if failed is None or failed.failed:   # the rogue's side of the story
                print("---- rogue %s (in-process library log)\n%s" % (ROGUE, lines.getvalue()))


@contextlib.contextmanager
def rogue_log():
    """The library's log lines of this process (the rogue's), at debug level, while inside."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.OssecFormatter("rogue", tracebacks=True))
    logger = logs.get()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def reconnected(dialer, old):
    wait_for(lambda: dialer.session is not None and dialer.session is not old
             and not dialer.session.closed, WAIT, what="the rogue to reconnect")
    return dialer.session


def test_a_rogue_clients_text_is_escaped_in_the_masters_log_tables_and_database(rogue):
    master, client, dialer, handlers = rogue
    # A version outside the alphabet: logged escaped once, shown as "(invalid)".
    master.wait_log(r"announced an invalid version '3\.0\\x0a2031/01/01", WAIT)
    # File names: refused, recorded escaped and cut.
    states = send(dialer, HOSTILE_NAMES)
    assert set(states.values()) == set(["invalid"]), states
    stored = [staterows.stored_name(name) for name in HOSTILE_NAMES]
    wait_for(lambda: all(rows(master, ROGUE).get(s) == "invalid" for s in stored), WAIT,
             what="the refused names recorded escaped")
    for name in rows(master, ROGUE):
        assert all(0x20 <= ord(c) < 0x7f for c in name) and len(name) < 400, repr(name)
    # An unknown command with a hostile name: the answer is escaped on our side too.
    with pytest.raises(RequestError) as info:
        dialer.session.call(EVIL, timeout=30)
    assert info.value.code == "unknown_command" and "\n" not in info.value.message
    # An error answer: the master stops that round and closes with the escaped reason.
    handlers.manifest_error = True
    old = dialer.session
    master.wait_log(r"Synchronisation with rogue01 stopped: 3\.0\\x0a2031/01/01", WAIT)
    session = reconnected(dialer, old)
    # A CLOSE with a hostile reason.
    session.close(EVIL)
    master.wait_log(r"closed by the peer: 3\.0\\x0a2031/01/01 00:00:00 wazuh-clusterd: "
                    r"ERROR: forged line\\x0d\\x1b\[2J", WAIT)
    session = reconnected(dialer, session)
    # An ERROR with a hostile code and message.
    session.channel.send_frame(protocol.ERROR, 0, 0, protocol.encode_body(
        {"code": EVIL, "message": EVIL}))
    master.wait_log(r"refused by the peer: 3\.0\\x0a2031/01/01", WAIT)
    reconnected(dialer, session)

    text = assert_clean_log(master)
    # The forged line only ever follows an escaped newline, inside a real line.
    assert FORGED in text and not re.search(r"(?<!\\x0a)2031/01/01", text)
    nodes = terminal_safe(master.cluster_control("-n"), master)
    assert re.search(r"(?m)^rogue01 .* \(invalid\) ", nodes), nodes
    data = json.loads(master.cluster_control("-n", "-j").out)
    assert [n["version"] for n in data["nodes"] if n["name"] == ROGUE] == [u"(invalid)"]
    files = terminal_safe(master.cluster_control("-l"), master)
    assert u"queue/agent-info/x\\x0a2031/01/01" in files
    terminal_safe(master.cluster_control("-i"), master)
    # A client relays its master's view of the nodes: escaped there too.
    relayed = terminal_safe(client.cluster_control("-n"), client)
    assert re.search(r"(?m)^rogue01 .* \(invalid\) ", relayed), relayed
    still_serves_real_client(master, client)
    assert_clean_log(master)
    assert_clean_log(client)


def test_refused_names_are_bounded_and_a_peers_answer_adds_no_rows(rogue):
    master, client, dialer, handlers = rogue
    # The master's round sent its files to the rogue, which answered with 3000 more names
    # and a 1 MiB one: only the files sent are recorded.
    assert handlers.asked.wait(WAIT), master.explain("the master sent nothing to the rogue")
    wait_for(lambda: rows(master, ROGUE).get(u"etc/client.keys") == "synchronized", WAIT,
             what="the master's record of its round with the rogue")
    assert handlers.deleted.wait(WAIT), master.explain("the master deleted nothing")
    assert not [n for n in rows(master, ROGUE) if n.startswith((u"bogus/", u"etc/shared/drift"))]
    # Thousands of refused names, then a 768 KiB one with newlines and a tracer: the
    # tracer's row proves that the request to the internal daemon went through. Not more
    # newlines: parsing a million of them holds 17 MB on 2.7, past a session's share of
    # the budget, and such a header is refused whole (test_header_peaks).
    batches = 4
    for batch in range(batches):
        names = [u"queue/agent-info/flood\n%d-%05d" % (batch, n) for n in range(1500)]
        assert set(send(dialer, names).values()) == set(["invalid"])
    tracer = u"queue/agent-info/tracer\x1b-any"
    huge = u"queue/agent-info/" + u"\n" * 16 + u"a" * (3 << 18)
    assert set(send(dialer, [huge, tracer]).values()) == set(["invalid"])
    wait_for(lambda: rows(master, ROGUE).get(staterows.stored_name(tracer)) == "invalid", WAIT,
             what="the tracer's invalid row")
    invalid = [n for n, s in rows(master, ROGUE).items() if s == "invalid"]
    assert len(invalid) == db.MAX_INVALID_PER_NODE, len(invalid)
    size = os.path.getsize(master.path("var", "db", "cluster.db"))
    assert size < 4 << 20, size
    assert master.internal_pid() and master.running_pid()
    still_serves_real_client(master, client)
    assert_clean_log(master)


# -- a rogue master ------------------------------------------------------------------------------

def evil_nodes(session, args, data):
    return {"nodes": [{"name": EVIL, "type": EVIL, "status": "connected", "address": EVIL,
                       "version": EVIL, "last_keepalive": "soon", "connected_since": None}]}, b""


def evil_agents(session, args, data):
    return {"agents": [{"id": EVIL, "name": EVIL, "ip": EVIL, "status": EVIL,
                        "node_name": EVIL, "last_keepalive": None}, {"id": 5}]}, b""


def test_a_rogue_masters_text_is_escaped_on_the_client_and_in_what_it_relays(make_node):
    client = make_node("client", "client", configure=False)
    rogue_address = new_address()
    client.configure("client", [rogue_address, client.address], interval="3s")
    write_internal_options(client.prefix, dict(FAST, **{"cluster.log_level": "2"}))
    settings = peers.make_settings(
        node_name="master", cluster_name="wazuh", key=client.key, role="master",
        bind_addr=rogue_address, port=client.port, nodes=[client.address],
        own_addresses=[rogue_address], keepalive=1.0, handshake_timeout=5.0, version=EVIL)
    server = peers.PeerServer(settings, {
        "sync_manifest": lambda session, args, data: ({"files": {}}, b""),
        "sync_files": lambda session, args, data: ({"states": {}}, b""),
        "cluster_nodes": evil_nodes, "cluster_agents": evil_agents,
    }, nonce_book=channel.NonceBook()).start()
    try:
        client.start()
        session = wait_for(lambda: server.registry.get(client.name), WAIT,
                           what="the client's session with the rogue master")
        client.wait_log(r"announced an invalid version '3\.0\\x0a2031/01/01", WAIT)
        # Names the client refuses, recorded on the client for node "master". Not a name of
        # escapes alone: on 2.7 such a header is charged more than 40 times its size (the
        # pieces its decoder builds) and refused whole (test_header_peaks).
        data = b"x"
        files = [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": 1,
                  "size": 1} for name in [u"etc/shared/" + EVIL, u"etc/" + (u"\x1b[2J" + u"a" * 30) * 150]]
        result, _ = session.call("sync_files", {"files": files}, data * 2, timeout=30)
        assert set(result["states"].values()) == set(["invalid"])
        wait_for(lambda: len(rows(client, "master")) >= 2, WAIT, what="the client's rows")
        terminal_safe(client.cluster_control("-l"), client)
        nodes = terminal_safe(client.cluster_control("-n"), client)
        assert u"3.0\\x0a2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged line\\x0d" in nodes
        agents = terminal_safe(client.cluster_control("-a"), client)
        assert u"\\x1b[2J" in agents
        exact = json.loads(client.cluster_control("-n", "-j").out)
        assert exact["nodes"][0]["name"] == EVIL  # -j is exact
        session.close(EVIL)
        client.wait_log(r"closed by the peer: 3\.0\\x0a2031/01/01", WAIT)
        assert client.running_pid()
        assert_clean_log(client)
    finally:
        server.stop()


def test_a_refusal_from_a_rogue_master_is_one_escaped_line():
    """In process: a "master" that proves the key, then refuses the hello with EVIL."""
    key = "k" * 32
    address = new_address()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def refuse():
        sock, _ = listener.accept()
        try:
            hs = channel.server_handshake(sock, key, "master", "wazuh", "master", 5,
                                          channel.DEFAULT_MAX_FRAME_BYTES, channel.NonceBook())
            ch = channel.SecureChannel(sock, hs.codec, hs.peer_name, hs.peer_role, 5)
            ch.recv_frame(5)
            ch.send_frame(protocol.ERROR, 0, 0, protocol.encode_body(
                {"code": EVIL, "message": EVIL}))
            ch.close()
        finally:
            sock.close()
    thread = threading.Thread(target=refuse)
    thread.start()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.OssecFormatter("wazuh-clusterd"))
    logger = logs.get()
    logger.addHandler(handler)
    try:
        settings = peers.make_settings(
            node_name="client01", cluster_name="wazuh", key=key, role="client",
            bind_addr=address, port=port, nodes=[address], keepalive=1.0,
            handshake_timeout=5.0)
        assert peers.Dialer(settings, {}, nonce_book=channel.NonceBook())._try(address) is None
    finally:
        thread.join(10)
        listener.close()
        logger.removeHandler(handler)
    lines = [l for l in stream.getvalue().split(u"\n") if l]
    refused = [l for l in lines if u"refused us" in l]
    assert len(refused) == 1, lines
    assert refused[0].endswith(u"refused us: 3.0\\x0a" + FORGED + u"\\x0d\\x1b[2J\\x1b]0;owned"
                               u"\\x07\\x00\\xe9\\u202e\\x85")
    for line in lines:
        assert LINE.match(line), line
