"""legacy_node: Wazuh 3.0's Fernet `node` request, over a socket pair.

The client side is written from SPEC section 11: Fernet(urlsafe_b64encode(key)) encrypts
b"node aaaaaaaaa", the token is followed by b"\\n\\t\\t\\n", the reply is read up to b"\\n" and
is a token (same key) of {"error": 0, "data": {"node", "cluster", "type"}}.
"""
from __future__ import absolute_import, division, print_function

import base64
import json
import socket
import threading
import time

import pytest
from cryptography.fernet import Fernet

from wazuh_cluster import compat, legacy_node

KEY = "Sup3rS3cretClusterKey0123456789a"
OTHER = "Wr0ngKeyWr0ngKeyWr0ngKeyWr0ngKey"


def f3(key=KEY):
    return Fernet(base64.urlsafe_b64encode(key.encode("ascii")))


def request(key=KEY, plain=b"node aaaaaaaaa", at=None):
    f = f3(key)
    token = f.encrypt(plain) if at is None else f.encrypt_at_time(plain, int(at))
    return token + b"\n\t\t\n"


def exchange(payload, role="master", deadline=5.0):
    """Send `payload` to serve(); returns (bytes read back until EOF, Refused or None)."""
    ours, theirs = socket.socketpair()
    outcome = []

    def server():
        try:
            legacy_node.serve(theirs, KEY, "node01", "wazuh", role,
                              compat.monotonic() + deadline)
            outcome.append(None)
        except legacy_node.Refused as exc:
            outcome.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=server)
    thread.start()
    ours.settimeout(10)
    ours.sendall(payload)
    ours.shutdown(socket.SHUT_WR)   # a short request must end in EOF, not at the deadline
    got = b""
    while True:
        try:
            chunk = ours.recv(4096)
        except socket.error:      # closed with our bytes unread: a reset
            break
        if not chunk:
            break
        got += chunk
    thread.join(10)
    ours.close()
    return got, outcome[0]


def test_node_request_answered_with_a_token_of_3_0_json():
    got, refused = exchange(request(), role="client")
    assert refused is None
    assert got.endswith(b"\n") and got.count(b"\n") == 1
    answer = f3().decrypt(got[:-1])
    assert answer == (b'{"error": 0, "data": {"node": "node01", "cluster": "wazuh", '
                      b'"type": "client"}}')
    assert json.loads(answer.decode("ascii"))["data"]["type"] == "client"


def test_request_is_104_bytes_and_starts_like_every_fernet_token():
    raw = request()
    assert len(raw) == 104 and raw.startswith(b"gAAAAA")
    assert legacy_node.looks_legacy(raw) and not legacy_node.looks_legacy(b"\x00\x5a")


# Tokens are made when the test runs (lambdas): made at collection, they would be older than
# 60 s by the time a slow or loaded run of the whole suite reaches this test.
@pytest.mark.parametrize("payload, reason", [
    (lambda: request(OTHER), "does not decrypt under the cluster key"),
    (lambda: request(at=time.time() - 3600), "older than 60 s"),
    (lambda: request(at=time.time() + 3600), "from the future"),
    (lambda: request(plain=b"zip aaaaaaaaaa"), "command 'zip' refused"),
    (lambda: request(plain=b"node aaaaaaaab"), "command 'node' refused"),
    (lambda: request(plain=b"\x1b[2Jnode\naaaa"), "command '\\x1b[2Jnode\\x0aaaaa' refused"),
    (lambda: request()[:-4] + request()[:-4] + b"\n\t\t\n", "not a Wazuh 3.0 node request"),
    (lambda: request() + b"extra", "bytes after a Wazuh 3.0 request"),
    (b"gAAAAA" + b"A" * 600, "longer than 512 bytes"),
    (b"gAAAAA" + b"!" * 94 + b"\n\t\t\n", "not a Wazuh 3.0 node request"),
    (b"gAAAA", "cut short"),
])
def test_everything_else_refused_and_closed_without_a_word(payload, reason):
    got, refused = exchange(payload() if callable(payload) else payload)
    assert got == b""
    assert refused is not None and reason in refused.reason, refused


def test_silent_requester_refused_at_the_deadline():
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(legacy_node.Refused) as info:
            legacy_node.serve(theirs, KEY, "node01", "wazuh", "master",
                              compat.monotonic() + 0.2)
        assert "deadline" in info.value.reason
    finally:
        ours.close()
        theirs.close()


def test_peek_leaves_the_first_byte_for_the_handshake():
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(b"\x00\x10rest")
        assert legacy_node.peek_first(theirs, 5) == b"\x00"
        assert theirs.recv(16) == b"\x00\x10rest"
    finally:
        ours.close()
        theirs.close()
