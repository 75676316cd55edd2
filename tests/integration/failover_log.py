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
"""
from __future__ import absolute_import, division, print_function

import io
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
            return "\n".join(repr(e) for e in self.events)


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


def check(recorder):
    """Assert the safety properties over everything recorded; returns the intervals."""
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
