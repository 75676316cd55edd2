"""When PeerSync sends: full rounds first, a push at once on a quiet line, then at most one
push per push_delay, with what arrived meanwhile travelling together."""
from __future__ import absolute_import, division, print_function

import os
import threading
import time

import pytest

from wazuh_cluster import compat, config
from wazuh_cluster.errors import RequestError
from wazuh_cluster.sync import Batch, InFlight, PeerSync

ITEMS, _EXCLUDE = config.load_items(os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "etc", "cluster.json"))
INTERVAL = 120.0
DELAY = 0.05


class Session(object):
    peer_name = "client-1"
    closed = False


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def master_sync(clock):
    """A master's PeerSync whose first full round has just ended."""
    sync = PeerSync(Session(), "/nonexistent", "master", None, ITEMS, INTERVAL, DELAY, 30.0,
                    clock=clock)
    job, _ = sync.due(clock())
    assert job == sync.full_round
    sync.last_round = clock()
    return sync


def take(sync, now):
    """The lists of the push due at `now`, or None when nothing is due (and the wait)."""
    captured = []
    sync.push = lambda *lists: captured.append(lists)
    job, wait = sync.due(now)
    if job is None:
        return None, wait
    job()
    return captured[0], 0


def test_the_first_change_is_pushed_without_waiting():
    clock = Clock()
    sync = master_sync(clock)
    sync.notify({"changed": [u"etc/shared/default/a.conf"]})
    lists, _ = take(sync, clock())
    assert lists == ([u"etc/shared/default/a.conf"], [], [], [])


def test_changes_during_push_delay_travel_together_in_the_next_push():
    clock = Clock()
    sync = master_sync(clock)
    sync.notify({"changed": [u"etc/shared/default/a.conf"]})
    take(sync, clock())
    sync.notify({"changed": [u"etc/shared/default/b.conf"]})
    sync.notify({"deleted": [u"etc/shared/default/c.conf"], "touched": [u"etc/client.keys"]})
    lists, wait = take(sync, clock() + DELAY / 2)
    assert lists is None and 0 < wait <= DELAY / 2 + 1e-9
    lists, _ = take(sync, clock() + DELAY)
    assert lists == ([u"etc/shared/default/b.conf"], [u"etc/client.keys"],
                     [u"etc/shared/default/c.conf"], [])


def test_names_this_node_does_not_own_are_not_pushed():
    clock = Clock()
    sync = master_sync(clock)
    sync.notify({"changed": [u"queue/agent-info/web-10.0.0.1"]})  # a client's
    lists, wait = take(sync, clock())
    assert lists is None and wait == INTERVAL


def test_a_round_is_due_every_interval_and_covers_what_is_queued():
    clock = Clock()
    sync = master_sync(clock)
    sync.notify({"changed": [u"etc/shared/default/a.conf"]})
    job, _ = sync.due(clock() + INTERVAL)
    assert job == sync.full_round
    assert not sync.has_push()


def test_a_file_changing_while_read_is_retried_later_not_at_once():
    clock = Clock()
    sync = master_sync(clock)
    sync.retry_later([u"etc/shared/default/a.conf"])
    lists, wait = take(sync, clock() + 1.0)
    assert lists is None and wait > 0
    lists, _ = take(sync, clock() + 2.5)
    assert lists == ([u"etc/shared/default/a.conf"], [], [], [])


def wait_until(condition, timeout=60.0):
    deadline = compat.monotonic() + timeout
    while not condition():
        assert compat.monotonic() < deadline, "condition never met"
        time.sleep(0.001)


def test_in_flight_calls_merge_their_states_and_never_exceed_the_depth():
    lock = threading.Lock()
    running, peak = [0], [0]
    gate = threading.Event()

    def call(batch):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(60)
        with lock:
            running[0] -= 1
        return dict((f["name"], "synchronized") for f in batch.files)
    calls = InFlight(call, 2)
    for n in range(5):
        batch = Batch()
        batch.add_file(u"etc/shared/default/f%d" % n, b"x", "0" * 64, 1)
        if n == 2:
            wait_until(lambda: running[0] == 2)  # both first calls are inside
            gate.set()  # let everything go from here
        calls.submit(batch)
    states = calls.finish()
    assert peak[0] == 2
    assert sorted(states) == [u"etc/shared/default/f%d" % n for n in range(5)]


def test_an_error_of_one_call_is_raised_once_all_calls_ended():
    finished = []

    def call(batch):
        name = batch.files[0]["name"]
        if name.endswith("f0"):
            raise RequestError("no answer", "timeout")
        finished.append(name)
        return {name: "synchronized"}
    calls = InFlight(call, 2)
    for n in range(2):
        batch = Batch()
        batch.add_file(u"etc/shared/default/f%d" % n, b"x", "0" * 64, 1)
        calls.submit(batch)
    with pytest.raises(RequestError):
        calls.finish()
    assert finished == [u"etc/shared/default/f1"]
