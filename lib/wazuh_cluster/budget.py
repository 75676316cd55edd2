"""One budget per process for the bytes that peers make us hold: fair, bounded, deadlock-free.

The plan (issue 12 item 3). Every session reads a message only after the budget granted it
room, so N hostile peers together can never make wazuh-clusterd hold more than `total`
bytes of received data (encrypted frames, assembled messages, inflated data, queued requests),
however fast they send: a session that cannot be granted simply is not read, and TCP pushes
back on its sender.

* Fair: grants go strictly in the order the sessions asked (FIFO), so a greedy session cannot
  jump ahead of the legitimate ones; and one session never holds more than its `share`, so it
  cannot take the whole budget and keep it.
* Urgent grants (answers to our own outstanding calls) go ahead of every waiting request and
  may use `reserve` bytes beyond `total`: an answer we wait for never waits behind the peers'
  requests that fill the budget (the request/response protocol always makes progress).
* Deadlock-free: a message is granted its worst case at once, when it starts, and never asks
  again while it is held (a session never holds part of a message while waiting for the rest);
  what it did not need is given back when it is complete. Whatever holds budget is released
  without waiting on any peer: a request when its handler answered, an answer when our caller
  took it. A size above what can ever be granted is refused at once (`Refused`), never waited
  for.

Sending draws on the same budget (issue 11 item 4): a session reads the files of a batch only
after a grant to a holder made with `sends=True` (outbox.py), and gives it back once the batch
is on the wire, before waiting for the answer. Ten sessions each reading and compressing their
own batches, nothing counting them, had the master at 237 MB. Sending waits for the peer to
read, and the peer may wait for its own budget: if our sends could take the room our reader
needs, two nodes sending to each other could each wait for the other for ever. Hence the
invariant:

* Sends hold at most `send_limit` (at most `total - share`), `cache` of it set aside for the
  shared compression cache (protocol.py's, bounded from here), and no receiving holder may
  ask for more than `total - send_limit` (a client's session with its master asked for the
  whole total: beside the cache's part that never fit, and its reader waited for ever).
  Whatever the sends hold, a receive of a whole share still fits, and what receives hold is
  given back without waiting on any peer: reading never depends on sending, here or on the
  peer, so every node keeps reading and every send ends. wazuh-clusterd gives sends a quarter
  of `total` (for_daemon), not all of `total - share`: a reader wants a whole window for its
  next message while the requests it read are still held by their handlers, and that room
  keeps a client reading the master's next batch (and the answers behind it) meanwhile.

wazuh-clusterd's cluster.max_inflight_bytes is the whole of it (issue 11, memory bounded by
design): for_daemon takes the urgent reserve out of it (a twelfth: with 24 MiB, what is left
beside the sends still takes a client's two largest messages), so `used` never passes
the option, however the grants fall; bound() adds the store of versions for deltas, the
other part of the daemon's memory that grows with what it sends, to give the most the
daemon holds above its baseline. Before, the reserve came on top (64 + 16 MiB by default)
and the store (24 MiB) was counted nowhere: baseline plus worst case was past 150 MB.
* A send first waits for its holder's own releases (outside every line), then in the send
  line (FIFO among senders: no session starves the others) for room in the send pool and in
  `total`. It does not stand in the common queue (Sends go ahead, below), so the head of
  that queue is never a send waiting for other sends.
  A slow peer delays only the grants of its own batches; a stalled one is cut off by the
  channel's send timeout, which gives them back.
* A send's grant is its batch's worst case, taken before the batch's first file is read and
  never added to while held; what the batch no longer needs goes back as it is encoded.

Sends go ahead (issue 11 item 4). A send waited in the common queue behind the receives'
windows: a push of one client.keys line (a few KB) behind keepalive batches' windows of 12-16
MiB, 0.3-0.7 s a push at 10 clients with 24 MiB. It needs no place in that queue: sends never
hold more than `send_limit` and a receive's share fits beside it, so whatever the sends take,
the receive at the head of the queue is granted once the other receives gave back theirs.

Parking (issue 11 item 4: priority, not size). A message's window is granted before its
first frame is read, so it is its worst case: for a compressed request twice the message
limit (16 MiB on a master), for a keepalive batch of 320 KB of names 40 times its frame (12.7
MB), however little it needs. With a 24 MiB budget that is most of the room receives have:
the master read about one session at a time, and an answer to our own call waited in its
peer's stream behind that peer's keepalive batch, itself in line behind every other
session's (append p99 4.2-4.5 s against 1.5-1.7 s with 64 MiB under the real keepalive rate).
So a request in one frame is read under a grant of its frame alone (`park`: at once or not
at all, out of `park_limit`, half the urgent reserve; its copies while it is read come from
the reserve), and a worker waits in line for its window (acquire's `unpark`; for an
uncompressed one, what its header's text can cost) while the reader goes on to the answers
behind it. Parked bytes are beside `total` the way urgent ones are: a normal grant does not
count them, so parking never holds a window back (the window of a parked message waits only
for what normal grants hold, as any window did: no new deadlock), and `used` stays within
total + reserve, the option.
"""
from __future__ import absolute_import, division, print_function

import collections
import threading

from wazuh_cluster import compat

DEFAULT_TOTAL = 64 << 20
ABANDON_CHECK = 1.0   # seconds between checks of acquire's `abandon`
RESERVE_PART = 12  # wazuh-clusterd: a twelfth of cluster.max_inflight_bytes for urgent grants,
SEND_PART = 4     # a quarter of the rest for sends...
CACHE_PART = 2    # ...and half of that set aside for the compression cache
PARK_PART = 2     # half of the urgent reserve for parked frames (see Parking)


def for_daemon(total):
    """The budget of a wazuh-clusterd of cluster.max_inflight_bytes `total`: the urgent
    reserve is inside `total`, so `used` never passes it (see bound())."""
    reserve = total // RESERVE_PART
    limit = (total - reserve) // SEND_PART
    return Budget(total - reserve, reserve=reserve, send_limit=limit,
                  cache=limit // CACHE_PART, park=reserve // PARK_PART)


def bound(max_inflight_bytes, store_most, store_held=0):
    """The most data wazuh-clusterd holds beyond its baseline (the daemon idle after its
    first sync), by design: its budget's worst case (every grant, urgent ones included, and
    the compression cache: `max_inflight_bytes`) plus what its store of versions for deltas
    may hold (`store_most`: versions.most(cluster.delta_store_bytes)) beyond `store_held`,
    what the store already held in that baseline (the current client.keys on a master).
    Issue 11: with cluster.max_inflight_bytes=24 MiB baseline plus this stays under 100 MB;
    the default 64 MiB trades that promise for latency (README, Performance)."""
    return int(max_inflight_bytes) + max(0, int(store_most) - int(store_held))


class Refused(Exception):
    """A request for more bytes than the budget can ever grant to this holder."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class Holder(object):
    """What one session holds of a Budget (its `share` bounds it); `sends`: for data we send."""
    __slots__ = ("name", "share", "held", "sends", "parked", "asked")

    def __init__(self, name, share, sends=False):
        self.name = name
        self.share = share
        self.held = 0
        self.sends = sends
        self.parked = 0   # frames waiting for their windows (not in `held`: see park)
        self.asked = 0    # grants past the share check, waiting in a line (within the share)

    def __repr__(self):
        return "<Holder %s %d/%d>" % (self.name, self.held, self.share)


class Budget(object):
    """`total` bytes shared by all sessions of a process; see the module doc.

    `share`: the most one holder may hold (default: half of `total`); `reserve`: the extra room
    only urgent grants may use (default: a quarter of `total`); `send_limit`: the most all
    sends hold (at most `total - share`; none by default: sends are then not counted); `cache`: the part of it set aside for
    the compression cache (counted in `used` for good; CACHE_PART of the pool in clusterd);
    `park`: the most parked frames hold (default: half the reserve, never more than it).
    """

    def __init__(self, total=DEFAULT_TOTAL, share=None, reserve=None, send_limit=None,
                 cache=None, park=None):
        if total <= 0:
            raise ValueError("total must be positive")
        self.total = int(total)
        self.share = int(share) if share else self.total // 2
        self.reserve = int(reserve) if reserve is not None else self.total // 4
        most = max(0, self.total - self.share)
        self.send_limit = max(0, min(int(send_limit or 0), most))
        self.cache = min(int(cache or 0), self.send_limit)
        self.park_limit = min(self.reserve, self.reserve // PARK_PART if park is None
                              else int(park))
        self.parked = 0               # held by parked frames, part of `used`
        self.sending = self.cache     # held by sends; the cache's part is always counted
        self.used = self.cache
        self.peak = self.used
        self._cond = compat.Condition(threading.Lock())  # 2.7: timed waits must not poll
        self._queue = collections.deque()     # tickets of the waiting normal grants, in order
        self._send_line = collections.deque()  # tickets of the sends waiting for the pool
        self._urgent_waiting = 0
        self._share_waiting = 0                # holders waiting for their own releases

    def __repr__(self):
        return "<Budget %d/%d, %d waiting>" % (self.used, self.total, len(self._queue))

    def holder(self, name, share=None, sends=False):
        """A new Holder for one session; `share` defaults to the budget's (with `sends`: the
        whole send pool; the send line is what keeps the senders fair)."""
        if sends:
            pool = self.send_limit - self.cache
            return Holder(name, min(pool, int(share) if share else pool), True)
        # never more than what the sends leave: a window of the whole total (a client's
        # session with its master asks for that) would wait for ever behind the cache's part
        return Holder(name, min(self.total - self.send_limit,
                                int(share) if share else self.share))

    def grantable(self, holder, wanted=None):
        """The most bytes `holder` can ever be granted at once (at most `wanted`)."""
        most = min(holder.share, self.total)
        return most if wanted is None else min(most, int(wanted))

    def acquire(self, holder, n, timeout=None, urgent=False, abandon=None, unpark=0):
        """Wait until `n` bytes are granted to `holder` (True) or `timeout` passes (False).

        `abandon()`, checked at least every ABANDON_CHECK seconds while waiting: True gives up
        (False returned). Unlike waiting again after a timeout, the waiter keeps its place in
        line meanwhile. Raises Refused when `n` can never be granted (above the holder's share).
        `unpark`: bytes of `holder`'s parked frames that become part of this grant (the
        window of a parked message; n + unpark is the window, granted like any other).
        """
        n, unpark = int(n), int(unpark)
        if n + unpark > self.grantable(holder) or unpark > holder.parked:
            raise Refused("%d bytes needed, at most %d can ever be granted to %s"
                          % (n + unpark, self.grantable(holder), holder.name))
        end = _Until(timeout, abandon)
        with self._cond:
            if urgent:
                return self._wait_urgent(holder, n, end)
            # A holder at its share waits for its own releases outside the queue: it must not
            # stand at the head and hold everyone else back meanwhile.
            # What its grants already waiting in a line will hold counts too: with parking,
            # several workers of one session may wait at once (review of the ninth round).
            self._share_waiting += 1
            try:
                while holder.held + holder.asked + n + unpark > holder.share:
                    if not end.wait(self._cond):
                        return False
            finally:
                self._share_waiting -= 1
            holder.asked += n + unpark
            try:
                if holder.sends:
                    return self._wait_send(holder, n, end)
                return self._wait_queue(holder, n, end, unpark)
            finally:
                holder.asked -= n + unpark

    def _wait_send(self, holder, n, end):
        """A send: its turn in the send line, room in the pool and in `total`; not behind
        the receives' windows in the common queue (see Sends go ahead)."""
        ticket = (object(), n)  # unique: remove() compares
        self._send_line.append(ticket)
        try:
            while not (self._send_line[0] is ticket and self.sending + n <= self.send_limit and
                       self.used - self.parked + n <= self.total):
                if not end.wait(self._cond):
                    return False
            self.sending += n
            self._grant(holder, n)
            return True
        finally:
            self._send_line.remove(ticket)
            self._cond.notify_all()

    def _wait_queue(self, holder, n, end, unpark=0):
        ticket = object()
        self._queue.append(ticket)
        try:
            # parked frames are beside `total` (see Parking): they hold no window back
            while not (self._queue[0] is ticket and not self._urgent_waiting and
                       self.used - self.parked + n + unpark + self._owed_to_send() <=
                       self.total):
                if not end.wait(self._cond):
                    return False
            self._grant(holder, n)
            self.parked -= unpark
            holder.parked -= unpark
            holder.held += unpark
            return True
        finally:
            self._queue.remove(ticket)
            self._cond.notify_all()

    def _owed_to_send(self):
        """The room a receive leaves for the send at the head of its line when only `total`
        holds that send back (its pool has room): else receive windows handed on one to the
        next, each granted before the last is given back, could starve it (review of the
        ninth round). Never more than the pool leaves, so a receive of a whole share still
        fits once the other receives gave back theirs: receiving never waits for sending."""
        if not self._send_line:
            return 0
        n = self._send_line[0][1]
        return n if self.sending + n <= self.send_limit else 0

    def _wait_urgent(self, holder, n, end):
        self._urgent_waiting += 1
        try:
            while self.used + n > self.total + self.reserve:
                if not end.wait(self._cond):
                    return False
            self._grant(holder, n)
            return True
        finally:
            self._urgent_waiting -= 1
            self._cond.notify_all()

    def _grant(self, holder, n):
        self.used += n
        holder.held += n
        self.peak = max(self.peak, self.used)

    def park(self, holder, n, copies=0):
        """Room for a frame of `n` bytes whose message will wait for its window elsewhere (see
        Parking), and for its `copies` while it is read (held as usual, given back once it is
        open: like an urgent grant, it waits on nothing): granted at once, ahead of every
        waiting grant, or not at all (False)."""
        n, copies = int(n), int(copies)
        with self._cond:
            # the frame and its copies out of park_limit's part of the reserve only: the rest
            # stays for the answers to our own calls (review of the ninth round)
            if self.parked + n > self.park_limit or \
                    self.used + n + copies > self.total + self.park_limit:
                return False
            self.parked += n
            holder.parked += n
            self._grant(holder, copies)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release_parked(self, holder, n):
        """Give back `n` bytes of `holder`'s parked frames (opened, or their session ended)."""
        if n <= 0:
            return
        with self._cond:
            n = min(int(n), holder.parked)
            holder.parked -= n
            self.parked -= n
            self.used -= n
            self._cond.notify_all()

    def release(self, holder, n):
        """Give back `n` bytes that `holder` holds."""
        if n <= 0:
            return
        with self._cond:
            n = min(int(n), holder.held)
            holder.held -= n
            self.used -= n
            if holder.sends:
                self.sending -= n
            self._cond.notify_all()

    def release_all(self, holder):
        """Give back everything `holder` holds (its session ended)."""
        self.release(holder, holder.held)

    def stats(self):
        """{"total", "used", "peak", "sending", "parked", "waiting"} for status output and
        tests."""
        with self._cond:
            return {"total": self.total, "used": self.used, "peak": self.peak,
                    "sending": self.sending, "parked": self.parked,
                    "waiting": len(self._queue) + len(self._send_line) +
                    self._urgent_waiting + self._share_waiting}


class _Until(object):
    """When a wait gives up: after `timeout` seconds (None: never), or once `abandon()`."""

    def __init__(self, timeout, abandon):
        self.end = None if timeout is None else compat.monotonic() + timeout
        self.abandon = abandon

    def wait(self, cond):
        """Wait on `cond` (held) once; False when it is time to give up."""
        if self.abandon is not None and self.abandon():
            return False
        step = None if self.abandon is None else ABANDON_CHECK
        if self.end is not None:
            left = self.end - compat.monotonic()
            if left <= 0:
                return False
            step = left if step is None else min(step, left)
        cond.wait(step)
        return True
