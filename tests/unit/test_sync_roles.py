"""sync.SyncManager with cluster.failover=1: a session starting at the instant the election
switches this node's role gets the PeerSync of the new role (failover_roles.py). The racy
interleaving is forced with events, not sleeps: the starting session is held inside the
making of its PeerSync while the switch runs."""
from __future__ import absolute_import, division, print_function

import logging
import os
import threading

from wazuh_cluster import config, sync

ITEMS, _EXCLUDE = config.load_items(os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "etc", "cluster.json"))
BOUND = 60.0   # a bound on every wait: reached only when the test fails anyway


class Session(object):
    closed = False
    features = ()
    address = ("127.0.0.2", 1516)
    version = "test"

    def __init__(self, name):
        self.peer_name = name

    def describe_address(self):
        return "%s:%d" % self.address


class Link(object):
    def call(self, cmd, args):
        assert cmd == "peer_seen"
        return {"recorded": True}


class Cfg(object):
    node_name = "alpha"
    interval = 120.0
    items = ITEMS
    options = config.Options(**dict((name, convert(default)) for name, convert, default
                                    in config.OPTIONS))._replace(failover=True)


class WatchedLock(object):
    """A lock that tells when a thread has to wait for it."""

    def __init__(self, contended):
        self.lock = threading.Lock()
        self.contended = contended

    def __enter__(self):
        if not self.lock.acquire(False):
            self.contended.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def manager(role, leader, progress):
    found = sync.SyncManager.__new__(sync.SyncManager)
    found.cfg, found.home, found.link, found.store = Cfg(), "/nonexistent", Link(), None
    found.log = logging.getLogger("test-sync-roles")
    found.lock = WatchedLock(progress)
    found.peers, found.sessions = {}, {}
    found.role, found.leader = role, leader
    found.failover = object()   # failover on; a PeerSync here never runs (start() below)
    found.pushed = found.state_writer = None
    return found


def held_peersync(monkeypatch, entered, release):
    """sync.PeerSync whose first making waits for `release` (it sets `entered` first)."""
    first = []
    base = sync.PeerSync

    class Held(base):
        def __init__(self, *args, **kwargs):
            if not first:
                first.append(self)
                entered.set()
                assert release.wait(BOUND)
            base.__init__(self, *args, **kwargs)

        def start(self):
            return self          # no thread: what matters is which worker is registered

    monkeypatch.setattr(sync, "PeerSync", Held)


def race(monkeypatch, role, leader, new_role, new_leader, peer):
    """A session with `peer` starts under (role, leader) and is held where its worker is
    made; the switch to (new_role, new_leader) runs until it finishes or waits for the
    session; then the session goes on. The worker registered in the end for `peer`."""
    entered, release, progress = threading.Event(), threading.Event(), threading.Event()
    held_peersync(monkeypatch, entered, release)
    found = manager(role, leader, progress)
    starting = threading.Thread(target=found.session_started, args=(Session(peer),))
    starting.start()
    assert entered.wait(BOUND)

    def switch():
        found.set_roles(new_role, new_leader)
        progress.set()
    switching = threading.Thread(target=switch)
    switching.start()
    assert progress.wait(BOUND)     # the switch ended, or waits for the starting session
    release.set()
    starting.join(BOUND)
    switching.join(BOUND)
    assert not starting.is_alive() and not switching.is_alive()
    return found.peers.get(peer)


def test_a_new_leader_never_keeps_a_client_worker_started_under_the_old_role(monkeypatch):
    # alpha followed beta; beta's session starts as alpha is elected and acts
    worker = race(monkeypatch, "client", "beta", "master", None, "beta")
    assert worker is not None and worker.role == "master"


def test_a_deposed_leader_never_keeps_a_master_worker_started_under_the_old_role(
        monkeypatch):
    # alpha acted as master; gamma's session starts as alpha learns that beta leads: alpha
    # sends nothing to a follower (gamma), and as a client only to beta
    worker = race(monkeypatch, "master", None, "client", "beta", "gamma")
    assert worker is None
