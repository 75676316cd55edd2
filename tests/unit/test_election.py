"""The election state machine input by input (election.py); whole clusters: test_election_sim."""
from __future__ import absolute_import, division, print_function

import pytest

from wazuh_cluster import election
from wazuh_cluster.electionstore import MemoryStore

TIMING = election.Timing(1.0)
T = TIMING.failover_timeout
VOTERS = ("a", "b", "c")
BOOT = 100.0 - TIMING.skew     # machines started then: the preferred master stands at 100.0


def machine(me, now=BOOT, preferred=False, store=None, voters=VOTERS):
    return election.Election(me, voters, preferred, TIMING, store or MemoryStore(), now,
                             rand=lambda: 0.5)


def msg(kind, **fields):
    fields["type"] = kind
    return election.parse_message(fields, VOTERS)


def sent(fx, kind):
    return [(peer, m) for peer, m in fx.send if m["type"] == kind]


def notes(fx, kind):
    return [text for k, text in fx.notes if k == kind]


def pump(src, fx, machines, now, drop=()):
    """Deliver fx's messages and every answer they cause among `machines`, instantly, except
    messages of the types in `drop`; the notes of all the steps."""
    by_name = dict((m.me, m) for m in machines)
    queue = [(src.me, peer, m) for peer, m in fx.send]
    seen = list(fx.notes)
    while queue:
        sender, peer, m = queue.pop(0)
        if peer in by_name and m["type"] not in drop:
            out = by_name[peer].receive(sender, election.parse_message(m, VOTERS), now)
            seen.extend(out.notes)
            queue.extend((peer, to, reply) for to, reply in out.send)
    return seen


def elect(leader, others, now):
    """leader stands (tick) and its pre-vote and vote reach `others`; the notes."""
    return pump(leader, leader.tick(now), [leader] + list(others), now)


def beat(leader, followers, now):
    """The leader's heartbeat round at `now` (a tick) reaches `followers`; the notes."""
    return pump(leader, leader.tick(now), [leader] + list(followers), now)


def cluster(now=100.0):
    boot = now - TIMING.skew
    a, b, c = machine("a", boot, preferred=True), machine("b", boot), machine("c", boot)
    assert ("elected" in dict(elect(a, [b, c], now))) and a.role == election.LEADER and a.term == 1
    return a, b, c


def _with(m, **changes):
    copy = dict(m)
    copy.update(changes)
    return copy


# -- messages -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    ({"type": "nope"}, "type"),
    ({"type": "hb", "term": -1, "n": 1, "last": [0, 0]}, "term"),
    ({"type": "hb", "term": True, "n": 1, "last": [0, 0]}, "term"),
    ({"type": "hb", "term": 2 ** 60, "n": 1, "last": [0, 0]}, "term"),
    ({"type": "hb", "term": 1, "n": "1", "last": [0, 0]}, "n"),
    ({"type": "hb", "term": 1, "n": 1, "last": [0]}, "last"),
    ({"type": "hb_ack", "term": 1, "n": 1, "ok": 1, "last": [0, 0]}, "ok"),
    ({"type": "vote", "term": 1, "last": [0, 0], "pre": False, "handover": "zz"}, "handover"),
    ([], "type"),
    ({"type": ["hb"]}, "type"),
    ({"type": "vote", "term": 1, "last": [0, 0], "pre": False, "handover": ["a"]}, "handover"),
])
def test_peer_messages_are_checked_field_by_field(bad, field):
    with pytest.raises(ValueError) as info:
        election.parse_message(bad, VOTERS)
    assert repr(field) in str(info.value) or field in str(info.value)


def test_hello_fields_round_trip_through_the_check():
    hello = machine("a", preferred=True).hello_fields()
    assert election.parse_hello(hello) == {"term": 0, "last": (0, 0), "preferred": True}
    with pytest.raises(ValueError):
        election.parse_hello({"term": 0, "last": [0, 0], "preferred": "yes"})


def test_lease_is_shorter_than_the_proven_bound():
    bound = T * (1 - election.DRIFT) / (1 + election.DRIFT)
    assert TIMING.heartbeat < TIMING.lease < bound
    assert election.Timing(10).failover_timeout == 30
    # a non-preferred candidate stands at most T/6 after its promise ran out
    assert TIMING.skew + TIMING.extra_delay == pytest.approx(T / 6)
    assert TIMING.skew > 2 * election.DRIFT * T


# -- who stands, votes -----------------------------------------------------------------------

def test_preferred_master_stands_at_first_start_with_a_pre_vote_first():
    a = machine("a", preferred=True)
    fx = a.tick(100.0)
    assert a.role == election.PRECANDIDATE and a.term == 0      # nothing taken yet
    assert sorted(p for p, m in sent(fx, "vote") if m["pre"] and m["term"] == 1) == ["b", "c"]
    b = machine("b")
    assert b.tick(100.0).send == []                             # others wait a random delay


def test_non_preferred_nodes_stand_in_slots_by_rank_at_most_t_over_6_after_the_promise():
    """The followers of a dead leader: their promises run out together (one heartbeat), the
    slots keep their candidacies gap / 2 apart at least, whatever the random draws."""
    hello = election.parse_hello({"term": 1, "last": [1, 0], "preferred": True})
    gap = TIMING.gap
    assert 0 < gap <= election.GAP and TIMING.skew + 3 * gap <= T / 6 + 1e-9
    for draw, earliest, latest in ((0.0, 0.0, gap), (0.999, gap / 2, 1.5 * gap)):
        stands = {}
        for me in ("b", "c"):
            m = election.Election(me, VOTERS, False, TIMING, MemoryStore(), 0.0,
                                  rand=lambda: draw)
            m.peer_connected("a", hello, 0.0)
            m.receive("a", msg("hb", term=1, n=1, last=[1, 0]), 10.0)   # promise: 10 + T
            now = 10.0 + T
            m.tick(now)                                                 # leader lost
            stands[me] = m.next_tick()
            assert m.tick(stands[me] - 1e-6).send == []
            assert sent(m.tick(stands[me]), "vote")
            assert stands[me] - now - TIMING.skew <= T / 6 - TIMING.skew
        assert stands["b"] - now - TIMING.skew == pytest.approx(gap * draw / 2)
        assert earliest <= stands["c"] - stands["b"] <= latest + 1e-9


def test_next_tick_is_when_the_machine_has_something_to_do():
    a, b, c = cluster()
    now = 100.0
    assert a.next_tick() == pytest.approx(now + TIMING.heartbeat)      # the next heartbeat
    assert b.next_tick() == pytest.approx(now + T)                     # b's promise
    a.tick(now + TIMING.heartbeat - 0.001)
    assert a.next_tick() == pytest.approx(now + TIMING.heartbeat)
    b.tick(now + T)                                                    # leader lost
    assert b.leader is None and b.next_tick() > now + T
    stood = b.next_tick()
    fx = b.tick(stood)
    assert b.role == election.PRECANDIDATE and sent(fx, "vote")        # nobody answers
    assert b.next_tick() == pytest.approx(stood + TIMING.round)        # the round's end
    assert b.tick(b.next_tick() - 0.001).notes == []
    assert notes(b.tick(b.next_tick()), "round_failed")


def test_a_vote_is_saved_before_it_is_answered():
    class FullDisk(MemoryStore):
        def save(self, term, voted_for, last):
            raise OSError(28, "No space left on device")
    b = machine("b", store=FullDisk())
    with pytest.raises(OSError):
        b.receive("a", msg("vote", term=1, last=[0, 0], pre=False, handover=None), 100.0)


def test_one_vote_per_term_even_after_a_restart():
    store = MemoryStore()
    b = machine("b", store=store)
    fx = b.receive("a", msg("vote", term=1, last=[0, 0], pre=False, handover=None), 100.0)
    assert sent(fx, "vote_ans")[0][1]["granted"] and store.record[:2] == (1, "a")
    b = machine("b", now=500.0, store=store)                    # restarted, promise run out
    fx = b.receive("c", msg("vote", term=1, last=[0, 0], pre=False, handover=None), 600.0)
    assert not sent(fx, "vote_ans")[0][1]["granted"]
    fx = b.receive("a", msg("vote", term=1, last=[0, 0], pre=False, handover=None), 600.0)
    assert sent(fx, "vote_ans")[0][1]["granted"]               # the same answer again


def test_no_vote_for_a_candidate_with_older_master_state():
    b = machine("b")
    b.change_applied((0, 0))
    b.receive("a", msg("hb", term=3, n=1, last=[3, 4]), 100.0)
    b.change_applied((3, 4))
    later = 100.0 + 2 * T
    for last in ([3, 3], [2, 9]):
        fx = b.receive("c", msg("vote", term=5, last=last, pre=False, handover=None), later)
        assert not sent(fx, "vote_ans")[0][1]["granted"]
    fx = b.receive("c", msg("vote", term=5, last=[3, 4], pre=False, handover=None), later)
    assert sent(fx, "vote_ans")[0][1]["granted"]


def test_a_promise_refuses_votes_without_taking_their_term():
    b = machine("b")
    b.receive("a", msg("hb", term=1, n=1, last=[1, 0]), 100.0)
    request = msg("vote", term=2, last=[1, 0], pre=False, handover=None)
    for kind_pre in (True, False):
        fx = b.receive("c", dict(request, pre=kind_pre), 100.0 + T * 0.99)
        assert not sent(fx, "vote_ans")[0][1]["granted"] and b.term == 1
    fx = b.receive("c", request, 100.0 + T)
    assert sent(fx, "vote_ans")[0][1]["granted"] and b.term == 2 and b.leader is None


def test_restart_renews_the_promise_but_a_first_start_has_none():
    store = MemoryStore()
    store.save(1, None, (1, 0))
    b = machine("b", now=10.0, store=store)
    request = msg("vote", term=2, last=[1, 0], pre=True, handover=None)
    assert not sent(b.receive("c", request, 10.0 + 0.99 * T), "vote_ans")[0][1]["granted"]
    assert sent(b.receive("c", request, 10.0 + T), "vote_ans")[0][1]["granted"]
    fresh = machine("b", now=10.0)
    assert sent(fresh.receive("c", dict(request, term=1, last=(0, 0)), 10.0),
                "vote_ans")[0][1]["granted"]


def test_a_node_that_joined_renews_its_promise_at_start_even_without_a_term():
    """Only a store that proves the node never joined skips the promise: a record lost with
    its term (term 0 again) must not let the node vote at once."""
    store = MemoryStore()
    store.saves = 1            # it saved a record once (FileStore: the marker exists)
    b = machine("b", now=10.0, store=store)
    assert b.term == 0
    request = msg("vote", term=1, last=[0, 0], pre=True, handover=None)
    assert not sent(b.receive("c", request, 10.0 + 0.99 * T), "vote_ans")[0][1]["granted"]
    assert sent(b.receive("c", request, 10.0 + T), "vote_ans")[0][1]["granted"]


def test_a_term_far_above_ours_is_refused_as_hostile_in_every_input():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    huge = b.term + election.MAX_TERM_JUMP + 1
    for m in (msg("hb", term=huge, n=1, last=[1, 0]),
              msg("vote", term=huge, last=[huge, 0], pre=False, handover=None),
              msg("vote_ans", term=huge, pre=False, granted=False),
              msg("hb_ack", term=huge, n=1, ok=False, last=[1, 0])):
        fx = b.receive("c", m, 100.0)
        assert not fx.send and "with term %d, more than 2^20 above term 1: refused" % huge \
            in notes(fx, "hostile")[0]
    fx = b.peer_connected("c", {"term": election.MAX_TERM - 1, "last": (0, 0),
                                "preferred": False}, 100.0)
    assert notes(fx, "hostile") and b.term == 1 and b.leader == "a"
    allowed, fx = b.transfer_allowed("c", huge, 100.0)
    assert not allowed and notes(fx, "hostile") and b.term == 1
    assert b.receive("c", msg("hb", term=huge - 1, n=1, last=[1, 0]), 100.0).send  # in bounds
    assert b.term == huge - 1


# -- leases ----------------------------------------------------------------------------------

def test_leader_acts_only_after_a_majority_acknowledged_and_until_the_lease_ends():
    a, b, c = machine("a", preferred=True), machine("b"), machine("c")
    pump(a, a.tick(100.0), [a, b, c], 100.0, drop=("hb",))
    assert a.role == election.LEADER and a.term == 1
    assert not a.is_acting(100.0) and a.new_version(100.0) is None   # votes are no acks
    start = 100.0 + TIMING.heartbeat
    beat(a, [b], start)                                         # a and b: a majority of 3
    assert a.is_acting(start) and a.new_version(start) == (1, 1)
    end = start + TIMING.lease
    assert a.is_acting(end - 0.001) and not a.is_acting(end)    # even without a tick
    assert a.new_version(end) is None
    fx = a.tick(end)
    assert notes(fx, "stepped_down") and a.role == election.FOLLOWER


def test_acknowledgements_of_old_heartbeats_do_not_extend_the_lease():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    fx = a.tick(100.0 + TIMING.heartbeat)                       # round 2, answered late
    (_, hb2), = [x for x in sent(fx, "hb") if x[0] == "b"]
    late = 100.0 + TIMING.lease - 0.01
    (_, ack), = b.receive("a", msg(**dict(hb2, kind="hb")), late).send
    a.receive("b", msg(**dict(ack, kind="hb_ack")), late)
    assert a.lease_until() == pytest.approx(100.0 + TIMING.heartbeat + TIMING.lease)


def test_a_higher_term_deposes_the_leader():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    fx = a.receive("c", msg("hb_ack", term=7, n=1, ok=False, last=[0, 0]), 100.1)
    assert a.term == 7 and a.role == election.FOLLOWER and not a.is_acting(100.1)
    assert notes(fx, "stepped_down")


def test_leader_refuses_a_vote_while_it_holds_its_own_promise():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    fx = a.receive("c", msg("vote", term=2, last=[1, 0], pre=False, handover=None), 101.0)
    assert not sent(fx, "vote_ans")[0][1]["granted"] and a.role == election.LEADER


# -- fencing ---------------------------------------------------------------------------------

def test_master_owned_files_only_from_the_leader_of_the_highest_term():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    assert b.transfer_allowed("a", 1, 100.0)[0]
    allowed, fx = b.transfer_allowed("c", 1, 100.0)             # not the leader of term 1
    assert not allowed and notes(fx, "refused")
    assert b.transfer_allowed("c", 2, 100.0)[0] and b.term == 2 and b.leader == "c"
    allowed, fx = b.transfer_allowed("a", 1, 100.0)             # stale term, whatever it says
    assert not allowed and "older than term 2" in notes(fx, "refused")[0]


def test_a_rename_is_fenced_by_the_leader_and_term_known_at_that_moment():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    assert b.still_leads("a", 1) and not b.still_leads("c", 1) and not b.still_leads("a", 0)
    b.transfer_allowed("c", 2, 100.0)                           # a higher term became known
    assert not b.still_leads("a", 1) and b.still_leads("c", 2)
    assert not a.still_leads("a", 1)                            # never from itself


def test_applied_versions_only_move_forward_and_are_saved():
    store = MemoryStore()
    b = machine("b", store=store)
    b.receive("a", msg("hb", term=2, n=1, last=[2, 3]), 100.0)
    b.change_applied((2, 3))
    b.change_applied((2, 1))
    b.change_applied((9, 0))                                    # a term not known: ignored
    assert b.last == (2, 3) and store.record == (2, None, (2, 3))


# -- failback --------------------------------------------------------------------------------

def test_a_leader_stopping_cleanly_hands_over_and_the_others_need_not_wait_for_promises():
    a, b, c = cluster()
    now = 100.0 + TIMING.heartbeat
    assert a.abdicate(now).send == [] and a.is_acting(now)      # nobody holds all of a's state
    b.change_applied((1, 0))
    c.change_applied((1, 0))
    beat(a, [b, c], now)                                        # b and c report their state
    assert b.abdicate(now).send == [] and not b.is_acting(now)  # a follower: nothing to do
    seen = pump(a, a.abdicate(now), [a, b, c], now)
    assert not a.is_acting(now) and a.role == election.FOLLOWER
    assert "handover" in dict(seen) and "elected" in dict(seen)
    assert b.role == election.LEADER and b.term == 2 and c.leader == "b"   # well within T
    now += 0.01
    beat(b, [c], now)                                           # a is gone: c's ack suffices
    assert b.is_acting(now)
    # a leader whose followers have not reported its newest version asks them, then hands over
    assert b.new_version(now) == (2, 1)
    assert b.abdicate(now).send == [] and b.is_acting(now)
    fx = b.abdicate(now, ping=True)
    assert [m["type"] for _, m in fx.send] == ["hb", "hb"] and b.is_acting(now)
    c.change_applied((2, 1))
    pump(b, fx, [b, c], now)                                    # c's answer: caught up
    seen = pump(b, b.abdicate(now), [b, c], now)
    assert "handover" in dict(seen) and not b.is_acting(now)
    assert c.role == election.LEADER and c.term == 3               # b, stopping, voted for c


def test_failback_hands_over_to_the_caught_up_preferred_master_in_the_next_term():
    now = 100.0
    a, b, c = machine("a", now, preferred=True), machine("b", now), machine("c", now)
    b.peer_connected("a", election.parse_hello(a.hello_fields()), now)
    now += TIMING.extra_delay
    elect(b, [c], now)                                          # a was away: b leads term 1
    assert b.is_acting(now) and b.new_version(now) == (1, 1)
    now += TIMING.heartbeat
    seen = beat(b, [a, c], now)                                 # a is back, not caught up
    assert b.is_acting(now) and a.leader == "b" and not dict(seen).get("handover")
    assert a.transfer_allowed("b", 1, now)[0]
    a.change_applied((1, 1))
    now += TIMING.heartbeat
    seen = beat(b, [a, c], now)                                 # a's answer shows it caught up
    assert [k for k, _ in seen].count("handover") == 2          # b hands over, a takes it
    assert "elected" in dict(seen) and a.role == election.LEADER and a.term == 2
    assert not b.is_acting(now) and b.role == election.FOLLOWER and b.leader == "a"
    assert a.last == (2, 0) and a.is_acting(now)                # no gap: acting at once


def test_a_handover_claim_from_someone_else_does_not_lift_a_promise():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    fx = b.receive("c", msg("vote", term=2, last=[1, 0], pre=False, handover="b"), 100.5)
    assert not sent(fx, "vote_ans")[0][1]["granted"] and b.term == 1


def test_a_leader_that_handed_nothing_over_refuses_a_handover_claim_naming_it():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    fx = a.receive("b", msg("vote", term=2, last=[1, 0], pre=False, handover="a"), 100.5)
    assert not sent(fx, "vote_ans")[0][1]["granted"] and a.is_acting(100.5) and a.term == 1


def test_status_shows_role_term_leader_and_the_lease_left():
    a, b, c = cluster()
    beat(a, [b, c], 100.0)
    assert a.status(101.0) == {"role": "leader", "term": 1, "leader": "a", "acting": True,
                               "lease_left": round(TIMING.lease - 1.0, 3), "last": [1, 0]}
    assert b.status(101.0)["leader"] == "a" and b.status(101.0)["lease_left"] is None
    assert a.status(100.0 + TIMING.lease)["acting"] is False
