"""Wazuh 3.0's `node` request on the cluster port (SPEC section 11), and nothing else of 3.0's.

Plan. The 3.0 framework (get_nodes behind the API's /cluster/nodes, `cluster_control.py -n`)
connects to every listed address and sends

    Fernet(urlsafe_b64encode(key)).encrypt(b"node aaaaaaaaa") + b"\\n\\t\\t\\n"

(the plaintext is always 14 bytes, so the token is always 100 characters), then reads up to
b"\\n" and decrypts a Fernet token of {"error": 0, "data": {"node", "cluster", "type"}}.
PeerServer peeks at the first byte of every admitted connection: a Fernet token is base64 text
starting "gAAAAA" (version byte 0x80, then a timestamp below 2^32), while our own hello starts
with its 2-byte length (0x00-0x02). A "g" goes to serve() here, when
cluster.legacy_node_requests is 1; otherwise to our handshake, which refuses it like any bad
hello. serve() answers only:
  - a request of at most MAX_REQUEST bytes that arrives before the handshake deadline,
  - made of exactly one token and the terminator, nothing after it,
  - whose token decrypts under the cluster key and is at most TTL seconds old (Fernet's ttl;
    Fernet also refuses a token more than 60 s in the future),
  - whose plaintext is exactly b"node aaaaaaaaa";
then writes the reply and the caller closes. Anything else raises Refused (the caller logs it
through the rate-limited refusal log) and the connection is closed without a word.

Deviation from SPEC 5, documented in README: Fernet's ttl compares the token's timestamp with
the wall clock. That is the only wall-clock decision, and it only guards this read-only answer
(the node's name, the cluster's name and its role, which every key holder knows anyway); a
token replayed within its minute gets the same answer again.

It imports `cryptography` for Fernet, which exists only to answer Wazuh 3.0 (channel.py
lists the modules that import it).
"""
from __future__ import absolute_import, division, print_function

import base64
import collections
import errno
import json
import re
import socket
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cryptography 3.3 warns on import under 2.7 (channel.py)
    from cryptography.fernet import Fernet, InvalidToken

from wazuh_cluster import compat, pathrules

PREFIX = b"gAAAAA"
TERMINATOR = b"\n\t\t\n"
PLAINTEXT = b"node aaaaaaaaa"
TOKEN_CHARS = 100            # len(Fernet token) for a 14-byte plaintext
MAX_REQUEST = 512            # the request is 104 bytes
TTL = 60
_TOKEN_RE = re.compile(b"\\A[A-Za-z0-9_-]+={0,2}\\Z")


class Refused(Exception):
    """The request is not one we answer; args[0] says why (escaped, for the log)."""

    @property
    def reason(self):
        return self.args[0]


def looks_legacy(first):
    """True when the first byte of a connection can start a Fernet token."""
    return first[:1] == PREFIX[:1]


def peek_first(sock, timeout):
    """The first byte the peer sent, without consuming it; b"" when it closed or went silent."""
    sock.settimeout(max(0.001, timeout))
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return b""
        except socket.error as exc:
            if exc.args and exc.args[0] == errno.EINTR:
                continue
            return b""


def fernet(key):
    """3.0's Fernet object for the cluster key (text): the key's 32 bytes, base64-encoded."""
    return Fernet(base64.urlsafe_b64encode(compat.to_bytes(key)))


def read_request(sock, deadline):
    """The token of one request (without the terminator) read before `deadline` (monotonic);
    Refused when it is not one."""
    data = b""
    while TERMINATOR not in data:
        if len(data) > MAX_REQUEST:
            raise Refused("Wazuh 3.0 request longer than %d bytes" % MAX_REQUEST)
        left = deadline - compat.monotonic()
        if left <= 0:
            raise Refused("Wazuh 3.0 request incomplete at the deadline")
        sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_REQUEST + len(TERMINATOR) - len(data) + 1)
        except socket.timeout:
            raise Refused("Wazuh 3.0 request incomplete at the deadline")
        except socket.error as exc:
            if exc.args and exc.args[0] == errno.EINTR:
                continue
            raise Refused("connection error during a Wazuh 3.0 request")
        if not chunk:
            raise Refused("Wazuh 3.0 request cut short (%d bytes)" % len(data))
        data += chunk
    token, _sep, rest = data.partition(TERMINATOR)
    if rest:
        raise Refused("%d bytes after a Wazuh 3.0 request" % len(rest))
    if not token.startswith(PREFIX) or len(token) != TOKEN_CHARS or not _TOKEN_RE.match(token):
        raise Refused("not a Wazuh 3.0 node request: %s" % pathrules.escape(token, 40))
    return token


def open_request(f, token, ttl):
    """The plaintext of a request token; Refused unless it is fresh and under the key."""
    try:
        return f.decrypt(token, ttl)
    except InvalidToken:
        pass
    try:
        f.decrypt(token)
    except InvalidToken:
        raise Refused("Wazuh 3.0 request does not decrypt under the cluster key")
    raise Refused("Wazuh 3.0 request older than %d s or from the future (clock skew?)" % ttl)


def node_reply(f, node_name, cluster_name, role):
    """The reply bytes: a Fernet token of 3.0's JSON answer, then b"\\n"."""
    answer = collections.OrderedDict((("error", 0), ("data", collections.OrderedDict((
        ("node", node_name), ("cluster", cluster_name), ("type", role))))))
    return f.encrypt(json.dumps(answer).encode("utf-8")) + b"\n"


def serve(sock, key, node_name, cluster_name, role, deadline, ttl=TTL):
    """Read one 3.0 request from `sock` and answer it before `deadline` (monotonic seconds),
    or raise Refused. Does not close the socket."""
    token = read_request(sock, deadline)
    f = fernet(key)
    plain = open_request(f, token, ttl)
    if plain != PLAINTEXT:
        command = plain.split(b" ", 1)[0]
        raise Refused("Wazuh 3.0 command %s refused (only 'node' is answered)"
                      % pathrules.escape(command, 40))
    sock.settimeout(max(0.001, deadline - compat.monotonic()))
    try:
        sock.sendall(node_reply(f, node_name, cluster_name, role))
    except socket.error:
        raise Refused("Wazuh 3.0 requester left before the reply")
