"""peers.Dialer in the failover mesh (cluster.failover=1): the node of the lower name dials, so
a dialer whose entry is such a node learns it at its first look and must not look again (a
whole handshake on both nodes) while that node's session with us is up; once it closed, it
looks again. A real listener on 127.0.0.1 answering the handshake, a real Dialer, a real
inbound Session in a real NodeRegistry, a real Failover (test_failover.py); every wait polls
with a bound."""
from __future__ import absolute_import, division, print_function

import socket
import threading

from wazuh_cluster import channel, peers
from wazuh_cluster.channel import NonceBook, SecureChannel
from wazuh_cluster.errors import HandshakeError
from wazuh_cluster.session import Session

from test_channel import KEY, handshake, wait_for
from test_failover import Clock, node

LOWER = "127.0.0.1"     # alpha: dials us
OURS = "127.0.0.2"      # beta


class Listener(object):
    """A listener on `ip` answering the cluster handshake as node `name`, counting them
    (each one is a look of the dialer)."""

    def __init__(self, ip, name):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((ip, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (socket.error, OSError):
                return
            try:
                channel.server_handshake(conn, KEY, self.name, "wazuh", "client", 5, 1 << 20,
                                         NonceBook())
                self.handshakes += 1
                conn.settimeout(5)
                while conn.recv(4096):     # until the dialer closes (its CLOSE frame first)
                    pass
            except (HandshakeError, socket.error, OSError):
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


class Registry(peers.NodeRegistry):
    """The real registry, counting the dialer's looks at it."""
    looks = 0

    def get(self, name):
        self.looks += 1
        return peers.NodeRegistry.get(self, name)


def inbound_session(name):
    """A live session of node `name` that dialed us, as PeerServer registers it."""
    cres, sres, c, s = handshake(server_kw={"node_name": "beta"}, client_kw={"node_name": name})
    ours = Session(SecureChannel(s, sres.value.codec, name, "client", 5.0), {}, 30.0,
                   address=(LOWER, 1))
    return ours, c


def test_a_mesh_dialer_waits_while_the_lower_named_node_is_connected_then_dials(tmpdir):
    listener = Listener(LOWER, "alpha")
    registry = Registry()
    inbound, other_end = inbound_session("alpha")
    assert registry.register(inbound)[0]
    settings = peers.make_settings(
        node_name="beta", cluster_name="wazuh", key=KEY, role="client", bind_addr=OURS,
        port=listener.port, nodes=[LOWER], own_addresses=[OURS], keepalive=1.0,
        handshake_timeout=2.0, reconnect_min=0.01, reconnect_max=0.05)
    dialer = peers.Dialer(settings, {}, nonce_book=NonceBook(), registry=registry,
                          failover=node(tmpdir, OURS, Clock())).start()
    try:
        assert wait_for(lambda: listener.handshakes >= 1)
        # ten periods of reconnect_max with alpha's session up: looked at it, never dialed
        wait_for(lambda: registry.looks >= 10 or listener.handshakes >= 2)
        assert listener.handshakes == 1 and registry.looks >= 10
        assert dialer.session is None
        inbound.close()
        assert wait_for(lambda: listener.handshakes >= 2)   # gone: it looks again
    finally:
        dialer.stop()
        listener.close()
        inbound.close()
        other_end.close()
