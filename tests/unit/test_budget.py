"""budget.Budget: bounded, fair (FIFO, per-holder share), urgent grants first, refusals at once."""
from __future__ import absolute_import, division, print_function

import random
import threading

import pytest

from wazuh_cluster import budget, config, versions
from wazuh_cluster.compat import monotonic

# The largest idle RSS of a wazuh-clusterd measured after a first sync of 100 000 agents and
# 10 000 shared files (bench_scale.py, the master at 10 clients: 51.4 MB with a 24 MiB budget,
# 60.3 MB with a 32 MiB budget; README, Performance: the bound), in MiB (what the benchmarks
# print as MB, and the unit of the 100 MB target); its store of versions then held that
# client.keys (9.5 MB).
BASELINE_MIB = 61
STORE_HELD = 9 << 20
BOUNDED = 24 << 20  # the default cluster.max_inflight_bytes: a bound under 100 MB


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
    b.release(greedy, 10)
    small.join(0.1)
    assert small.is_alive() and order == []  # 5 bytes fit now, but "big" asked first
    # (the threads record their grants after returning, in whatever order they run: the
    # order of the list is the scheduler's, so the line is checked while it holds)
    b.release(greedy, 80)
    big.join(5)
    small.join(5)
    assert sorted(order) == ["big", "small"] and b.used == 85


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


# -- sending (issue 11 item 4): one pool inside the budget, its own fair line ---------------

def test_sends_never_hold_more_than_the_pool_so_a_whole_receive_share_always_fits():
    b = budget.Budget(100, share=40, send_limit=60, cache=10)
    assert b.send_limit == 60 and b.used == 10          # the cache's part is counted for good
    s1, s2 = b.holder("s1", sends=True), b.holder("s2", sends=True)
    assert s1.share == 50                                 # the pool: send_limit - cache
    assert b.acquire(s1, 30) and b.acquire(s2, 20)
    assert not b.acquire(s2, 1, timeout=0.05)             # the pool is full...
    assert b.acquire(b.holder("reader"), 40, timeout=0)   # ...a receive of a share still fits
    assert b.used == 100 and b.stats()["sending"] == 60
    b.release(s1, 30)
    assert b.stats()["sending"] == 30 and b.used == 70


def test_a_send_waiting_for_the_pool_never_holds_a_receive_back():
    b = budget.Budget(100, share=50, send_limit=50)
    s = b.holder("s", sends=True)
    assert b.acquire(s, 50)
    order = []
    t = acquire_in_thread(b, b.holder("more", sends=True), 10, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    assert b.acquire(b.holder("reader"), 50, timeout=0)   # not queued behind the send
    assert order == []
    b.release(s, 50)
    t.join(5)
    assert order == ["more"]


def test_senders_are_served_in_the_order_they_asked():
    b = budget.Budget(100, share=50, send_limit=50)
    first = b.holder("first", sends=True)
    assert b.acquire(first, 45)
    order = []
    big = acquire_in_thread(b, b.holder("big", sends=True), 40, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    small = acquire_in_thread(b, b.holder("small", sends=True), 5, order)
    assert wait_for(lambda: b.stats()["waiting"] == 2)
    b.release(first, 5)
    small.join(0.1)
    assert small.is_alive() and order == []  # 5 bytes fit the pool, but "big" asked first
    b.release(first, 40)                       # (the list's order is the scheduler's)
    big.join(5)
    small.join(5)
    assert sorted(order) == ["big", "small"] and b.used == 45


def test_a_sender_at_its_share_waits_for_its_own_releases_outside_the_line():
    b = budget.Budget(100, share=50, send_limit=50)
    slow = b.holder("slow", share=20, sends=True)
    assert b.acquire(slow, 20)
    order = []
    t = acquire_in_thread(b, slow, 10, order)             # its peer reads slowly...
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    assert b.acquire(b.holder("other", sends=True), 30, timeout=1)   # ...others go on
    b.release(slow, 20)
    t.join(5)
    assert order == ["slow"]


def test_sends_and_receives_of_many_sessions_all_complete_with_a_small_budget():
    """No deadlock, no starvation: every holder acquires and releases many times, the
    budget never goes past its total and the sends never past their pool."""
    b = budget.Budget(64, share=32, reserve=16, send_limit=32, cache=8)
    errors, done, seen = [], [], []
    lock = threading.Lock()

    def run(name, sends, seed):
        rng = random.Random(seed)
        h = b.holder(name, sends=sends)
        try:
            for _ in range(200):
                n = rng.randint(1, h.share)
                assert b.acquire(h, n, timeout=30), "%s starved" % name
                with lock:
                    seen.append((b.used, b.sending))
                b.release(h, rng.randint(0, n))
                b.release_all(h)
            done.append(name)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=("h%d" % k, k % 2 == 0, k)) for k in range(8)]
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(done) == 8
    assert max(u for u, _ in seen) <= 64 and max(s for _, s in seen) <= 32
    assert b.used == 8 and b.sending == 8                 # only the cache's part is left


def test_a_receiving_holder_may_never_ask_for_what_the_sends_may_hold():
    b = budget.Budget(100, share=40, send_limit=30, cache=10)
    whole = b.holder("client's session with its master", share=100)
    assert whole.share == 70 and b.grantable(whole, 1000) == 70
    assert b.acquire(b.holder("s", sends=True), 20)
    assert b.acquire(whole, 70, timeout=0)                # fits beside the cache and sends


def test_the_daemon_budget_keeps_a_twelfth_for_urgent_grants_and_a_quarter_of_the_rest_for_sends():
    b = budget.for_daemon(48 << 20)
    assert (b.total, b.reserve) == (44 << 20, 4 << 20)
    assert (b.share, b.send_limit, b.cache) == (22 << 20, 11 << 20, (11 << 20) // 2)
    assert b.holder("s", sends=True).share == (11 << 20) - (11 << 20) // 2


def drive_to_the_worst_case(b):
    """Every kind of grant at once, as much as each may take: sends, receives, urgent
    answers; the most `used` reaches."""
    sender = b.holder("sends", sends=True)
    assert b.acquire(sender, b.grantable(sender), timeout=0)
    receivers = [b.holder("peer%d" % i) for i in range(8)]
    for holder in receivers:
        room = b.total - b.used
        if room > 0:
            assert b.acquire(holder, min(room, b.grantable(holder)), timeout=0)
    assert not b.acquire(receivers[0], 1, timeout=0)     # full for peers' requests
    urgent = b.holder("answers to our calls")
    while b.acquire(urgent, min(1 << 20, b.grantable(urgent)), timeout=0, urgent=True):
        pass
    return b.used


@pytest.mark.parametrize("inflight", [16 << 20, 32 << 20, 64 << 20, (32 << 20) + 12345])
def test_the_daemon_budget_never_holds_more_than_cluster_max_inflight_bytes(inflight):
    b = budget.for_daemon(inflight)
    worst = drive_to_the_worst_case(b)
    assert b.peak == worst and inflight - (1 << 20) < worst <= inflight
    # the compression cache is part of it, and the receive share still fits beside the sends
    assert b.cache > 0 and b.share + b.send_limit <= b.total


def test_the_default_budget_is_bounded_under_100_mb():
    """README, Performance: the largest baseline measured (idle RSS after the first sync of
    100 000 agents and 10 000 shared files) plus budget.bound() stays under 100 MB with the
    default cluster.max_inflight_bytes (24 MiB since issue 11 item 4, where parking and
    batches granted what they hold made it as quick as 64 MiB); 64 MiB does not promise it.
    Either way the budget reaches exactly its part of the bound, and a master takes a
    client's session share whole beside its sends."""
    problems = []
    options = config.read_options([], problems)
    assert not problems and options.max_inflight_bytes == BOUNDED
    most = versions.most(options.delta_store_bytes)
    for inflight, under_100_mb in ((options.max_inflight_bytes, True), (64 << 20, False)):
        assert budget.bound(inflight, most) == inflight + ((2 * 10 + 1) << 20)
        bound = budget.bound(inflight, most, STORE_HELD)
        assert ((BASELINE_MIB << 20) + bound < 100 << 20) == under_100_mb
        daemon = budget.for_daemon(inflight)
        assert drive_to_the_worst_case(daemon) <= inflight
        assert daemon.total - daemon.send_limit >= 2 * options.max_client_message_bytes


def test_a_wait_abandoned_gives_up_and_one_not_abandoned_keeps_its_place():
    b = budget.Budget(100, share=50, send_limit=50)
    first = b.holder("first", sends=True)
    assert b.acquire(first, 50)
    gone = threading.Event()
    order = []
    waiting = acquire_in_thread(b, b.holder("waiting", sends=True), 50, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    quitter = threading.Thread(target=lambda: order.append(
        b.acquire(b.holder("quitter", sends=True), 10, abandon=gone.is_set)))
    quitter.start()
    assert wait_for(lambda: b.stats()["waiting"] == 2)
    gone.set()                                  # its session closed
    quitter.join(10)
    assert order == [False] and b.stats()["waiting"] == 1
    b.release(first, 50)
    waiting.join(5)
    assert order == [False, "waiting"]


def test_parked_frames_hold_no_window_back_and_stay_within_the_reserve():
    """budget.py, Parking: a parked frame is beside `total` (normal grants do not count it),
    granted at once or not at all, within `park_limit` and within total + reserve."""
    b = budget.Budget(100, share=60, reserve=20)      # park_limit: half the reserve
    assert b.park_limit == 10
    normal, reader = b.holder("windows"), b.holder("reader")
    assert b.acquire(normal, 60)
    assert b.park(reader, 8, copies=4)                # the frame, and its copies while read
    assert not b.park(reader, 3)                      # past park_limit
    b.release(reader, 4)                              # the copies: the frame is open
    assert b.acquire(b.holder("next"), 40, timeout=0)  # 60 + 40: the parked 8 not counted
    assert b.used == 108 and b.stats()["parked"] == 8 and b.used <= b.total + b.reserve
    assert not b.park(b.holder("full"), 2, copies=11)  # past total + reserve: refused, not waited


def test_a_parked_frame_becomes_part_of_its_window_granted_in_line():
    b = budget.Budget(100, share=60, reserve=20)
    reader, other = b.holder("reader"), b.holder("other")
    assert b.park(reader, 8)
    assert b.acquire(other, 50)
    assert not b.acquire(reader, 52, timeout=0, unpark=8)     # 50 + 60 > 100
    b.release(other, 50)
    assert b.acquire(reader, 52, timeout=0, unpark=8)
    assert (reader.held, reader.parked, b.used, b.stats()["parked"]) == (60, 0, 60, 0)
    with pytest.raises(budget.Refused):
        b.acquire(reader, 1, unpark=1)                         # nothing parked any more


def test_the_daemon_budget_parks_within_its_urgent_reserve():
    b = budget.for_daemon(24 << 20)
    assert 0 < b.park_limit <= b.reserve // 2
    assert drive_to_the_worst_case(b) <= 24 << 20
    parked = b.holder("parked")
    while b.park(parked, 64 << 10, copies=128 << 10):
        pass
    assert b.used <= 24 << 20 and b.stats()["parked"] <= b.park_limit


def test_a_send_goes_ahead_of_the_receives_waiting_in_line():
    """budget.py, Sends go ahead: a push of a few KB waited in the common queue behind the
    keepalive batches' windows; it needs no place there (a receive's share fits beside all
    that sends may hold)."""
    b = budget.Budget(100, share=60, send_limit=30)
    reader = b.holder("reader")
    assert b.acquire(reader, 50)
    order = []
    window = acquire_in_thread(b, b.holder("window"), 60, order)   # 50 + 60 > 100: waits
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    assert b.acquire(b.holder("push", sends=True), 10, timeout=0)   # not behind it
    b.release(reader, 50)
    window.join(5)
    assert order == ["window"] and b.used == 70


def test_a_waiting_send_is_not_starved_by_receives_that_hand_the_room_on():
    """Review: sends no longer stand in the common queue, and receives do not yield to them:
    while receive windows overlap (one granted before the last is given back, as on a busy
    master), the room free never reaches what the send waits for, however long it waited."""
    b = budget.Budget(100, share=60, send_limit=40)
    assert b.acquire(b.holder("r0"), 40)
    last = b.holder("r1")
    assert b.acquire(last, 30)                                     # 30 free
    order = []
    send = acquire_in_thread(b, b.holder("push", sends=True), 40, order)
    assert wait_for(lambda: b.stats()["waiting"] == 1)
    for n in range(20):
        nxt = b.holder("r%d" % (n + 2))
        granted = b.acquire(nxt, 30, timeout=0.05)   # a new window, before the last one ends
        b.release(last, 30)
        last = nxt if granted else last
        if order:
            break
    send.join(2)
    assert order == ["push"]


def test_a_holder_whose_grants_wait_in_line_together_never_holds_more_than_its_share():
    """Review: a session's share was checked once, before its grant stands in the common
    queue; with parking the workers of one session wait there together (_unpark), each
    passed the check while the others were not granted yet, and all are granted."""
    b = budget.Budget(100, share=50)
    hog = b.holder("hog", share=100)
    assert b.acquire(hog, 100)
    session = b.holder("session")
    order = []
    workers = [acquire_in_thread(b, session, 40, order) for _ in range(2)]
    assert wait_for(lambda: b.stats()["waiting"] == 2)
    b.release(hog, 100)
    assert wait_for(lambda: len(order) >= 1)
    threading.Event().wait(0.2)
    assert session.held <= session.share
    b.release_all(session)
    for t in workers:
        t.join(5)


def test_the_copies_of_parked_frames_leave_room_in_the_reserve_for_urgent_grants():
    """Review: park_limit bounds the parked frames to half the reserve, but their copies
    while they are read (FRAME_COPIES times the frame, held until the frame is read: a peer
    sending it slowly holds them up to the channel's io_timeout) come from the rest of the
    reserve unbounded; once `total` is taken, an answer to our own call waits behind them."""
    b = budget.Budget(100, share=50, reserve=30)
    assert b.park_limit == 15
    assert b.acquire(b.holder("receives", share=100), 100)       # total taken, as under load
    peer = b.holder("peer")
    if b.park(peer, 10, copies=20):                               # a frame read slowly
        assert b.acquire(b.holder("answer"), 10, timeout=0.1, urgent=True)
