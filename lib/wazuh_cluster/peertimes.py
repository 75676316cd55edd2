"""Times from peers on the receiving side: how far ahead they may be, and telling it once.

A file's mtime is wall-clock data (an agent-info's mtime is the agent's last keepalive), so it
is compared with this node's wall clock. The rules themselves are pure (pathrules.check_mtime,
pathrules.clamp_mtime); this holds the clock, the bound (cluster.max_future_seconds) and the
log line: one per peer and CLAMP_LOG_EVERY, however many files and batches a peer whose clock
runs ahead (or an insider) sends.
"""
from __future__ import absolute_import, division, print_function

import time

from wazuh_cluster import compat
from wazuh_cluster.pathrules import escape

DEFAULT_MAX_FUTURE_SECONDS = 60
# A peer whose times keep being clamped is said again after this long (monotonic seconds).
CLAMP_LOG_EVERY = 3600.0
MAX_PEERS = 1024


class FutureTimes(object):
    """The bound on peers' mtimes and its log line. Callers serialise (the Receiver's lock).

    `clock` returns epoch seconds (the wall clock: mtimes are wall-clock data); `log` is a
    logging.Logger.
    """

    def __init__(self, log, max_future_seconds=DEFAULT_MAX_FUTURE_SECONDS, clock=time.time):
        self.log = log
        self.max_future_ns = int(max_future_seconds * 10 ** 9)
        self.clock = clock
        self._notes = {}  # sender -> [monotonic time of its last line, clamps since]

    def now_ns(self):
        return int(self.clock() * 10 ** 9)

    def tell(self, sender, count, example):
        """`count` mtimes from `sender` (already escaped) were clamped; `example` is
        (name, mtime_ns) of the first. Logged once per sender and CLAMP_LOG_EVERY."""
        now = compat.monotonic()
        note = self._notes.get(sender)
        if note is not None and now - note[0] < CLAMP_LOG_EVERY:
            note[1] += count
            return
        if note is None and len(self._notes) >= MAX_PEERS:
            self._notes.clear()  # the names are the peers' own text: bounded memory
        earlier = note[1] if note is not None else 0
        self._notes[sender] = [now, 0]
        name, mtime_ns = example
        self.log.warning(
            "mtimes more than %d s ahead of this node's clock from %s (%d file(s), e.g. %s "
            "dated %s%s): applied with this node's time; check that node's clock (said once "
            "an hour per peer)", self.max_future_ns // 10 ** 9, sender, count, escape(name),
            _utc(mtime_ns), ", %d more since the last line" % earlier if earlier else "")


def _utc(mtime_ns):
    """An mtime as 'YYYY-MM-DD HH:MM:SS UTC' for a log line (seconds where time_t ends)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime_ns // 10 ** 9))
    except (ValueError, OverflowError, OSError):
        return "%d s after 1970" % (mtime_ns // 10 ** 9)
