"""Threads of an idle wazuh-clusterd sleep until there is something to do (issue 11: an idle
master, both daemons, <= 1 % of a core): the peer and control servers, the events thread of
the internal link and each peer's sync thread.

A thread's wakeups are counted as its voluntary context switches (/proc/self/task/TID/status,
Linux): a thread that wakes to look at a flag and blocks again makes one each time. Before,
each server made five a second (serve_forever(0.2)), the events thread two, a sync thread
one; an idle master's clusterd woke ~30 times a second at 4 clients, most of its CPU. 2.7
has no native thread id: there only the stops are checked.
"""
from __future__ import absolute_import, division, print_function

import io
import os
import socket
import threading
import time

import pytest

from wazuh_cluster import compat, config, localsock, quietserve
from wazuh_cluster.control_server import ControlServer
from wazuh_cluster.internal_link import Subscription
from wazuh_cluster.sync import PeerSync

ITEMS, _EXCLUDE = config.load_items(os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "etc", "cluster.json"))
WAIT = 30.0
QUIET = 1.5  # seconds watched: the old loops woke 2-8 times in that
counted = pytest.mark.skipif(not hasattr(threading.Thread, "native_id"),
                             reason="no native thread id (2.7)")


def switches(thread):
    path = "/proc/self/task/%d/status" % thread.native_id
    with io.open(path) as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in %s" % path)


def wakeups(thread, seconds=QUIET):
    time.sleep(0.2)  # whatever it did when it started
    before = switches(thread)
    time.sleep(seconds)
    return switches(thread) - before


def wait_until(predicate):
    deadline = time.time() + WAIT
    while not predicate() and time.time() < deadline:
        time.sleep(0.01)
    return predicate()


class Echo(compat.socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.request.recv(16))


class EchoServer(compat.socketserver.ThreadingTCPServer, quietserve.QuietServe):
    daemon_threads = True
    allow_reuse_address = True


def test_a_quiet_server_sleeps_while_idle_serves_a_connection_and_stops():
    server = EchoServer(("127.0.0.1", 0), Echo)
    server.new_waker()
    thread = threading.Thread(target=server.serve_quietly)
    thread.daemon = True
    thread.start()
    try:
        if hasattr(thread, "native_id"):
            assert wakeups(thread) == 0
        client = socket.create_connection(server.server_address, WAIT)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        client.close()
    finally:
        server.stop_serving(thread, WAIT)
        server.server_close()
    assert not thread.is_alive()


def test_the_control_server_is_quiet(tmp_path):
    server = ControlServer(str(tmp_path / "control.sock"), None)
    server.start()
    try:
        if hasattr(server.thread, "native_id"):
            assert wakeups(server.thread) == 0
    finally:
        server.stop()
    assert not server.thread.is_alive()


class FakeInternal(object):
    """Answers one 'subscribe' on a UNIX socket, then sends events when told."""

    def __init__(self, path):
        self.listener = localsock.bind_unix(path)
        self.conn = None

    def serve(self):
        self.conn, _ = self.listener.accept()
        header = self.conn.recv(4)
        request = localsock.decode(self.conn.recv(localsock.HEADER.unpack(header)[0]))
        self.conn.sendall(localsock.encode({"id": request["id"], "ok": True,
                                            "result": {"subscribed": True}}))

    def close(self):
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


def test_the_events_thread_sleeps_until_an_event_and_stop_wakes_it(tmp_path):
    path = str(tmp_path / "internal.sock")
    internal = FakeInternal(path)
    server = threading.Thread(target=internal.serve)
    server.start()
    events, stopping = [], compat.Event()
    subscription = Subscription(path, events.append, lambda: None, stopping)
    subscription.start()
    try:
        server.join(WAIT)
        assert internal.conn is not None
        if hasattr(subscription.thread, "native_id"):
            assert wakeups(subscription.thread) <= 1
        internal.conn.sendall(localsock.encode({"event": "changes", "changed": ["a"]}))
        assert wait_until(lambda: events)
    finally:
        stopping.set()
        subscription.stop()
        subscription.thread.join(WAIT)
        internal.close()
    assert not subscription.thread.is_alive()
    assert events[0]["changed"] == ["a"]


class Session(object):
    peer_name = "client-1"
    closed = False


@counted
def test_an_idle_peers_sync_thread_sleeps_until_its_next_round():
    sync = PeerSync(Session(), "/nonexistent", "master", None, ITEMS, 120.0, 0.05, 30.0)
    rounds = []
    sync.full_round = lambda: (rounds.append(1), sync.finished_round(sync.clock()))
    sync.start()
    try:
        assert wait_until(lambda: rounds)
        assert wakeups(sync.thread) == 0
        sync.request_full()   # a notify still wakes it at once
        assert wait_until(lambda: len(rounds) == 2)
    finally:
        sync.stop()
        sync.thread.join(WAIT)
    assert not sync.thread.is_alive()
