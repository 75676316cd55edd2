"""Calls to the internal daemon that the caller need not wait for, in the order they were made.

A client.keys append under churn (issue 11) waited on both sides for the internal daemons,
which answer one request or tick at a time and were busy with the clients' keepalive
batches: the master's sync thread for the states rows of its last push (the next push
waited for them), a client's sync_files handler for telling its daemon the hash of the
file it wrote (the master's push waited for that answer). Neither result is needed to go
on; only their order matters, and what a write met must not be lost.
"""
from __future__ import absolute_import, division, print_function

import collections
import threading

from wazuh_cluster import compat, logs


IDLE_SECONDS = 30.0  # a Serial's thread ends after this long without work (one per peer)


class Serial(object):
    """Runs calls one at a time, in the order they were submitted, from one thread that lives
    while there is work (and IDLE_SECONDS after): a push a second to a peer reuses it instead
    of starting a thread per push."""

    def __init__(self, name="serial", idle=IDLE_SECONDS):
        self._name = name
        self._idle = idle
        self._cond = compat.Condition()  # 2.7: the idle wait must not poll
        self._queue = collections.deque()
        self._thread = None
        self.threads = 0    # threads started (tests)

    def submit(self, call, *args):
        """A Pending for `call(*args)`, run after every call submitted before it."""
        pending = Pending()
        with self._cond:
            self._queue.append((pending, call, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name)
                self._thread.daemon = True
                self.threads += 1
                self._thread.start()
            else:
                self._cond.notify()
        return pending

    def _run(self):
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(self._idle)
                if not self._queue:
                    self._thread = None
                    return
                pending, call, args = self._queue.popleft()
            try:
                pending.run(call, args)
            except BaseException:
                # Not an error of the call (those wait() raises): this thread ends, so the
                # next submit starts another rather than notifying a dead one.
                with self._cond:
                    self._thread = None
                raise


class Pending(object):
    """One call of a Serial: wait() returns once it ended and raises what it raised (the
    caller's error, met later)."""

    def __init__(self):
        self._done = compat.Event()
        self._error = None

    def run(self, call, args):
        try:
            call(*args)
        except Exception as err:  # raised again in wait(), in the caller's thread
            self._error = err
        finally:
            self._done.set()

    def wait(self):
        self._done.wait()
        if self._error is not None:
            raise self._error

    def done(self):
        """True once the call ended (wait() then returns at once)."""
        return self._done.is_set()


class Latest(object):
    """Hands values to `call(value)` from one thread, in the order they were put; a value not
    yet taken when a newer one comes is dropped (only the newest matters: a hint about the
    file as it is now). `call` handles its own errors; anything else it raises is logged."""

    def __init__(self, call, name="latest"):
        self._call = call
        self._name = name
        self._cond = compat.Condition()
        self._value = None
        self._has = False
        self._thread = None

    def put(self, value):
        with self._cond:
            self._value, self._has = value, True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name)
                self._thread.daemon = True
                self._thread.start()

    def _run(self):
        while True:
            with self._cond:
                if not self._has:
                    self._thread = None
                    self._cond.notify_all()
                    return
                value, self._value, self._has = self._value, None, False
            try:
                self._call(value)
            except Exception:  # a bug: the next value must still go
                logs.get().exception("%s failed", self._name)

    def flush(self):
        """Wait until every value put so far was handed over (tests)."""
        with self._cond:
            while self._thread is not None:
                self._cond.wait()
