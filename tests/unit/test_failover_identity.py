"""Fencing goes by the <nodes> entry of the live session a batch arrives on, never by node
name (review of issue 14): a name is what a peer says it is, and a node that once connected
under the leader's name must not make the leader's changes be refused. Real Failover objects
on loopback sessions (test_failover.py), a real Inbox and Receiver (test_failover_fencing.py)."""
from __future__ import absolute_import, division, print_function

import os

import pytest

from wazuh_cluster.channel import SecureChannel
from wazuh_cluster.errors import RequestError
from wazuh_cluster.session import Session

from test_channel import handshake
from test_failover import Clock, connect, node, peer, run_until
from test_failover_fencing import SHARED, batch, follower_inbox, write
from test_receive import read

KEYS = "".join("%03d agent%d any %s\n" % (i, i, "k" * 64) for i in range(1, 21))


def session_as(a, b, name):
    """A real session from Failover `a` to `b` in which `a` calls itself `name` (any holder
    of the key can): b's end, opened by b; its other end drops election frames."""
    cres, sres, c, s = handshake(server_kw={"node_name": b.node_name},
                                 client_kw={"node_name": name})
    ours = Session(SecureChannel(c, cres.value.codec, b.node_name, "client", 5.0), {}, 30.0,
                   address=(b.me, 1))
    ours.on_election = lambda session, header: None
    theirs = Session(SecureChannel(s, sres.value.codec, name, "client", 5.0), {}, 30.0,
                     address=(a.me, 1))
    b.session_opened(theirs, a.hello_fields())
    ours.start()
    theirs.start()
    return ours, theirs


@pytest.fixture
def impostor_first(tmpdir):
    """alpha (preferred), beta, gamma; gamma's first session with beta said it was "alpha",
    then closed (gamma stays away from beta); alpha is elected over alpha-beta and
    alpha-gamma."""
    clock = Clock()
    alpha, beta, gamma = (node(tmpdir, "127.0.0.1", clock, preferred=True),
                          node(tmpdir, "127.0.0.2", clock), node(tmpdir, "127.0.0.3", clock))
    sessions = list(session_as(gamma, beta, "alpha"))
    for session in sessions:
        session.close()
    beta.session_closed(sessions[1])
    sessions.extend(connect(alpha, beta) + connect(alpha, gamma))
    run_until([alpha, beta, gamma], clock,
              lambda: alpha.is_acting() and beta.leader_name() == "alpha")
    yield alpha, beta, gamma, clock, sessions
    for session in sessions:
        session.close()


def test_a_node_that_once_used_the_leaders_name_cannot_make_its_changes_refused(
        tmpdir, impostor_first):
    alpha, beta, gamma, clock, sessions = impostor_first
    assert beta.names["127.0.0.3"] == "alpha"       # what beta saw: kept for display only
    box, home = follower_inbox(tmpdir, beta)
    header, data = batch([(SHARED, b"from the leader\n")], term=1)
    answer, _ = box.sync_files(peer(beta, "alpha"), header, data)
    assert answer["states"] == {SHARED: "synchronized"}
    assert read(home, SHARED) == b"from the leader\n"
    # the held client.keys records the leader's entry, not a name: applied when confirmed
    write(home, "etc/client.keys", KEYS.encode("ascii"))
    header, data = batch([(u"etc/client.keys", b"001 agent1 any " + b"k" * 64 + b"\n")],
                         term=1)
    answer, _ = box.sync_files(peer(beta, "alpha"), header, data)
    assert answer["states"] == {u"etc/client.keys": "pending"}
    assert box.held()["from"] == "127.0.0.1"
    assert len(box.confirm_removals()["removed"]) == 19
    assert read(home, "etc/client.keys") == b"001 agent1 any " + b"k" * 64 + b"\n"


def test_the_impostor_itself_and_a_stale_term_are_still_refused(tmpdir, impostor_first):
    alpha, beta, gamma, clock, sessions = impostor_first
    box, home = follower_inbox(tmpdir, beta)
    leader = peer(beta, "alpha")
    sessions.extend(session_as(gamma, beta, "alpha"))   # live now, from gamma's entry
    impostor = beta.sessions["127.0.0.3"]
    header, data = batch([(SHARED, b"from gamma\n")], term=1)
    with pytest.raises(RequestError) as info:
        box.sync_files(impostor, header, data)
    assert info.value.code == "stale_term" and "not the leader" in info.value.message
    assert beta.follows(leader) and not beta.follows(impostor)
    assert beta.fence("127.0.0.3", 1)(lambda: None) is False
    assert beta.fence(None, 1)(lambda: None) is False
    # the leader's own session passes until a higher term is known, then not any more
    fence = beta.fence(beta.voter_of(leader), 1)
    assert fence(lambda: None) is True
    with beta.lock:   # as if beta had heard of a later election
        beta.election.term = 2
    assert fence(lambda: None) is False
    with pytest.raises(RequestError) as info:
        box.sync_files(leader, *batch([(SHARED, b"stale\n")], term=1))
    assert info.value.code == "stale_term" and not os.path.exists(os.path.join(home, SHARED))
