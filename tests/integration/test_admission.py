"""Fair admission on a real master: one listed address floods the cluster port with idle
connections (reopening every one that is closed), and another listed node still connects and
synchronises; the flood leaves a bounded number of lines in cluster.log.

With only the global bound (cluster.max_pending_handshakes, 16 by default) the flooder's idle
connections hold every handshake slot for cluster.handshake_timeout and are replaced at once,
so the client's handshakes are refused again and again.
"""
from __future__ import absolute_import, division, print_function

import errno
import io
import socket
import threading

from harness import read_text as read
from harness import (base_install, make_node, new_address, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)

FAST = {"cluster.poll_interval": "0.2", "cluster.scan_interval": "1", "cluster.keepalive": "1",
        "cluster.reconnect_max": "1"}
KEYS = u"001 web01 any 1111\n"
HOLD = 40


class Flooder(object):
    """Keeps HOLD idle connections open from `source` to (address, port), reopening each one
    the server closes; counts the connections it opened."""

    def __init__(self, source, address, port):
        self.source, self.target = source, (address, port)
        self.opened = 0
        self.stop = threading.Event()
        self.socks = []
        self.thread = threading.Thread(target=self.run)
        self.thread.daemon = True

    def open_one(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.source, 0))
        sock.settimeout(2)
        try:
            sock.connect(self.target)
        except socket.error:
            sock.close()
            return
        sock.setblocking(False)
        self.socks.append(sock)
        self.opened += 1

    def closed(self, sock):
        try:
            return sock.recv(1) == b""
        except socket.error as err:
            return err.args[0] not in (errno.EAGAIN, errno.EWOULDBLOCK)  # still open

    def run(self):
        while not self.stop.is_set():
            alive = []
            for sock in self.socks:
                if self.closed(sock):
                    sock.close()
                else:
                    alive.append(sock)
            self.socks = alive
            for _ in range(min(HOLD - len(self.socks), 5)):   # at most 500 a second
                self.open_one()
            self.stop.wait(0.01)   # pacing of the load, not a wait for a condition
        for sock in self.socks:
            sock.close()


def test_a_flooding_address_does_not_starve_another_node(make_node):
    master = make_node("master", "master", configure=False)
    client = make_node("client1", "client", configure=False)
    flood_from = new_address()
    client.port = master.port
    for node, role in ((master, "master"), (client, "client")):
        node.configure(role, [master.address, client.address, flood_from])
        write_internal_options(node.prefix, FAST)
    with io.open(master.path("etc", "client.keys"), "w", encoding="utf-8") as handle:
        handle.write(KEYS)
    master.start()
    flooder = Flooder(flood_from, master.address, master.port)
    flooder.thread.start()
    try:
        wait_for(lambda: flooder.opened >= 300, 30, what="300 connections of the flooder")
        client.start()
        wait_for(lambda: read(client, "etc/client.keys") == KEYS, 20,
                 what="the client synchronised while the flood goes on")
        assert flooder.opened > 300
    finally:
        flooder.stop.set()
        flooder.thread.join(10)
    lines = [line for line in master.log().splitlines() if flood_from + ":" in line]
    # 300 and more refusals; the first is logged, the others counted for the summary that
    # comes a minute later (the test ends well before).
    assert 1 <= len(lines) <= 2, lines
    assert "refused peer" in lines[0] and "from this address" in lines[0]
