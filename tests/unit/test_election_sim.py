"""Simulated clusters of election.Election state machines under faults, with a checker.

Deterministic (every trial is seeded) and in simulated time only: a message bus with loss,
delay and partitions, one monotonic clock per node whose rate is off by up to election.DRIFT
and whose origin is arbitrary at each boot, node crashes and restarts that keep only the
durable store, process pauses (the clock runs on meanwhile), partitions, single links cut (a
partition that is not transitive), flapping links. The checker asserts at every event: at most
one leader per term; never two nodes believing they act at one instant; nothing done by a
leader once a newer term has elected someone; nothing applied from a stale term; a vote at
most once per term and terms never going back, across restarts; every version committed in a
term in every leader of a later term. After the faults are healed: a leader within a bound,
then the preferred master back (failback) with never two acting.

WAZUH_CLUSTER_ELECTION_TRIALS=500 runs more trials per cluster size (default 12).
"""
from __future__ import absolute_import, division, print_function

import heapq
import json
import os
import random

import pytest

from wazuh_cluster import election
from wazuh_cluster.electionstore import FileStore, MemoryStore

TIMING = election.Timing(1.0)          # failover_timeout 3 s
T = TIMING.failover_timeout
TRIALS = int(os.environ.get("WAZUH_CLUSTER_ELECTION_TRIALS", "12"))
CHAOS = 30 * T                         # faults happen in [0, CHAOS), then all is healed
LEADER_BOUND = 3 * T                   # after healing: some node acts, all follow it
# after healing: the preferred master acts, and goes on acting (an acting master that failed a
# handover tries again after FAILBACK_BACKOFF failover timeouts)
FAILBACK_BOUND = (4 + election.FAILBACK_BACKOFF) * T
TICK = T / 20


class Clock(object):
    """A node's monotonic clock: its own rate (within DRIFT), a new origin at every boot."""

    def __init__(self, rng):
        drift = election.DRIFT
        self.rate = rng.choice([1 - drift, 1 + drift, 1 + rng.uniform(-drift, drift)])
        self.base_real = 0.0
        self.base_local = 0.0

    def boot(self, real, rng):
        self.base_real = real
        self.base_local = rng.uniform(0, 1e6)

    def now(self, real):
        return self.base_local + (real - self.base_real) * self.rate


class AuditedStore(object):
    """A node's durable store, every save shown to the checker first."""

    def __init__(self, name, inner, checker):
        self.name = name
        self.inner = inner
        self.checker = checker

    def load(self):
        return self.inner.load()

    def joined(self):
        return self.inner.joined()

    def save(self, term, voted_for, last):
        self.checker.saved(self.name, term, voted_for, tuple(last))
        self.inner.save(term, voted_for, last)


class Node(object):
    def __init__(self, name, store, clock):
        self.name = name
        self.store = store
        self.clock = clock
        self.up = False
        self.epoch = 0
        self.sm = None
        self.paused_until = 0.0


class Checker(object):
    """Ground truth kept outside the state machines."""

    def __init__(self, sim):
        self.sim = sim
        self.leaders = {}      # term -> node elected in it
        self.elected_at = {}   # term -> real time of that election
        self.votes = {}        # (node, term) -> voted_for
        self.terms = {}        # node -> last saved term
        self.lasts = {}        # node -> last saved version (the durable state)
        self.parent = {}       # (term, 0) -> the version the leader of `term` held then
        self.commits = [(0, 0)]   # committed versions, oldest first (one line of descent)
        self.dirty = False

    def fail(self, text):
        raise AssertionError("%s at t=%.3f\n%s" % (text, self.sim.real, self.sim.trace_text()))

    def saved(self, name, term, voted_for, last):
        if term < self.terms.get(name, 0):
            self.fail("%s saved term %d after term %d" % (name, term, self.terms[name]))
        if voted_for is not None:
            earlier = self.votes.setdefault((name, term), voted_for)
            if earlier != voted_for:
                self.fail("%s voted for %s and %s in term %d" % (name, earlier, voted_for, term))
        self.terms[name] = term
        if self.lasts.get(name) != last:
            self.lasts[name] = last
            self.dirty = True

    def restarted(self, node):
        sm = node.sm
        if (sm.term, sm.voted_for, sm.last) != (self.terms.get(node.name, 0),
                                                self.votes.get((node.name, sm.term)),
                                                self.lasts.get(node.name, (0, 0))):
            self.fail("%s lost its durable state in a restart" % node.name)

    def elected(self, name, term, prior):
        if self.leaders.setdefault(term, name) != name:
            self.fail("two leaders in term %d: %s and %s" % (term, self.leaders[term], name))
        self.elected_at[term] = self.sim.real
        self.refresh_commits()
        # Raft's leader completeness: what was committed in earlier terms is in every leader
        # of a later term (a leader elected late in an older term acts never: see acted()).
        known = [v for v in self.commits if v[0] < term][-1]
        if not self.descends(prior, known):
            self.fail("%s elected in term %d without committed version %s (has %s)"
                      % (name, term, known, prior))
        self.parent[(term, 0)] = prior

    def acted(self, name, term):
        newer = [t for t in self.elected_at if t > term]
        if newer:
            self.fail("%s acted for term %d after term %d elected %s"
                      % (name, term, max(newer), self.leaders[max(newer)]))

    def parent_of(self, version):
        if version[1] > 0:
            return (version[0], version[1] - 1)
        return self.parent.get(version, (0, 0))

    def descends(self, version, ancestor):
        while version > ancestor:
            version = self.parent_of(version)
        return version == ancestor

    def refresh_commits(self):
        # Raft's rule: a version is committed when a majority holds it in the version's own
        # term (a majority holding an older term's version may still be overwritten).
        if not self.dirty:
            return
        self.dirty = False
        majority = len(self.sim.nodes) // 2 + 1
        for term in set(v[0] for v in self.lasts.values()):
            seqs = sorted((v[1] for v in self.lasts.values() if v[0] == term), reverse=True)
            if len(seqs) < majority or term == 0:
                continue
            version, top = (term, seqs[majority - 1]), self.commits[-1]
            if version > top:
                if not self.descends(version, top):
                    self.fail("committed %s does not contain committed %s" % (version, top))
                self.commits.append(version)
            elif not self.descends(top, version):
                self.fail("committed %s is not in committed %s" % (version, top))

    def observe(self):
        acting = [n.name for n in self.sim.nodes.values()
                  if n.up and n.sm.is_acting(n.clock.now(self.sim.real))]
        if len(acting) > 1:
            self.fail("two nodes act at once: %s" % acting)
        self.refresh_commits()


class Sim(object):
    """n nodes, n0 the preferred master; run(until) processes events in real-time order."""

    def __init__(self, n, seed, store_factory=None, failback=True):
        self.rng = random.Random(seed)
        self.names = ["n%d" % i for i in range(n)]
        self.failback = failback
        self.checker = Checker(self)
        self.nodes = {}
        self.queue = []
        self.seq = 0
        self.real = 0.0
        self.blocked = {}      # frozenset pair -> number of faults blocking it
        self.loss = 0.0
        self.max_delay = 0.02 * T
        self.change_rate = 0.03
        self.trace = []
        for name in self.names:
            inner = store_factory(name) if store_factory else MemoryStore()
            self.nodes[name] = Node(name, AuditedStore(name, inner, self.checker),
                                    Clock(self.rng))
        for name in self.names:
            self.start(name)

    # -- plumbing --------------------------------------------------------------------------

    def at(self, when, kind, *args):
        heapq.heappush(self.queue, (when, self.seq, kind, args))
        self.seq += 1

    def log(self, name, text):
        self.trace.append("%9.3f %s %s" % (self.real, name, text))
        del self.trace[:-300]

    def trace_text(self):
        return "\n".join(self.trace[-120:])

    def linked(self, a, b):
        return (self.nodes[a].up and self.nodes[b].up
                and not self.blocked.get(frozenset((a, b))))

    def send(self, src, dst, kind, payload):
        # A hello opens a session: it is lost only with the link (it is not a session otherwise).
        if not self.linked(src, dst) or kind != "hello" and self.rng.random() < self.loss:
            return
        delay = self.rng.uniform(0.001, self.max_delay)
        self.at(self.real + delay, "deliver", src, dst, self.nodes[src].epoch,
                self.nodes[dst].epoch, kind, payload)

    def apply(self, node, prior, fx):
        for peer, msg in fx.send:
            self.send(node.name, peer, "msg", json.dumps(msg))
        for kind, text in fx.notes:
            self.log(node.name, "%s: %s" % (kind, text))
            if kind == "elected":
                self.checker.elected(node.name, node.sm.term, prior)

    def run(self, until):
        while self.queue and self.queue[0][0] <= until:
            when, _, kind, args = heapq.heappop(self.queue)
            self.real = when
            getattr(self, "_ev_" + kind)(*args)
            self.checker.observe()
        self.real = until

    # -- node life -------------------------------------------------------------------------

    def start(self, name):
        node = self.nodes[name]
        node.up = True
        node.epoch += 1
        node.paused_until = 0.0
        node.clock.boot(self.real, self.rng)
        node.sm = election.Election(name, self.names, name == self.names[0], TIMING, node.store,
                                    node.clock.now(self.real), rand=self.rng.random,
                                    failback=self.failback)
        self.checker.restarted(node)
        self.log(name, "started in term %d" % node.sm.term)
        self.at(self.real + self.rng.uniform(0, TICK), "tick", name, node.epoch)
        for other in self.names:
            if other != name and self.linked(name, other):
                self.connect(name, other)

    def connect(self, a, b):
        self.send(a, b, "hello", json.dumps(self.nodes[a].sm.hello_fields()))
        self.send(b, a, "hello", json.dumps(self.nodes[b].sm.hello_fields()))

    def lose(self, a, b):
        for one, other in ((a, b), (b, a)):
            node = self.nodes[one]
            if node.up:
                node.sm.peer_lost(other, node.clock.now(self.real))

    def _ev_kill(self, name):
        node = self.nodes[name]
        if node.up:
            node.up = False
            node.epoch += 1
            self.log(name, "killed")
            for other in self.names:
                if other != name:
                    self.lose(name, other)

    def _ev_restart(self, name):
        if not self.nodes[name].up:
            self.start(name)

    def _ev_pause(self, name, seconds):
        self.nodes[name].paused_until = max(self.nodes[name].paused_until, self.real + seconds)
        self.log(name, "paused for %.2f s" % seconds)

    def _ev_block(self, pairs):
        for pair in pairs:
            self.blocked[pair] = self.blocked.get(pair, 0) + 1
            if self.blocked[pair] == 1:
                self.lose(*sorted(pair))

    def _ev_unblock(self, pairs):
        for pair in pairs:
            self.blocked[pair] -= 1
            if self.blocked[pair] == 0 and self.linked(*sorted(pair)):
                self.connect(*sorted(pair))

    def _ev_network(self, loss, max_delay):
        self.loss, self.max_delay = loss, max_delay

    def _ev_tick(self, name, epoch):
        node = self.nodes[name]
        if not node.up or node.epoch != epoch:
            return
        if node.paused_until > self.real:
            self.at(node.paused_until, "tick", name, epoch)
            return
        now = node.clock.now(self.real)
        prior = node.sm.last
        self.apply(node, prior, node.sm.tick(now))
        if node.sm.is_acting(now):
            self.act(node, now)
        self.at(self.real + TICK * self.rng.uniform(0.5, 1.5), "tick", name, epoch)

    def act(self, node, now):
        """What an acting master does: originate changes now and then, push its state."""
        sm = node.sm
        if self.rng.random() < self.change_rate:
            if sm.new_version(now) is None:
                self.checker.fail("%s acting but refused a new version" % node.name)
            self.checker.acted(node.name, sm.term)
        for peer in self.names:
            if peer != node.name and self.rng.random() < 0.25:
                self.checker.acted(node.name, sm.term)
                self.send(node.name, peer, "push", json.dumps([sm.term, list(sm.last)]))

    def _ev_deliver(self, src, dst, src_epoch, dst_epoch, kind, payload):
        node = self.nodes[dst]
        if (self.nodes[src].epoch != src_epoch or node.epoch != dst_epoch
                or not self.linked(src, dst)):
            return
        if node.paused_until > self.real:   # the kernel keeps it in the socket buffer
            self.at(node.paused_until, "deliver", src, dst, src_epoch, dst_epoch, kind, payload)
            return
        now = node.clock.now(self.real)
        prior = node.sm.last
        body = json.loads(payload)
        if kind == "msg":
            self.apply(node, prior, node.sm.receive(src, election.parse_message(
                body, node.sm.voters), now))
        elif kind == "hello":
            self.apply(node, prior, node.sm.peer_connected(src, election.parse_hello(body), now))
        else:
            allowed, fx = node.sm.transfer_allowed(src, body[0], now)
            self.apply(node, prior, fx)
            if allowed and body[0] != self.checker.terms.get(dst, 0):
                self.checker.fail("%s applied files of term %d from %s, knowing term %d"
                                  % (dst, body[0], src, self.checker.terms.get(dst, 0)))
            if allowed:
                node.sm.change_applied(tuple(body[1]))

    # -- scenarios -------------------------------------------------------------------------

    def acting(self):
        return [n.name for n in self.nodes.values()
                if n.up and n.sm.is_acting(n.clock.now(self.real))]

    def chaos(self, until):
        """Random faults in [0, until); every one of them ends before `until`."""
        rng = self.rng
        when = 0.5 * T
        while True:
            when += rng.expovariate(1.0 / T)
            if when >= until:
                break
            length = min(rng.uniform(0.2 * T, 4 * T), until - when)
            kind = rng.choice(["kill", "kill", "partition", "partition", "isolate", "cut",
                               "cut", "flap", "pause", "network"])
            getattr(self, "_fault_" + kind)(when, length)
        self.at(until, "network", 0.0, 0.02 * T)

    def _fault_kill(self, when, length):
        name = self.rng.choice(self.names)
        self.at(when, "kill", name)
        self.at(when + length, "restart", name)

    def _fault_partition(self, when, length):
        side = set(self.rng.sample(self.names, self.rng.randint(1, len(self.names) - 1)))
        pairs = [frozenset((a, b)) for a in side for b in self.names if b not in side]
        self.at(when, "block", pairs)
        self.at(when + length, "unblock", pairs)

    def _fault_isolate(self, when, length):
        self.at(when, "isolate_leader", length)

    def _ev_isolate_leader(self, length):
        acting = self.acting() or [self.rng.choice(self.names)]
        pairs = [frozenset((acting[0], b)) for b in self.names if b != acting[0]]
        self._ev_block(pairs)
        self.at(self.real + length, "unblock", pairs)

    def _fault_cut(self, when, length):
        """One link down, the others up: a and b both still reach the rest (not transitive)."""
        pair = [frozenset(self.rng.sample(self.names, 2))]
        self.at(when, "block", pair)
        self.at(when + length, "unblock", pair)

    def _fault_flap(self, when, length):
        pair = [frozenset(self.rng.sample(self.names, 2))]
        step = length / 8
        for i in range(4):
            self.at(when + 2 * i * step, "block", pair)
            self.at(when + (2 * i + 1) * step, "unblock", pair)

    def _fault_pause(self, when, length):
        self.at(when, "pause", self.rng.choice(self.names), min(length, 2 * T))

    def _fault_network(self, when, length):
        self.at(when, "network", self.rng.choice([0.1, 0.3, 0.6]),
                self.rng.choice([0.02 * T, 0.3 * T, T]))
        self.at(when + length, "network", 0.0, 0.02 * T)


def stable_leader(sim):
    """The node every live node follows, acting, all in one term; or None."""
    acting = sim.acting()
    if len(acting) != 1:
        return None
    leader = sim.nodes[acting[0]].sm
    for node in sim.nodes.values():
        if node.sm.term != leader.term or node.sm.leader != leader.me:
            return None
    return leader.me


def wait_until(sim, bound, predicate, step=T / 10, lasting=0.0):
    """Run the simulation until predicate(sim) holds (and has held for `lasting` simulated
    seconds), at most `bound` simulated seconds."""
    end = sim.real + bound
    since = None
    while True:
        if not predicate(sim):
            since = None
        elif since is None:
            since = sim.real
        if since is not None and sim.real - since >= lasting:
            return True
        if sim.real >= end:
            return False
        sim.run(min(end, sim.real + step))


def run_trial(n, seed, store_factory=None):
    sim = Sim(n, seed, store_factory)
    sim.chaos(CHAOS)
    sim.run(CHAOS)
    sim.change_rate = 0.0        # quiet after healing, so that the preferred master catches up
    sim.run(CHAOS + T)           # healed once the slowest message sent before is in
    healed = sim.real
    assert wait_until(sim, LEADER_BOUND, stable_leader), (
        "no stable leader %.1f s after healing (seed %d)\n%s" % (LEADER_BOUND, seed,
                                                                 sim.trace_text()))
    assert wait_until(sim, FAILBACK_BOUND - (sim.real - healed),
                      lambda s: stable_leader(s) == s.names[0], lasting=2 * T), (
        "preferred master not back and staying %.1f s after healing (seed %d)\n%s"
        % (FAILBACK_BOUND, seed, sim.trace_text()))
    return sim


@pytest.mark.parametrize("n", [3, 5])
def test_randomized_trials_keep_every_invariant(n):
    elections = 0
    for seed in range(TRIALS):
        sim = run_trial(n, 1000 * n + seed)
        elections += len(sim.checker.leaders)
    # The faults did cause failovers: the trials exercised elections, not one long reign.
    assert elections >= 3 * TRIALS


def test_restarts_keep_state_on_disk(tmpdir):
    """The same trials with the real file store: a restart reads back what was fsync'd."""
    folder = str(tmpdir)

    def store(name):
        return FileStore(os.path.join(folder, name + ".json"),
                         os.path.join(folder, name + ".joined"))
    sim = run_trial(3, 77, store)
    for name in sim.names:
        saved = store(name).load()
        assert saved == (sim.nodes[name].sm.term, sim.nodes[name].sm.voted_for,
                         sim.nodes[name].sm.last)


def test_first_start_elects_the_preferred_master_at_once():
    sim = Sim(5, 5)
    assert wait_until(sim, T, stable_leader)
    assert stable_leader(sim) == "n0"
    assert sim.nodes["n0"].sm.term == 1


def test_leader_isolated_stops_acting_before_the_majority_elects():
    sim = Sim(5, 6)
    assert wait_until(sim, T, stable_leader)
    sim.change_rate = 0.2
    sim._ev_isolate_leader(10 * T)
    old = sim.nodes["n0"]
    assert wait_until(sim, 3 * T, lambda s: stable_leader(s) not in (None, "n0")
                      or len(s.acting()) == 1 and s.acting()[0] != "n0")
    new_term = max(sim.checker.leaders)
    assert sim.checker.leaders[new_term] != "n0" and not old.sm.is_acting(
        old.clock.now(sim.real))
    assert old.sm.role == election.FOLLOWER


def test_wall_clock_is_never_read(monkeypatch):
    """Elections use monotonic time handed in by the caller: a wall clock jumping by hours
    in the middle of a run changes nothing (a module reading it would fail here)."""
    import time

    def jumping_clock():
        raise AssertionError("election code read the wall clock")
    monkeypatch.setattr(time, "time", jumping_clock)
    monkeypatch.setattr(time, "monotonic", jumping_clock, raising=False)
    run_trial(3, 11)


def test_follower_restarted_during_a_lease_keeps_its_promise():
    """n2 cut off from the leader n0 stands; n1, n0's only acknowledging follower, restarts
    and loses its link to n0 while n0's lease still counts on n1's acknowledgements. Without
    the promise renewed at start, n1 would elect n2 while n0 still acts."""
    sim = Sim(3, 8)
    assert wait_until(sim, T, lambda s: stable_leader(s) == "n0")
    sim._ev_block([frozenset(("n0", "n2"))])
    sim.run(sim.real + 1.3 * T)          # n2's promise has run out; it keeps standing
    assert sim.acting() == ["n0"] and sim.nodes["n2"].sm.leader is None
    sim._ev_kill("n1")
    sim._ev_block([frozenset(("n0", "n1"))])
    sim._ev_restart("n1")
    sim.run(sim.real + 3 * T)            # the checker sees every instant
    assert max(sim.checker.leaders) > 1 and sim.checker.leaders[max(sim.checker.leaders)] != "n0"
