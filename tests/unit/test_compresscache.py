"""compresscache: a large body sent to several peers is compressed once."""
from __future__ import absolute_import, division, print_function

import os
import threading
import zlib

from wazuh_cluster import protocol
from wazuh_cluster.compresscache import CompressedCache


class Counting(object):
    """zlib level 1 that counts its calls; `gate` (an Event) holds it back when given."""

    def __init__(self, gate=None):
        self.calls = 0
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, data):
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60)
        return zlib.compress(data, 1)


def body(tag, size=4096):
    return (tag * size)[:size]


def test_the_same_large_body_is_compressed_once():
    zlib_ = Counting()
    cache = CompressedCache(zlib_, min_bytes=1024, budget=1 << 20)
    first = cache.compress(body(b"client.keys "))
    assert cache.compress(body(b"client.keys ")) == first
    assert zlib_.calls == 1 and cache.hits == 1
    assert zlib.decompress(first) == body(b"client.keys ")
    assert cache.bytes == len(first)


def test_small_bodies_are_not_kept():
    zlib_ = Counting()
    cache = CompressedCache(zlib_, min_bytes=1024)
    cache.compress(b"x" * 100)
    cache.compress(b"x" * 100)
    assert zlib_.calls == 2 and cache.bytes == 0


def test_the_budget_drops_the_least_recently_used():
    zlib_ = Counting()
    one = len(zlib.compress(body(b"a"), 1))
    cache = CompressedCache(zlib_, min_bytes=1024, budget=2 * one)
    for tag in (b"a", b"b", b"a", b"c"):  # "b" is the least recently used when "c" comes
        cache.compress(body(tag))
    assert cache.bytes <= 2 * one
    calls = zlib_.calls
    cache.compress(body(b"a"))
    assert zlib_.calls == calls  # kept
    cache.compress(body(b"b"))
    assert zlib_.calls == calls + 1  # dropped, compressed again


def test_a_session_waits_for_the_one_compressing_the_same_body():
    gate = threading.Event()
    zlib_ = Counting(gate)
    cache = CompressedCache(zlib_, min_bytes=1024)
    results = []
    first = threading.Thread(target=lambda: results.append(cache.compress(body(b"k"))))
    first.start()
    assert zlib_.started.wait(60)
    second = threading.Thread(target=lambda: results.append(cache.compress(body(b"k"))))
    second.start()
    gate.set()
    first.join(60)
    second.join(60)
    assert zlib_.calls == 1 and len(results) == 2 and results[0] == results[1]


def test_protocol_compress_shares_large_bodies():
    data = body(b"shared body ", 2 * protocol.compresscache.MIN_BYTES)
    hits = protocol._SHARED.hits
    assert protocol.compress(data) == protocol.compress(data)
    assert protocol._SHARED.hits == hits + 1
    assert protocol.Inflater([protocol.compress(data)], len(data)).read_all() == data


def test_parts_are_compressed_unjoined_and_share_the_cache_with_the_whole_body():
    cache = CompressedCache(Counting(), min_bytes=1024, budget=1 << 20)
    parts = [b"\x00\x00\x00\x02{}", body(b"agent.conf "), body(b"client.keys ", 9000)]
    streamed = cache.compress_parts(parts)
    assert zlib.decompress(streamed) == b"".join(parts)
    assert cache.compress(b"".join(parts)) == streamed and cache.hits == 1


def test_a_smaller_bound_drops_the_oldest_streams_at_once():
    cache = CompressedCache(zlib.compress, min_bytes=1024, budget=1 << 20)
    for tag in (b"a ", b"b ", b"c "):
        cache.compress(os.urandom(2000) + body(tag))
    kept = cache.bytes
    cache.resize(kept // 2)
    assert 0 < cache.bytes <= kept // 2
