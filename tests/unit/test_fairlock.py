"""fairlock.FairLock: waiters get the lock in the order they asked, a returning holder last."""
from __future__ import absolute_import, division, print_function

import threading

import pytest

from wazuh_cluster import fairlock, internal_link

from test_groupcommit import wait_until  # noqa: I100 - a bounded, polling wait


def test_waiters_get_the_lock_in_the_order_they_asked_and_a_returning_holder_last():
    # Ten sync threads called the internal daemon over one link; one that released the lock
    # and asked again at once mostly got it again, and a push's manifest waited 6.5 s for
    # the others' calls (issue 11, append p99).
    lock = fairlock.FairLock()
    order = []
    lock.acquire()
    threads = []
    for k in range(4):
        def run(name="waiter%d" % k):
            with lock:
                order.append(name)
        threads.append(threading.Thread(target=run))
        threads[-1].start()
        wait_until(lambda k=k: lock.waiting() == k + 1)   # queued before the next one starts
    for _ in range(3):
        lock.release()
        lock.acquire()      # at once, as a sync thread pushing again: after every waiter
        order.append("holder")
    lock.release()
    for thread in threads:
        thread.join(30)
    assert order == ["waiter0", "waiter1", "waiter2", "waiter3", "holder", "holder", "holder"]
    assert lock.waiting() == 0


def test_an_unheld_lock_is_taken_at_once_and_cannot_be_released_twice():
    lock = fairlock.FairLock()
    with lock:
        assert lock.waiting() == 0
    with lock:
        pass
    with pytest.raises(RuntimeError):
        lock.release()


def test_the_internal_daemons_link_serves_its_callers_first_come_first_served():
    link = internal_link.InternalLink("/nonexistent/socket")
    assert isinstance(link._lock, fairlock.FairLock)
    assert isinstance(link.urgent()._lock, fairlock.FairLock)
