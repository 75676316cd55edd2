"""Calls the caller does not wait for (background.py): their order, their errors, and a
client's sync_files that does not wait for its internal daemon to take a hint."""
from __future__ import absolute_import, division, print_function

import threading

import pytest

from wazuh_cluster import background, inbox
from wazuh_cluster.errors import RequestError


def test_a_deferred_call_raises_what_it_met_when_waited_for():
    done = []
    serial = background.Serial()
    serial.submit(done.append, 1).wait()
    assert done == [1]

    def fails():
        raise RequestError("gone", "internal_unavailable")
    deferred = serial.submit(fails)
    with pytest.raises(RequestError):
        deferred.wait()
    serial.submit(done.append, 2).wait()      # the error stopped nothing after it
    assert done == [1, 2]


def test_calls_run_in_the_order_submitted_from_one_thread_not_one_each():
    # A push a second to each peer started a thread per push for its states rows.
    gate = threading.Event()
    seen = []
    serial = background.Serial()
    first = serial.submit(lambda: (gate.wait(30), seen.append(0)))
    pending = [serial.submit(seen.append, n) for n in range(1, 50)]
    assert seen == []
    gate.set()
    for p in [first] + pending:
        p.wait()
    assert seen == list(range(50)) and serial.threads == 1


def test_the_thread_ends_when_idle_and_a_new_one_serves_what_comes_later():
    serial = background.Serial(idle=0.01)
    serial.submit(lambda: None).wait()
    while serial._thread is not None:     # no timing assumed: it ends when it ends
        threading.Event().wait(0.01)
    seen = []
    serial.submit(seen.append, 1).wait()
    assert seen == [1] and serial.threads == 2


@pytest.mark.filterwarnings("ignore:Exception in thread")  # the SystemExit, on purpose
def test_a_call_that_ends_its_thread_leaves_the_next_submit_a_new_one():
    # A BaseException (SystemExit) ends the worker thread: a later submit that only
    # notified it would never run, and its wait() would hang.
    serial = background.Serial()

    def leaves():
        raise SystemExit(0)
    serial.submit(leaves).wait()
    for _ in range(3000):                 # a bound on a wait for a thread, not a limit
        if serial._thread is None:
            break
        threading.Event().wait(0.01)
    assert serial._thread is None, "the Serial still counts on a thread that has ended"
    seen = []
    serial.submit(seen.append, 1).wait()
    assert seen == [1] and serial.threads == 2


class SlowLink(object):
    """An internal daemon busy with a tick until `release`: the rows it was told."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.told = []

    def call(self, cmd, args):
        assert cmd == "received"
        self.entered.set()
        assert self.release.wait(30)
        self.told.append(args["rows"][0][0])
        return {"learned": 0, "hinted": 1}


def test_a_client_tells_its_daemon_what_it_wrote_without_waiting_newest_last():
    # A client's sync_files waited for this answer from its internal daemon, busy storing
    # a pass: up to 3.8 s of the master's push of an append (20 clients, issue 11).
    box = inbox.Inbox.__new__(inbox.Inbox)
    box.urgent = SlowLink()
    box.teller = background.Latest(box._tell, "tell-written")
    box.tell_written(["v1"])             # returns at once, the daemon still busy
    assert box.urgent.entered.wait(30)
    box.tell_written(["v2"])
    box.tell_written(["v3"])
    assert box.urgent.told == []
    box.urgent.release.set()
    box.teller.flush()
    # v1 was under way; v2 was not taken before v3 came: only the newest of those goes
    assert box.urgent.told == ["v1", "v3"]
    box.tell_written(["v4"])
    box.teller.flush()
    assert box.urgent.told == ["v1", "v3", "v4"]


def test_a_value_whose_call_failed_does_not_stop_the_next():
    seen = []

    def call(value):
        seen.append(value)
        if value == 1:
            raise ValueError("a bug")
    latest = background.Latest(call)
    latest.put(1)
    latest.flush()
    latest.put(2)
    latest.flush()
    assert seen == [1, 2]
