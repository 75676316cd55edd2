"""Fair admission on the cluster port: slots per source address, and refusals logged with a limit.

Plan (issue 12, item 5). Before this module the cluster port had two global bounds (connections
and pending handshakes): one listed address holding idle connections could take every slot and
starve the other nodes until its handshakes timed out. Now:

- Every address has its own bounds (cluster.max_pending_per_address, default 4, and
  cluster.max_connections_per_address, default 8). They are checked first.
- The global bounds (cluster.max_pending_handshakes, cluster.max_connections) still cap the
  total, with one exception that makes "other nodes are always served" hold whatever the
  settings: an address listed in <nodes> that holds no slot of that kind yet is admitted even
  when the global bound is reached. The total then stays below the global bound plus the number
  of listed addresses, which is finite; with cluster.allow_unlisted_peers=1 the unlisted
  addresses get no exception (there is no bound on how many of them there are).
- A refusal is logged at once the first time for an address; further refusals of that address
  within REFUSAL_WINDOW (60 s) are only counted, and one summary line with the count is written
  when the window is over (at the next refusal, or whenever any refusal is logged). A flood of
  any size therefore writes at most about one line per address per minute, and at most
  MAX_TRACKED addresses are remembered (the oldest is summarised and forgotten first).

Admission is thread-safe; the clock is a seam (monotonic seconds) for the unit tests.
"""
from __future__ import absolute_import, division, print_function

import collections
import logging
import threading

from wazuh_cluster import compat

REFUSAL_WINDOW = 60.0
MAX_TRACKED = 1024

log = logging.getLogger("wazuh_cluster")


class Admission(object):
    """Counts connections and pending handshakes of the cluster port, globally and per address.

    admit(request, host, listed) -> None when admitted, else the reason (text) of the refusal;
    handshake_done(request) once the handshake is over; release(request) when the connection
    ends (idempotent).
    """

    def __init__(self, max_connections, max_pending, max_connections_per_address,
                 max_pending_per_address):
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_connections_per_address = max_connections_per_address
        self.max_pending_per_address = max_pending_per_address
        self._lock = threading.Lock()
        self._hosts = {}          # request -> source address
        self._pending = set()     # requests still in their handshake
        self._conns_by_host = collections.defaultdict(int)
        self._pending_by_host = collections.defaultdict(int)

    def admit(self, request, host, listed):
        """Take a connection slot and a handshake slot for `request` from `host`, or refuse."""
        with self._lock:
            own_conns = self._conns_by_host.get(host, 0)
            own_pending = self._pending_by_host.get(host, 0)
            if own_pending >= self.max_pending_per_address:
                return "too many pending handshakes from this address (%d)" % own_pending
            if own_conns >= self.max_connections_per_address:
                return "too many connections from this address (%d)" % own_conns
            if len(self._pending) >= self.max_pending and not (listed and own_pending == 0):
                return "too many pending handshakes (%d)" % len(self._pending)
            if len(self._hosts) >= self.max_connections and not (listed and own_conns == 0):
                return "too many connections (%d)" % len(self._hosts)
            self._hosts[request] = host
            self._pending.add(request)
            self._conns_by_host[host] += 1
            self._pending_by_host[host] += 1
            return None

    def handshake_done(self, request):
        """The handshake of `request` is over (whatever its outcome): free its handshake slot."""
        with self._lock:
            self._end_pending(request)

    def release(self, request):
        """The connection ended: free both its slots."""
        with self._lock:
            self._end_pending(request)
            host = self._hosts.pop(request, None)
            if host is not None:
                _decrement(self._conns_by_host, host)

    def _end_pending(self, request):
        if request in self._pending:
            self._pending.discard(request)
            _decrement(self._pending_by_host, self._hosts[request])

    def counts(self):
        """(connections, pending handshakes) right now."""
        with self._lock:
            return len(self._hosts), len(self._pending)

    def counts_of(self, host):
        """(connections, pending handshakes) of one source address."""
        with self._lock:
            return self._conns_by_host.get(host, 0), self._pending_by_host.get(host, 0)


def _decrement(counts, host):
    counts[host] -= 1
    if counts[host] <= 0:
        del counts[host]


class RefusalLog(object):
    """"refused peer" lines, at most one line per address per window plus a summary with a count.

    `logger` is a logging.Logger; `clock` monotonic seconds. Reasons must already be escaped
    (peer text through pathrules.escape): this class only decides whether a line is written.
    """

    def __init__(self, logger=None, window=REFUSAL_WINDOW, max_tracked=MAX_TRACKED,
                 clock=compat.monotonic):
        self.logger = logger if logger is not None else log
        self.window = window
        self.max_tracked = max_tracked
        self.clock = clock
        self._lock = threading.Lock()
        # host -> [window start, suppressed count, last suppressed reason]; oldest first.
        self._windows = collections.OrderedDict()

    def refused(self, host, level, peer, reason):
        """Log "refused peer PEER: REASON" unless address `host` already had its line.

        `peer` is what the line names (address:port, and the node name once known).
        """
        now = self.clock()
        lines = []
        with self._lock:
            lines.extend(self._expire(now))
            entry = self._windows.get(host)
            if entry is None:
                if len(self._windows) >= self.max_tracked:
                    old_host, old = self._windows.popitem(last=False)
                    lines.extend(_summary(old_host, old, self.window))
                self._windows[host] = [now, 0, None, level]
                lines.append((level, "refused peer %s: %s" % (peer, reason)))
            else:
                entry[1] += 1
                entry[2] = reason
                entry[3] = max(entry[3], level)
        for lvl, text in lines:
            self.logger.log(lvl, "%s", text)

    def flush(self):
        """Write the summaries of every window now (at shutdown, or from a test)."""
        with self._lock:
            lines = []
            for host, entry in self._windows.items():
                lines.extend(_summary(host, entry, self.window))
            self._windows.clear()
        for lvl, text in lines:
            self.logger.log(lvl, "%s", text)

    def _expire(self, now):
        """Summaries of the windows that are over (their addresses may log again)."""
        lines = []
        while self._windows:
            host, entry = next(iter(self._windows.items()))
            if now - entry[0] < self.window:
                break
            del self._windows[host]
            lines.extend(_summary(host, entry, self.window))
        return lines


def _summary(host, entry, window):
    _start, count, last, level = entry
    if not count:
        return []
    return [(level, "refused peer %s: %d more refusal(s) in %d s not logged one by one "
             "(last: %s)" % (host, count, int(window), last))]
