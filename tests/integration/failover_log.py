"""A recorder of the election's log lines of every node, and the safety checks over them.

The recorder reads each node's logs/cluster.log from where it left off every PERIOD seconds
and stamps each new "Failover:" line with the time it saw it (one clock, the test's, with
sub-second resolution; the logs' own stamps are whole seconds). A line is seen at most PERIOD
after it was written, and the daemons log "stopped acting" at their next tick after the lease
ran out, so a recorded stop is never earlier than the real one: "A's stop recorded before
B's election" proves the order.

check() asserts over a whole run: at most one node elected per term, never two nodes acting
at once (an acting interval runs from "acting master in term N" to that node's next
"stopped acting" line, or to its kill -9 as the test reports it, or to the end of the run).

It also checks the tests' own changes, made through Recorder.change(): what (the lines a
write of a file adds), where, when, and the node's view right before and right after the
write (cluster_control -j -i: role, term, lease). The recorder watches every node's live copy
of the file until a majority of the nodes holds the lines. A change is a LEADER'S change when
the node acted in the same term before and after the write and still did when a majority held
it: no stop, kill or newer election recorded in between (a leader's lease ends with its
"stopped acting" line at the latest). A leader's change must be, after the run converged, in
the live file of every live node (never rolled back, never only in backup/cluster/), unless a
later leader's change of the same file removed those lines. Any other change (made after the
lease ran out, or by a leader cut off before it could spread it) need not survive, but must
not be silently lost either: it stays in the live files or sits in the origin's
backup/cluster/. A lease seen at the write alone is not enough: the old master's edit at the
moment of a cut is made under its lease and reaches nobody.
"""
from __future__ import absolute_import, division, print_function

import glob
import io
import json
import os
import re
import threading
import time

PERIOD = 0.05
_KINDS = (("elected", re.compile(r"Failover: elected master for term (\d+)")),
          ("acting", re.compile(r"Failover: acting master in term (\d+)")),
          ("stopped", re.compile(r"Failover: stopped acting as master(?: in term (\d+))?")),
          ("adopted", re.compile(r"Failover: term (\d+) adopted")),
          ("stale_refused", re.compile(r"older than term (\d+)")))


class Event(object):
    __slots__ = ("time", "node", "kind", "term", "line")

    def __init__(self, when, node, kind, term, line):
        self.time, self.node, self.kind, self.term, self.line = when, node, kind, term, line

    def __repr__(self):
        return "%.3f %s %s %s | %s" % (self.time, self.node, self.kind, self.term, self.line)


def parse(line):
    """(kind, term or None) of a log line, or None when it is none of the recorded kinds."""
    for kind, regex in _KINDS:
        found = regex.search(line)
        if found:
            return kind, int(found.group(1)) if found.group(1) else None
    return None


class Recorder(object):
    """Use as a context manager around a run; nodes may be added before start()."""

    def __init__(self, nodes, period=PERIOD):
        self.nodes = list(nodes)
        self.period = period
        self.events = []
        self.changes = []
        self.leaders_changes = []      # of self.changes, those check() found made under a lease
        self._offsets = dict((n.name, 0) for n in self.nodes)
        self._rest = dict((n.name, b"") for n in self.nodes)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._thread.is_alive():
            self._halt.set()
            self._thread.join(10)
        self.poll()

    def _run(self):
        while not self._halt.wait(self.period):
            self.poll()

    def poll(self):
        """Read what the logs gained since the last poll (also called by the test at will)."""
        with self._lock:
            now = time.time()
            for node in self.nodes:
                for line in self._new_lines(node):
                    found = parse(line)
                    if found:
                        self.events.append(Event(now, node.name, found[0], found[1], line))
            for change in self.changes:
                if change.spread is None and change.term is not None and \
                        not self._ended(change):
                    holders = [n for n in self.nodes if change.held_by(n)]
                    if len(holders) > len(self.nodes) // 2:
                        change.spread = now

    def _ended(self, change):
        """The origin's lease surely ended since the change was written (nothing to watch)."""
        return any(e.time > change.time and (e.node == change.node and e.kind in (
            "stopped", "killed") or e.kind == "elected" and e.term > change.term)
            for e in self.events)

    def change(self, node, rel, content):
        """Write `content` to `rel` on `node` (a test's change) and record it with the node's
        view of its role before and after the write (cluster_control -j -i)."""
        try:
            with io.open(node.path(*rel.split("/")), encoding="utf-8") as handle:
                old = set(handle.read().splitlines())
        except (IOError, OSError):
            old = set()
        before = view(node)
        path = node.path(*rel.split("/"))
        if not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path))
        with io.open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
        when = time.time()
        after = view(node)
        new = content.splitlines()
        change = Change(when, node.name, rel, [line for line in new if line not in old],
                        old.difference(new), before, after)
        with self._lock:
            self.changes.append(change)
        return path

    def _new_lines(self, node):
        try:
            with io.open(node.path("logs", "cluster.log"), "rb") as handle:
                handle.seek(self._offsets[node.name])
                data = handle.read()
        except (IOError, OSError):
            return []
        self._offsets[node.name] += len(data)
        data = self._rest[node.name] + data
        lines = data.split(b"\n")
        self._rest[node.name] = lines.pop()
        return [line.decode("utf-8", "replace") for line in lines]

    def mark(self, node, kind):
        """An event the logs cannot tell, e.g. "killed" after a kill -9 completed."""
        self.poll()
        with self._lock:
            self.events.append(Event(time.time(), node.name, kind, None, ""))

    def of(self, kind, node=None):
        with self._lock:
            return [e for e in self.events if e.kind == kind
                    and (node is None or e.node == node.name)]

    def dump(self):
        with self._lock:
            return "\n".join([repr(e) for e in self.events] +
                             ["change %r" % c for c in self.changes])


def view(node, tries=3):
    """The failover part of `cluster_control -j -i` on `node`; {"error": why} when it does not
    answer `tries` times (the change then counts as no leader's)."""
    why = None
    # a node in a network namespace (test_netns) finds its own address only in there
    space = getattr(node, "space", None)
    prefix = ("ip", "netns", "exec", space) if space else ()
    for _ in range(tries):
        result = node.cluster_control("-j", "-i", argv_prefix=prefix)
        try:
            found = json.loads(result.out).get("failover") if result.rc == 0 else None
        except (ValueError, AttributeError):
            found = None
        if isinstance(found, dict):
            return found
        why = "rc %s: %s" % (result.rc, (result.err or result.out).strip()[-200:])
    return {"error": why}


def acts(status):
    return status.get("role") in ("master", "acting master") and \
        status.get("lease_remaining") is not None


class Change(object):
    """A test's write of a file on a node: the lines it `added` and `removed`, `before` /
    `after` the node's failover view around the write, `spread` when a majority held the
    added lines."""

    def __init__(self, when, node, rel, added, removed, before, after):
        self.time, self.node, self.rel = when, node, rel
        self.added, self.removed, self.before, self.after = added, removed, before, after
        self.term = before.get("term") if acts(before) and acts(after) and \
            before.get("term") == after.get("term") else None
        self.spread = None

    def held_by(self, node, folder=None):
        """All added lines are in `node`'s live copy (or in the copy under `folder`)."""
        path = os.path.join(folder, *self.rel.split("/")) if folder else \
            node.path(*self.rel.split("/"))
        try:
            with io.open(path, encoding="utf-8") as handle:
                lines = set(handle.read().splitlines())
        except (IOError, OSError):
            return False
        return all(line in lines for line in self.added)

    def __repr__(self):
        return "%.3f %s %s +%r term %s spread %s (before %s, after %s)" % (
            self.time, self.node, self.rel, self.added, self.term, self.spread,
            self.before, self.after)


def leaders_change(change, events):
    """True when `change` was made under its node's lease (module docstring)."""
    if change.term is None or change.spread is None:
        return False
    return not any(change.time < e.time <= change.spread and (
        e.node == change.node and e.kind in ("stopped", "killed") or
        e.kind == "elected" and e.term > change.term) for e in events)


def check_changes(recorder, live, timeout):
    """Every leader's change in every live node's live file (waiting `timeout` at most for
    the last pushes), every other change there or in a backup on its node."""
    events = list(recorder.events)
    changes = sorted(recorder.changes, key=lambda c: c.time)
    leaders = [c for c in changes if leaders_change(c, events)]
    by_name = dict((n.name, n) for n in recorder.nodes)
    deadline = time.time() + timeout
    while True:
        missing = []
        for change in changes:
            # lines a later leader's change removed on purpose (it saw them) need not stay
            gone = set()
            for c in leaders:
                if c.rel == change.rel and c.time > change.time:
                    gone.update(c.removed)
            probe = Change(change.time, change.node, change.rel,
                           [line for line in change.added if line not in gone], (), {}, {})
            if all(probe.held_by(n) for n in live):
                continue
            if change in leaders:
                missing.append("a leader's change is not on every live node: %r" % change)
            elif not any(probe.held_by(None, folder) for folder in glob.glob(
                    by_name[change.node].path("backup", "cluster", "*"))):
                missing.append("a change neither on every live node nor backed up on %s: %r"
                               % (change.node, change))
        if not missing or time.time() >= deadline:
            break
        time.sleep(0.1)
    assert not missing, "%s\n%s" % ("\n".join(missing), recorder.dump())
    return leaders


def leaders_by_term(events):
    found = {}
    for event in events:
        if event.kind == "elected":
            found.setdefault(event.term, set()).add(event.node)
    return found


def acting_intervals(events, end):
    """[(node, term, start, stop)]: stop is the node's next stop/kill, or `end`."""
    intervals, open_ = [], {}
    for event in sorted(events, key=lambda e: e.time):
        if event.kind == "acting":
            if event.node in open_:   # acting again without a stop line: still one interval
                continue
            open_[event.node] = (event.term, event.time)
        elif event.kind in ("stopped", "killed") and event.node in open_:
            term, start = open_.pop(event.node)
            intervals.append((event.node, term, start, event.time))
    for node, (term, start) in open_.items():
        intervals.append((node, term, start, end))
    return sorted(intervals, key=lambda i: i[2])


def check(recorder, live=None, timeout=30.0):
    """Assert the safety properties over everything recorded; returns the intervals. `live`:
    the nodes whose files count at the end (default: those whose daemon runs)."""
    if live is None:
        live = [n for n in recorder.nodes if n.running_pid()]
    recorder.poll()
    recorder.leaders_changes = check_changes(recorder, live, timeout)
    recorder.stop()
    events = list(recorder.events)
    for term, nodes in leaders_by_term(events).items():
        assert len(nodes) <= 1, "term %d has %d leaders: %s\n%s" % (
            term, len(nodes), sorted(nodes), recorder.dump())
    intervals = acting_intervals(events, time.time())
    for i, first in enumerate(intervals):
        for second in intervals[i + 1:]:
            if first[0] != second[0] and second[2] < first[3]:
                raise AssertionError("%s (term %s) and %s (term %s) acted at once: %.3f-%.3f "
                                     "and %.3f-%.3f\n%s" % (first[0], first[1], second[0],
                                                           second[1], first[2], first[3],
                                                           second[2], second[3],
                                                           recorder.dump()))
    for node, term, start, stop in intervals:
        terms = [e.term for e in events if e.node == node and e.kind == "elected"
                 and e.time <= start]
        assert terms and terms[-1] == term, "%s acted in term %s without being elected in " \
            "it\n%s" % (node, term, recorder.dump())
    return intervals
