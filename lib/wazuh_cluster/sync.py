"""Synchronisation: what this node owns goes to its peers; what peers send is checked and applied.

Sending (one `PeerSync` thread per session, the owner drives):
  * pushes: the internal daemon's change events, sent at once when the line is quiet; while a
    push is in flight, and for cluster.push_delay after it began, new changes gather and
    travel together (one event already holds everything a scan pass found, so a burst is one
    transfer without making the first change wait);
  * full rounds: at session start and in this peer's slot of every <interval>: summaries
    first (summary.py), then the peer's manifest of our items in the buckets that differ is
    compared with ours (checksums both ways) and every difference is repaired, including
    drift that nothing recorded (a file edited or deleted by hand, a lost database); what
    is queued while a round runs goes between its steps and while the round waits for its
    summaries (PeerSync.push_between, pushing_while).
A push waits for no internal daemon's answer it does not need: changed files are read, not
looked up, and its states rows are written while the next push goes (in order).
Receiving (`SyncHandlers`, the session's dispatcher entries): the peer is untrusted; every name
goes through receive.Receiver, which enforces the rules of SPEC section 4.
Every outcome is recorded as <node> <file> <state> through the internal daemon.
"""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import hashlib
import math
import os
import stat
import threading
import time

from wazuh_cluster import (agentlist, background, compat, delta, deltasend, groupcommit,
                           hashtell, logs, manifest, metapack, outbox, protocol, scanner,
                           staterows, summary, versions)
from wazuh_cluster.errors import ClusterError, ProtocolError, RequestError
from wazuh_cluster.internal_link import InternalUnavailable

# Data per sync_files batch. With two batches in flight per client, each held in several
# forms (files, joined, compressed, framed), 8 MiB batches took a master sending its 17 MB
# of shared files to two new clients to 109 MB; 2 MiB to 82 MB, at no cost in time.
BATCH_BYTES = 2 << 20
BATCH_FILES = 2000
# sync_files batches in flight to one peer. A master sending to its clients reads the next
# batch while a client applies the last; clients all send to one master, which is busy with
# all of them already: a second batch from each would only wait decoded in its memory
# (50k agent-info from 4 clients: 88 -> 113 MB peak).
PIPELINE_FROM_MASTER = 2
PIPELINE_FROM_CLIENT = 1
MAX_FILE_BYTES = 48 << 20
RETRY_DELAY = 2.0
INTERNAL_RETRY = 1.0
# One round at a time in a process compares manifests: each holds two of them (tens of
# thousands of dicts), and a master forced to compare with four clients at once peaked at
# four times that. Transfers are outside it.
ROUND_SLOT = threading.BoundedSemaphore(1)
SLOT_POLL = 0.2  # seconds between looks at ROUND_SLOT while a push may come (round_slot)
# A push of at most this many names asks for its manifest on the internal daemon's urgent
# connection (InternalLink.urgent): small enough to be answered at once.
URGENT_NAMES = 64
# Pushes to one peer whose states rows may still be on their way to the internal daemon when
# the next push goes; beyond, the next push waits for the oldest.
RECORDS_AHEAD = 8
NOT_ACTING = "not_acting"   # RequestError code: a master's batch while it holds no lease
ACTING_POLL = 0.2           # how often a leader without its lease looks again (seconds)


class WholeReading(object):
    """read_stable's default `reading`: the whole file read into one string, hashed whole."""

    @staticmethod
    def read(handle, most):
        return handle.read(most)

    @staticmethod
    def digest(data):
        return compat.sha256(data).hexdigest()


def read_stable(path, reading=None, seen=None):
    """(data, sha256, mtime_ns) of a regular file, or None when it changed while being read.

    A file rewritten during the read is sent later, never half old and half new.
    `reading`: reading.read(handle, most) returns at most `most` bytes of the open file (the
    data: bytes, or a versions.Version) and reading.digest(data) their SHA-256 hex digits;
    versions.VersionStore's reads only what was appended to the version it holds, and hashes
    only that (None: WholeReading).
    `seen`: a list, given (scanner fingerprint, wall ns the read began) when the descriptor's
    fstat was that same fingerprint before and after the read (hashtell.py).
    """
    reading = reading or WholeReading
    try:
        before = os.lstat(path)
        with open(path, "rb") as handle:
            # read(n) allocates n bytes first: MAX_FILE_BYTES for every 2 KB shared file was
            # a 48 MB mapping made, shrunk to a page of its own and unmapped, per file sent
            opened = os.fstat(handle.fileno())
            # after that fstat: its times are never later than this (the racy rule)
            began = int(time.time() * 1e9)
            data = reading.read(handle, min(opened.st_size, MAX_FILE_BYTES) + 1)
            if seen is not None:
                fingerprint = scanner.fingerprint(opened)
                if scanner.fingerprint(os.fstat(handle.fileno())) == fingerprint and \
                        len(data) == opened.st_size:
                    seen.append((fingerprint, began))
        after = os.lstat(path)
    except (IOError, OSError):
        return None
    if (before.st_size, compat.stat_mtime_ns(before), before.st_ino) != \
            (after.st_size, compat.stat_mtime_ns(after), after.st_ino) or len(data) != after.st_size:
        return None
    return data, reading.digest(data), compat.stat_mtime_ns(after)


def is_regular(path):
    """True when `path` is a regular file (not a symlink, not gone)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def file_size(path):
    """The size of a regular file (before it is read and its room granted), None if gone."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def fresh_touch(path, entry):
    """What to send for a touched file recorded as manifest.Entry `entry`: (data or None,
    sha256, mtime_ns) of one look at the file, or None when it is gone or changing.

    The newest keepalive goes (agents touch their file every 10 s, often again since the
    scan), but never a new mtime with the recorded checksum of older content: the receiver,
    proving that checksum, would date the old content with it. So a file touched since the
    scan is read again (agent-info: a few hundred bytes) and its checksum compared.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if compat.stat_mtime_ns(st) == entry.mtime_ns:
        return None, entry.sha256, entry.mtime_ns
    return read_stable(path)


def plan_round(mine, theirs, items, delete_extra, my_groups=None):
    """Compare our manifest with the peer's: (send_data, send_meta, delete, delete_dirs, same).

    Manifests map name -> {"sha256", "mtime_ns", "item", ...}. Same content with another mtime
    travels as metadata only, for items whose mtime is data (agent-info). With `delete_extra`
    (we own every file of these items), the peer's extra files and group folders go.
    `my_groups`: our group folders, when `mine` holds only some summary buckets.
    """
    send_data, send_meta, delete = manifest.diff(mine, theirs, delete_extra,
                                                 tuple(items.values()))
    same = sorted(set(mine) - set(send_data) - set(send_meta))
    delete_dirs = extra_dirs(mine, theirs, items, my_groups) if delete_extra else []
    return send_data, send_meta, delete, delete_dirs, same


def spare_pushed(delete, dirs, pushed):
    """The deletions of a round step without the names, and folders holding names, that a
    push sent while the step fetched its manifests: that push may be newer than either
    manifest (a file made after ours was taken, or made again after a deletion), and the
    peer's copy of it is not deleted on their word. The next round compares them again."""
    if not pushed:
        return delete, dirs
    return ([name for name in delete if name not in pushed],
            [folder for folder in dirs
             if not any(name == folder or name.startswith(folder + "/") for name in pushed)])


def round_phase(node, peer, interval):
    """Where in each `interval` the rounds of `node` with `peer` fall (seconds, stable).

    From a hash of both names: a master's rounds with its clients, and the clients' rounds
    with their master, spread over the interval instead of all firing within seconds of
    each other (each client's round rewrote 10 001 rows and compared two manifests at once).
    """
    digest = hashlib.sha256(("%s\n%s" % (node, peer)).encode("utf-8")).digest()
    return interval * (int(binascii.hexlify(digest[:4]), 16) / float(1 << 32))


def next_round_at(after, interval, phase):
    """The first time t >= after + interval / 2 with t = phase modulo interval: the slot of
    `phase` in the next interval, at least half an interval after a round (monotonic)."""
    earliest = after + interval / 2.0
    return phase + interval * math.ceil((earliest - phase) / interval)


def in_items(items, name):
    """True when `name` is one of these items' files."""
    for item in items:
        if name == item.path or name.startswith(item.path + "/"):
            return True
    return False


def extra_dirs(mine, theirs, items_by_name, my_groups=None):
    """Group folders (first level below a delete_dirs item) the peer has and we do not
    (`my_groups` when given: ours, of all buckets)."""
    def groups(files):
        found = set()
        for name, entry in files.items():
            item = items_by_name.get(entry.item)
            if item is None or not item.delete_dirs:
                continue
            rest = name[len(item.path) + 1:]
            if "/" in rest:
                found.add(item.path + "/" + rest.split("/", 1)[0])
        return found
    return sorted(groups(theirs) - (groups(mine) if my_groups is None else set(my_groups)))


class PeerSync(object):
    """Sends what this node owns to one peer, from one thread, one request at a time."""

    state_writer = None  # groupcommit.GroupCommit of all peers (SyncManager), else one's own
    node_name = None     # ours (SyncManager): the agent-info we report names it (reported())
    rows_held = 1000     # a round's state rows held at most until written (more: at a step's end)
    urgent_link = None   # InternalLink.urgent() (SyncManager): a small push's manifest
    urgent_writer = None  # GroupCommit on it (SyncManager): a small push's states

    def __init__(self, session, home, role, link, items, interval, push_delay, request_timeout,
                 clock=compat.monotonic, phase=0.0, store=None):
        self.session = session
        self.home = home
        self.peer = session.peer_name
        self.role = role
        self.link = link
        self.items = dict((item.name, item) for item in items if item.source == role)
        self.interval = interval
        self.push_delay = push_delay
        self.request_timeout = request_timeout
        self.clock = clock
        self.log = logs.get("sync")
        self.cond = compat.Condition()
        self.changed, self.touched, self.deleted, self.deleted_dirs = set(), set(), set(), set()
        self.full_wanted = True
        self.next_push = 0.0  # monotonic time before which no push starts
        self.stopped = False
        self.phase = phase  # round_phase(): this peer's slot in every interval
        self.last_round = None
        self.next_round = None
        self.last_round_ok = None
        # What the peer holds of our big files, to send their changes as deltas (delta.py)
        # when it announced them.
        self.versions = deltasend.PeerVersions(
            store if "delta" in getattr(session, "features", ()) else None, home, self.items,
            read_stable)
        # its metadata updates in packed form, and the compact answer (metapack.py)
        self.packed = metapack.FEATURE in getattr(session, "features", ())
        self._room = None
        self._recording = collections.deque()  # background.Pending: pushes' states rows
        self._recorder = background.Serial("record-%s" % self.peer)
        self.summaries = True  # until the peer answers sync_summary with unknown_command
        self.summary_form = 1  # the form of the peer's last summary (peer_summary)
        # cluster.failover=1 (failover.Failover): as a master, act only while holding the lease
        # and stamp every batch with {term} (set by SyncManager)
        self.failover = None
        # failover: the term in which the peer confirmed our state up to a version, every push
        # since complete (a push of that term then confirms its version too), else None;
        # postponed: files postponed so far
        self.in_sync = None
        self.postponed = 0
        self.round_clean = True
        self.written = set()   # summary buckets the running round sent something to (settle)
        self.pushed_meanwhile = None  # names pushed while a round step fetched its manifests
        self.equal_written = set()   # names compared equal in those buckets (settle)
        # localedits.LocalEdits.pushed: tell what the peer applied of our pushes
        self.pushed = None
        self.thread = threading.Thread(target=self.run, name="sync-%s" % self.peer)
        self.thread.daemon = True

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify()

    # -- what to do -----------------------------------------------------------------------------

    def notify(self, event, owned=False):
        """Queue the names of a change event that belong to items we own (all of them when
        the caller filtered them already: `owned`, SyncManager.on_event)."""
        with self.cond:
            for key, bucket in (("changed", self.changed), ("touched", self.touched),
                                ("deleted", self.deleted), ("deleted_dirs", self.deleted_dirs)):
                names = event.get(key) or ()
                bucket.update(names if owned else (n for n in names if self.owns(n)))
            self.cond.notify()

    def request_full(self):
        with self.cond:
            self.full_wanted = True
            self.cond.notify()

    def owns(self, name):
        return in_items(self.items.values(), name)

    def has_push(self):
        return bool(self.changed or self.touched or self.deleted or self.deleted_dirs)

    # -- the thread -----------------------------------------------------------------------------

    def run(self):
        try:
            while True:
                job = self.next_job()
                if job is None:
                    return
                try:
                    job()
                except RequestError as err:
                    self.in_sync = None
                    if err.code in (NOT_ACTING, "not_leader", "not_master", "stale_term"):
                        # the lease ran out midway, or the peer does not know of our election
                        # yet: compare everything again in a moment
                        with self.cond:
                            self.cond.wait(ACTING_POLL)
                        self.request_full()
                        continue
                    if err.code != InternalUnavailable.code:
                        raise
                    # Our internal daemon, or the peer's, is restarting: wait, then compare
                    # everything again.
                    self.log.warning("Synchronisation with %s paused: %s", self.peer, err)
                    with self.cond:
                        self.cond.wait(INTERNAL_RETRY)
                    self.request_full()
        except RequestError as err:
            if not self.session.closed:
                self.log.warning("Synchronisation with %s stopped: %s", self.peer, err)
                self.session.close("synchronisation failed: %s" % err)
        except ClusterError as err:
            self.log.error("Synchronisation with %s failed: %s", self.peer, err)
            self.session.close("synchronisation failed")

    def next_job(self):
        """Block until something is due; return the callable that does it, None to stop."""
        with self.cond:
            while True:
                if self.stopped or self.session.closed:
                    return None
                job, wait = self.due(self.clock())
                if job is not None:
                    return job
                # Until it is due, or notify() (a change, a request, stop or the end of
                # the session): an idle peer's thread no longer looks once a second.
                self.cond.wait(max(0.001, wait))

    def due(self, now):
        """(job, 0) when a full round or a push is due at monotonic `now`, else (None, wait).

        A round (asked for, at session start, then in this peer's slot of every interval:
        next_round_at) comes first and covers what is queued. A push starts at once unless
        one started less than push_delay ago. Called with the condition held.
        """
        if not self.may_act():
            return None, ACTING_POLL
        if self.last_round is None or now >= self.next_round:
            self.full_wanted = True
        if self.full_wanted:
            self.full_wanted = False
            self.clear_push()
            return self.full_round, 0
        if self.has_push() and now >= self.next_push:
            self.next_push = now + self.push_delay
            # the version first: with the queue taken under the same hold of the condition,
            # every change it covers is in this push (SyncManager.on_event queues, then bumps)
            version = self.leader_version()
            job = self.take_push()
            return (lambda: self.confirmed_push(version, job)), 0
        wait = self.next_round - now
        if self.has_push():
            wait = min(wait, self.next_push - now)
        return None, wait

    def may_act(self):
        """False while this node, sending as a master with failover on, holds no lease: it
        then pushes nothing and runs no round (election.py: Leases)."""
        return self.failover is None or self.role != "master" or self.failover.is_acting()

    def stamped(self, header):
        """A master's batch header with {term} (failover on); RequestError not_acting when
        the lease is gone."""
        if self.failover is None or self.role != "master":
            return header
        term = self.failover.acting_term()
        if term is None:
            raise RequestError("not acting as master any more", NOT_ACTING)
        header["term"] = term
        return header

    def leader_version(self):
        """Failover, sending as the master: our state's version now, else None."""
        if self.failover is None or self.role != "master":
            return None
        return self.failover.current_version()

    def confirm_version(self, version, clean):
        """After a round begun (or a push taken) at our version `version`: when `clean`, the
        peer holds all of our state up to it, and is told so (an empty batch with {term,
        version}; election.py: Fencing). Otherwise nothing is confirmed until a clean round."""
        clean = clean and version is not None and self.failover.is_acting()
        self.in_sync = version[0] if clean else None
        if clean:
            header = Batch().header()
            header["term"], header["version"] = version[0], version
            self.session.call("sync_files", header, timeout=self.request_timeout)

    def confirmed_push(self, version, job):
        """A push; with failover on, confirmed when the peer was in sync before it and every
        name of it ended synchronized (none postponed, none left out: a file changed and
        gone since, a folder made again)."""
        states = self.push(*job)
        if version is not None:
            self.confirm_version(version, self.in_sync == version[0] and all(
                states.get(name) == "synchronized" for names in job for name in names))

    def clear_push(self):
        self.changed, self.touched, self.deleted, self.deleted_dirs = set(), set(), set(), set()

    def take_push(self):
        job = (sorted(self.changed), sorted(self.touched - self.changed), sorted(self.deleted),
               sorted(self.deleted_dirs))
        self.clear_push()
        return job

    def retry_later(self, names):
        with self.cond:
            self.postponed += len(names)
            self.changed.update(names)
            self.next_push = max(self.next_push, self.clock() + RETRY_DELAY)

    # -- sending --------------------------------------------------------------------------------

    def manifest(self, names=None, buckets=None):
        """Our manifest {name: manifest.Entry} of the items we own (of `names` only, of
        some summary buckets only)."""
        args = {"source": self.role, "as_data": True}
        if names is not None:
            args["names"] = names
        if buckets is not None:
            args["buckets"] = buckets
        link = self.link
        if names is not None and len(names) <= URGENT_NAMES and self.urgent_link is not None:
            link = self.urgent_link   # a client.keys append: not behind keepalive batches
        return manifest.decode(link.call_data("manifest", args)[1] or b"{}")

    def full_round(self):
        """Compare with the peer and repair every difference (see summary.py).

        Summaries first: only the buckets whose summaries differ are compared entry by
        entry, BUCKETS_PER_STEP at a time, so that a round holds a slice of each manifest.
        A session's first round compares every bucket (it also writes the state rows a lost
        database misses). A peer that knows no summaries gets the whole manifests at once.
        """
        started = self.clock()
        self.recorded()   # the round reads what is pending: the pushes' rows first
        version = self.leader_version()   # before the manifests: they hold all it covers
        postponed = self.postponed
        self.round_clean = True           # round_step: no outcome left out was a failure
        self.written, self.equal_written = set(), set()
        pending, compared = self.pushing_while(self.round_basis)
        if compared is None:
            steps, groups = [None], None
        else:
            steps, groups = summary.steps(compared[0]), compared[1]
        states, counts, ok = {}, [0, 0, 0, 0, 0], True
        for buckets in steps:
            self.push_between()
            step = self.round_step(buckets, groups, counts)
            ok = ok and all(s == "synchronized" for s in step.values())
            states.update(step)
            del step
            if len(states) >= self.rows_held:
                # Written as the steps end once there are many, not kept for the whole
                # round: a master's first rounds with 20 new clients held 20 dicts of 10 000
                # names (each its own string, from its manifest) until their last step.
                # What settle() may still leave out waits for it.
                held = frozenset(self.unproven(states)) if compared is not None else ()
                self.record(dict(i for i in states.items() if i[0] not in held))
                states = dict((name, states[name]) for name in held)
        unsettled = 0
        self.push_between()
        if compared is not None:
            states.update(self.confirm_pending(pending, compared[0]))
            unsettled = self.settle(states, compared[2])
        self.record(states)
        self.finished_round(self.clock())
        if unsettled:
            self.next_round = min(self.next_round, self.clock() + RETRY_DELAY)
        self.last_round_ok = ok and not unsettled and \
            all(s == "synchronized" for s in states.values())
        if version is not None:
            self.confirm_version(version, self.last_round_ok and self.round_clean and
                                 self.postponed == postponed)
        self.log.debug("Full round with %s: %s buckets compared; %d sent, %d metadata, "
                       "%d deleted, %d folders, %d unchanged in %.2f s.", self.peer,
                       "all" if compared is None else len(compared[0]), counts[0],
                       counts[1], counts[2], counts[3], counts[4], self.clock() - started)

    def round_basis(self):
        """(our files pending for the peer, compare_summaries()): what a round starts from."""
        pending = self.link.call("pending", {"node": self.peer})["files"] \
            if self.summaries else []
        return pending, self.compare_summaries(everything=self.last_round is None)

    def pushing_while(self, call):
        """call() in a helper thread while this one pushes what is queued (push_between);
        its result, or its error raised here. A round's first calls waited for both
        internal daemons and the peer, busy with keepalive batches: up to 8 s at 20
        clients, and that client's appends with them (issue 11). Its summaries may be
        taken before or after such a push: its buckets count as written (settle)."""
        if self.failover is not None:
            return call()
        done = []

        def run():
            try:
                done.append((True, call()))
            except BaseException as err:  # raised again below, in the round's thread
                done.append((False, err))
            with self.cond:
                self.cond.notify_all()
        helper = threading.Thread(target=run, name="round-%s" % self.peer)
        helper.daemon = True
        helper.start()
        while not done:
            if not self.push_between():
                with self.cond:
                    if not done:
                        due = self.next_push - self.clock() if self.has_push() else SLOT_POLL
                        self.cond.wait(min(SLOT_POLL, max(0.001, due)))
        helper.join()
        ok, value = done[0]
        if not ok:
            raise value
        return value

    def compare_summaries(self, everything):
        """(buckets to compare, our group folders, the peer's summary) from both summaries;
        every bucket when `everything`; None when the peer knows no summaries (an older
        version)."""
        if not self.summaries:
            return None
        try:
            theirs = self.peer_summary()
        except RequestError as err:
            if err.code != "unknown_command":
                raise
            self.log.info("%s knows no summaries: full manifests in every round.", self.peer)
            self.summaries = False
            return None
        # Ours after theirs: made in the form the peer answered in.
        mine = self.my_summary()
        buckets = list(range(summary.BUCKETS)) if everything else \
            summary.differing(summary.parse(mine["buckets"]), theirs)
        return buckets, mine.get("groups") or [], theirs

    def my_summary(self):
        """Our summary of our items (with our group folders), in the form of the peer's
        last one (summary_form)."""
        args = {"source": self.role, "groups": True}
        if self.summary_form != 1:
            args["form"] = self.summary_form
        return self.link.call("summary", args)

    def peer_summary(self):
        """The peer's summary of its copy of our items, as of now (parsed); asked in the
        newest form, its answer's form remembered (summary_form: an older peer answers in
        form 1 without saying so)."""
        result, _ = self.session.call("sync_summary", {"source": self.role,
                                                       "form": summary.FORM},
                                      timeout=self.request_timeout)
        try:
            if not isinstance(result, dict):
                raise ProtocolError("summary: an object expected")
            form = summary.parse_form(result.get("form"))
            parsed = summary.parse(result.get("buckets"))
        except ProtocolError as err:
            raise RequestError("%s sent a malformed summary: %s" % (self.peer, err.message),
                               "protocol")
        self.summary_form = form
        return parsed

    def settle(self, states, basis):
        """Leave out of `states` the "synchronized" this round did not get from a transfer
        (a file compared equal, or pending and in a bucket whose summaries matched) when the
        peer's copy changed in that bucket since `basis`, its summary this round began
        from; returns how many were left out (then another round follows soon).

        Those confirmations rest on the peer's copy as the summary or a step's manifest
        showed it: a file the peer lost meanwhile (a client.keys removed by hand there,
        noticed while the round ran) was recorded "synchronized" and not sent again until
        the next interval. In a bucket this round wrote to, the sums move because of its
        transfers: a file compared equal there is checked against the peer's entry again.
        """
        confirmed = self.unproven(states)
        if not confirmed:
            return 0
        now = self.peer_summary()
        moved = frozenset(b for b in range(summary.BUCKETS)
                          if tuple(now[b]) != tuple(basis[b]))
        dropped = [name for name in confirmed if name not in self.equal_written and
                   summary.bucket_of(name) in moved]
        equal = [name for name in confirmed if name in self.equal_written]
        if equal:
            # The peer's sum of a written bucket is ours once it holds what we hold there;
            # where it is not, the entries of the files compared equal tell.
            mine = summary.parse(self.my_summary()["buckets"])
            unsure = sorted(name for name in equal if tuple(now[summary.bucket_of(name)]) !=
                            tuple(mine[summary.bucket_of(name)]))
            if unsure:
                ours, theirs = self.manifests(names=unsure)
                same = set(plan_round(ours, theirs, self.items, delete_extra=False)[4])
                dropped.extend(name for name in unsure if name not in same)
        for name in dropped:
            del states[name]
        if dropped:
            self.round_clean = False
            self.log.info("The copy on %s changed during a round: %d file(s) not confirmed "
                          "(e.g. %s), compared again in %.0f s.", self.peer, len(dropped),
                          sorted(dropped)[0], RETRY_DELAY)
        return len(dropped)

    def unproven(self, states):
        """The names of `states` confirmed without a transfer: what settle() checks again."""
        return [name for name, state in states.items() if state == "synchronized"
                and (summary.bucket_of(name) not in self.written or
                     name in self.equal_written)]

    def push_between(self):
        """In a round, between its steps and while it waits for ROUND_SLOT: send what was
        queued since it began, as due() would have (True when it did).

        A round with a client takes seconds (two summaries, other peers' rounds holding the
        slot, the steps; 4-12 s at 10 clients under load), and the client.keys appends
        queued meanwhile waited for its end: the append p99 of issue 11 was that client's.
        Its buckets count as written by this round (settle: their sums move because of it).
        Not with failover on: a push's version confirmation rests on the peer being in sync
        before it, which a running round has yet to establish.
        """
        if self.failover is not None:
            return False
        with self.cond:
            now = self.clock()
            if self.stopped or not self.has_push() or now < self.next_push:
                return False
            self.next_push = now + self.push_delay
            job = self.take_push()
        self.written.update(summary.bucket_of(name) for names in job for name in names)
        if self.pushed_meanwhile is not None:
            self.pushed_meanwhile.update(name for names in job for name in names)
        self.push(*job)
        return True

    def round_slot(self):
        """Take ROUND_SLOT; pushes go out while other peers' rounds hold it."""
        while not ROUND_SLOT.acquire(False):
            if not self.push_between():
                with self.cond:
                    if not self.has_push():
                        self.cond.wait(SLOT_POLL)

    def round_step(self, buckets, groups, counts):
        """Compare and repair the files of these summary buckets (all when None); returns
        {name: state}; adds to `counts` (sent, metadata, deleted, folders, unchanged)."""
        self.round_slot()
        try:
            # Pushes go while both manifests are fetched: under churn at 20 clients that
            # took the internal daemons and the client seconds, and the client's appends
            # waited with it (as round_basis: pushing_while).
            self.pushed_meanwhile = set()
            try:
                mine, theirs = self.pushing_while(lambda: self.manifests(buckets))
            finally:
                pushed, self.pushed_meanwhile = self.pushed_meanwhile, None
            send_data, send_meta, delete, dirs, same = plan_round(
                mine, theirs, self.items, delete_extra=self.role == "master",
                my_groups=groups)
            delete, dirs = spare_pushed(delete, dirs, pushed)
            if buckets is not None and self.role == "client":
                send_meta, same = self.reported(send_meta, same)
            self.versions.note_round(mine, theirs)
            # Only the entries sent as metadata are needed from here: the manifests (tens of
            # thousands of dicts) go before the transfers, and another round may begin.
            mine = dict((name, mine[name]) for name in send_meta)
            del theirs
        finally:
            ROUND_SLOT.release()
        states = dict((name, "synchronized") for name in same)
        # A folder removed moves the buckets of its files: those of this step and of the
        # steps before are written by their deletion, those of later steps are compared
        # after it (a sum moved there only brings the next round sooner).
        self.written.update(summary.bucket_of(name) for name in send_data + send_meta + delete)
        self.equal_written.update(name for name in same
                                  if summary.bucket_of(name) in self.written)
        states.update(self.send(mine, send_data, send_meta, delete, dirs))
        if any(s != "synchronized" for s in states.values()):
            self.round_clean = False      # also for what forget_unknown leaves out
        self.forget_unknown(states, delete + dirs)
        for k, part in enumerate((send_data, send_meta, delete, dirs, same)):
            counts[k] += len(part)
        return states

    def reported(self, send_meta, same):
        """(send_meta, same) of a client's round step over buckets whose summaries
        differed: our agent-info files the master holds as we do go as metadata too. The
        master's summary of our agents is of the agents its table says we report; a table
        that lost rows (a lost database, held rows of a killed daemon) left agents that
        keep alive no more (disconnected) out for good, and their buckets compared entry
        by entry in every round. Such an update is our report: the master records it
        (newest keepalive wins) and keeps its file as it is. Not a copy naming another
        node (a master made a client keeps its clients' files): the master would record
        us as their reporter."""
        item = self.items.get("agent-info")
        if item is None or not item.mtime_is_data:
            return send_meta, same
        folder = item.path + "/"
        ours = [name for name in same if name.startswith(folder) and agentlist.read_node_name(
            os.path.join(self.home, *name.split("/")))[1] in (None, self.node_name)]
        if not ours:
            return send_meta, same
        ours_set = set(ours)
        return sorted(send_meta + ours), [name for name in same if name not in ours_set]

    def confirm_pending(self, pending, compared):
        """Of our files recorded pending for the peer before the summaries were made, those
        in buckets whose summaries were the same (the peer holds them as we do):
        {name: "synchronized"}."""
        skip = frozenset(compared)
        return dict((name, "synchronized") for name in pending
                    if self.owns(name) and summary.bucket_of(name) not in skip)

    def finished_round(self, now):
        """A full round ended at monotonic `now`: the next one is in this peer's slot."""
        self.last_round = now
        self.next_round = next_round_at(now, self.interval, self.phase)

    def manifests(self, buckets=None, names=None):
        """(ours, the peer's) for a full round, of some summary buckets (or names) only."""
        mine = self.manifest(names=names, buckets=buckets)
        args = {"source": self.role, "manifest_in_data": True}
        if self.role == "client" or names is not None:
            # The master holds every client's agent-info: ask only about ours.
            args["names"] = sorted(mine)
        elif buckets is not None:
            args["buckets"] = buckets
        result, data = self.session.call("sync_manifest", args, timeout=self.request_timeout)
        try:
            if isinstance(result, dict) and result.get("files_in_data"):
                theirs = manifest.decode(data)  # relayed as bytes (inbox.sync_manifest)
            else:
                theirs = manifest.compact(result.get("files") if isinstance(result, dict)
                                          else None)
        except ProtocolError as err:
            raise RequestError("%s sent a malformed manifest: %s" % (self.peer, err), "protocol")
        if self.role == "client":
            theirs = dict((n, e) for n, e in theirs.items() if n in mine)
        return mine, theirs

    def push(self, changed, touched, deleted, deleted_dirs):
        started = self.clock()
        if touched or deleted or deleted_dirs:
            mine = self.manifest(changed + touched + deleted)
            send_data = [n for n in changed if n in mine]
        else:
            # Changed files only (a client.keys append): send() reads each one itself, and
            # the manifest would only tell that it is still there. Asking for it had every
            # sync thread wait for the internal daemon's request or tick under way (its
            # clients' keepalive batches; up to 3.3 s at 20 clients, issue 11).
            mine = {}
            send_data = [n for n in changed if is_regular(
                os.path.join(self.home, *n.split("/")))]
        send_meta = [n for n in touched if n in mine]
        delete = [n for n in deleted if n not in mine]
        dirs = list(deleted_dirs)
        if dirs:
            # A folder recreated meanwhile is not deleted: its files would be on our side.
            everything = self.manifest()
            dirs = [d for d in dirs if not any(n.startswith(d + "/") for n in everything)]
        if self.role == "client":
            delete, dirs = [], []  # a master keeps agent-info; its own manager decides
        manifested = self.clock()
        states = self.send(mine, send_data, send_meta, delete, dirs)
        sent = self.clock()
        self.record(states, urgent=len(states) <= URGENT_NAMES, later=self.failover is None)
        self.log.debug("Pushed to %s: %d files, %d metadata, %d deleted in %.3f s (manifest "
                       "%.3f s, transfer %.3f s, states %.3f s).", self.peer, len(send_data),
                       len(send_meta), len(delete) + len(dirs), self.clock() - started,
                       manifested - started, sent - manifested, self.clock() - sent)
        return states

    def send(self, mine, send_data, send_meta, delete, dirs):
        """Send in batches; return {name: state} as the peer reported it.

        `mine` is our manifest: a metadata-only update carries the checksum the receiver must
        already have, so that it never stamps a new mtime on other content. Up to PIPELINE_*
        batches are in flight: the next one is read while the peer applies the last.
        """
        calls = InFlight(self.call_files, PIPELINE_FROM_MASTER if self.role == "master"
                         else PIPELINE_FROM_CLIENT)
        room = self.room()
        batch = Batch(room.batch_bytes(BATCH_BYTES, BATCH_FILES))
        # A batch is granted its worst case before its first entry (outbox.py): no more names
        # than this send has, and when one name may carry data, that name's data: a push of
        # one client.keys line does not take the whole send pool (with 24 MiB each push took
        # it, and the pushes of an append to ten clients went one after the other).
        bound = (min(BATCH_FILES, len(send_data) + len(send_meta) + len(delete)),
                 len(send_data) + len(send_meta) == 1)
        postponed = []
        held = {}   # names the peer holds as they are: their states, nothing sent
        try:
            for name in send_data:
                path = os.path.join(self.home, *name.split("/"))
                size = file_size(path)
                got = made = None
                if size is not None and self.versions.shares(size):
                    # A big file is read once into the shared store, not into this session's
                    # room: only what this peer gets of it (often a delta) is granted.
                    got = self.versions.read(name)
                    if got is None:
                        postponed.append(name)
                        continue
                    # The version read is the one sent: an append since the lstat above
                    # only makes it newer (a size compared with that lstat postponed it by
                    # RETRY_DELAY, under an append a second; 20 clients, issue 11).
                    size = len(got[0])
                    if self.versions.holds_exactly(name, got[1], got[2]):
                        # Pushed already, mtime and all: a client.keys change is announced
                        # before it is hashed (catalog.look_hot) and named again once it is.
                        # A metadata update would cost every peer a call and hold its next
                        # append behind it.
                        held[name] = "synchronized"
                        continue
                    if self.versions.holds(name, got[1]):
                        # Pushed already (the change event came after the push that read
                        # it): its mtime only, not 9.4 MB to every client at once.
                        batch = calls.submit_if_full(batch)
                        batch.make_room(room, 0, *bound)
                        batch.meta.append({"name": name, "sha256": got[1], "mtime_ns": got[2]})
                        continue
                    made = self.versions.delta_for(name, got)
                cost = size if made is None else len(made[1].middle)
                if size is not None:
                    batch = calls.submit_if_full(batch, cost)
                    batch.make_room(room, cost, *bound)
                if got is None and size is not None:
                    got = self.versions.read(name)
                if got is None or len(got[0]) != size:  # changed since: its size was granted
                    postponed.append(name)
                    continue
                if made is None:
                    if self.versions.shares(size):
                        self.log.debug("%s goes whole (%d bytes) to %s: %s.", name, size,
                                       self.peer, self.versions.whole_why)
                    batch.add_file(name, *got)
                else:
                    batch.add_delta(name, got, *made)
                del got
            for name in send_meta:
                got = fresh_touch(os.path.join(self.home, *name.split("/")), mine[name])
                if got is None:
                    postponed.append(name)
                elif got[1] != mine[name].sha256:
                    batch = calls.submit_if_full(batch, len(got[0]))
                    batch.make_room(room, len(got[0]), *bound)
                    batch.add_file(name, *got)  # written since the scan: its new content
                else:
                    batch = calls.submit_if_full(batch)
                    batch.make_room(room, 0, *bound)
                    batch.meta.append({"name": name, "sha256": got[1], "mtime_ns": got[2]})
            for name in delete:
                batch = calls.submit_if_full(batch)
                batch.make_room(room, 0, *bound)
                batch.delete.append(name)
            batch.delete_dirs.extend(dirs)
            if not batch.empty():
                calls.submit(batch, last=True)
                batch = Batch()  # its grant is its call's now
        finally:
            batch.close_grant()  # one not submitted (an error) gives its room back here
            states = calls.finish()
        if postponed:
            self.retry_later(postponed)
        states.update(held)
        return states

    def room(self):
        """Our grants for sending to this peer (outbox.Room), made once."""
        if self._room is None:
            self._room = outbox.Room(self.session.budget, "%s (sending)" % self.peer,
                                     lambda: self.stopped or self.session.closed)
        return self._room

    def call_files(self, batch):
        # The files go as a list: the message is encoded from them, not from a copy, and
        # they leave memory once compressed (see outbox.py). The batch's own list goes (the
        # encoder empties it): a joined copy kept every batch's files until the peer's
        # answer, beyond what its grant counts (20 clients: +20 MB at the first sync).
        data = batch.data
        data.extend(batch.delta_data)
        del batch.delta_data[:]
        try:
            result, _ = self.session.call("sync_files", self.stamped(batch.header(self.packed)),
                                          data,
                                          timeout=self.request_timeout,
                                          compress=batch.size >= protocol.COMPRESS_FROM,
                                          grant=batch.grant)
        finally:
            batch.close_grant()
        # Only the names of this batch: the peer's answer must not add rows of its choosing.
        states = metapack.full_states(result, batch.names(), [entry["name"] for entry in
                                                              batch.meta] if self.packed else ())
        if states is None:
            raise RequestError("%s sent a malformed answer" % self.peer, "protocol")
        if batch.deltas:
            states.update(self.resend_refused(batch, result.get("delta_refused")))
        if self.role == "client":
            self.kept_newer(batch, result.get("kept_newer"), states)
        self.versions.note_sent(batch.files + batch.deltas, states)
        self.versions.note_meta(batch.meta, states)
        if self.pushed is not None and self.failover is not None and self.role == "master":
            # stamped above: sent while acting
            self.pushed(self.peer, [(f["name"], f["sha256"]) for f in batch.files
                                    + batch.deltas + batch.meta]
                        + [(name, None) for name in batch.delete], states)
        return states

    def kept_newer(self, batch, names, states):
        """The master kept its newer copy of these agent-info files we sent (their agent
        moved to another node; ours is left from before): each is recorded in our agents
        table as reported elsewhere (by no node name: which one, the master does not say)
        at the mtime we sent, so that our rounds and pushes leave it out until it is newer
        than that (Catalog._own_agents_only) and the master's summary of our agents
        (without it) matches ours. Else it went whole in every round, and the master
        refused it every time. Names the batch did not send or did not find synchronized
        are ignored: the answer is the peer's."""
        item = self.items.get("agent-info")
        if not isinstance(names, list) or item is None or not item.mtime_is_data:
            return
        sent = dict((entry["name"], entry["mtime_ns"]) for entry in batch.files + batch.meta)
        folder = item.path + "/"
        rows = [[name[len(folder):], u"", sent[name]] for name in set(
            name for name in names if isinstance(name, compat.string_types))
            if name in sent and states.get(name) == "synchronized" and
            name.startswith(folder) and "/" not in name[len(folder):]]
        if rows:
            self.link.call("agent_nodes", {"rows": rows})

    def resend_refused(self, batch, refused):
        """{name: state} of the whole files sent, in this same push or round, for the deltas
        the peer refused (its file was not the base: edited by hand, or replaced)."""
        names = self.versions.refused(batch.deltas, refused)
        whole = Batch()
        for name in names:
            got = self.versions.read(name)
            if got is not None:
                whole.make_room(self.room(), len(got[0]))
                whole.add_file(name, *got)
        if names:
            self.log.debug("%s refused the delta of %d file(s) (e.g. %s): sent whole.",
                           self.peer, len(names), names[0])
        return self.call_files(whole) if not whole.empty() else {}

    def recorded(self, ahead=0):
        """Wait until at most `ahead` pushes' states rows are still being written (none by
        default); raise what the writes that ended met."""
        recording = self._recording
        while recording and (len(recording) > ahead or recording[0].done()):
            recording.popleft().wait()

    def forget_unknown(self, states, extra):
        """Leave out the outcome of deleting names that only the peer's manifest listed,
        unless we had them pending for it (a file we deleted): a peer listing a million
        names must not add a million rows to our database."""
        if not extra:
            return
        pending = set(self.link.call("pending", {"node": self.peer})["files"])
        for name in extra:
            if name not in pending:
                states.pop(name, None)

    def record(self, states, urgent=False, later=False):
        """Write the states rows, a small push's on the urgent link. `later` (a push): in
        the background, while the next push goes (they waited 0.5-1.6 s for the internal
        daemon under churn at 20 clients, and the next append with them), in order behind
        the rows of the pushes before (one Serial). A push no longer waits for the rows of
        the push before it either (at most RECORDS_AHEAD in all): a full pass of the
        master's internal daemon under load (1.1-1.4 s) held a client's next append that
        long (issue 11, 20 clients). Rows written at once wait for all of those."""
        self.recorded(RECORDS_AHEAD - 1 if later else 0)
        writer = (urgent and self.urgent_writer) or self.state_writer or \
            groupcommit.GroupCommit(self.link.call)
        rows = staterows.rows(self.peer, states)
        if later and rows:
            self._recording.append(self._recorder.submit(writer.write, rows))
        else:
            writer.write(rows)
        failed = [name for name, state in states.items() if state == "failed"]
        if failed:
            self.log.warning("%d file(s) failed on %s (e.g. %s); retried at the next round.",
                             len(failed), self.peer, failed[0])


class InFlight(object):
    """sync_files calls running at once (at most `depth`), each from a thread of its own.

    finish() waits for all of them and returns their states merged; the first error any of
    them raised is raised there, once every call has ended.
    """

    def __init__(self, call, depth):
        self.call = call
        self.depth = depth
        self.running = collections.deque()
        self.states = {}
        self.error = None

    def submit_if_full(self, batch, extra=0):
        """Submit `batch` when one more entry would make it too large; return the one to fill."""
        if not batch.full(extra):
            return batch
        self.submit(batch)
        return Batch(batch.max_bytes)

    def submit(self, batch, last=False):
        """Start the call of `batch`; the `last` one of a send runs in this thread (nothing
        is read after it: a push of one append to ten clients started and joined a thread
        per client for it), its error raised by finish() as any other's."""
        while len(self.running) >= self.depth:
            self._join(self.running.popleft())
        if self.error is not None:
            raise self.error
        result = {}
        if last:
            self._run(batch, result)
            self._joined(result)
            return
        thread = threading.Thread(target=self._run, args=(batch, result), name="sync-files")
        thread.daemon = True
        thread.start()
        self.running.append((thread, result))

    def _run(self, batch, result):
        try:
            result["states"] = self.call(batch)
        except Exception as err:  # raised again in the thread that owns the calls
            result["error"] = err

    def _join(self, running):
        thread, result = running
        thread.join()
        self._joined(result)

    def _joined(self, result):
        if "error" in result:
            self.error = self.error or result["error"]
        else:
            self.states.update(result.get("states") or {})

    def finish(self):
        while self.running:
            self._join(self.running.popleft())
        if self.error is not None:
            raise self.error
        return self.states


class Batch(object):
    """Files (data concatenated), metadata updates and deletions of one sync_files request.

    `max_bytes`: its data bound; `grant`: the outbox.Grant its files are read under.
    """

    def __init__(self, max_bytes=BATCH_BYTES):
        self.files, self.data, self.meta, self.delete, self.delete_dirs = [], [], [], [], []
        self.deltas, self.delta_data = [], []  # their middles travel after the files' data
        self.size = 0
        self.max_bytes = max_bytes
        self.grant = None

    def full(self, extra=0):
        """True when the batch has reached its data or entry bound (keeps headers small)."""
        entries = len(self.files) + len(self.meta) + len(self.delete) + len(self.deltas)
        return entries > 0 and (self.size + extra > self.max_bytes or entries >= BATCH_FILES)

    def make_room(self, room, size=0, entries=BATCH_FILES, alone=False):
        """Before its first entry: a grant of `room` for the whole batch (its data bound, or
        one file of `size` beyond it; none for a batch of names only) of at most `entries`
        names; `alone`: no other entry of the batch carries data (only `size` is granted)."""
        if self.grant is None:
            data = (size if alone else max(size, self.max_bytes)) if size else 0
            self.grant = room.grant(outbox.batch_cost(data, entries))

    def close_grant(self):
        if self.grant is not None:
            self.grant.close()

    def add_file(self, name, data, sha256, mtime_ns):
        data = versions.bytes_of(data)  # a big file's version joined: it goes whole
        self.files.append({"name": name, "sha256": sha256, "mtime_ns": mtime_ns,
                           "size": len(data)})
        self.data.append(data)
        self.size += len(data)

    def add_delta(self, name, got, base_sha256, made):
        """A file as a delta.Delta against the version `base_sha256` the peer holds."""
        _data, sha256, mtime_ns = got
        self.deltas.append(delta.entry(name, sha256, mtime_ns, base_sha256, made))
        self.delta_data.append(made.middle)
        self.size += len(made.middle)

    def empty(self):
        return not (self.files or self.meta or self.delete or self.delete_dirs or self.deltas)

    def names(self):
        """Every name this batch asks the peer about."""
        return [f["name"] for f in self.files + self.meta + self.deltas] + self.delete + \
            self.delete_dirs

    def header(self, packed=False):
        """The sync_files request; `packed`: the metadata updates in packed form (the peer
        announced it, metapack.py)."""
        header = {"files": self.files, "meta": self.meta, "delete": self.delete,
                  "delete_dirs": self.delete_dirs}
        form = metapack.encode(self.meta) if packed else None
        if form:
            del header["meta"]
            header.update(form)
        if self.deltas:  # only to a peer that announced "delta" (PeerVersions.store)
            header["deltas"] = self.deltas
        return header


class SyncManager(object):
    """One PeerSync per live session; change events and operator requests fan out to them.

    With cluster.failover=1 (`failover` set) the roles are the election's (set_roles): an
    acting leader sends as the master to every node, a follower as a client to the leader
    only, and nothing goes between followers.
    """

    failover = None
    pushed = None   # failover: localedits.LocalEdits.pushed, for the PeerSyncs of a master
    urgent_link = None  # the link's urgent() connection, for the PeerSyncs' small pushes
    urgent_writer = None

    def __init__(self, cfg, layout, link):
        self.cfg = cfg
        self.home = layout.home
        self.link = link
        self.log = logs.get("sync")
        self.lock = threading.Lock()
        self.peers = {}
        options = cfg.options
        # Our recent versions of big files, shared by every session (versions.py).
        self.store = versions.VersionStore(options.delta_min_bytes, options.delta_store_bytes) \
            if options.delta_min_bytes else None
        self.role = cfg.node_type
        self.leader = None
        self.sessions = {}   # failover: every live session by node name
        self.master_items = [item for item in cfg.items if item.source == "master"]
        self.state_writer = groupcommit.GroupCommit(link.call)
        self.urgent_link = link.urgent()
        self.urgent_writer = groupcommit.GroupCommit(self.urgent_link.call)
        # The checksums of the client.keys we read to push, for the internal daemon's record
        # (hashtell.py); the internal daemon takes them only for a hot file it sends.
        self.teller = None
        if self.store is not None:
            self.teller = hashtell.HashTeller(self.urgent_link.call, self.home, [
                item.path for item in cfg.items if item.kind == "file" and item.hot])
            self.store.told = self.teller.tell

    def worker_role(self, session):
        """The role this node sends to `session` in; None: no PeerSync (failover on)."""
        if self.failover is None or self.role == "master":
            return self.role
        return "client" if session.peer_name == self.leader else None

    def set_roles(self, role, leader):
        """Failover: this node now sends as `role`, and node `leader` leads (None: unknown).
        The sessions' roles follow (the leader's is master), and their PeerSyncs."""
        with self.lock:
            self.role, self.leader = role, leader
            sessions = list(self.sessions.values())
        for session in sessions:
            session.peer_role = "master" if session.peer_name == leader else "client"
            self.peer_seen(session)
            with self.lock:
                want = self.worker_role(session)
                worker = self.peers.get(session.peer_name)
                keep = worker is not None and worker.role == want and worker.session is session
                if worker is not None and not keep:
                    del self.peers[session.peer_name]
            if keep:
                continue
            if worker is not None:
                worker.stop()
            if want is not None and not session.closed:
                self.start_worker(session)

    def peer_seen(self, session):
        try:
            self.link.call("peer_seen", {"name": session.peer_name, "role": session.peer_role,
                                         "address": session.address[0] if session.address
                                         else None, "version": session.version})
        except RequestError as err:
            self.log.warning("Cannot record node %s: %s", session.peer_name, err)

    def session_started(self, session):
        if self.failover is not None:
            with self.lock:
                self.sessions[session.peer_name] = session
                session.peer_role = "master" if session.peer_name == self.leader else "client"
        self.peer_seen(session)
        if not self.start_worker(session):
            self.log.info("Session with node %s (%s) started: election only.",
                          session.peer_name, session.describe_address())

    def start_worker(self, session):
        """Start the PeerSync of `session` in the role this node sends in now; False when it
        has none (failover on: a follower sends only to the leader).

        The role is read and the worker registered in one hold of the lock set_roles changes
        the role under: a session starting while the role switches gets a worker of the new
        role, or one of the old role that set_roles then finds and replaces. Read outside it,
        a just-deposed leader could install a master worker after the switch had passed (or
        a new leader a client one), and nothing would replace it until the next switch."""
        options = self.cfg.options
        with self.lock:
            role = self.worker_role(session)
            if role is None:
                return False
            worker = PeerSync(session, self.home, role, self.link, self.cfg.items,
                              self.cfg.interval, options.push_delay, options.request_timeout,
                              phase=round_phase(self.cfg.node_name, session.peer_name,
                                                self.cfg.interval), store=self.store)
            worker.summaries = bool(options.round_summaries)
            worker.node_name = self.cfg.node_name
            worker.failover = self.failover
            worker.pushed = self.pushed
            worker.state_writer = self.state_writer
            worker.urgent_link = self.urgent_link
            worker.urgent_writer = self.urgent_writer
            old = self.peers.pop(session.peer_name, None)
            self.peers[session.peer_name] = worker
        if old is not None:
            old.stop()
        self.log.info("Session with %s node %s (%s) started.", session.peer_role,
                      session.peer_name, session.describe_address())
        worker.start()  # after a stop() meanwhile (set_roles), its thread ends at once
        return True

    def session_ended(self, session, reason):
        with self.lock:
            if self.sessions.get(session.peer_name) is session:
                del self.sessions[session.peer_name]
            worker = self.peers.get(session.peer_name)
            if worker is not None and worker.session is session:
                del self.peers[session.peer_name]
            else:
                worker = None
        if worker is not None:
            worker.stop()
        self.log.info("Session with %s node %s ended: %s.", session.peer_role,
                      session.peer_name, reason)

    def workers(self, names=None):
        with self.lock:
            return [w for n, w in sorted(self.peers.items()) if names is None or n in names]

    def on_event(self, event):
        self.queue_event(event)
        self.new_version(event)

    def new_version(self, event):
        """Failover, acting leader: its master-owned files changed, its state gets a new
        version; only now that every worker queued the names (see PeerSync.due)."""
        if self.failover is None or self.role != "master":
            return
        if event.get("overflow") or any(
                in_items(self.master_items, name)
                for key in ("changed", "touched", "deleted", "deleted_dirs")
                for name in event.get(key) or ()):
            self.failover.new_version()

    def queue_event(self, event):
        workers = self.workers()
        if workers and not event.get("overflow"):
            # Every worker owns the same items (this node's role): the names are filtered
            # once, not once per peer (100 000 names times 20 clients).
            owns = workers[0].owns
            event = dict((key, [n for n in event.get(key) or () if owns(n)])
                         for key in ("changed", "touched", "deleted", "deleted_dirs"))
        for worker in workers:
            if event.get("overflow"):
                # Too many names to list (catalog.py), or Wazuh 3.0's `clear` (legacy_db.py):
                # compare everything with every peer.
                worker.request_full()
            else:
                worker.notify(event, owned=True)

    def on_reconnect(self):
        # Events may have been lost while the internal daemon restarted: compare everything.
        for worker in self.workers():
            worker.request_full()
        self.new_version({"overflow": True})

    def push_now(self):
        """Send what is queued without waiting for push_delay; returns the peers told."""
        workers = self.workers()
        for worker in workers:
            with worker.cond:
                worker.next_push = 0.0
                worker.cond.notify()
        return [w.peer for w in workers]

    def force(self, names=None):
        """A full round now with these peers (all when None); returns the peers told."""
        workers = self.workers(names)
        for worker in workers:
            worker.request_full()
        return [w.peer for w in workers]

    def status(self):
        """Per peer: last full round (monotonic seconds ago) and whether it ended clean."""
        now = compat.monotonic()
        return dict((w.peer, {"last_sync_ago": None if w.last_round is None
                              else round(now - w.last_round, 3),
                              "last_sync_ok": w.last_round_ok})
                    for w in self.workers())

    def stop(self):
        if self.teller is not None:
            self.teller.stop()
        for worker in self.workers():
            worker.stop()
