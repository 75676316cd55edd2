"""Master failover at run time (cluster.failover=1): one election.Election per wazuh-clusterd.

election.py is the state machine and its proof; this module runs it among real sessions:
  * the Election behind one lock, its FileStore in var/db (an unusable record stops the start),
    a timer thread ticking it every Timing.heartbeat / 4 on the boot-time monotonic clock
    (compat.boottime: a suspended leader must not wake up believing its lease still runs);
  * ELECTION frames in (every field checked by election.parse_message) and out (one sender
    thread per session: a peer that does not read must not delay heartbeats to the others);
  * the hello: our election fields, and the peer's checked (a peer with failover off is a
    configuration error, refused in one line);
  * what sync.py and inbox.py ask: is_acting(), acting_term(), new_version(),
    current_version(), check_transfer(), fence() (each rename), confirm(); status() for
    cluster_control; listeners told when this node starts or stops acting or the leader changes.
Voters are the entries of <nodes>; a session counts for the entry its address resolves to.
Every note of the machine is logged (stepped_down, leader_lost and round_failed as warnings);
what a peer can repeat at will (a bad message, a hostile term, a refused message or batch)
through admission.RefusalLog: at most one line per peer a minute, then a count.
"""
from __future__ import absolute_import, division, print_function

import collections
import logging
import re
import threading
import time

from wazuh_cluster import admission, compat, election, electionstore, logs, protocol, text
from wazuh_cluster.errors import ClusterError, ProtocolError, RequestError

HELLO_KEY = "election"         # HELLO_INFO field holding election.hello_fields()
HISTORY = 20                   # failovers kept for status()
SEND_QUEUE = 64                # ELECTION messages queued per peer at most
IDLE_SENDER_WAIT = 30.0        # s; an idle election sender is woken by put() or close()
TICK_LATE = 0.005              # a wake-up just after a deadline, never just before it
ABDICATE_WAIT = 1.0            # a clean stop waits this long at most for its handover to leave
_WARN_NOTES = ("stepped_down", "leader_lost", "refused", "round_failed")


def resolve_voters(nodes, own_address, resolver):
    """(voter ids: the <nodes> entries, ours, {ip: entry}) for the election."""
    by_ip = {}
    me = None
    for entry in nodes:
        for ip in resolver(entry) or [entry]:
            by_ip.setdefault(ip, entry)
            if ip == own_address and me is None:
                me = entry
    if me is None:
        raise ClusterError("failover: this node's address %s is not among <nodes>" % own_address)
    return list(nodes), me, by_ip


class _Sender(object):
    """ELECTION frames to one session, from a thread of their own, in order."""

    def __init__(self, session):
        self.session = session
        self.queue = collections.deque(maxlen=SEND_QUEUE)
        self.busy = False
        self.closed = False
        self.cond = compat.Condition()   # 2.7: an idle sender must not poll
        self.thread = threading.Thread(target=self._run, name="election-%s" % session.peer_name)
        self.thread.daemon = True
        self.thread.start()

    def put(self, message):
        with self.cond:
            # bounded, and what falls out is the oldest: a peer that does not read must not
            # make us drop the newest heartbeat or vote answer and keep stale ones
            self.queue.append(message)
            self.cond.notify()

    def close(self):
        """The session ended (Failover.session_closed): the thread leaves now."""
        with self.cond:
            self.closed = True
            self.cond.notify()

    def idle(self):
        """Nothing queued, nothing being sent."""
        with self.cond:
            return not self.queue and not self.busy

    def _run(self):
        while True:
            with self.cond:
                self.busy = False
                while not self.queue and not self.closed and not self.session.closed:
                    # woken by put() or close(): an idle mesh must not wake four times a
                    # second per node (2.7 measured +0.3 % of a core at 5 nodes with 1.0 s);
                    # the long bound only covers a close nobody reported
                    self.cond.wait(IDLE_SENDER_WAIT)
                if self.closed or self.session.closed:
                    return
                message = self.queue.popleft()
                self.busy = True
            try:
                self.session.channel.send_frame(protocol.ELECTION, 0, 0,
                                                protocol.encode_body(message))
            except ProtocolError:
                self.busy = False    # nothing more leaves: a clean stop must not wait for it
                return               # the session's reader notices and closes it


class Failover(object):
    """The election of this node among its sessions. Thread-safe; start() / stop()."""

    def __init__(self, cfg, db_folder, resolver, clock=compat.boottime, wall=time.time):
        options = cfg.options
        self.node_name = cfg.node_name
        self.clock = clock
        self.wall = wall
        self.log = logs.get("failover")
        self.once = logs.OnceLog(self.log)
        voters, self.me, self._by_ip = resolve_voters(cfg.nodes, cfg.own_address, resolver)
        self.timing = election.Timing(options.keepalive, options.failover_timeout or None,
                                      len(voters))
        store = electionstore.FileStore(electionstore.path_in(db_folder),
                                        electionstore.marker_in(db_folder))
        self.refusals = admission.RefusalLog(self.log, clock=clock)
        self.lock = threading.RLock()
        try:
            self.election = election.Election(self.me, voters, cfg.is_master, self.timing,
                                              store, clock(), failback=bool(options.failback))
        except electionstore.ElectionStoreError as err:
            raise ClusterError(str(err))
        self.names = {self.me: cfg.node_name}     # voter -> node name, as seen
        self.sessions = {}                        # voter -> live session
        self.senders = {}                         # voter -> _Sender
        self.failovers = []                       # {"time", "term", "leader"}
        self.listeners = []                       # callable(acting, leader name)
        self.dialer_wakers = []                   # Dialer.wake of the mesh (peer_waiting)
        self._seen = (False, None)                # (acting, leader) last told to listeners
        self._stop = compat.Event()
        self._thread = None

    # -- life -------------------------------------------------------------------------------

    def start(self):
        self.log.info("Failover on: term %d, %d voters (majority %d), failover timeout %.1f s, "
                      "lease %.2f s.", self.election.term, len(self.election.voters),
                      self.election.majority, self.timing.failover_timeout, self.timing.lease)
        self._thread = threading.Thread(target=self._run, name="election")
        self._thread.daemon = True
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def abdicate(self, timeout=ABDICATE_WAIT):
        """A clean stop: an acting leader hands its role over (election.Election.abdicate)
        to a follower that reports all of its state, asked with one heartbeat, and waits
        `timeout` at most (for the answers, then for the frame to leave) before the
        sessions close."""
        deadline = self.clock() + timeout
        self._input(lambda now: self.election.abdicate(now, ping=True))
        while self.is_acting() and self.clock() < deadline:
            self._stop.wait(0.02)
            self._input(lambda now: self.election.abdicate(now))
        with self.lock:
            senders = list(self.senders.values())
        while not all(s.idle() for s in senders) and self.clock() < deadline:
            self._stop.wait(0.01)

    def _run(self):
        period = self.timing.heartbeat / 4
        wait = period
        while not self._stop.wait(wait):
            try:
                self.tick()
                # Wake when the machine has something to do (a promise running out, a slot
                # to stand in), not up to a period later: that would add to every failover.
                with self.lock:
                    left = self.election.next_tick() - self.clock()
                wait = min(period, left) + TICK_LATE if left > 0 else period
            except Exception:  # a bug must not end the elections of this node silently
                self.log.exception("election tick failed")
                wait = period

    def tick(self):
        """Time passed (the timer thread calls it every heartbeat / 4)."""
        if self.election.term == 0 and not self.election.preferred:
            # No leader ever existed: the master's files are the cluster's only state, and
            # another node elected first would push its own (often empty) copies.
            return
        self._input(lambda now: self.election.tick(now))

    # -- sessions ---------------------------------------------------------------------------

    def hello_fields(self):
        with self.lock:
            return {HELLO_KEY: self.election.hello_fields()}

    def check_hello(self, session, hello):
        """None when the peer's hello is fit for failover, else the one-line reason."""
        fields = hello.get(HELLO_KEY) if isinstance(hello, dict) else None
        if fields is None:
            return ("node %s has cluster.failover=0 and this node has cluster.failover=1: "
                    "the setting must be the same on every node" % session.peer_name)
        try:
            election.parse_hello(fields)
        except ValueError as err:
            return "node %s sent a bad election hello: %s" % (session.peer_name, err)
        if self.voter_of(session) is None:
            return "node %s at %s is not one of <nodes>" % (session.peer_name,
                                                           session.describe_address())
        return None

    def voter_of(self, session):
        address = session.address[0] if session.address else None
        return self._by_ip.get(address)

    def peer_waiting(self):
        """A node of a higher name dialed us and waits for our dial (one session per pair):
        our dialers try now. Their backoff grew while it was down (up to reconnect_max, 30 s
        by default), and without that session a failover needing both of us would wait."""
        for wake in list(self.dialer_wakers):
            wake()

    def session_opened(self, session, hello):
        """A session passed check_hello(): it carries election messages from now on."""
        voter = self.voter_of(session)
        fields = election.parse_hello(hello[HELLO_KEY])
        with self.lock:
            self.names[voter] = session.peer_name
            self.sessions[voter] = session
            replaced = self.senders.get(voter)
            self.senders[voter] = _Sender(session)
        if replaced is not None:
            replaced.close()
        session.on_election = self._on_frame
        self._input(lambda now: self.election.peer_connected(voter, fields, now), voter)

    def session_closed(self, session):
        voter = self.voter_of(session)
        with self.lock:
            if self.sessions.get(voter) is not session:
                return
            del self.sessions[voter]
            sender = self.senders.pop(voter, None)
        if sender is not None:
            sender.close()
        self._input(lambda now: self.election.peer_lost(voter, now))

    def _on_frame(self, session, header):
        voter = self.voter_of(session)
        try:
            message = election.parse_message(header, self.election.voters)
        except ValueError as err:
            self.refused(session.peer_name, "bad election message: %s" % str(err))
            return
        with self.lock:
            if self.sessions.get(voter) is not session:
                return
        self._input(lambda now: self.election.receive(voter, message, now), voter)

    # -- inputs -----------------------------------------------------------------------------

    def _input(self, step, peer=None):
        """step(now) -> Effects, under the lock; `peer`: the voter whose input it is (the
        key of its rate-limited lines)."""
        with self.lock:
            now = self.clock()
            fx = step(now)
            for peer_to, message in fx.send:
                sender = self.senders.get(peer_to)
                if sender is not None:
                    sender.put(message)
            for kind, note in fx.notes:
                if kind in ("hostile", "refused") and peer is not None:
                    # what the peer's input was refused for: it can repeat it at will
                    self.refused(self._name(peer), self._named(note))
                    continue
                self._note(kind, note)
            seen = (self.election.is_acting(now), self._name(self.election.leader))
            changed, self._seen = seen != self._seen, seen
            listeners = list(self.listeners) if changed else []
        for listener in listeners:
            listener(*seen)

    def refused(self, peer_name, reason):
        """What a peer can repeat at will: at most one line per peer a minute, then a count
        (admission.RefusalLog); both texts escaped here."""
        self.refusals.refused(peer_name, logging.WARNING, text.printable(peer_name),
                              text.printable(reason, text.REASON_LIMIT))

    def _named(self, note):
        """A note of the machine, which names voters by <nodes> entry, with their names."""
        for voter, name in self.names.items():
            if voter != name:
                note = re.sub(r"(?<![\w.-])%s(?![\w-])" % re.escape(voter),
                              lambda m: "%s (%s)" % (name, voter), note)
        return note

    def _note(self, kind, note):
        level = logging.WARNING if kind in _WARN_NOTES else logging.INFO
        note = text.printable(self._named(note), text.REASON_LIMIT)
        if kind == "round_failed":   # every half round while no majority answers: once
            self.once.warning("round", "Failover: %s; trying again (logged once).", note)
            return
        if kind in ("elected", "leader"):
            self.once.clear("round", "Failover: a majority answers again")
        self.log.log(level, "Failover: %s.", note)
        if kind in ("elected", "leader"):
            leader = self._name(self.election.leader)
            if not self.failovers or self.failovers[-1]["leader"] != leader:
                self.failovers.append({"time": self.wall(), "term": self.election.term,
                                       "leader": leader})
                del self.failovers[:-HISTORY]

    def _name(self, voter):
        return None if voter is None else self.names.get(voter, voter)

    # -- what sync.py asks --------------------------------------------------------------------

    def is_acting(self):
        """This node leads and holds its lease, now."""
        with self.lock:
            return self.election.is_acting(self.clock())

    def leader_name(self):
        with self.lock:
            return self._name(self.election.leader)

    def acting_term(self):
        """The term a master-owned batch sent now carries; None when not acting."""
        with self.lock:
            return self.election.term if self.election.is_acting(self.clock()) else None

    def follows(self, session):
        """The node at the other end of `session` leads the highest term this node knows and
        this node does not act as leader, both now in one look (the removal guard asks it:
        inbox.py)."""
        with self.lock:
            e = self.election
            return e.leader not in (None, self.me) and not e.is_acting(self.clock()) and \
                self.sessions.get(e.leader) is session

    def new_version(self):
        """[term, seq]: this acting leader's master-owned files changed (the change is queued
        for every peer already); None when not acting."""
        with self.lock:
            version = self.election.new_version(self.clock())
        return None if version is None else [version[0], version[1]]

    def current_version(self):
        """[term, seq] of this acting leader's state now (nothing originated); None when
        not acting."""
        with self.lock:
            e = self.election
            return [e.last[0], e.last[1]] if e.is_acting(self.clock()) else None

    def check_transfer(self, session, header):
        """Fencing: returns when master-owned files from the node at the other end of
        `session` with this header (hostile: {"term": int}, and "version": [term, seq] on a
        confirmation) may be applied; RequestError stale_term else."""
        peer_name = session.peer_name
        if not isinstance(header, dict):
            header = {}
        # the fields of a heartbeat are the same: term, and [term, seq] as "last"
        version = header.get("version", [header.get("term"), 0])
        try:
            checked = election.parse_message({"type": "hb", "term": header.get("term"), "n": 0,
                                              "last": version}, ())
        except ValueError as err:
            raise RequestError("master-owned files from %s: %s" % (
                text.printable(peer_name), str(err).replace("'last'", "'version'")),
                "stale_term")
        term = checked["term"]
        if checked["last"][0] != term:
            raise RequestError("master-owned files from %s: version %s not of term %d" % (
                text.printable(peer_name), list(checked["last"]), term), "stale_term")
        voter = self._live_voter(session)
        allowed = []

        def step(now):
            ok, fx = self.election.transfer_allowed(voter, term, now)
            allowed.append(ok)
            return fx
        self._input(step, voter)
        if not allowed[0]:
            raise RequestError("master-owned files from %s in term %d refused: not the leader "
                               "of the highest term known" % (text.printable(peer_name), term),
                               "stale_term")

    def _live_voter(self, session):
        """The <nodes> entry of `session`, a session live now. Never looked up by node name:
        a name is what a peer says it is (any holder of the key may say another's), and one
        name can be on record for two entries (a node once connected under another's name),
        so a lookup by name could give the leader's changes to the wrong entry and refuse
        them. The entry comes from the address the session was made with (voter_of)."""
        voter = self.voter_of(session)
        with self.lock:
            live = voter is not None and self.sessions.get(voter) is session
        if not live:
            raise RequestError("master-owned files from %s, which is not a connected voter"
                               % text.printable(session.peer_name), "stale_term")
        return voter

    def fence(self, voter, term):
        """For receive.Receiver, after check_transfer: run(change) makes a change of a
        master-owned file (a rename, an unlink) and returns True only while `voter` (a
        <nodes> entry: voter_of the batch's session, or the one recorded with the held
        client.keys) still leads `term`, checked under the lock that adopts a higher term:
        once this node knows a higher term, no change of the deposed leader's batch is made
        any more. (Connected or not: the held client.keys is applied later,
        inbox.confirm_removals.)"""

        def run(change):
            with self.lock:
                if voter is None or not self.election.still_leads(voter, term):
                    return False
                change()
                return True
        return run

    def confirm(self, session, header):
        """A confirmation (inbox: an empty batch with {term, version}, passed check_transfer):
        this node holds all of the leader's state up to the version. Recorded only while the
        sender still leads that term."""
        voter = self._live_voter(session)
        with self.lock:
            if self.election.still_leads(voter, header["term"]):
                self.election.change_applied(tuple(header["version"]))

    def status(self):
        with self.lock:
            now = self.clock()
            e = self.election
            acting = e.is_acting(now)
            if e.role == election.LEADER:
                role = ("master" if e.preferred else "acting master") if acting \
                    else "candidate"
            elif e.role == election.FOLLOWER:
                role = "client"
            else:
                role = "candidate"
            until = e.lease_until()
            return {"failover": True, "role": role, "term": e.term,
                    "leader": self._name(e.leader), "preferred": self._name(e.preferred_peer),
                    "lease_remaining": round(until - now, 3) if acting else None,
                    "failovers": [dict(f) for f in self.failovers],
                    "last": [e.last[0], e.last[1]]}
