"""Wazuh 3.0's framework against our real daemons: the cluster port's Fernet `node` request and
the text commands of queue/ossec/cluster_db (SPEC section 11), byte for byte.

The client side is written from SPEC 11, as 3.0's framework/wazuh/cluster.py speaks:
- cluster port: Fernet(urlsafe_b64encode(key)).encrypt(b"node aaaaaaaaa") + b"\\n\\t\\t\\n", then
  read up to b"\\n" and decrypt {"error": 0, "data": {"node", "cluster", "type"}};
- cluster_db: a raw UNIX socket, one ASCII command, then recv() of the 10000-byte NUL-padded
  reply, the next command on the same connection; rows keyed by the peer's listed address, file
  names with a leading "/".
A master and a client run for real; the client has cluster.legacy_node_requests=0. Extra
addresses are listed in <nodes> (no daemon behind them) so that each refused request comes
from an address of its own and its log line can be found.
"""
from __future__ import absolute_import, division, print_function

import base64
import json
import os
import socket
import time

import pytest
from cryptography.fernet import Fernet

from harness import put_text as put, read_text as read
from harness import (base_install, make_node, new_address, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from wazuh_cluster import localsock

FAST = {"cluster.poll_interval": "0.2", "cluster.scan_interval": "1", "cluster.keepalive": "1",
        "cluster.reconnect_max": "1", "cluster.log_level": "1"}
KEYS = u"001 web01 any 1111\n002 db01 10.0.0.5 2222\n"
AGENT_CONF = u"<agent_config></agent_config>\n"
WEB_CONF = u"<agent_config><web/></agent_config>\n"
WAIT = 20.0
EXTRA = 6


def states(node, peer):
    """{file: state} of `peer`'s rows in `node`'s database, through our own JSON API."""
    client = localsock.Client(node.path("queue", "ossec", "cluster_db"), 10)
    try:
        return dict((f, s) for _n, f, s in client.call("states", {"node": peer})["rows"])
    finally:
        client.close()


@pytest.fixture
def pair(make_node):
    """(master, client, extra listed addresses): started, client.keys and two shared files
    synchronised and recorded as such on the master; the interval is long, so only a push or
    an asked-for round repairs drift during a test."""
    master = make_node("master", "master", configure=False)
    client = make_node("client1", "client", configure=False)
    extra = [new_address() for _ in range(EXTRA)]
    client.port = master.port
    for node, role in ((master, "master"), (client, "client")):
        node.configure(role, [master.address, client.address] + extra, interval="2m")
    write_internal_options(master.prefix, FAST)
    write_internal_options(client.prefix, dict(FAST, **{"cluster.legacy_node_requests": "0"}))
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", AGENT_CONF)
    put(master, "etc/shared/web/agent.conf", WEB_CONF)
    master.start()
    client.start()
    wait_for(lambda: read(client, "etc/shared/web/agent.conf") == WEB_CONF, WAIT,
             what="first sync to the client")
    wait_for(lambda: states(master, "client1").get("etc/shared/web/agent.conf")
             == "synchronized", WAIT, what="the master's rows of client1")
    return master, client, extra


# -- the cluster port ---------------------------------------------------------------------------

def fernet(key):
    return Fernet(base64.urlsafe_b64encode(key.encode("ascii")))


def node_request(source, node, payload, timeout=10.0):
    """Connect from `source` to `node`'s cluster port, send `payload`, read until EOF or b"\\n"."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((node.address, node.port))
        sock.sendall(payload)
        got = b""
        while not got.endswith(b"\n"):
            try:
                chunk = sock.recv(4096)
            except socket.error:       # a reset: closed without a word
                break
            if not chunk:
                break
            got += chunk
        return got
    finally:
        sock.close()


def token(key, plain=b"node aaaaaaaaa", at=None):
    f = fernet(key)
    raw = f.encrypt(plain) if at is None else f.encrypt_at_time(plain, int(at))
    return raw + b"\n\t\t\n"


def lines_about(node, address):
    return [line for line in node.log().splitlines() if address + ":" in line]


def test_node_request_answered_as_3_0_did_and_everything_else_refused(pair):
    master, client, extra = pair
    got = node_request(client.address, master, token(master.key))
    assert got.endswith(b"\n") and got.count(b"\n") == 1
    answer = json.loads(fernet(master.key).decrypt(got[:-1]).decode("utf-8"))
    assert answer == {"error": 0, "data": {"node": "master", "cluster": "wazuh",
                                           "type": "master"}}
    wrong = "A" * 32
    cases = [
        (token(wrong), "does not decrypt under the cluster key"),
        (token(master.key, at=time.time() - 600), "older than 60 s"),
        (token(master.key, plain=b"zip aaaaaaaaaa"), "command 'zip' refused"),
        (token(master.key, plain=b"x\n2031/01/01 a"), "command 'x\\x0a2031/01/01' refused"),
        (b"gAAAAA" + b"garbage" * 100, "longer than 512 bytes"),
    ]
    for (payload, reason), source in zip(cases, extra):
        assert node_request(source, master, payload) == b"", reason
        wait_for(lambda: lines_about(master, source), 10, what="refusal of %s" % source)
        lines = lines_about(master, source)
        assert len(lines) == 1 and reason in lines[0], (reason, lines)
    unlisted = new_address()
    assert node_request(unlisted, master, token(master.key)) == b""
    wait_for(lambda: lines_about(master, unlisted), 10, what="refusal of an unlisted address")
    assert "address not in <nodes>" in lines_about(master, unlisted)[0]
    # Our own session is untouched: a change still reaches the client.
    put(master, "etc/shared/default/agent.conf", AGENT_CONF + u"<!-- v2 -->\n")
    wait_for(lambda: read(client, "etc/shared/default/agent.conf") == AGENT_CONF +
             u"<!-- v2 -->\n", WAIT, what="a push after the 3.0 requests")


def test_node_request_refused_like_a_bad_hello_when_turned_off(pair):
    master, client, extra = pair
    source = extra[-1]
    assert node_request(source, client, token(client.key)) == b""
    wait_for(lambda: lines_about(client, source), 10, what="the client's refusal")
    line = lines_about(client, source)[0]
    assert "handshake failed" in line and "bad handshake message length" in line


# -- queue/ossec/cluster_db ---------------------------------------------------------------------

class TextClient(object):
    """3.0's side of cluster_db: send a command, read exactly one 10000-byte reply."""

    def __init__(self, node):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(node.path("queue", "ossec", "cluster_db"))

    def ask(self, command):
        self.sock.sendall(command)
        reply = b""
        while len(reply) < 10000:
            chunk = self.sock.recv(10000 - len(reply))
            assert chunk, "cluster_db closed the connection after %r" % command
            reply += chunk
        return reply

    def text(self, command):
        return self.ask(command).replace(b"\0", b"").decode("ascii")

    def close(self):
        self.sock.close()


def rows_of(text_client, address):
    """3.0's get_file_status: count, then select pages of 100 ("0", "0100", ... offsets)."""
    count = int(text_client.text(b"count " + address.encode("ascii")))
    query, listed = "select %s 100 " % address, ""
    for offset in range(0, count, 100):
        query += str(offset)
        listed += text_client.text(query.encode("ascii"))
    return dict(row.split("*") for row in listed.split(" ") if row)


def test_cluster_db_text_commands_in_sequence_beside_our_json_clients(pair):
    master, client, _extra = pair
    ours = localsock.Client(master.path("queue", "ossec", "cluster_db"), 10)
    legacy = TextClient(master)
    try:
        address = client.address.encode("ascii")
        ours_before = states(master, "client1")
        reply = legacy.ask(b"count " + address)
        assert len(reply) == 10000 and reply.rstrip(b"\0").isdigit()
        assert int(reply.rstrip(b"\0")) == len(ours_before)
        assert reply[len(reply.rstrip(b"\0")):] == b"\0" * (10000 - len(reply.rstrip(b"\0")))
        page = legacy.text(b"select " + address + b" 100 0")
        assert page.startswith(" /") and page.endswith(" ")
        assert rows_of(legacy, client.address) == dict(("/" + f, s)
                                                       for f, s in ours_before.items())
        assert rows_of(legacy, client.address)["/etc/client.keys"] == "synchronized"
        assert legacy.text(b"count " + master.address.encode("ascii")) == "0"
        # Malformed commands: 10000 NULs, and the connection goes on.
        for bad in (b"count", b"select " + address + b" ten 0", b"GET / HTTP/1.0\r\n\r\n",
                    b"update2 pending " + address + b" etc/client.keys"):
            assert legacy.ask(bad) == b"\0" * 10000, bad
        assert ours.call("status")["files"] >= 3          # our JSON client, same socket
        # update2 pending = send again: drift on the client is repaired by that alone.
        put(client, "etc/shared/default/agent.conf", u"edited by hand on the client\n")
        assert legacy.text(b"update2 pending " + address +
                           b" /etc/shared/default/agent.conf") == "Command OK"
        wait_for(lambda: read(client, "etc/shared/default/agent.conf") == AGENT_CONF, WAIT,
                 what="the file sent again after update2 pending")
        # clear = a full resynchronisation with every peer.
        put(client, "etc/shared/web/agent.conf", u"also edited by hand\n")
        os.unlink(client.path("etc", "client.keys"))
        assert legacy.text(b"clear ") == "Command OK"
        wait_for(lambda: read(client, "etc/shared/web/agent.conf") == WEB_CONF and
                 read(client, "etc/client.keys") == KEYS, WAIT,
                 what="a full round after clear")
        wait_for(lambda: set(rows_of(legacy, client.address).values()) == {"synchronized"},
                 WAIT, what="the rows synchronized again after clear")
        assert ours.call("status")["files"] >= 3
    finally:
        legacy.close()
        ours.close()
