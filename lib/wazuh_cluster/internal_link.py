"""wazuh-clusterd's view of the internal daemon: thread-safe calls and a change subscription."""
from __future__ import absolute_import, division, print_function

import socket
import threading

from wazuh_cluster import compat, fairlock, localsock, logs
from wazuh_cluster.errors import ProtocolError, RequestError


class InternalUnavailable(RequestError):
    """The internal daemon cannot be reached (it is starting or restarting)."""
    code = "internal_unavailable"


class InternalLink(object):
    """Calls to wazuh-clusterd-internal over its UNIX socket, from any thread.

    The internal daemon may be restarting: a call that cannot connect raises RequestError
    ("unreachable") and the next one reconnects.
    """

    def __init__(self, path, timeout=60.0):
        self.path = path
        self.timeout = timeout
        self._client = localsock.Client(path, timeout)
        # first come, first served: a thread calling again at once does not pass the others
        self._lock = fairlock.FairLock()
        self._urgent = None
        self._urgent_lock = threading.Lock()  # not _lock: made while a bulk call runs

    def call(self, cmd, args=None):
        """The result of `cmd`; InternalUnavailable while the daemon restarts."""
        return self.call_data(cmd, args)[0]

    def call_data(self, cmd, args=None):
        """(result, raw bytes after the reply or None): see localsock.WithData."""
        with self._lock:
            return _called(self._client, self._client.call_data, cmd, args)

    def stream(self, cmd, args=None):
        """(result, chunks) of a streamed answer (localsock.Chunked) over a connection of its
        own: the shared one, and its lock, are not held while a slow reader (cluster_control
        into a pager) takes the chunks. The connection closes once they are read or closed."""
        client = localsock.Client(self.path, self.timeout)
        result, chunks = _called(client, client.call_chunks, cmd, args)
        return result, _closing(client, chunks)

    def urgent(self):
        """A link of its own connection for the few small requests on the way of a change to
        a peer (a push's manifest of a few names, a client.keys just written).

        The internal daemon answers one request at a time, but takes its connections in
        turn; the threads of this link wait for each other's calls in the order they came
        (fairlock.FairLock). On this
        link a push's manifest waits for the request the daemon is answering, not for the
        other sessions' batches of 1 000 keepalives queued here (up to 1.5 s at 10 clients
        under churn, on the way of every client.keys append).
        """
        with self._urgent_lock:
            if self._urgent is None:
                self._urgent = InternalLink(self.path, self.timeout)
            return self._urgent

    def wait_ready(self, timeout, stopping):
        """Poll until the internal daemon answers (True) or `timeout` passes (False)."""
        deadline = compat.monotonic() + timeout
        while not stopping.is_set():
            try:
                self.call("status")
                return True
            except InternalUnavailable:
                if compat.monotonic() >= deadline:
                    return False
                stopping.wait(0.05)
        return False

    def close(self):
        with self._lock:
            self._client.close()
        with self._urgent_lock:
            urgent = self._urgent
        if urgent is not None:
            urgent.close()


def _called(client, call, cmd, args):
    """call(cmd, args); InternalUnavailable when the daemon cannot be reached (the client is
    closed on any failure: the next call reconnects)."""
    try:
        return call(cmd, args)
    except RequestError as err:
        client.close()
        if err.code in ("unreachable", "timeout"):
            raise InternalUnavailable("internal daemon unavailable: %s" % err.message)
        raise
    except ProtocolError:
        client.close()
        raise


def _closing(client, chunks):
    try:
        for chunk in chunks:
            yield chunk
    finally:
        client.close()


# Seconds between the subscription thread's looks at `stopping` while no event comes.
STOP_CHECK = 5.0


class Subscription(object):
    """A thread that subscribes to change events and hands each to `on_event(event)`.

    It reconnects while the internal daemon restarts; `on_reconnect()` is called after each
    (re)subscription, since events may have been missed meanwhile.
    """

    def __init__(self, path, on_event, on_reconnect, stopping, retry=0.5):
        self.path = path
        self.on_event = on_event
        self.on_reconnect = on_reconnect
        self.stopping = stopping
        self.retry = retry
        self.log = logs.get("link")
        self.thread = None
        self._client = None

    def start(self):
        # Created here, not in __init__: the daemon forks between the two, and a Thread object
        # made before a fork cannot be started after it (Python 3.13 refuses).
        self.thread = threading.Thread(target=self.run, name="internal-events")
        self.thread.daemon = True
        self.thread.start()
        return self

    def run(self):
        warned = False
        while not self.stopping.is_set():
            client = localsock.Client(self.path, timeout=30.0)
            try:
                client.call("subscribe")
            except (RequestError, ProtocolError) as err:
                client.close()
                if not warned:
                    self.log.warning("internal daemon not reachable yet (%s)", err)
                    warned = True
                self.stopping.wait(self.retry)
                continue
            if warned:
                self.log.info("internal daemon reachable again")
            warned = False
            self._client = client
            self.on_reconnect()
            self._read(client)
            client.close()

    def _read(self, client):
        while not self.stopping.is_set():
            try:
                # stop() wakes this wait (shutdown); the timeout is only there for a stop
                # that came before the connection was made (it polled twice a second)
                if not client.wait_readable(STOP_CHECK):
                    continue
                message = client.receive()
            except (socket.error, ProtocolError, ValueError):
                return
            if message.get("event"):
                self.on_event(message)

    def stop(self):
        """Wake the thread's wait (the events' connection shut down, not closed under its
        feet: the thread closes it), after `stopping` was set."""
        client = self._client
        if client is not None:
            client.shutdown()
