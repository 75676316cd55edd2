"""Threads of wazuh-clusterd that wait for another one on the way of an append or a batch do
not poll: on 2.7, threading's timed waits sleep 0.5-50 ms between looks (a waiter woke up to
50 ms late, and nine sessions waiting for one read of client.keys took the GIL ~20 times a
second each from the thread hashing it). compat's Condition and Event block instead.

2.7's Condition.wait(timeout) sleeps through threading._sleep: counting its calls from the
waiting thread tells a polling wait from a blocking one (3.x has no such loop: always 0).
"""
from __future__ import absolute_import, division, print_function

import threading
import time
import zlib

import pytest

from wazuh_cluster import budget, compresscache, versions

WAIT = 30.0
HELD = 0.3  # how long the other thread keeps the waiter waiting (a 2.7 poll sleeps 0.5-50 ms)


@pytest.fixture
def polls(monkeypatch):
    """Calls of threading's polling sleep, by thread name."""
    counted = {}
    real = time.sleep

    def counting(seconds):
        name = threading.current_thread().name
        counted[name] = counted.get(name, 0) + 1
        real(seconds)
    monkeypatch.setattr(threading, "_sleep", counting, raising=False)
    return counted


def wait_until(predicate):
    deadline = time.time() + WAIT
    while not predicate() and time.time() < deadline:
        time.sleep(0.005)
    return predicate()


def test_a_session_waiting_for_another_s_read_of_a_big_file_does_not_poll(tmp_path, polls):
    path = str(tmp_path / "client.keys")
    data = b"001 agent any key\n" * 10000
    with open(path, "wb") as handle:
        handle.write(data)
    started, go, results = threading.Event(), threading.Event(), []

    def slow_read(p, reading=None, seen=None):
        started.set()
        go.wait(WAIT)
        return data, "0" * 64, 1

    store = versions.VersionStore(min_bytes=1000)
    reader = threading.Thread(target=lambda: results.append(store.read(path, slow_read)))
    reader.start()
    assert started.wait(WAIT)
    waiter = threading.Thread(target=lambda: results.append(store.read(path, slow_read)),
                              name="waiter")
    waiter.start()
    assert wait_until(lambda: store.waiting == 1)
    time.sleep(HELD)
    go.set()
    reader.join(WAIT)
    waiter.join(WAIT)
    assert [versions.bytes_of(r[0]) for r in results] == [data, data]
    assert polls.get("waiter", 0) == 0


def test_a_session_waiting_for_another_s_compression_does_not_poll(polls):
    started, go, made = threading.Event(), threading.Event(), []

    def slow_compress(data):
        made.append(data)
        started.set()
        go.wait(WAIT)
        return zlib.compress(data, 1)

    cache = compresscache.CompressedCache(slow_compress, min_bytes=1024)
    body, results = b"x" * 4096, []
    first = threading.Thread(target=lambda: results.append(cache.compress(body)))
    first.start()
    assert started.wait(WAIT)
    waiter = threading.Thread(target=lambda: results.append(cache.compress(body)),
                              name="waiter")
    waiter.start()
    time.sleep(HELD)
    go.set()
    first.join(WAIT)
    waiter.join(WAIT)
    assert len(made) == 1 and len(results) == 2 and results[0] == results[1]
    assert polls.get("waiter", 0) == 0


def test_a_grant_waiting_for_room_with_a_timeout_does_not_poll(polls):
    room = budget.Budget(100, share=100)
    first = room.holder("first")
    assert room.acquire(first, 100)
    granted = []
    waiter = threading.Thread(target=lambda: granted.append(
        room.acquire(room.holder("second"), 50, timeout=WAIT)), name="waiter")
    waiter.start()
    assert wait_until(lambda: room.stats()["waiting"] == 1)
    time.sleep(HELD)
    room.release(first, 100)
    waiter.join(WAIT)
    assert granted == [True]
    assert polls.get("waiter", 0) == 0
