"""Glue between the scanner and the cluster database, and the command service of the internal
daemon (CONTRACT: "Internal daemon UNIX socket API").

The select() loop of internal.py owns the transport; it calls
    catalog.tick(now)          every loop turn (cheap when nothing is due) -> event dict or None
    catalog.handle(cmd, args)  for every request                         -> result dict
and pushes the events returned by tick() to its subscribers.

Who gets a changed file ("pending" rows), kept simple on purpose:
- on a master, a changed or deleted file of a master-owned item is pending for every known
  peer whose role is "client" or unknown;
- on a client, a changed, touched or deleted file of a client-owned item (agent-info) is
  pending for every known peer whose role is "master".
Known peers are those recorded by the peer_seen command plus any node named in states rows
(set_states); this node's own name is never a target.

Commands (args -> result; errors: RequestError codes unknown_command, bad_request, db_error):
  status      {}                                  -> {files, last_scan, scan_seconds, ...}
  manifest    {source?, items?, names?, as_data?} -> {files: {name: {sha256, size, mtime_ns,
                                                      mode, item}}}; with as_data: true,
                                                      {count} and that files mapping as
                                                      JSON bytes after the reply (localsock)
  summary     {source, node?, groups?, form?}     -> {buckets: [[count, digest]] x 256,
                                                      groups?: [..]} (summary.py); also
                                                      manifest takes buckets: [n, ..]
  pending     {node}                              -> {files: [..], deleted: [..]}
  set_states  {rows: [[node, file, state]]}       -> {updated: n}
  states      {node?, files?}                     -> {rows: [[node, file, state]]}
  rescan      {}                                  -> {scheduled: true}
  hashed      {name, fingerprint, sha256,          -> {taken}: wazuh-clusterd's checksum of
               hashed_at}                             our client.keys it read (_cmd_hashed)
  peer_seen   {name, role, address?, version?}    -> {recorded: true}
  peers       {}                                  -> {peers: [{node, role, address, version,
                                                      last_seen}]}
  agents      {keepalives?}                       -> {count, rows_in_chunks: true, columns}
                                                      and the rows [id, name, ip, status,
                                                      node_name, last_keepalive] in JSON,
                                                      streamed in chunks (agentrows)
  agent_nodes {rows: [[agent-info name, node]]}   -> {updated: n}
  meta_get    {key}                               -> {value: JSON value or null}
  meta_set    {key, value}  (null deletes)        -> {stored: true}
  fingerprints {names}                            -> {count, ticket} and count records
                                                      after the reply (localsock.WithData),
                                                      each scanner.FINGERPRINT (zeros:
                                                      unknown); the ticket (none for a name
                                                      with a NUL) names these names for one
                                                      "received" (ASKED_KEPT kept)
  received    {rows: [[name, size, mtime_ns, ino, ctime_ns, st_mode, sha256]],
               agents?: [agent_nodes rows]}       -> {learned: n, hinted: n, updated?: n}
                                                      (keepalive.py: files given a new mtime
                                                      by wazuh-clusterd, and the agents the
                                                      batch reported); or {names | ticket,
                                                      of, at; records, node?}: see
                                                      _cmd_received
"""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import itertools
import json
import operator
import os
import random
import struct
import sys
import time

from wazuh_cluster import agentlist, agentrows, compat, errors, localsock, manifest, summary, text
from wazuh_cluster import db as db_mod
from wazuh_cluster import scanner as scanner_mod

TOMBSTONE_SECONDS = 30 * 86400
PURGE_EVERY = 3600.0
# Items this node only receives (agent-info on a master; shared files on a client) are
# written by our own sync (and on a master by its own remoted, for agents reporting to it);
# nothing this node holds of them is sent anywhere, so SPEC section 8's "an in-place edit
# anywhere else within one full pass (cluster.scan_interval)" -- a latency to the peers --
# does not apply; what does is section 4's "every interval a full integrity round compares
# checksums both ways and repairs any drift": a peer's round first makes our copy of its
# files current (_refresh_received; on a master, which wrote and checked them itself, a look
# at the agent-info folder: what was created, removed or renamed over), every interval. So
# the periodic pass over them is the backstop for in-place edits on a master and for files
# no peer asks about (the agents reporting to it), and runs on this slow cadence: 100 000
# agent-info lstats every 10 s would cost a master ~3 % of a core on their own (section 8
# asks for 1 % in all). Worst-case detection delays with the defaults (poll 1 s,
# scan_interval 10 s, <interval> 2 min, this 10 min; a file rewritten in the clock tick of
# its last hash is hashed again RACY_NS = 2 s later):
#   client.keys (hot, both roles)                         1/HOT_CHECKS_PER_POLL poll, and
#                                                           HOT_LOOK_SECONDS between requests
#   own items, created / deleted / renamed                1 poll
#   own items edited in place (shared on a master,        scan_interval (their full pass)
#     agent-info on a client)
#   received items, created / deleted / renamed           scan_interval (their folders are
#                                                           polled at that cadence), or the
#                                                           peer's next round if sooner
#   received items edited in place on a client (by hand)  the peer's next round (they are
#                                                           stat-ed first: <interval>)
#   received items edited in place on a master (by hand,  FOREIGN_SCAN_INTERVAL (option
#     or by its own remoted)                                cluster.received_scan_interval;
#                                                           the client's round after it
#                                                           repairs a hand edit)
# A "rescan" request passes everything at the next tick.
FOREIGN_SCAN_INTERVAL = 600.0
# client.keys (hot) is also looked at this many times per poll, an lstat each time: an agent
# added on the master reaches the clients a quarter of a poll after, not up to a whole one
# (SPEC section 8's append latency: p50 1 s, p99 2 s, of which a 1 s poll took 0.5 / 1 s).
# A change look_hot announced is hashed and recorded by the next poll (Catalog._check_hot).
HOT_CHECKS_PER_POLL = 4
# While the loop is awake anyway (a request, a tick), client.keys is looked at once this long
# after the last look (an lstat), and a change is announced before it is hashed (look_hot).
HOT_LOOK_SECONDS = 0.02
# Seconds of hashing received files per tick (Scanner.defer_hashing): the internal daemon's
# loop serves requests and looks at client.keys again between slices.
HASH_SLICE = 0.1
# Names a "fingerprints" request may ask about: each costs 68 bytes of answer, known or not
# (keepalive.py asks at most REQUEST_BYTES / ROW_COST = 4 915 at a time).
MAX_FINGERPRINT_NAMES = 16384
# "fingerprints" requests kept for a "received" to refer to (each until it does): one a
# batch in flight, ten clients' sessions at once; an older one is dropped, and a
# "received" referring to it is refused (its sender then sends the names).
ASKED_KEPT = 20
ASKED_BYTES = 6 << 20  # and the bytes their names take at most (_asked_kept; ~110 a name)
# What a kept name costs beyond its own size (_asked_kept): the allocator's rounding and
# the list's pointer.
_NAME_OVERHEAD = 16
TICKET_LIMIT = 1 << 53  # a ticket is a JSON number any reader takes exactly
# A master's summary of a client's agent-info follows that client's keepalives (the moves of
# their mtimes) for up to this many per file it sums between two rounds, then is made anew
# at the next: following one costs about what summing a file does (0.6-1.1 against ~0.5 us
# on 3.11), and at the real rate (each file every 10 s, a round every 2 min) following them
# all would cost twelve times a round's summary (_node_summary).
NODE_SUM_KEEPALIVES = 1
_SHA_LEN = frozenset([64])
_INTS = frozenset(compat.integer_types)  # exact types: True is no size nor time
_TEXTS = frozenset(compat.string_types)
_LIST = frozenset([list])
_AGENT_WIDTHS = frozenset([2, 3])
_WITH_KEEPALIVE = frozenset([3])
_SPLIT_LAST = operator.methodcaller("rpartition", "/")  # a name's (folder, "/", base)
_FOLDER = operator.itemgetter(0)
_SLASHES = operator.methodcaller("count", "/")
# A FINGERPRINT record's mtime_ns and nothing else, as a struct format (Catalog._reported).
_MTIME_OF_RECORD = "%dxq%dx" % (scanner_mod.FINGERPRINT_MTIME_AT, scanner_mod.FINGERPRINT.size
                                - scanner_mod.FINGERPRINT_MTIME_AT - 8)


def _bad(message):
    return errors.RequestError(message, "bad_request")


def _opt_text(args, key):
    value = args.get(key)
    if value is not None and not isinstance(value, compat.string_types):
        raise _bad("%r must be a string or null" % key)
    return value


def _opt_text_list(args, key):
    value = args.get(key)
    if value is None:
        return None
    # the types of the whole list at once: a keepalive batch's 2 000 names, five times a
    # second ("fingerprints")
    if not isinstance(value, list) or not set(map(type, value)) <= _TEXTS:
        raise _bad("%r must be a list of strings or null" % key)
    return value


def _asked_kept(names):
    """(the names, as a list; how many; the bytes that takes at most; the folder they are
    all directly in, or None: _one_folder) as kept for a ticket, or None when they cannot
    be (a name with a NUL: its sender sends the names).

    The very objects the "fingerprints" answer looked up, their hashes computed (native
    text on 3.x, and on 2.7 a batch's, from a long JSON document: compat.json_loads): its
    "received" looks them up again (learn_records, twice a taken one) and the item check
    hashes them. Kept as UTF-8 text in one bytes object, they were decoded, split and
    hashed again for it (in process, 100 000 records, 2 000-name batches: "received"
    1.85-2.16 -> 1.49-1.63 us a keepalive). A name costs its str and a pointer."""
    joined = u"\0".join(names)  # (2.7: a JSON str is ASCII)
    if joined.count(u"\0") != len(names) - 1:
        return None
    size = sum(map(sys.getsizeof, names)) + _NAME_OVERHEAD * len(names) + 200
    return list(names), len(names), size, _one_folder(joined, names)


def _one_folder(joined, names):
    """The folder every one of `names` is directly in (a keepalive batch's: the agent-info
    folder), or None; `joined`: the names with a NUL between them (none holds one). Seen
    once, when a ticket is kept, by three C calls over that text: its "received" took the
    same look three times, a Python call a name each (the item check, the folders the
    scanner unseals, which of them are agent rows), ~0.4 us a keepalive."""
    folder = names[0].rpartition(u"/")[0]
    prefix = folder + u"/"
    # each name after a NUL starts with the prefix, and no name has a "/" beyond it
    if folder and joined.startswith(prefix) and \
            joined.count(u"\0" + prefix) == len(names) - 1 and \
            joined.count(u"/") == len(names) * prefix.count(u"/"):
        return folder
    return None


def source_is_foreign(source, role):
    """True when a request is about the items of a peer (their copies here)."""
    return source in ("master", "client") and source != role


def _noting_groups(rows, groups, items):
    """Pass `rows` through, adding to the set `groups` (when not None) the group folders
    (first level below a delete_dirs item) that hold them: a master deletes a client's
    extra group folders, and compares only some buckets' entries (sync.extra_dirs)."""
    roots = [item.path + "/" for item in items if item.delete_dirs]
    for row in rows:
        if groups is not None:
            for root in roots:
                rest = row[0][len(root):] if row[0].startswith(root) else ""
                if "/" in rest:
                    groups.add(root + rest.split("/", 1)[0])
        yield row


def _digests(hex_digits):
    """The 32-byte digests of the concatenated lower-case SHA-256 hex digits, or None: one
    unhexlify for a batch's 2 000 (a regex over them cost a third of the row checks)."""
    if hex_digits.lower() != hex_digits:
        return None
    try:
        data = binascii.unhexlify(hex_digits)
    except (TypeError, ValueError, binascii.Error):  # UnicodeError is a ValueError
        return None
    return [data[at:at + 32] for at in range(0, len(data), 32)]


def _rows(args, key, width):
    value = args.get(key)
    if not isinstance(value, list):
        raise _bad("%r must be a list of rows" % key)
    for row in value:
        if not isinstance(row, list) or len(row) != width:
            raise _bad("every row of %r must be a list of %d values" % (key, width))
    return value


class Catalog(object):
    """Scanner + ClusterDB + the socket commands.

    home, items (config.Item tuples), exclude (fnmatch patterns), db (db.ClusterDB),
    log (logging.Logger); role "master" or "client"; node_name = this node (never a target);
    poll_interval / scan_interval = cluster.poll_interval / cluster.scan_interval seconds;
    foreign_scan_interval = full-pass cadence of the items this node only receives
    (default max(scan_interval, FOREIGN_SCAN_INTERVAL)); max_event_names = beyond this many
    names an event is sent as {"overflow": true} with empty lists (None: never);
    clock = monotonic seconds (cadence); wall = epoch seconds (display and agent status only).
    """

    def __init__(self, home, items, exclude, db, log, role="master", node_name=None,
                 poll_interval=1.0, scan_interval=10.0, foreign_scan_interval=None,
                 max_event_names=None, clock=compat.monotonic, wall=time.time):
        self.home = home
        self.items = tuple(items)
        self.db = db
        self.log = log
        self.role = role
        self.node_name = node_name
        self.poll_interval = float(poll_interval)
        self.scan_interval = float(scan_interval)
        if foreign_scan_interval is None:
            foreign_scan_interval = max(self.scan_interval, FOREIGN_SCAN_INTERVAL)
        self.foreign_scan_interval = float(foreign_scan_interval)
        self.max_event_names = max_event_names
        self._own_items(role)
        self._item_paths = frozenset(item.path for item in self.items)  # _any_sent_by_us
        # "fingerprints" requests a "received" may refer to, by ticket (_cmd_received); the
        # first ticket drawn at random, so none of an earlier run of this daemon is taken
        self._asked = collections.OrderedDict()
        self._asked_bytes = 0
        self._next_ticket = random.SystemRandom().randrange(1, TICKET_LIMIT >> 1)
        self._wall = wall
        self.scanner = scanner_mod.Scanner(home, self.items, exclude, clock=clock, wall=wall,
                                           report=self._skipped, summary_entry=summary.entry)
        self.scanner.load(db.iter_files())
        self.scanner.defer_hashing(self._foreign)
        self.scanner.between = self._between
        # callable(event): sends an event at once (InternalLoop.broadcast), for a look_hot
        # in the middle of a pass; None: looked at between ticks only
        self.announce = None
        self._rescan = True        # the first tick is a full pass (reconciles db and disk)
        self._last_full = None     # last pass over the items this node sends
        self._last_foreign = None  # last pass over the items it receives
        self._last_foreign_poll = None
        self._last_poll = None
        self._last_hot = None      # last look at the hot files (a poll or check_hot)
        self._last_look = None     # last look_hot
        self._announced = {}       # hot name -> the fingerprint look_hot announced it with
        self._last_purge = None
        self._keys_stale = False   # client.keys changed since agent_keys was refreshed
        self._last_keys = None     # when it was
        self._last_scan_wall = None
        self._db_errors = 0
        self._carry = []           # ChangeSets found between ticks (on-demand passes)
        self._mtimes_unpack = None  # _reported's Struct of the last batch size
        self._summaries = {}       # summary request -> its answer, until the next change
        # client node -> [agents generation, summary.Summary (form 2, unreduced sums),
        # keepalives it may still follow until the next round, its answer or None]
        # (_node_summary)
        self._node_sums = {}
        self._clock = clock
        self._commands = {
            "status": self._cmd_status,
            "manifest": self._cmd_manifest,
            "summary": self._cmd_summary,
            "pending": self._cmd_pending,
            "set_states": self._cmd_set_states,
            "states": self._cmd_states,
            "rescan": self._cmd_rescan,
            "peer_seen": self._cmd_peer_seen,
            "peers": self._cmd_peers,
            "agents": self._cmd_agents,
            "agent_nodes": self._cmd_agent_nodes,
            "meta_get": self._cmd_meta_get,
            "meta_set": self._cmd_meta_set,
            "fingerprints": self._cmd_fingerprints,
            "received": self._cmd_received,
            "set_role": self._cmd_set_role,
            "hashed": self._cmd_hashed,
        }

    def commands(self):
        """Names of the commands handle() knows (sorted)."""
        return sorted(self._commands)

    def _skipped(self, name, reason):
        self.log.warning("%s: %s", name, reason)

    # -- the timer ----------------------------------------------------------------------------

    def timeout(self, now):
        """Seconds until tick() has work to do (for the select() timeout); 0 when due."""
        if self._rescan or self._last_full is None or self.scanner.backlog():
            return 0.0
        due = min(self._last_full + self.scan_interval, self._last_poll + self.poll_interval,
                  self._last_foreign + self.foreign_scan_interval,
                  self._last_hot + self.poll_interval / HOT_CHECKS_PER_POLL)
        agents = self.db.agents_due_in(now)
        return max(0.0, due - now) if agents is None else min(max(0.0, due - now), agents)

    def look_hot(self, now):
        """An event naming the hot files (client.keys) whose lstat changed since they were
        hashed, at most once per change and HOT_LOOK_SECONDS; None when none did or it is too
        soon. The internal daemon's loop asks between requests and before every tick, and
        sends it at once: the next poll hashes (9.4 MB) and stores the change (_check_hot),
        and its event leaves the file out when it hashed the very fingerprint announced
        (_unannounced). Under churn at 20 clients, an append waited up to 1.9 s for the
        tick that noticed it, behind requests, passes and that hash (issue 11)."""
        if self._last_look is not None and now - self._last_look < HOT_LOOK_SECONDS:
            return None
        self._last_look = now
        fresh = []
        for name, fingerprint in self.scanner.hot_moved(self._own):
            if self._announced.get(name) != fingerprint:
                self._announced[name] = fingerprint
                fresh.append(name)
        if not fresh:
            return None
        # Pending now, before wazuh-clusterd hears of it: the rows of its push may come in
        # before the tick that hashes the file, whose own pending rows (_store) would then
        # stand over "synchronized" until the next round.
        self._safely(self._mark_pending, fresh)
        return {"event": "changes", "changed": fresh, "touched": [], "deleted": [],
                "deleted_dirs": []}

    def _mark_pending(self, names):
        targets = self._targets()
        if targets:
            self.db.mark_pending(targets, names)

    def _unannounced(self, changed):
        """`changed` without the hot files look_hot announced with the fingerprint now
        recorded: wazuh-clusterd read and sent that version already (a second push to every
        peer per append, each with its states rows, for nothing). One written again since
        with another fingerprint stays. A rewrite keeping the fingerprint (same size, in the
        same clock tick) is the racy case that wazuh-clusterd's store of versions, keyed by
        the same fingerprint, does not tell apart either: the next round repairs it."""
        keep = []
        for name in changed:
            fingerprint = self._announced.pop(name, None)
            if fingerprint is None or not self.scanner.hashed_as(name, fingerprint):
                keep.append(name)
        return keep

    def _between(self):
        """Between two folders of a pass: a changed client.keys is announced at once."""
        if self.announce is not None:
            event = self.look_hot(self._clock())
            if event:
                self.announce(event)

    def tick(self, now):
        """Run the pass that is due at monotonic time `now`, store it, return its event.

        A full pass over the items this node sends every scan_interval, over the items it
        receives every foreign_scan_interval (and over everything on rescan), otherwise a
        poll every poll_interval (of the received items' folders only every
        scan_interval), or a slice of the received files a pass left unhashed (see
        HASH_SLICE); nothing when none is due. Returns None when nothing changed, else
        {"event": "changes", "changed": [..], "touched": [..], "deleted": [..],
         "deleted_dirs": [..]} for the subscribers. When max_event_names is set and more
        files changed at once, the lists are empty and "overflow": true asks subscribers for
        a full integrity round (manifest) instead.
        """
        if self.db.agents_due_in(now) == 0:
            self._safely(self.db.flush_agents, now)   # db.record_agents
        first = self._rescan or self._last_full is None
        own_due = first or now - self._last_full >= self.scan_interval
        foreign_due = first or now - self._last_foreign >= self.foreign_scan_interval
        if own_due or foreign_due:
            if own_due and foreign_due:
                changes = self.scanner.full_pass(budget=HASH_SLICE)
            else:
                changes = self.scanner.full_pass(self._own if own_due else self._foreign,
                                                 budget=HASH_SLICE)
            self._rescan = False
            if own_due:
                self._last_full = now
            if foreign_due:
                self._last_foreign = self._last_foreign_poll = now
            self._last_poll = now
            self._last_scan_wall = self._wall()
        elif now - self._last_poll >= self.poll_interval:
            if now - self._last_foreign_poll >= self.scan_interval:
                # The folders of received items too, but only every scan_interval: a master
                # re-listing 50 000 agent-info entries at every poll while files arrive
                # would spend a third of a core on 2.7.
                changes = self.scanner.poll(budget=HASH_SLICE)
                self._last_foreign_poll = now
            else:
                changes = self.scanner.poll(self._own)
            self._last_poll = now
        elif self.scanner.backlog():
            # received files a pass left unhashed (HASH_SLICE), a slice a tick; client.keys
            # looked at before each
            changes = scanner_mod.merge([self._check_hot(), self.scanner.drain(HASH_SLICE)])
        elif now - self._last_hot >= self.poll_interval / HOT_CHECKS_PER_POLL:
            changes = self._check_hot()
        else:
            return None
        self._last_hot = now
        if self._last_purge is None or now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            self._safely(self.db.purge_deleted, self._wall() - TOMBSTONE_SECONDS)
        if not changes.is_empty():
            self._safely(self._store, changes)
        self._refresh_keys(now, changes)
        if self._carry:
            # Changes found by an on-demand pass (see _refresh_received) since the last tick.
            changes = scanner_mod.merge(self._carry + [changes])
            self._carry = []
        if changes.is_empty():
            return None
        event = changes.to_event()
        if self._announced:
            event["changed"] = self._unannounced(event["changed"])
            if not any(event[key] for key in ("changed", "touched", "deleted", "deleted_dirs")):
                return None
        size = len(changes.changed) + len(changes.touched) + len(changes.deleted)
        if self.max_event_names is not None and size > self.max_event_names:
            # A first start or a mass change: lists this long would make a frame of megabytes;
            # subscribers are told to fetch the manifest (a full integrity round) instead.
            event = {"event": "changes", "overflow": True, "changed": [], "touched": [],
                     "deleted": [], "deleted_dirs": event["deleted_dirs"]}
        return event

    def _check_hot(self):
        """Between polls: the hot files this node sends whose lstat changed, hashed, except a
        change look_hot announced (the fingerprint it announced), which the next poll hashes.

        Only what this node sends: a received client.keys is the peer's to push, and only the
        peer's round repairs its loss here (sooner is safe, see README's integrity rounds, but
        useless). An announced change has gone to the peers already (wazuh-clusterd reads and
        hashes what it sends); hashing it here at once as well, and again at the poll while it
        is racy, was two SHA-256 of a 9.4 MB client.keys per append (an append a second: ~1.4 %
        of a core). Its record, which nothing sends before it is made, follows within a poll;
        the poll hashes it once, whether it is new or racy, however many appends came."""
        return self.scanner.check_hot(self._own, announced=self._announced)

    def _safely(self, func, arg):
        try:
            func(arg)
        except db_mod.Error as exc:
            # The database is a cache: a full disk must not stop change detection. The next
            # full pass after a restart (or a rescan) rebuilds what was not stored.
            self._db_errors += 1
            if self._db_errors == 1 or self._db_errors % 100 == 0:
                self.log.error("cluster database write failed (%d times so far): %s",
                               self._db_errors, exc)

    def _refresh_received(self, names=None, at_once=False):
        """A peer asks for our copy of what it owns (its integrity round): make it current
        (only these `names` when given: a client asking about its own agent-info).

        The items this node only receives are otherwise fully passed every
        foreign_scan_interval; a hand edit there must be visible to the round that repairs
        it. The first look of a round (`at_once`: a summary, a whole manifest) always
        passes: a round's basis must hold every change made before it began (a client.keys
        removed by hand a moment after the last round's pass was counted as still there,
        and the master confirmed it "synchronized" without sending it: test_legacy). Its
        later steps (bucket manifests) pass at most once per scan_interval; the round
        checks the peer's summary again before it confirms anything (sync.PeerSync.settle).
        The changes found go out with the next tick.

        On a master, what it receives is agent-info its clients sent, written here by
        wazuh-clusterd after checking it: the rounds look at their folder, not at every file
        (10 000 lstats per client round were most of an idle master). A file created, removed
        or renamed over changes the folder and is seen; a file edited in place by anyone else
        is seen by the full pass over them (foreign_scan_interval) and then repaired by its
        client's next round.
        """
        now = self._clock()
        if names is None and self.role == "master":
            changes = self.scanner.poll(self._foreign, racy_folders=True)
            self._last_foreign_poll = now
        elif names is not None:
            changes = self.scanner.check_files(names)
        elif not at_once and self._last_foreign is not None and \
                now - self._last_foreign < self.scan_interval:
            return
        else:
            changes = self.scanner.full_pass(self._foreign)
            self._last_foreign = self._last_foreign_poll = now
        if not changes.is_empty():
            self._safely(self._store, changes)
            self._carry.append(changes)

    def _store(self, changes):
        """One transaction: file rows, tombstones and pending rows of one pass."""
        self._forget_summaries(changes)
        scanner = self.scanner
        rows = (scanner.row(name) for name in changes.changed + changes.touched
                if name in scanner)
        announced = self._announced
        outgoing = [n for n in changes.changed + changes.touched + changes.deleted
                    if self._sent_by_us(n) and not (
                        n in announced and scanner.hashed_as(n, announced[n]))]
        targets = self._targets() if outgoing else []
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        reread = [n[len(info):] for n in changes.changed if n.startswith(info)]
        gone = [n[len(info):] for n in changes.deleted if n.startswith(info)]
        keys = self._item_path("client.keys", "etc/client.keys")
        with self.db.transaction():
            if changes.changed or changes.touched:
                self.db.save_files(rows)
            if changes.deleted:
                self.db.mark_deleted(changes.deleted)
            if targets:
                self.db.mark_pending(targets, outgoing)
            if reread or gone:
                agentlist.note_changed(self.db, self._agent_info_folder(), reread, gone)
        if keys in changes.changed:
            self._keys_stale = True   # parsed by a later tick (_refresh_keys)

    def _refresh_keys(self, now, changes):
        """agent_keys (cluster_control -a) follows client.keys at most every scan_interval,
        in a tick that did not find client.keys changed: with an append a second every node
        hashed the whole file again and parsed it in the tick that announced it, on the way of
        every append to the clients (0.2-0.4 s of the master's 0.6 s tick at 100 000 agents
        under load). A listing refreshes them itself first (agentlist.listing)."""
        keys = self._item_path("client.keys", "etc/client.keys")
        if not self._keys_stale or keys in changes.changed or (
                self._last_keys is not None and now - self._last_keys < self.scan_interval):
            return
        self._keys_stale = False
        self._last_keys = now
        self._safely(lambda path: agentlist.refresh_keys(self.db, path),
                     os.path.join(self.home, keys))

    def _forget_summaries(self, changes):
        """Drop the cached summaries these changes make stale: those covering the items they
        are in. A summary covers the items of one source (or all): a client's ("node")
        agent-info only, so a client.keys append (once a second on a busy master) or a
        shared file leaves the ten clients' summaries as they are, and an agent-info file
        found changed leaves the master's 10 000 shared files' summary as it is."""
        sources = set()
        for name in changes.changed + changes.touched + changes.deleted:
            item = self.scanner.item_of(name)
            if item is not None:
                sources.add(item.source)
                if len(sources) == 2:
                    break
        self._forget_summaries_of(sources)

    def _forget_summaries_of(self, sources, node_sums=True):
        """Drop the cached summaries covering the items of these sources ("master",
        "client"), and those of all items; `node_sums`: a master's of its clients' agent-info
        too (_node_summary)."""
        if sources:
            self._summaries = dict((key, value) for key, value in self._summaries.items()
                                   if json.loads(key).get("source") not in
                                   tuple(sources) + (None,))
            if node_sums and "client" in sources:
                self._node_sums = {}

    def _sent_by_us(self, name):
        item = self.scanner.item_of(name)
        return item is not None and item.source == self.role

    def _targets(self):
        """Peers that should receive what this node owns (see the module docstring)."""
        wanted = ("client", None) if self.role == "master" else ("master",)
        return sorted(node for node, role in self.db.known_nodes().items()
                      if role in wanted and node != self.node_name)

    # -- commands -----------------------------------------------------------------------------

    def handle(self, cmd, args):
        """Run one socket command; returns its result dict or raises errors.RequestError."""
        func = self._commands.get(cmd)
        if func is None:
            raise errors.RequestError("unknown command %r" % (cmd,), "unknown_command")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _bad("args must be an object")
        try:
            return func(args)
        except db_mod.Error as exc:
            self.log.error("cluster database error in %s: %s", cmd, exc)
            raise errors.RequestError("cluster database error: %s" % exc, "db_error")

    def _cmd_set_role(self, args):
        """{role}: with cluster.failover=1 the elected leader owns the master's items
        (failover_roles.py); what this node sends and to whom follows from the role."""
        role = args.get("role")
        if role not in ("master", "client"):
            raise _bad("role must be \"master\" or \"client\"")
        if role != self.role:
            self.log.info("Role changed from %s to %s (failover).", self.role, role)
            self.role = role
            self._summaries = {}
            self._node_sums = {}
            # The items now sent were passed only every foreign_scan_interval: a full pass
            # at the next tick (a new leader's client.keys edit waited up to scan_interval, an
            # old master turned client did not see its own agents' rewrites), and they are
            # polled like the master's from then on.
            self._own_items(role)
            self.scanner.defer_hashing(self._foreign)
            self._rescan = True
        return {"role": role}

    def _own_items(self, role):
        """The items this node sends in `role` (polled) and those it receives."""
        self._own = frozenset(i.name for i in self.items if i.source == role)
        self._foreign = frozenset(i.name for i in self.items if i.source != role)

    def _cmd_status(self, args):
        return {"files": len(self.scanner), "last_scan": self._last_scan_wall,
                "scan_seconds": round(self.scanner.full_pass_seconds, 6),
                "poll_seconds": round(self.scanner.poll_seconds, 6),
                "db": self.db.path, "db_in_memory": self.db.in_memory, "role": self.role,
                "rescan_scheduled": self._rescan, "states": self.db.state_counts(),
                "peers": len(self.db.peers()), "hashed": self.scanner.hashed,
                "hot_hinted": self.scanner.hot_hinted, "racy": self.scanner.racy_count()}

    def _manifest_rows(self, args, refresh=True):
        """Scanner rows a manifest or summary request selects ({source?, items?, names?,
        buckets?})."""
        source = _opt_text(args, "source")
        if source not in (None, "master", "client"):
            raise _bad("source must be \"master\", \"client\" or null")
        names = _opt_text_list(args, "items")
        wanted = set(item.name for item in self.items
                     if (source is None or item.source == source)
                     and (names is None or item.name in names))
        only = _opt_text_list(args, "names")
        try:
            buckets = summary.parse_buckets(args.get("buckets"))
        except errors.ProtocolError as exc:
            raise _bad(exc.message)
        if refresh and source_is_foreign(source, self.role):
            # A peer's round compares with our copy of its files: it must be current (a
            # stale mtime would have the peer send its keepalives again), names or not.
            if only is not None:
                self._refresh_received(only)
            else:
                self._refresh_received(at_once=buckets is None)  # a whole manifest: a round
        if only is not None:
            # A push asks about the few files it sends, not the whole catalogue.
            rows = (self.scanner.row(name) for name in only)
            rows = [row for row in rows if row is not None and row[1] in wanted]
        else:
            rows = (row for row in self.scanner.rows(wanted) if row[1] in wanted)
        if buckets is not None:
            rows = (row for row in rows if summary.bucket_of(row[0]) in buckets)
        if source == "client" and self.role == "client":
            rows = self._own_agents_only(rows, only)
        return rows

    def _own_agents_only(self, rows, names=None):
        """Leave out the agent-info files this client holds only because it was the master
        once (a returning old master, cluster.failover=1; or a master made a client): those
        its agents table records as reported by another node, not written here since (the
        mtime it recorded is the file's). Sent as ours they would make the acting master
        record this node as their reporter until their own nodes report again, and keep
        them there when their node is gone; their own nodes send them (newest keepalive
        wins, SPEC section 4). Refusing them on the master instead cannot work: a relayed
        copy newer than the master's is indistinguishable from a report. A file an agent
        of this node rewrote since (it moved here) is newer, and is ours."""
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        if names is not None:   # a push asks about a few: not the whole table each time
            names = [n[len(info):] for n in names if n.startswith(info)]
        others = self.db.agents_of_others(self.node_name or "", names)
        if not others:
            return rows

        def relayed(row):
            if not row[0].startswith(info) or row[0][len(info):] not in others:
                return False
            keepalive = others[row[0][len(info):]]
            return keepalive is None or row[3] <= keepalive
        return (row for row in rows if not relayed(row))

    def _cmd_summary(self, args):
        """{source, node?, groups?, form?} -> {buckets: summary.Summary.to_wire(), groups?};
        see summary.py (form 1 when absent).

        With "node" (a master asked by that client), only the agent-info files the agents
        table says it reports. Cached until the next stored change or agents update: an
        idle master answers its clients' rounds without a pass over 100 000 rows each (a
        master's of a client in form 2 follows that client's keepalives: _node_summary).
        """
        node = _opt_text(args, "node")
        try:
            form = summary.parse_form(args.get("form"))
        except errors.ProtocolError as exc:
            raise _bad(exc.message)
        key = json.dumps(args, sort_keys=True)
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        if node is not None or source_is_foreign(args.get("source"), self.role):
            self._refresh_received(at_once=True)  # stored changes empty the cache
        cached = self._summaries.get(key)
        if cached is not None:
            return cached
        if node is not None and self.role == "master" and args.get("source") == "client" \
                and set(args) - set(["form"]) == set(("source", "node")):
            return self._node_summary(node, form, key, info)
        if node is not None:
            rows = self._manifest_rows(dict(args, names=self.db.agent_names(node, info)),
                                       refresh=False)
        else:
            rows = self._manifest_rows(dict(args, names=None), refresh=False)
        flags = dict((item.name, item.mtime_is_data) for item in self.items)
        groups = set() if args.get("groups") is True else None
        # Summed from the records' kept values (Scanner.summary_sums), not from a SHA-256
        # per row (summary.of_rows): a master's summary of its 10 000 shared files, made
        # again at its first round after any change of theirs or of client.keys, and each
        # client's of its copy, were ~2 us a file more.
        names = {}
        for row in _noting_groups(rows, groups, self.items):
            names.setdefault(row[1], []).append(row[0])
        totals = summary.Summary(form)
        for item_name, item_names in names.items():
            self.scanner.summary_sums(item_names, flags.get(item_name), form == 2,
                                      totals.counts, totals.sums)
        result = {"buckets": totals.to_wire()}
        if groups is not None:
            result["groups"] = sorted(groups)
        self._summaries[key] = result
        return result

    def _node_summary(self, node, form, key, info):
        """A master's summary of the agent-info files client `node` reports (their rows in
        the agents table), from those files only: a pass over every client's 100 000 rows
        per client round was most of an idle master's internal daemon (0.33 s of CPU each);
        and no row each.

        In form 2 it is kept while the agents table keeps every agent's node (the database's
        agents_generation) and follows that client's keepalives (_follow_keepalives): made
        anew at every round after a keepalive, it was 15-25 ms of a 2.7 master's CPU per
        client round (10 000 lookups and products), a round every 12 s at 10 clients. Any
        other change of those files (found by a pass, taken without a node, the files of
        the keepalives of another node) drops it, as it drops every cached summary."""
        generation = self.db.agents_generation()
        kept = self._node_sums.get(node) if form == 2 else None
        if kept is not None and kept[0] == generation:
            kept[2] = NODE_SUM_KEEPALIVES * sum(kept[1].counts)
            if kept[3] is None:
                kept[3] = {"buckets": kept[1].to_wire()}
            return kept[3]
        item = self.scanner.item_of(info[:-1])
        mtime_is_data = bool(item and item.mtime_is_data)
        totals = summary.Summary()
        self.scanner.summary_sums(self.db.agent_names(node, info), mtime_is_data, form == 2,
                                  totals.counts, totals.sums)
        result = {"buckets": totals.to_wire()}
        if form == 2 and mtime_is_data:
            self._node_sums[node] = [generation, totals,
                                     NODE_SUM_KEEPALIVES * sum(totals.counts), result]
        else:
            self._summaries[key] = result
        return result

    def _follow_keepalives(self, node, replaced, data, taken):
        """Client `node`'s kept summary (_node_summary) moved by the keepalives of its files
        learn_records took (each the record it `replaced`, `data`, its answer `taken`), or
        dropped when it has followed NODE_SUM_KEEPALIVES a file or a record keeps no base.
        A file another node reports (its agent moved) is counted here too, and its rows then
        change the agents table's node: the generation moves and the summary is made anew."""
        kept = self._node_sums[node]
        kept[2] -= len(replaced)
        if kept[2] < 0 or not self.scanner.mtime_moves(replaced, data, taken, kept[1].sums):
            del self._node_sums[node]
        elif replaced:
            kept[3] = None

    def _cmd_manifest(self, args):
        rows = self._manifest_rows(args)
        if args.get("as_data") is True:
            # The files mapping as JSON bytes after the reply: wazuh-clusterd relays it to
            # the asking peer as it is (no dict per file on its side; see localsock).
            count = [0]
            data = manifest.to_json(rows, count)
            return localsock.WithData({"count": count[0]}, data)
        files = {}
        for name, item, size, mtime_ns, _ino, _ctime, mode, sha in rows:
            files[name] = {"sha256": sha, "size": size, "mtime_ns": mtime_ns, "mode": mode,
                           "item": item}
        return {"files": files}

    def _cmd_pending(self, args):
        node = _opt_text(args, "node")
        if not node:
            raise _bad("\"node\" is required")
        files = self.db.pending(node)
        return {"files": files, "deleted": sorted(self.db.deleted_files(files))}

    def _cmd_set_states(self, args):
        rows = _rows(args, "rows", 3)
        for row in rows:
            if not all(isinstance(v, compat.string_types) for v in row):
                raise _bad("rows are [node, file, state] strings")
        try:
            return {"updated": self.db.set_states(rows)}
        except ValueError as exc:
            raise _bad(str(exc))

    def _cmd_states(self, args):
        return {"rows": self.db.states(_opt_text(args, "node"), _opt_text_list(args, "files"))}

    def _cmd_rescan(self, args):
        self._rescan = True
        return {"scheduled": True}

    def _cmd_peer_seen(self, args):
        name = _opt_text(args, "name")
        role = _opt_text(args, "role")
        if not name:
            raise _bad("\"name\" is required")
        if role not in ("master", "client"):
            raise _bad("\"role\" must be \"master\" or \"client\"")
        self.db.record_peer(name, role, _opt_text(args, "address"), _opt_text(args, "version"))
        return {"recorded": True}

    def _cmd_peers(self, args):
        return {"peers": self.db.peers()}

    def _cmd_agent_nodes(self, args):
        return {"updated": self._record_agents(self._agent_rows(args.get("rows")))}

    def _agent_rows(self, rows):
        """(agent, node, keepalive_ns or None) of [agent-info file name, node, mtime_ns?]
        rows, or RequestError bad_request (checked whole, a column at a time, before
        anything is stored)."""
        if not isinstance(rows, list) or not set(map(type, rows)) <= _LIST or \
                not set(map(len, rows)) <= _AGENT_WIDTHS:
            raise _bad("'rows' must be a list of [agent-info file name, node, mtime_ns?]")
        if not set(map(type, itertools.chain.from_iterable(row[:2] for row in rows))) <= \
                _TEXTS:
            raise _bad("rows are [agent-info file name, node] strings")
        if not set(type(row[2]) for row in rows if len(row) == 3) <= _INTS:
            raise _bad("a row's mtime_ns must be an integer")
        return rows

    def _record_agents(self, rows):
        if not rows:
            return 0
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        # A row's third value is the keepalive that node's batch applied: rows of two
        # batches may arrive in either order, the newest keepalive keeps its node
        # (db.record_agents). Without it, the file's as recorded here.
        clean = rows if set(map(len, rows)) == _WITH_KEEPALIVE else [
            row if len(row) == 3 else [row[0], row[1], self._recorded_mtime(info + row[0])]
            for row in rows]
        # Which agents a node reports: the summaries of agent-info change (a client's own
        # too: _own_agents_only), those of the master's items do not (the 10 000 shared
        # files were summarised again after every keepalive batch). A master's of each
        # client's agent-info is kept while the table's generation is (_node_summary).
        self._forget_summaries_of(set(item.source for item in self.items
                                      if item.name == "agent-info"), node_sums=False)
        return self.db.record_agents(clean, self._clock())

    def _recorded_mtime(self, name):
        record = self.scanner.get(name)
        return record["mtime_ns"] if record else None

    def _cmd_meta_get(self, args):
        key = _opt_text(args, "key")
        if not key:
            raise _bad("\"key\" is required")
        value = self.db.get_meta(key)
        return {"value": json.loads(value) if value is not None else None}

    def _cmd_meta_set(self, args):
        key = _opt_text(args, "key")
        if not key:
            raise _bad("\"key\" is required")
        value = args.get("value")
        self.db.set_meta(key, None if value is None else json.dumps(value, sort_keys=True))
        return {"stored": True}

    def _cmd_fingerprints(self, args):
        """{names} -> {count} and count scanner.FINGERPRINT records after the reply, in the
        order of the names (localsock.WithData; keepalive.records reads them).

        A racy record is no proof: the receiver would date a same-tick rewrite's content
        with the sender's mtime without reading it. Answered as unknown, such a file is read
        and hashed by the receiver (a few hundred bytes for an agent-info)."""
        names = _opt_text_list(args, "names") or []
        if len(names) > MAX_FINGERPRINT_NAMES:
            raise _bad("at most %d names a request" % MAX_FINGERPRINT_NAMES)
        result = {"count": len(names)}
        data = self.scanner.fingerprints(names)
        kept = _asked_kept(names) if names else None
        if kept is not None:
            result["ticket"] = self._keep_asked(kept)
        return localsock.WithData(result, data)

    def _keep_asked(self, kept):
        """The ticket by which a "received" refers to these names (_asked_kept; see
        _asked_names)."""
        ticket = self._next_ticket
        self._next_ticket = ticket + 1 if ticket + 1 < TICKET_LIMIT else 1
        self._asked[ticket] = kept
        self._asked_bytes += kept[2]
        while len(self._asked) > ASKED_KEPT or self._asked_bytes > ASKED_BYTES:
            self._asked_bytes -= self._asked.popitem(last=False)[1][2]
        return ticket

    def _asked_names(self, args):
        """The names a "received" refers to by "ticket": those of the "fingerprints" request
        that ticket answered (taken once), "of" of them, the ones at the indexes "at", in
        that order, and the folder they are all directly in (or None: _one_folder);
        RequestError bad_request for a ticket not (or no longer) kept, or anything else
        that does not match it. The records follow their order."""
        ticket, count, at = args.get("ticket"), args.get("of"), args.get("at")
        kept = self._asked.pop(ticket, None) if type(ticket) in _INTS else None
        if kept is None:
            raise _bad("unknown ticket: send the names")
        kept_names, kept_count, size, folder = kept
        self._asked_bytes -= size
        if type(count) not in _INTS or count != kept_count:
            raise _bad("the ticket was of %d names" % kept_count)
        if not isinstance(at, list) or not set(map(type, at)) <= _INTS or (at and (
                min(at) < 0 or max(at) >= count)) or len(set(at)) != len(at):
            raise _bad("'at' must be a list of distinct indexes of the ticket's names")
        # a keepalive batch set in place whole: the names asked, in their order
        if at == list(range(count)):
            return kept_names, folder
        return list(map(kept_names.__getitem__, at)), folder

    def _cmd_hashed(self, args):
        """wazuh-clusterd read and hashed our hot file `name` (client.keys) to push it:
        {name, fingerprint: [size, mtime_ns, ino, ctime_ns, mode] of its descriptor, the same
        before and after the read, sha256, hashed_at: wall ns the read began} -> {taken}.
        The next look records that checksum instead of hashing the file (9.4 MB, an append a
        second) only while its lstat is exactly that fingerprint, under the racy rule
        (Scanner.hint_hot); a name that is not a hot file this node sends is not taken."""
        name, fp, sha, at = (args.get(key) for key in ("name", "fingerprint", "sha256",
                                                        "hashed_at"))
        if not (type(name) in _TEXTS and type(fp) in _LIST and len(fp) == 5 and
                set(map(type, fp + [at])) <= _INTS and type(sha) in _TEXTS and
                len(sha) == 64 and _digests(sha) is not None):
            self.log.warning("malformed 'hashed' request (name %s) ignored",
                             text.printable(name))
            raise _bad("'hashed' is {name, fingerprint: [size, mtime_ns, ino, ctime_ns, "
                       "mode], sha256, hashed_at}")
        return {"taken": self.scanner.hint_hot(name, fp, sha, at, self._own)}

    def _cmd_received(self, args):
        """Files wazuh-clusterd just wrote or stamped, as it found them after its rename or
        utime. Same content with a new mtime (a keepalive) is taken now
        (Scanner.learn_records); new content (a client.keys delta or whole file) is taken
        at the next check while the fingerprint is unchanged (Scanner.hint), so that check
        still reports the change. Either way no pass reads the file again. Not written to
        the database (a cache: a restart hashes such files once), which 10 000 keepalives
        a second would keep busy.

        "names" and "records": a keepalive batch's files and, base64 in the same order,
        their scanner.FINGERPRINT records (68 bytes each: no JSON value per number); or
        instead of "names", "ticket", "of" and "at": the ticket of the "fingerprints"
        answer that asked about them, how many it asked, and their indexes there
        (_asked_names: the names travel and are parsed once);
        "node" (optional): the node that reported those of them that are agent-info
        files, each with its record's mtime as its keepalive (db.record_agents).
        "rows" (optional): [[name, size, mtime_ns, ino, ctime_ns, mode, sha256]] rows (a
        client.keys written). "agents" (optional): more agent_nodes rows.

        Everything is checked before anything is taken, a column at a time (2 000 files a
        request, five requests a second on a master of 100 000 agents)."""
        agents = self._agent_rows(args["agents"]) if "agents" in args else []
        names, data, folder = self._received_records(args)
        node = _opt_text(args, "node")
        rows = _rows(args, "rows", 7) if "rows" in args else []
        names_of_rows = [row[0] for row in rows]
        shas = [row[6] for row in rows]
        digests = None
        if set(map(type, names_of_rows)) <= _TEXTS and set(map(type, shas)) <= _TEXTS and \
                set(map(len, shas)) <= _SHA_LEN and set(map(type, itertools.chain.from_iterable(
                    row[1:6] for row in rows))) <= _INTS and \
                not self._any_sent_by_us(names_of_rows + names, None if rows else folder):
            digests = _digests(u"".join(shas))
        if digests is None:
            raise _bad("rows are [received file name, size, mtime_ns, ino, ctime_ns, "
                       "mode, sha256]")
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        # a keepalive batch of one client: its kept summary follows it (_node_summary)
        batch = bool(self._node_sums) and node is not None and \
            self._all_directly_in(info, names, folder)
        replaced = [] if batch and node in self._node_sums else None
        taken = self.scanner.learn_records(names, data, folder, replaced)
        if replaced is not None:
            self._follow_keepalives(node, replaced, data, taken)
        elif self._node_sums and (any(taken) and not batch or
                                  any(name.startswith(info) for name in names_of_rows)):
            # agent-info of no known client may have changed: any client's summary may move
            self._node_sums = {}
        missed = self.scanner.learn_rows(rows, digests)
        size = scanner_mod.FINGERPRINT.size
        for index in [] if all(taken) else [i for i, ok in enumerate(taken) if not ok]:
            fields = scanner_mod.FINGERPRINT.unpack_from(data, index * size)
            missed.append([names[index]] + list(fields[:5]) +
                          [binascii.hexlify(fields[5]).decode("ascii")])
        hinted = 0
        for row in missed:
            if row[0] in self.scanner:
                self.scanner.hint(row[0], row[1:6], row[6])
                hinted += 1
        result = {"learned": len(rows) + len(names) - len(missed), "hinted": hinted}
        if node is not None and names:
            agents.extend(self._reported(names, data, node, folder))
        if agents:
            result["updated"] = self._record_agents(agents)
        return result

    def _received_records(self, args):
        """(names, FINGERPRINT records, the folder the names are all directly in or None)
        of a "received" request, or RequestError: the names as they are (no folder told), or
        by "ticket" (_asked_names), never both."""
        folder = None
        if "ticket" in args:
            if "names" in args:
                raise _bad("'names' or 'ticket', not both")
            names, folder = self._asked_names(args)
        else:
            names = args.get("names", [])
        if not isinstance(names, list) or not set(map(type, names)) <= _TEXTS:
            raise _bad("'names' must be a list of file names")
        try:
            data = binascii.a2b_base64(compat.to_bytes(_opt_text(args, "records") or u""))
        except (TypeError, ValueError, binascii.Error):
            data = None
        if data is None or len(data) != scanner_mod.FINGERPRINT.size * len(names):
            raise _bad("'records' must be base64 of one fingerprint record per name")
        return names, data, folder

    def _reported(self, names, data, node, folder=None):
        """agent_nodes rows of the agent-info files among `names`, reported by `node` with
        their records' mtimes (the time the receiver gave them); `folder`: the one the names
        are all directly in, when known (_one_folder). The mtimes are unpacked by one C
        call for the whole batch: a call, an index and a slice per name were 1.4 us a
        keepalive, more than the agents table's UPDATE."""
        info = self._item_path("agent-info", "queue/agent-info") + "/"
        start = len(info)
        unpack = self._mtimes_unpack
        if unpack is None or unpack.size != len(data):
            # A Struct of its own, the last batch size's kept: struct.unpack_from's cache
            # would keep up to 100 of them, ~75 KB each at 2 000 names (7 MB).
            unpack = self._mtimes_unpack = struct.Struct("<" + _MTIME_OF_RECORD * len(names))
        mtimes = unpack.unpack_from(data)
        # their rows made by C calls, as tuples (none of them is changed)
        if self._all_directly_in(info, names, folder):
            return list(zip(map(operator.itemgetter(slice(start, None)), names),
                            itertools.repeat(node), mtimes))
        return [(name[start:], node, mtime) for name, mtime in zip(names, mtimes)
                if name.startswith(info) and name.find(u"/", start) < 0]

    @staticmethod
    def _all_directly_in(prefix, names, folder=None):
        """True when all these names are directly in folder `prefix` (ending in "/"), as a
        keepalive batch's are: known from its ticket (`folder`), or seen at once by their
        count of "/"."""
        if folder is not None:
            return folder + u"/" == prefix
        return set(map(_SLASHES, names)) == set([prefix.count("/")]) and \
            all(map(operator.methodcaller("startswith", prefix), names))

    def _any_sent_by_us(self, names, folder=None):
        """True when one of these names is of an item this node sends (looked up once per
        folder, by its last name: a keepalive batch's 2 000 names are in one); `folder`:
        the one they are all directly in, when known (_one_folder)."""
        paths = self._item_paths.intersection(names)
        if paths:
            # an item's own path answers for itself only (scanner.item_of), never for the
            # other names of its folder
            if any(self._sent_by_us(name) for name in paths):
                return True
            names = [name for name in names if name not in paths]
        if folder is not None:
            return bool(names) and self._sent_by_us(names[-1])
        folders = dict(zip(map(_FOLDER, map(_SPLIT_LAST, names)), names))
        return any(self._sent_by_us(name) for name in folders.values())

    # -- agents -------------------------------------------------------------------------------

    def _item_path(self, name, default):
        for item in self.items:
            if item.name == name:
                return item.path
        return default

    def _cmd_agents(self, args):
        """One row per agent of client.keys with its status (SPEC section 2), streamed in
        chunks after the reply (agentrows), from the database (agentlist); every
        last_keepalive null with {"keepalives": false} (agentrows.keepalives)."""
        count, chunks = agentlist.listing(
            self.db, os.path.join(self.home, self._item_path("client.keys", "etc/client.keys")),
            self._agent_info_folder(), self._wall(),
            lambda rows: self._safely(self.db.record_agent_file_nodes, rows),
            agentrows.keepalives(args))
        return localsock.Chunked(agentrows.streamed(count), chunks)

    def _agent_info_folder(self):
        return os.path.join(self.home, self._item_path("agent-info", "queue/agent-info"))
