"""Master failover, election part: a pure state machine (SPEC section 10).

failover.py runs it in wazuh-clusterd behind `cluster.failover=1` (failover_roles.py switches
the data plane, peers.py keeps the full mesh). The plan of the whole feature:

Terms and durable state
    Every node keeps `term`, `voted_for` and `last` = (term, seq), the newest version of a
    leader's master-owned state it is known to hold wholly (see Fencing). They live in var/db/cluster-election.json (electionstore.py), written and
    fsync'd (file and folder) BEFORE any message that depends on them leaves the machine: the
    machine calls store.save() itself and only then returns the messages. Not in cluster.db:
    the vote answer is given by wazuh-clusterd on a session thread, and a round trip to the
    internal daemon (the database's only writer, SPEC section 3) would put a restartable
    process and a socket between a vote and its durability, for a record of three values that
    wazuh-clusterd alone owns (sessions belong to clusterd). A lost or unreadable file is never
    silently replaced by term 0 (that could vote twice in a term): start refuses with one line.
    "Lost" is known from a marker, etc/cluster-election.joined, written (durably) before the
    first record: a record missing while the marker exists stops the start. The marker lives in
    etc/, not next to the record, so that wiping var/db (a lost or reset database) cannot take
    both; only an operator deleting it too (README: Failover, a lost election record) can.

Voters and majority
    The voters are the entries of <nodes> (a voter id is the listed entry a session was matched
    to; the wiring maps sessions to it). majority = len(voters) // 2 + 1. With failover on,
    every node keeps a session to every other node (today a client only dials the master).

Messages (one new frame type ELECTION, the next free code in protocol.MESSAGE_TYPES, JSON
header only; parse_message() checks every field of a peer's message before use):
    vote      {term, last, pre, handover}   request; pre=True is a pre-vote (term not taken)
    vote_ans  {term, pre, granted}
    hb        {term, n, last}               leader's lease heartbeat, n = its sequence number
    hb_ack    {term, n, ok, last}           ok=False with the follower's higher term deposes
    handover  {term}                        failback: the leader hands its role to the preferred
    HELLO_INFO gains {term, last, preferred} (hello_fields()); every master-owned transfer
    (sync_files headers) carries {term}: the receiver asks transfer_allowed() first, and
    still_leads() again right before each file is renamed into place. A confirmation (an empty
    sync_files with {term, version}, see Fencing) is recorded with change_applied(version).
    A term more than MAX_TERM_JUMP above ours is refused as hostile: one insider could
    otherwise set every term to 2^53 - 1, after which no election can increment it.

Votes (Raft's election restriction applied to file state)
    A node votes at most once per term (voted_for is saved before the answer), and only for a
    candidate whose `last` is at least as recent as its own. A candidate first runs a pre-vote
    (term not incremented, nothing saved by voters): a node cut off in a minority never inflates
    its term, so it cannot depose a working leader when the network heals.

Who stands
    A node stands only when no leader is known AND its lease promise (below) has run out, plus
    3 D T (the promises of the others run out up to 2 D T later on their clocks). The
    preferred master (node_type master) then stands at once; every other node waits an extra
    delay of its own slot: gap x (rank + a random share below 1/2), rank = its place among the
    voters other than the preferred master (all, while it is unknown), sorted, gap =
    min(GAP, (T/6 - 3 D T) / voters): in all at most T / 6. The promises of the followers
    of one leader were renewed by the same heartbeats, so they run out together (the wiring
    wakes at the machine's next deadline, next_tick): the slots keep two candidates at least
    gap / 2 apart (a split vote needs a pre-vote round trip longer than that), and the node
    of the lowest rank that is alive stands within 1.5 gap. (A random delay over all of
    T / 6 cost up to 4 s at the default T = 30 s, and still split whenever two draws fell
    within one round trip.) A failover's time is T + 3 D T + this slot + the new leader's
    first push. A failed round is retried after round/2 (preferred) or round/2 + its slot
    delay (others).

Leases (timing: Timing below; times are each node's monotonic clock, never the wall clock)
    A follower that acknowledges a heartbeat from the leader of its term at its time r promises
    to grant no vote (and not stand) before r + T, T = failover_timeout; a node that starts
    promises the same from its start time (it may have promised before it stopped), except
    when the store proves it never joined (store.joined() false: no record and no marker, so
    it never acknowledged a heartbeat nor voted, which both save a record first).
    The leader counts itself as acknowledging each heartbeat when it sends it. A leader ACTS
    (pushes, runs rounds, accepts agent-info as master, answers cluster-wide queries, originates
    master-owned versions) only while now < s_m + L, where s_m is the send time (its clock) of
    the newest heartbeat that a majority has acknowledged; it steps down by itself when that
    time passes. A handover ends acting at once.

    Claim: a leader A stops acting before any other node can be elected in a higher term.
    Let every monotonic clock advance at a rate within [1 - D, 1 + D] of real time (D = DRIFT).
    A acts until real time R(s_m) + L / (1 - D) at the latest. The majority that acknowledged
    heartbeat s_m and the majority that elects any B in a higher term share a node F. F
    received s_m after A sent it (real time R(r) >= R(s_m)) and grants no vote until its clock
    passes r + T, i.e. not before R(s_m) + T / (1 + D). B is elected after F's vote, and acts
    only after a majority acknowledged one of its own heartbeats, later still. So A has stopped
    before B is elected whenever L / (1 - D) < T / (1 + D), i.e. L < T (1 - D) / (1 + D).
    Timing takes L = T/2 * (1 - D) / (1 + D), half that bound: message delays, lost messages,
    and F restarting (a restart renews the promise) do not enter the argument. D = 1 % is far
    above what NTP-slewed or free-running clocks do (tens of ppm). A handover (below) is the
    one way around a promise, and it is A's own act after it stopped. A jump of the wall
    clock changes no input of this module. The wiring must read CLOCK_BOOTTIME where it
    exists (Linux; 3.7+ time.clock_gettime, 2.7 through ctypes, in compat.py) and
    time.monotonic() only elsewhere: CLOCK_MONOTONIC stops while a machine is suspended, and
    a leader suspended for a minute would wake up believing its lease still runs. A stopped
    process (SIGSTOP, a long pause) is safe: its clock runs on and is_acting() is asked anew.

Fencing
    A node applies master-owned files only from the leader of the highest term it knows
    (transfer_allowed): an older term is refused and logged whatever the content; a higher term
    is adopted (the sender leads it). The check is repeated right before each file of a batch
    is renamed into place, under the lock that adopts a higher term (still_leads): a batch
    that was streaming when a higher term became known renames nothing more.
    A leader's state gets version (term, 0) when it is elected and (term, seq + 1) each time
    its master-owned files change while it acts (new_version, after the change is queued for
    every peer). Batches carry the term only: a batch covers part of the state, and batches to
    several peers interleave, so no batch proves that its receiver holds everything. A follower
    records a version only from a confirmation, which the leader sends when a full integrity
    round with that peer, begun (manifests read after) at version V, ended with every file
    synchronized and nothing postponed; or when a push taken at V (its queue holds every change
    up to V) ended so, the peer having been confirmed before in that term and every push since
    complete.
    So `last` = V means: this node holds every change the leader versioned up to V, a faithful
    summary for the vote rule, like Raft's (last log term, last log index). A version is
    committed when a majority recorded it; the election restriction keeps every committed
    version in every later leader. A change that no version covers yet is committed by none.

Failback (cluster.failback=1, default)
    The preferred master returning after a failover follows the acting master and catches up.
    When its acknowledged `last` equals the leader's, the acting master stops acting, sends
    `handover`, and the preferred master stands at once in term + 1; voters whose leader in the
    previous term is the one handing over grant despite their promise (that leader has given
    up its lease). No gap: the new leader acts after one heartbeat round. If the handover
    election fails, promises run out and an ordinary election follows; the acting master does
    not try again for FAILBACK_BACKOFF failover timeouts. A peer holding the key can claim a
    handover; like every insider it can already forge files (README, security section).
    A clean stop (SIGTERM) of the acting master is a handover too (abdicate): to a follower
    that reported all of its state (asked with one heartbeat, for a second at most), before
    the sessions close, so a planned restart costs about a second instead of T. A kill, no
    follower caught up in time, or a handover lost or refused, leaves the promises to run
    out as after a crash.

Local edits on a non-leader (wiring, sync.py)
    Before a master-owned file edited locally on a node that is not the acting leader is
    replaced by the leader's version, the local one is copied under
    backup/cluster/TERM-YYYYmmddHHMMSS/PATH, a warning names it, and cluster_control -i lists it
    until acknowledged.

Wiring checklist (next step)
    clusterd: one Election per process behind a lock, tick() from the session loop's timer
    (every heartbeat / 4 at most), a FileStore in var/db (its load() error stops the start),
    every Effects note logged with peer names escaped (text.py), Effects.send as ELECTION
    frames. peers.py: with failover on, dial every listed node and accept sessions on every
    node; hello_fields() in HELLO_INFO, parse_hello() + peer_connected() on receipt,
    peer_lost() on close. sync.py: pushes, rounds, agent-info as master and cluster-wide
    answers only while is_acting(now); new_version() per change of its master-owned files;
    transfer_allowed() before applying master-owned files, still_leads() at each rename,
    change_applied() on a confirmation. config.py: cluster.failover (0), cluster.failover_timeout (3 x keepalive),
    cluster.failback (1), `-t` warns below three nodes. control.py: status() in -n, -i, -j.

Failover off (cluster.failover=0, the default)
    Nothing of this runs: no election file, no ELECTION frames, HELLO_INFO and sync headers as
    today, a client dials only the master. Peers with failover on refuse a mixed cluster in the
    hello (the setting must be the same on every node).
"""
from __future__ import absolute_import, division, print_function

import random

from wazuh_cluster.compat import integer_types, string_types

FOLLOWER = "follower"
PRECANDIDATE = "pre-candidate"
CANDIDATE = "candidate"
LEADER = "leader"

DRIFT = 0.01            # bound on any monotonic clock's rate error (see the claim above)
LEASE_SHARE = 0.5       # the lease is this share of the largest safe lease
GAP = 0.5               # seconds between the candidacy slots of two non-preferred nodes, at most
FAILBACK_BACKOFF = 4    # failover timeouts between two handover attempts
MAX_TERM = 2 ** 53      # terms and sequence numbers stay exact in JSON doubles
# A peer's term further above ours is refused as hostile: honest terms grow by one per
# election round (a million rounds of T / 10 is weeks of failed elections), and one forged
# huge term would leave no room to increment.
MAX_TERM_JUMP = 2 ** 20
MESSAGE_FIELDS = {
    "vote": ("term", "last", "pre", "handover"),
    "vote_ans": ("term", "pre", "granted"),
    "hb": ("term", "n", "last"),
    "hb_ack": ("term", "n", "ok", "last"),
    "handover": ("term",),
}


class Timing(object):
    """The durations of the election, all derived from failover_timeout (seconds)."""

    def __init__(self, keepalive, failover_timeout=None, voters=3):
        timeout = float(failover_timeout if failover_timeout is not None else 3 * keepalive)
        if timeout <= 0:
            raise ValueError("failover_timeout must be positive")
        self.failover_timeout = timeout
        self.lease = timeout * LEASE_SHARE * (1 - DRIFT) / (1 + DRIFT)
        self.heartbeat = self.lease / 4   # three heartbeats may be lost without losing the lease
        # Promises given for one heartbeat run out up to 2 D T apart on different clocks: a
        # candidate waits that much more, or the first pre-vote is often refused for nothing.
        self.skew = 3 * DRIFT * timeout
        self.extra_delay = timeout / 6 - self.skew     # the slots of all voters fit in it
        self.gap = min(GAP, self.extra_delay / voters)
        self.round = timeout / 10         # how long a (pre-)vote round waits for its answers


class Effects(object):
    """What one input produced: `send` [(peer, message dict)], `notes` [(kind, text)].

    Notes are for cluster.log; kinds: adopted_term, elected, acting, stepped_down, leader,
    leader_lost, round_failed, handover, refused, hostile (a term too far ahead: rate-limit).
    """

    def __init__(self):
        self.send = []
        self.notes = []

    def note(self, kind, text):
        self.notes.append((kind, text))


def _check_int(msg, field):
    value = msg.get(field)
    if isinstance(value, bool) or not isinstance(value, integer_types) or not 0 <= value < MAX_TERM:
        raise ValueError("field %r must be an integer from 0 to 2^53" % field)
    return value


def _check_version(msg, field):
    value = msg.get(field)
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("field %r must be [term, seq]" % field)
    return tuple(_check_int({"v": item}, "v") for item in value)


def _check_bool(msg, field):
    if not isinstance(msg.get(field), bool):
        raise ValueError("field %r must be true or false" % field)
    return msg[field]


def _check_handover(msg, field, voters):
    value = msg.get(field)
    if value is not None and (not isinstance(value, string_types) or value not in voters):
        raise ValueError("field %r must name a listed node or be null" % field)
    return value


# field -> check(message, field, voters) -> the checked value
_FIELD_CHECKS = {
    "term": lambda msg, field, voters: _check_int(msg, field),
    "n": lambda msg, field, voters: _check_int(msg, field),
    "last": lambda msg, field, voters: _check_version(msg, field),
    "pre": lambda msg, field, voters: _check_bool(msg, field),
    "granted": lambda msg, field, voters: _check_bool(msg, field),
    "ok": lambda msg, field, voters: _check_bool(msg, field),
    "handover": _check_handover,
}


def parse_message(msg, voters):
    """A checked copy of a peer's election message (versions as tuples); ValueError naming
    the field otherwise. `voters`: the ids a `handover` field may name."""
    if (not isinstance(msg, dict) or not isinstance(msg.get("type"), string_types)
            or msg["type"] not in MESSAGE_FIELDS):
        raise ValueError("field 'type' must be one of %s" % ", ".join(sorted(MESSAGE_FIELDS)))
    out = {"type": msg["type"]}
    for field in MESSAGE_FIELDS[msg["type"]]:
        out[field] = _FIELD_CHECKS[field](msg, field, voters)
    return out


def parse_hello(hello):
    """The election fields of a peer's HELLO_INFO, checked; ValueError naming the field."""
    if not isinstance(hello, dict):
        raise ValueError("hello must be an object")
    return {"term": _check_int(hello, "term"), "last": _check_version(hello, "last"),
            "preferred": _check_bool(hello, "preferred")}


def _wire(version):
    return [version[0], version[1]]


class Election(object):
    """One node's election state. Every input method takes the node's monotonic `now` and
    returns Effects; the store is saved before the method returns anything to send.

    me: this node's voter id; voters: all voter ids (me included); preferred: this node is the
    configured master; store: load() -> (term, voted_for, (term, seq)), save(...) durable;
    rand: a random() source in [0, 1).
    """

    def __init__(self, me, voters, preferred, timing, store, now, rand=random.random,
                 failback=True):
        if me not in voters:
            raise ValueError("this node is not one of the voters")
        self.me = me
        self.voters = frozenset(voters)
        self.majority = len(self.voters) // 2 + 1
        self.preferred = preferred
        self.timing = timing
        self.failback = failback
        self._store = store
        self._rand = rand
        self.term, self.voted_for, last = store.load()
        self.last = tuple(last)
        self.role = FOLLOWER
        self.leader = None
        self.preferred_peer = me if preferred else None
        # Start renews the promise of a lease that may have been acknowledged before a stop,
        # unless the store proves there was none (never joined). Not "term > 0": a record
        # lost with its term must not let a node vote at once.
        self._promise_until = now + timing.failover_timeout if store.joined() else now
        self._stand_at = self._promise_until + self._extra()
        self._round_deadline = None
        self._grants = set()
        self._handed = None          # (term, peer) after this node handed its role over
        self._next_failback = now
        self._hb_sent = {}           # heartbeat n -> send time, this term
        self._hb_n = 0
        self._last_hb = None
        self._acks = {}              # peer -> send time of its newest acknowledged heartbeat
        self.match = {}              # peer -> last version it reported (leader only)
        self._elected_at = None
        self._was_acting = False

    # -- queries ---------------------------------------------------------------------------

    def lease_until(self):
        """The end of this leader's lease on its clock, or None (not leading, no majority)."""
        if self.role != LEADER or self._last_hb is None:
            return None
        times = sorted([self._acks[v] for v in self._acks] + [self._last_hb], reverse=True)
        if len(times) < self.majority:
            return None
        return times[self.majority - 1] + self.timing.lease

    def is_acting(self, now):
        """True while this node may act as master: leader holding an unexpired lease."""
        until = self.lease_until()
        return until is not None and now < until

    def committed(self):
        """The newest version a majority (this leader included) has recorded, or None."""
        if self.role != LEADER:
            return None
        versions = sorted([self.match[v] for v in self.match] + [self.last], reverse=True)
        return versions[self.majority - 1] if len(versions) >= self.majority else None

    def next_tick(self):
        """The time at which tick() has something to do next (it may be past): the wiring
        sleeps until then, and a heartbeat / 4 at most (messages move deadlines too)."""
        if self.role == LEADER:
            until = self.lease_until()
            if until is None:
                until = self._elected_at + self.timing.lease
            return min(until, self._last_hb + self.timing.heartbeat)
        if self.role in (PRECANDIDATE, CANDIDATE):
            return self._round_deadline
        if self.leader is not None:
            return self._promise_until
        return max(self._promise_until, self._stand_at)

    def hello_fields(self):
        """What HELLO_INFO carries for the election."""
        return {"term": self.term, "last": _wire(self.last), "preferred": self.preferred}

    def status(self, now):
        """For cluster_control -i: role as shown, term, leader, remaining lease."""
        acting = self.is_acting(now)
        until = self.lease_until()
        return {"role": self.role, "term": self.term, "leader": self.leader, "acting": acting,
                "lease_left": round(until - now, 3) if acting else None,
                "last": _wire(self.last)}

    # -- inputs ----------------------------------------------------------------------------

    def tick(self, now):
        """Time passed: heartbeats, lease expiry, leader loss, candidacy, round deadlines."""
        fx = Effects()
        if self.role == LEADER:
            self._tick_leader(now, fx)
        elif self.role in (PRECANDIDATE, CANDIDATE):
            if now >= self._round_deadline:
                fx.note("round_failed", "election round for term %d got %d of %d votes needed"
                        % (self._round_term(), len(self._grants), self.majority))
                self._become_follower(now + self._retry_delay())
        else:
            if self.leader is not None and now >= self._promise_until:
                fx.note("leader_lost", "no heartbeat from %s (term %d) for %.1f s"
                        % (self.leader, self.term, self.timing.failover_timeout))
                self.leader = None
                self._stand_at = now + self._extra()
            if self.leader is None and now >= self._promise_until and now >= self._stand_at:
                self._start_prevote(now, fx)
        return fx

    def receive(self, peer, msg, now):
        """A checked message (parse_message) from voter `peer`."""
        fx = Effects()
        if peer not in self.voters or peer == self.me:
            fx.note("refused", "election message from %s, which is not a voter" % peer)
            return fx
        if not self._hostile(peer, msg["term"], "%s message" % msg["type"], fx):
            self._HANDLERS[msg["type"]](self, peer, msg, now, fx)
        return fx

    def peer_connected(self, peer, hello, now):
        """A session to `peer` opened; `hello`: parse_hello() of its HELLO_INFO. A leader's
        next heartbeat round (within Timing.heartbeat) reaches the new peer."""
        fx = Effects()
        if self._hostile(peer, hello["term"], "hello", fx):
            return fx
        if hello.get("preferred"):
            self.preferred_peer = peer
        if hello["term"] > self.term:
            self._adopt(hello["term"], "hello of %s" % peer, fx)
        return fx

    def peer_lost(self, peer, now):
        """A session closed. A promise outlives a session, so nothing changes but the leader's
        view of what the peer holds."""
        self.match.pop(peer, None)
        return Effects()

    def transfer_allowed(self, peer, term, now):
        """Fencing: (True, fx) when master-owned files from `peer` in `term` may be applied."""
        fx = Effects()
        if self._hostile(peer, term, "master-owned files", fx):
            return False, fx
        if term < self.term:
            fx.note("refused", "master-owned files from %s in term %d, older than term %d"
                    % (peer, term, self.term))
            return False, fx
        if term > self.term:
            self._adopt(term, "transfer from %s" % peer, fx)
        if self.leader is None and self.role != LEADER:
            self._follow(peer, fx)
        if self.leader != peer or peer == self.me:
            fx.note("refused", "master-owned files from %s in term %d, whose leader is %s"
                    % (peer, term, self.leader))
            return False, fx
        return True, fx

    def still_leads(self, peer, term):
        """Fencing at each rename: `peer` is still the leader of `term`, the highest known."""
        return term == self.term and self.leader == peer != self.me

    def change_applied(self, version):
        """This follower now holds all of the leader's state up to `version` (confirmed)."""
        version = tuple(version)
        if version > self.last and version[0] <= self.term:
            self.last = version
            self._save()

    def new_version(self, now):
        """The new version of this leader's state after a change of its master-owned files,
        or None when it is not acting (it must then not originate anything)."""
        if not self.is_acting(now):
            return None
        self.last = (self.term, self.last[1] + 1)
        self._save()
        return self.last

    # -- messages --------------------------------------------------------------------------

    def _on_vote(self, peer, msg, now, fx):
        if msg["pre"]:
            granted = (msg["term"] > self.term and now >= self._promise_until
                       and self.role != LEADER and msg["last"] >= self.last)
            fx.send.append((peer, {"type": "vote_ans", "pre": True, "granted": granted,
                                   "term": msg["term"] if granted else self.term}))
            return
        handover = (msg["handover"] is not None and msg["term"] == self.term + 1
                    and (msg["handover"] == self.leader != self.me
                         or self._handed == (self.term, peer) and msg["handover"] == self.me))
        if msg["term"] < self.term or (now < self._promise_until and not handover):
            fx.send.append((peer, {"type": "vote_ans", "pre": False, "granted": False,
                                   "term": self.term}))
            return
        if msg["term"] > self.term:
            self._adopt(msg["term"], "vote request of %s" % peer, fx)
        granted = self.voted_for in (None, peer) and msg["last"] >= self.last
        if granted and self.voted_for is None:
            self.voted_for = peer
            self._save()
            self._stand_at = max(self._stand_at, now + self.timing.round + self._extra())
        fx.send.append((peer, {"type": "vote_ans", "pre": False, "granted": granted,
                               "term": self.term}))

    def _on_vote_ans(self, peer, msg, now, fx):
        if msg["pre"] and msg["granted"]:
            if self.role == PRECANDIDATE and msg["term"] == self.term + 1:
                self._count(peer, now, fx)
            return
        if msg["term"] > self.term:
            self._adopt(msg["term"], "vote answer of %s" % peer, fx)
        elif (msg["granted"] and not msg["pre"] and self.role == CANDIDATE
              and msg["term"] == self.term):
            self._count(peer, now, fx)

    def _on_hb(self, peer, msg, now, fx):
        if msg["term"] < self.term or (msg["term"] == self.term and self.role == LEADER):
            fx.send.append((peer, {"type": "hb_ack", "term": self.term, "n": msg["n"],
                                   "ok": False, "last": _wire(self.last)}))
            return
        if msg["term"] > self.term:
            self._adopt(msg["term"], "heartbeat of %s" % peer, fx)
        if self.leader != peer:
            self._follow(peer, fx)
        # The promise is made before the acknowledgement that the leader will count.
        self._promise_until = now + self.timing.failover_timeout
        fx.send.append((peer, {"type": "hb_ack", "term": self.term, "n": msg["n"],
                               "ok": True, "last": _wire(self.last)}))

    def _on_hb_ack(self, peer, msg, now, fx):
        if msg["term"] > self.term:
            self._adopt(msg["term"], "heartbeat answer of %s" % peer, fx)
            return
        if self.role != LEADER or msg["term"] != self.term or not msg["ok"]:
            return
        sent = self._hb_sent.get(msg["n"])
        if sent is None:
            return
        if sent > self._acks.get(peer, sent - 1):
            self._acks[peer] = sent
        self.match[peer] = msg["last"]
        if not self._was_acting and self.is_acting(now):
            self._was_acting = True
            fx.note("acting", "acting master in term %d: a majority acknowledged the lease"
                    % self.term)
        self._maybe_hand_over(now, fx)

    def _on_handover(self, peer, msg, now, fx):
        if msg["term"] != self.term or self.leader != peer or self.role != FOLLOWER:
            return
        fx.note("handover", "%s hands the master role over in term %d" % (peer, self.term))
        self._start_vote(now, peer, fx)

    _HANDLERS = {"vote": _on_vote, "vote_ans": _on_vote_ans, "hb": _on_hb,
                 "hb_ack": _on_hb_ack, "handover": _on_handover}

    # -- transitions -----------------------------------------------------------------------

    def _save(self):
        self._store.save(self.term, self.voted_for, self.last)

    def _hostile(self, peer, term, what, fx):
        """True (and noted) when a peer's term is too far above ours to be honest."""
        if term <= self.term + MAX_TERM_JUMP:
            return False
        fx.note("hostile", "%s from %s with term %d, more than 2^20 above term %d: refused"
                % (what, peer, term, self.term))
        return True

    def _extra(self):
        if self.preferred:
            return self.timing.skew
        others = sorted(self.voters - set([self.preferred_peer]))
        return self.timing.skew + self.timing.gap * (others.index(self.me) + self._rand() / 2)

    def _retry_delay(self):
        return self.timing.round / 2 + self._extra()

    def _round_term(self):
        return self.term + 1 if self.role == PRECANDIDATE else self.term

    def _adopt(self, term, why, fx):
        was_leader = self.role == LEADER
        self.term = term
        self.voted_for = None
        self._save()
        fx.note("adopted_term", "term %d adopted (%s)" % (term, why))
        if was_leader:
            fx.note("stepped_down", "stopped acting as master: a higher term exists")
        self._become_follower(self._stand_at)

    def _become_follower(self, stand_at):
        self.role = FOLLOWER
        self.leader = None
        self._grants = set()
        self._round_deadline = None
        self._was_acting = False
        self._stand_at = stand_at

    def _follow(self, peer, fx):
        self._become_follower(self._stand_at)
        self.leader = peer
        fx.note("leader", "%s leads term %d" % (peer, self.term))

    def _start_prevote(self, now, fx):
        self.role = PRECANDIDATE
        self._grants = set([self.me])
        self._round_deadline = now + self.timing.round
        msg = {"type": "vote", "term": self.term + 1, "last": _wire(self.last), "pre": True,
               "handover": None}
        fx.send.extend((v, dict(msg)) for v in sorted(self.voters - set([self.me])))
        self._count(None, now, fx)

    def _start_vote(self, now, handover, fx):
        self.term += 1
        self.voted_for = self.me
        self._save()
        self.role = CANDIDATE
        self.leader = None
        self._grants = set([self.me])
        self._round_deadline = now + self.timing.round
        msg = {"type": "vote", "term": self.term, "last": _wire(self.last), "pre": False,
               "handover": handover}
        fx.send.extend((v, dict(msg)) for v in sorted(self.voters - set([self.me])))
        self._count(None, now, fx)

    def _count(self, peer, now, fx):
        if now >= self._round_deadline:
            return      # a round that ran out (e.g. this process was stopped) counts nothing
        if peer is not None:
            self._grants.add(peer)
        if len(self._grants) < self.majority:
            return
        if self.role == PRECANDIDATE:
            self._start_vote(now, None, fx)
        else:
            self._become_leader(now, fx)

    def _become_leader(self, now, fx):
        self.role = LEADER
        self.leader = self.me
        self.last = (self.term, 0)
        self._save()
        self._elected_at = now
        self._hb_sent = {}
        self._acks = {}
        self.match = {}
        self._last_hb = None
        self._was_acting = False
        fx.note("elected", "elected master for term %d with %d of %d votes"
                % (self.term, len(self._grants), len(self.voters)))
        self._send_heartbeat(sorted(self.voters - set([self.me])), now, fx)

    def _tick_leader(self, now, fx):
        until = self.lease_until()
        if until is None:
            until = self._elected_at + self.timing.lease
        if now >= until:
            fx.note("stepped_down", "stopped acting as master in term %d: no majority "
                    "acknowledged the lease within %.1f s" % (self.term, self.timing.lease))
            self._become_follower(self._promise_until + self._extra())
        elif now - self._last_hb >= self.timing.heartbeat:
            self._send_heartbeat(sorted(self.voters - set([self.me])), now, fx)

    def _send_heartbeat(self, peers, now, fx):
        self._hb_n += 1
        self._hb_sent[self._hb_n] = now
        self._last_hb = now
        self._promise_until = now + self.timing.failover_timeout   # the leader's own promise
        horizon = now - self.timing.lease
        for n in [n for n, sent in self._hb_sent.items() if sent < horizon]:
            del self._hb_sent[n]
        msg = {"type": "hb", "term": self.term, "n": self._hb_n, "last": _wire(self.last)}
        fx.send.extend((peer, dict(msg)) for peer in peers)

    def _maybe_hand_over(self, now, fx):
        target = self.preferred_peer
        if (not self.failback or self.preferred or target is None or target == self.me
                or now < self._next_failback or self.match.get(target) != self.last
                or not self.is_acting(now)):
            return
        fx.note("handover", "handing the master role back to %s in term %d (caught up at %s)"
                % (target, self.term, _wire(self.last)))
        self._hand_over(target, now, fx)

    def abdicate(self, now, ping=False):
        """This acting leader stops cleanly (its process ends): it hands the role to a
        follower that reported all of its state (the preferred master first), as failback
        does, so that the others need not wait for their promises to run out. None caught
        up: nothing, or with `ping` a heartbeat now, whose answers report their state (the
        wiring asks again; when nobody catches up in time the promises run out as after a
        crash). A handover to a node missing some of the state would be refused by the
        voters that hold it."""
        fx = Effects()
        if not self.is_acting(now):
            return fx
        ready = sorted(p for p in self.match if self.match[p] == self.last)
        if not ready:
            if ping:
                self._send_heartbeat(sorted(self.voters - set([self.me])), now, fx)
            return fx
        target = self.preferred_peer if self.preferred_peer in ready else ready[0]
        fx.note("handover", "handing the master role over to %s in term %d before stopping "
                "(caught up at %s)" % (target, self.term, _wire(self.last)))
        self._hand_over(target, now, fx)
        return fx

    def _hand_over(self, target, now, fx):
        fx.note("stepped_down", "stopped acting as master for the handover")
        self._handed = (self.term, target)
        self._next_failback = now + FAILBACK_BACKOFF * self.timing.failover_timeout
        self._become_follower(self._promise_until + self._extra())
        fx.send.append((target, {"type": "handover", "term": self.term}))
