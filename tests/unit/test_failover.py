"""failover.Failover: the election among real sessions (TCP on loopback, real handshakes, the
durable store in a temporary folder). Time is a manual clock advanced by the test; every wait
on the sockets polls with a bound."""
from __future__ import absolute_import, division, print_function

import threading
import time

import py
import pytest

from wazuh_cluster import config, failover
from wazuh_cluster.channel import SecureChannel
from wazuh_cluster.errors import ClusterError, RequestError
from wazuh_cluster.session import Session

from test_channel import handshake

NAMES = {"127.0.0.1": "alpha", "127.0.0.2": "beta", "127.0.0.3": "gamma"}
OPTIONS = config.Options(**dict((name, convert(default)) for name, convert, default
                                in config.OPTIONS))._replace(keepalive=1.0, failover=True)


class Cfg(object):
    def __init__(self, address, preferred):
        self.node_name = NAMES[address]
        self.nodes = sorted(NAMES)
        self.own_address = address
        self.is_master = preferred
        self.options = OPTIONS


class Clock(object):
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


def db_folder(tmpdir, name):
    """NAME/var/db of an installation in tmpdir (its etc/ holds the election marker)."""
    home = tmpdir.join(name) if tmpdir.join(name).check() else tmpdir.mkdir(name)
    home.ensure("etc", dir=True)
    return str(home.ensure("var", "db", dir=True))


def node(tmpdir, address, clock, preferred=False):
    return failover.Failover(Cfg(address, preferred), db_folder(tmpdir, NAMES[address]),
                             lambda entry: [entry], clock=clock)


def connect(a, b):
    """A real session between Failover `a` and `b` (both sides opened, hello exchanged)."""
    cres, sres, c, s = handshake(server_kw={"node_name": b.node_name},
                                 client_kw={"node_name": a.node_name})
    ca = SecureChannel(c, cres.value.codec, b.node_name, "client", 5.0)
    cb = SecureChannel(s, sres.value.codec, a.node_name, "client", 5.0)
    sa = Session(ca, {}, 30.0, address=(b.me, 1))
    sb = Session(cb, {}, 30.0, address=(a.me, 1))
    hello_a, hello_b = a.hello_fields(), b.hello_fields()
    assert a.check_hello(sa, hello_b) is None and b.check_hello(sb, hello_a) is None
    a.session_opened(sa, hello_b)
    b.session_opened(sb, hello_a)
    sa.start()
    sb.start()
    return sa, sb


def peer(node, name):
    """`node`'s live session with the node named `name` (the identity fencing goes by)."""
    found = [s for s in node.sessions.values() if s.peer_name == name]
    assert len(found) == 1, name
    return found[0]


class Stranger(object):
    """A session from an address that is none of <nodes>."""
    peer_name = "delta"
    address = ("127.0.0.9", 1)


def run_until(nodes, clock, condition, step=0.01, limit=20000):
    """Advance the shared clock by `step` and tick every node until `condition()` holds;
    between ticks the frames travel (polled, bounded)."""
    for _ in range(limit):
        if condition():
            return
        clock.now += step
        for n in nodes:
            n.tick()
        time.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture
def cluster(tmpdir):
    clock = Clock()
    nodes = [node(tmpdir, "127.0.0.1", clock, preferred=True), node(tmpdir, "127.0.0.2", clock),
             node(tmpdir, "127.0.0.3", clock)]
    sessions = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            sessions.extend(connect(a, b))
    yield nodes, clock, sessions
    for session in sessions:
        session.close()


def test_the_preferred_master_is_elected_over_real_sessions_and_the_others_follow(cluster):
    (alpha, beta, gamma), clock, _ = cluster
    run_until(cluster[0], clock, alpha.is_acting)
    run_until(cluster[0], clock, lambda: beta.leader_name() == gamma.leader_name() == "alpha")
    status = alpha.status()
    assert status["role"] == "master" and status["term"] == 1 and status["leader"] == "alpha"
    assert status["preferred"] == "alpha" and 0 < status["lease_remaining"]
    assert status["failovers"][0]["leader"] == "alpha"
    assert beta.status()["role"] == "client" and beta.status()["lease_remaining"] is None
    assert not beta.is_acting() and beta.new_version() is None


def test_a_leader_cut_off_stops_acting_when_its_lease_runs_out(cluster):
    (alpha, beta, gamma), clock, sessions = cluster
    run_until(cluster[0], clock, alpha.is_acting)
    # peers.py tells the Failover of every closed session (nothing else empties
    # alpha.sessions): the same here, so the test does not wait out a bound for it.
    for session in sessions:
        session.close()
    for n in (alpha, beta, gamma):
        for session in list(n.sessions.values()):
            n.session_closed(session)
    assert not alpha.sessions and alpha.is_acting()   # until its lease runs out
    clock.now += alpha.timing.lease
    alpha.tick()
    assert not alpha.is_acting() and alpha.new_version() is None
    assert alpha.status()["role"] != "master"


def test_master_owned_batches_are_fenced_by_term_and_every_field_is_checked(cluster):
    (alpha, beta, gamma), clock, _ = cluster
    run_until(cluster[0], clock, lambda: alpha.is_acting() and beta.leader_name() == "alpha")
    version = alpha.new_version()
    assert version == [1, 1]
    beta.check_transfer(peer(beta, "alpha"), {"term": 1})                  # a batch: the term only
    beta.check_transfer(peer(beta, "alpha"), {"term": 1, "version": version})     # a confirmation
    beta.confirm(peer(beta, "alpha"), {"term": 1, "version": version})
    assert beta.status()["last"] == [1, 1]
    for bad in (None, [], {}, {"term": "1", "version": [1, 1]}, {"term": True, "version": [1, 1]},
                {"version": [1, 1]}, {"term": 1, "version": [1]}, {"term": 1, "version": [2, 0]},
                {"term": 1, "version": [1, -1]}, {"term": 2 ** 60, "version": [1, 1]}):
        with pytest.raises(RequestError) as info:
            beta.check_transfer(peer(beta, "alpha"), bad)
        assert info.value.code == "stale_term"
    with pytest.raises(RequestError) as info:       # not the leader of the term
        beta.check_transfer(peer(beta, "gamma"), {"term": 1, "version": [1, 2]})
    assert info.value.code == "stale_term"
    with pytest.raises(RequestError) as info:       # no session with that node
        beta.check_transfer(Stranger(), {"term": 1, "version": [1, 2]})
    assert info.value.code == "stale_term"


def test_an_older_term_is_refused_once_a_newer_is_known(cluster):
    (alpha, beta, gamma), clock, _ = cluster
    run_until(cluster[0], clock, lambda: alpha.is_acting() and beta.leader_name() == "alpha")
    with beta.lock:   # as if beta had heard of a later election
        beta.election.term = 5
    with pytest.raises(RequestError) as info:
        beta.check_transfer(peer(beta, "alpha"), {"term": 1, "version": [1, 3]})
    assert info.value.code == "stale_term" and "refused" in info.value.message


def test_before_any_leader_existed_only_the_preferred_master_stands(tmpdir):
    clock = Clock()
    beta, gamma = node(tmpdir, "127.0.0.2", clock), node(tmpdir, "127.0.0.3", clock)
    sessions = connect(beta, gamma)
    try:
        for _ in range(200):
            clock.now += 0.5
            beta.tick()
            gamma.tick()
        assert beta.status()["term"] == gamma.status()["term"] == 0
        assert beta.status()["role"] == gamma.status()["role"] == "client"
    finally:
        for session in sessions:
            session.close()


def test_a_peer_with_failover_off_is_refused_in_one_line(tmpdir):
    clock = Clock()
    alpha, beta = node(tmpdir, "127.0.0.1", clock, True), node(tmpdir, "127.0.0.2", clock)
    sa, sb = connect(alpha, beta)
    try:
        reason = alpha.check_hello(sa, {"name": "beta", "role": "client", "version": "3.0.0"})
        assert reason == ("node beta has cluster.failover=0 and this node has "
                          "cluster.failover=1: the setting must be the same on every node")
        bad = alpha.check_hello(sa, {"election": {"term": -1, "last": [0, 0],
                                                  "preferred": False}})
        assert bad.startswith("node beta sent a bad election hello: field 'term'")
    finally:
        sa.close()
        sb.close()


def test_an_unusable_election_record_stops_the_start_naming_it(tmpdir):
    folder = py.path.local(db_folder(tmpdir, "alpha"))
    folder.join("cluster-election.json").write("{not json")
    with pytest.raises(ClusterError) as info:
        failover.Failover(Cfg("127.0.0.1", True), str(folder), lambda entry: [entry])
    assert "cluster-election.json" in str(info.value)


def test_this_node_must_be_listed():
    cfg = Cfg("127.0.0.1", True)
    cfg.own_address = "127.0.0.9"
    with pytest.raises(ClusterError) as info:
        failover.Failover(cfg, "/nonexistent", lambda entry: [entry])
    assert "127.0.0.9 is not among <nodes>" in str(info.value)


def test_failed_rounds_are_logged_once_not_every_half_round(tmpdir, caplog):
    clock = Clock()
    alpha = node(tmpdir, "127.0.0.1", clock, preferred=True)
    for _ in range(100):
        clock.now += 0.5
        alpha.tick()
    lines = [r.getMessage() for r in caplog.records if "votes needed" in r.getMessage()]
    assert len(lines) == 1 and "logged once" in lines[0]
    assert not alpha.is_acting()


def test_an_idle_election_sender_thread_does_not_poll(cluster):
    """Each node has one sender thread per peer (the full mesh), idle almost always. 2.7's
    threading.Condition.wait(timeout) polls (a sleep up to 50 ms between looks, ~20 wake-ups
    a second per thread): the idle cost of failover on 2.7 was +0.6 % of a core per node at
    5 nodes instead of ~+0.1 %. compat.Condition blocks until notified or timed out."""
    _, _, sessions = cluster
    sleeps = []

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) == "sleep":
            sleeps.append(threading.current_thread().name)
    threading.setprofile(profile)
    try:
        sender = failover._Sender(sessions[0])
    finally:
        threading.setprofile(None)
    time.sleep(0.5)                       # an idle window of ten 2.7 polls at least
    assert sender.idle() and sleeps == []


def test_an_election_sender_leaves_when_its_session_is_reported_closed(cluster):
    """The idle sender waits untimed for put() (see above); the end of its session must
    still end its thread, not leave one blocked thread per session the node ever had."""
    _, _, sessions = cluster
    sender = failover._Sender(sessions[0])
    sender.close()
    sender.thread.join(10)
    assert not sender.thread.is_alive() and not sessions[0].closed
