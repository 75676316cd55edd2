"""budget.Budget: bounded, fair (FIFO, per-holder share), urgent grants first, refusals at once."""
from __future__ import absolute_import, division, print_function

import threading

import pytest

from wazuh_cluster import budget
from wazuh_cluster.compat import monotonic


def wait_for(predicate, timeout=10.0, step=0.005):
    end = monotonic() + timeout
    while not predicate():
        if monotonic() > end:
            return False
        threading.Event().wait(step)
    return True


def acquire_in_thread(b, holder, n, order, urgent=False):
    def run():
        b.acquire(holder, n, urgent=urgent)
        order.append(holder.name)
    t = threading.Thread(target=run)
    t.daemon = True
    t.start()
    return t


def test_grants_never_exceed_the_total_and_releases_wake_waiters():
    b = budget.Budget(100, share=100)
    h = b.holder("a")
    assert b.acquire(h, 60)
    assert not b.acquire(b.holder("b"), 50, timeout=0.05)   # would pass the total
    order = []
    t = acquire_in_thread(b, b.holder("c"), 50, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    assert order == [] and b.used == 60
    b.release(h, 60)
    t.join(5)
    assert order == ["c"] and b.used == 50 and b.peak == 60


def test_waiters_are_served_in_the_order_they_asked_even_when_a_later_one_would_fit():
    b = budget.Budget(100, share=100)
    greedy = b.holder("greedy")
    assert b.acquire(greedy, 90)
    order = []
    big = acquire_in_thread(b, b.holder("big"), 80, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    small = acquire_in_thread(b, b.holder("small"), 5, order)
    assert wait_for(lambda: b.stats()["waiting"] == 2)
    assert not b.acquire(greedy, 5, timeout=0.05)  # greedy cannot cut in line either
    assert order == []                      # 5 bytes fit, but "big" asked first
    b.release(greedy, 90)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]


def test_one_holder_never_holds_more_than_its_share_and_does_not_block_the_others():
    b = budget.Budget(100, share=40)
    greedy, other = b.holder("greedy"), b.holder("other")
    assert b.acquire(greedy, 40)
    order = []
    t = acquire_in_thread(b, greedy, 10, order)   # waits for its own releases...
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    assert b.acquire(other, 30, timeout=1)        # ...without holding the others back
    assert order == []
    b.release(greedy, 40)
    t.join(5)
    assert order == ["greedy"] and greedy.held == 10


def test_urgent_grants_go_ahead_of_waiting_requests_and_may_use_the_reserve():
    b = budget.Budget(100, share=100, reserve=50)
    h = b.holder("requests")
    assert b.acquire(h, 100)
    order = []
    t = acquire_in_thread(b, b.holder("waiting"), 10, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    answer = b.holder("answer")
    assert b.acquire(answer, 40, timeout=1, urgent=True)   # past the total, within the reserve
    assert not b.acquire(answer, 20, timeout=0.05, urgent=True)
    b.release(h, 100)
    t.join(5)
    assert order == ["waiting"]


def test_a_size_that_can_never_be_granted_is_refused_at_once():
    b = budget.Budget(100, share=40)
    h = b.holder("a")
    with pytest.raises(budget.Refused) as info:
        b.acquire(h, 41)
    assert "at most 40" in info.value.message
    assert b.grantable(h) == 40 and b.grantable(h, 10) == 10
    assert b.grantable(b.holder("c", share=1000)) == 100


def test_release_never_gives_back_more_than_held():
    b = budget.Budget(100)
    h = b.holder("a")
    b.acquire(h, 30)
    b.release(h, 50)
    b.release_all(h)
    assert b.used == 0 and h.held == 0
