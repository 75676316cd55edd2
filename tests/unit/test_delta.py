"""Deltas of big files: the prefix/suffix delta, the store of versions, the sender's record of
what a peer holds, and the receiver's checks (hostile entries refused, nothing written)."""
from __future__ import absolute_import, division, print_function

import hashlib
import os
import threading
import time

import pytest
from test_receive import BASE_NS, ITEMS, EXCLUDE, home, log, outside, put  # noqa: F401

from wazuh_cluster import delta, deltarx, deltasend, protocol, versions
from wazuh_cluster.sync import read_stable

KEYS = "etc/client.keys"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def keys(count, start=1):
    return b"".join(b"%03d agent%05d any %064x\n" % (i % 1000, i, i)
                    for i in range(start, start + count))


BIG = keys(3000)  # ~90 KB, over the default threshold
WAIT = 30  # bound of every wait for another thread (never reached when the code is right)


def line(i):
    return b"%03d agent%05d any %064x\n" % (i % 1000, i, i)


# -- delta.make / delta.apply -------------------------------------------------------------------

CASES = [
    ("empty base", b"", BIG),
    ("empty result", BIG, b""),
    ("both empty", b"", b""),
    ("identical", BIG, BIG),
    ("append", BIG, BIG + line(99999)),
    ("prepend", BIG, line(99999) + BIG),
    ("middle edit", BIG, BIG.replace(line(1500), line(1500).replace(b"any", b"10.0.0.1"))),
    ("removal", BIG, BIG.replace(line(1500), b"")),
    ("last line removed", BIG, BIG[:-len(line(3000))]),
    ("two distant edits", BIG, BIG.replace(line(2), b"").replace(line(2999), b"")),
    ("rewrite", BIG, keys(3000, start=5000)),
    ("repeated bytes", b"a" * 200000, b"a" * 200001),
    ("one byte", b"x", b"y"),
]


@pytest.mark.parametrize("label,base,new", CASES, ids=[c[0] for c in CASES])
def test_applying_the_delta_to_its_base_gives_the_new_version(label, base, new):
    made = delta.make(base, new)
    assert made.base_size == len(base)
    assert made.head + made.tail <= min(len(base), len(new))
    assert delta.apply(base, made.head, made.tail, made.middle, made.result_size()) == new


def test_one_line_changes_cost_one_line():
    for new in (BIG + line(99999), BIG.replace(line(1500), line(1500)[:-2] + b"f\n"),
                BIG.replace(line(1500), b"")):
        assert len(delta.make(BIG, new).middle) <= len(line(1))
    assert delta.make(BIG, BIG).middle == b""


def test_prefix_and_suffix_are_found_across_blocks_and_at_every_offset():
    base = os.urandom(3 * delta.BLOCK + 17)
    for at in (0, 1, delta.BLOCK - 1, delta.BLOCK, 2 * delta.BLOCK + 5, len(base) - 1):
        new = base[:at] + b"!" + base[at + 1:]
        if new == base:
            continue
        made = delta.make(base, new)
        assert (made.head, made.tail, made.middle) == (at, len(base) - at - 1, b"!")


def test_a_version_whole_at_the_start_of_the_other_is_compared_without_slices(monkeypatch):
    # Every client.keys append linked the versions through 64 KiB slices of both (2.4 ms at
    # 9.4 MB, once a second on a busy master); one of them whole at the start of the other
    # is one comparison. Anything else still goes through the blocks.
    sliced = []
    real = delta._forward
    monkeypatch.setattr(delta, "_forward", lambda x, lo, hi: sliced.append(lo) or real(x, lo, hi))
    base = os.urandom(3 * delta.BLOCK + 17)
    assert delta.common_prefix(base, base + b"new line\n") == len(base)
    assert delta.common_prefix(base + b"new line\n", base) == len(base)
    assert delta.common_prefix(base, base) == len(base)
    assert delta.common_prefix(b"", base) == 0
    made = delta.make(base, base + b"x")
    assert (made.head, made.tail, made.middle) == (len(base), 0, b"x")
    assert sliced == []
    edited = bytearray(base + b"x")
    edited[delta.BLOCK + 3] ^= 1
    edited = bytes(edited)
    assert delta.common_prefix(base, edited) == delta.BLOCK + 3 and sliced


def test_a_rewrite_is_not_worth_a_delta_an_append_is():
    assert not delta.worth(delta.make(BIG, keys(3000, start=5000)), len(BIG))
    assert delta.worth(delta.make(BIG, BIG + line(99999)), len(BIG) + len(line(1)))


@pytest.mark.parametrize("head,tail,middle,size", [
    (len(BIG), 1, b"", len(BIG) + 1),       # past the base
    (10, 10, b"abc", 24),                    # does not add up
    (0, 0, b"abc", 2),
])
def test_apply_refuses_bounds_that_do_not_hold(head, tail, middle, size):
    with pytest.raises(delta.DeltaError):
        delta.apply(BIG, head, tail, middle, size)


def good_entry(**changes):
    new = BIG + line(99999)
    value = delta.entry(KEYS, sha(new), BASE_NS, sha(BIG), delta.make(BIG, new))
    value.update(changes)
    return value


@pytest.mark.parametrize("changes,word", [
    ({"head": -1}, "head"), ({"tail": True}, "tail"), ({"size": "3"}, "size"),
    ({"result_size": 1.5}, "result_size"), ({"base_size": None}, "base_size"),
    ({"mtime_ns": -5}, "mtime_ns"), ({"sha256": "A" * 64}, "sha256"),
    ({"base_sha256": "0" * 63}, "base_sha256"), ({"name": 7}, "name"),
    ({"head": 10 ** 12}, "past the base"), ({"size": 2}, "result_size"),
    ({"result_size": 49 << 20, "size": (49 << 20) - len(BIG)}, "over the limit"),
])
def test_hostile_entries_are_refused_naming_the_field(changes, word):
    with pytest.raises(delta.DeltaError) as info:
        delta.parse_entry(good_entry(**changes), 48 << 20)
    assert word in str(info.value)


def test_a_good_entry_passes():
    assert delta.parse_entry(good_entry(), 48 << 20)["name"] == KEYS


# -- versions.VersionStore ----------------------------------------------------------------------

def test_the_store_keeps_big_files_within_its_budget_least_recent_out():
    store = versions.VersionStore(min_bytes=1000, budget=3 * len(BIG))
    store.put(sha(b"small"), b"small")
    assert store.get(sha(b"small")) is None
    olds = [BIG + line(i) for i in range(4)]
    for data in olds:
        store.put(sha(data), data)
    assert store.bytes <= store.budget
    assert store.get(sha(olds[0])) is None
    assert versions.bytes_of(store.get(sha(olds[3]))) == olds[3]


def test_a_file_is_read_once_while_its_fingerprint_holds(tmp_path):
    path = str(tmp_path / "client.keys")
    with open(path, "wb") as handle:
        handle.write(BIG)
    reads = []

    def read(p, reading=None, seen=None):
        reads.append(p)
        return read_stable(p, reading, seen)
    store = versions.VersionStore(min_bytes=1000)
    first = store.read(path, read)
    second = store.read(path, read)
    assert versions.bytes_of(first[0]) == versions.bytes_of(second[0]) == BIG and len(reads) == 1
    with open(path, "ab") as handle:
        handle.write(line(99999))
    assert versions.bytes_of(store.read(path, read)[0]) == BIG + line(99999) and len(reads) == 2


def test_sessions_reading_a_changed_big_file_at_once_read_it_once(tmp_path):
    # Every session of a master read its own copy of client.keys after each append: memory
    # grew with the clients. The second session waits for the first one's read.
    path = str(tmp_path / "client.keys")
    with open(path, "wb") as handle:
        handle.write(BIG)
    started, go, reads, results = threading.Event(), threading.Event(), [], []

    def slow_read(p, reading=None, seen=None):
        reads.append(p)
        started.set()
        go.wait(WAIT)
        return read_stable(p, reading, seen)
    store = versions.VersionStore(min_bytes=1000)
    threads = [threading.Thread(target=lambda: results.append(store.read(path, slow_read)))
               for _ in range(2)]
    threads[0].start()
    assert started.wait(WAIT)
    threads[1].start()
    deadline = time.time() + WAIT
    while store.waiting < 1 and time.time() < deadline:
        time.sleep(0.01)
    waited = store.waiting
    go.set()
    for thread in threads:
        thread.join(WAIT)
    assert waited == 1 and len(reads) == 1
    assert [versions.bytes_of(r[0]) for r in results] == [BIG, BIG] and \
        results[0][0] is results[1][0]


def _hashing_counted(monkeypatch):
    """The bytes given to compat.sha256 objects (made or updated) from now on."""
    from wazuh_cluster import compat
    real, fed = compat.sha256, []

    class Counted(object):
        def __init__(self, data=b"", inner=None):
            self.inner = real() if inner is None else inner
            self.update(data)

        def update(self, data):
            fed.append(len(data))
            self.inner.update(data)

        def copy(self):
            return Counted(inner=self.inner.copy())

        def hexdigest(self):
            return self.inner.hexdigest()
    monkeypatch.setattr(compat, "sha256", Counted)
    return fed


def _big_keys(tmp_path, monkeypatch):
    """(path of a client.keys of BIG, a VersionStore, the counted SHA-256 feeds)."""
    path = str(tmp_path / "client.keys")
    with open(path, "wb") as handle:
        handle.write(BIG)
    return path, versions.VersionStore(min_bytes=1000), _hashing_counted(monkeypatch)


def test_an_append_is_hashed_from_the_state_after_the_version_held(tmp_path, monkeypatch):
    # wazuh-clusterd hashed the whole 9.4 MB client.keys again after every append (~6 ms
    # of SHA-256 a second on the master); the bytes held prove the prefix, the tail is hashed.
    path, store, fed = _big_keys(tmp_path, monkeypatch)
    assert store.read(path, read_stable)[1] == sha(BIG) and sum(fed) == len(BIG)
    del fed[:]
    with open(path, "ab") as handle:
        handle.write(line(99999))
    got = store.read(path, read_stable)
    assert versions.bytes_of(got[0]) == BIG + line(99999) and got[1] == sha(BIG + line(99999))
    assert sum(fed) == len(line(99999)) and store.tail_hashed == 1
    with open(path, "ab") as handle:   # and again from the new version's state
        handle.write(line(99998))
    assert store.read(path, read_stable)[1] == sha(BIG + line(99999) + line(99998))
    assert sum(fed) == len(line(99999) + line(99998)) and store.tail_hashed == 2


def test_an_edit_in_place_with_an_append_is_hashed_whole(tmp_path, monkeypatch):
    # The held bytes are compared, not assumed from the size: an agent's key changed in the
    # middle (same length) while another is appended must not get the tail's checksum.
    path, store, fed = _big_keys(tmp_path, monkeypatch)
    store.read(path, read_stable)
    del fed[:]
    edited = bytearray(BIG)
    edited[len(BIG) // 2] ^= 1
    with open(path, "r+b") as handle:
        handle.write(bytes(edited) + line(99999))
    got = store.read(path, read_stable)
    assert got[1] == sha(bytes(edited) + line(99999)) and store.tail_hashed == 0
    assert sum(fed) == len(edited) + len(line(99999))
    shrunk = bytes(edited)[:-10]    # and a file made shorter than the version held
    with open(path, "wb") as handle:
        handle.write(shrunk)
    assert store.read(path, read_stable)[1] == sha(shrunk) and store.tail_hashed == 0


def test_a_read_of_a_file_seen_small_does_not_extend_the_version_held(tmp_path, monkeypatch):
    # A file seen small is read outside the store's one big read at a time: had it grown
    # big again from the version held, that read extended the shared tail beside the big
    # read's, and one version's bytes were the other's append.
    path, store, fed = _big_keys(tmp_path, monkeypatch)
    held = store.read(path, read_stable)[0]
    with open(path, "wb") as handle:
        handle.write(b"small\n")

    def grown_back(p, reading, seen=None):
        with open(p, "wb") as handle:   # between the lstat and the read
            handle.write(BIG + line(99999))
        return read_stable(p, reading, seen)
    got = store.read(path, grown_back)
    assert versions.bytes_of(got[0]) == BIG + line(99999) and got[1] == sha(BIG + line(99999))
    assert store.tail_hashed == 0 and whole(held) == BIG


def whole(version):
    """Its bytes, without joining it (a join is kept: the chain would end there)."""
    return version[0:len(version)]


def _reads_counted(monkeypatch):
    """The sizes asked of every read of a file opened by sync.read_stable."""
    from wazuh_cluster import sync as sync_mod
    asked = []
    real_open = open

    class Counted(object):
        def __init__(self, handle):
            self.handle = handle

        def read(self, size):
            asked.append(size)
            return self.handle.read(size)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(sync_mod, "open", lambda *a: Counted(real_open(*a)), raising=False)
    return asked


def test_a_chain_of_appends_is_read_as_tails_with_the_exact_bytes_and_checksum(tmp_path,
                                                                                monkeypatch):
    # Each append was read into a new string of the whole file (a new 9.4 MB mapping with
    # malloc's threshold fixed: ~2 300 page faults an append on the master). The file is
    # compared with the version held in pieces and only what follows is read.
    monkeypatch.setattr(versions, "CHUNK_BYTES", 4096)  # BIG in several pieces
    path, store, fed = _big_keys(tmp_path, monkeypatch)
    first = store.read(path, read_stable)
    asked = _reads_counted(monkeypatch)
    data, shas = BIG, [first[1]]
    for i in range(5):
        data += line(99000 + i)
        with open(path, "ab") as handle:
            handle.write(line(99000 + i))
        del fed[:]
        got = store.read(path, read_stable)
        assert whole(got[0]) == data and got[1] == sha(data)
        assert sum(fed) == len(line(99000 + i))      # only the tail hashed
        assert store.bytes == len(data)             # the version held counts base and tail
        shas.append(got[1])
    assert max(asked) <= 4096 and len(asked) > 5 * len(BIG) // 4096  # never whole
    assert store.tail_hashed == 5
    # A delta from any version of the chain is the tail since, and applies to the exact bytes.
    for i, base_sha in enumerate(shas[:-1]):
        base = BIG + b"".join(line(99000 + j) for j in range(i))
        made = store.delta(base_sha, shas[-1], got[0])
        assert made.middle == data[len(base):] and made.base_size == len(base)
        result = delta.apply(base, made.head, made.tail, made.middle, len(data))
        assert sha(result) == shas[-1] and result == data
    # A whole-file send joins it once; the store then holds the joined string only.
    joined = versions.bytes_of(got[0])
    assert joined == data and versions.bytes_of(store.get(shas[-1])) is joined
    assert store.bytes == len(data)


@pytest.mark.parametrize("where", ["middle", "chunk end", "chunk start", "last byte held",
                                   "inside the tail"])
def test_an_edit_anywhere_in_the_version_held_as_tails_is_caught(tmp_path, monkeypatch, where):
    # The version held is bytes plus appended tails: an edit in either, or across a piece's
    # border, must get the whole file read and hashed, never the held bytes with a new tail.
    monkeypatch.setattr(versions, "CHUNK_BYTES", 4096)  # BIG in several pieces
    path, store, fed = _big_keys(tmp_path, monkeypatch)
    store.read(path, read_stable)
    data = BIG
    for i in range(3):
        data += line(99000 + i)
        with open(path, "ab") as handle:
            handle.write(line(99000 + i))
        store.read(path, read_stable)
    at = {"middle": len(BIG) // 2, "chunk end": versions.CHUNK_BYTES - 1,
          "chunk start": versions.CHUNK_BYTES, "last byte held": len(data) - 1,
          "inside the tail": len(BIG) + 3}[where]
    edited = bytearray(data)
    edited[at] ^= 1
    edited = bytes(edited) + line(99999)
    with open(path, "r+b") as handle:
        handle.write(edited)
    hashed = store.tail_hashed
    got = store.read(path, read_stable)
    assert whole(got[0]) == edited and got[1] == sha(edited)
    assert store.tail_hashed == hashed and store.bytes == len(edited)
    # ...and the next append is a tail of that version again.
    with open(path, "ab") as handle:
        handle.write(line(99998))
    got = store.read(path, read_stable)
    assert whole(got[0]) == edited + line(99998)
    assert got[1] == sha(edited + line(99998)) and store.tail_hashed == hashed + 1


def test_a_long_tail_is_folded_into_the_version_s_bytes(tmp_path, monkeypatch):
    # Tails stay short (their copies below malloc's mmap threshold): past FOLD_BYTES the
    # version is one string again, and the chain of links and deltas goes on across it.
    monkeypatch.setattr(versions, "FOLD_BYTES", 3 * len(line(0)))
    path = str(tmp_path / "client.keys")
    with open(path, "wb") as handle:
        handle.write(BIG)
    store = versions.VersionStore(min_bytes=1000)
    shas = [store.read(path, read_stable)[1]]
    data = BIG
    for i in range(8):
        data += line(99000 + i)
        with open(path, "ab") as handle:
            handle.write(line(99000 + i))
        got = store.read(path, read_stable)
        assert whole(got[0]) == data and got[1] == sha(data)
        assert store.bytes == len(data)
        assert len(got[0]) - len(got[0]._parts[0]) <= versions.FOLD_BYTES
        shas.append(got[1])
    assert store.tail_hashed == 8
    made = store.delta(shas[0], shas[-1], got[0])
    assert made.middle == data[len(BIG):]


def test_a_version_is_a_snapshot_whatever_is_appended_after_it():
    # Versions of a chain share one tail; a version extended again from an older one (a
    # file truncated back and appended otherwise) must not change what the others hold.
    first = versions.Version(b"abc")
    second = first.extended(b"de")
    third = second.extended(b"fg")
    other = second.extended(b"XY")
    assert [versions.bytes_of(v) for v in (first, second, third, other)] == \
        [b"abc", b"abcde", b"abcdefg", b"abcdeXY"]
    assert third[1:6] == b"bcdef" and third[4:7] == b"efg" and third[0:2] == b"ab"
    assert third.startswith(second) and not other.startswith(third)
    assert other.startswith(b"abcdeX") and not other.startswith(b"abcdeZ")
    assert third.matches(2, b"cdef") and not third.matches(2, b"cdeX")
    assert not third.matches(5, b"fgh")  # past its end


def test_a_version_held_as_tails_goes_whole_as_one_byte_string():
    # The encoder sends byte strings: a version of a chain of appends is joined for a
    # whole-file send (a peer that holds no version of the chain), with its exact size.
    from wazuh_cluster import sync as sync_mod
    version = versions.Version(BIG).extended(line(1)).extended(line(2))
    batch = sync_mod.Batch()
    batch.add_file(KEYS, version, sha(BIG + line(1) + line(2)), 1)
    assert batch.data == [BIG + line(1) + line(2)] and isinstance(batch.data[0], bytes)
    assert batch.files[0]["size"] == batch.size == len(BIG + line(1) + line(2))


def test_small_files_are_never_waited_for(tmp_path):
    path = str(tmp_path / "small")
    with open(path, "wb") as handle:
        handle.write(b"x" * 10)
    reads = []

    def read(p, reading=None, seen=None):
        reads.append(p)
        return read_stable(p, reading, seen)
    store = versions.VersionStore(min_bytes=1000)
    assert store.read(path, read)[0] == store.read(path, read)[0] == b"x" * 10
    assert len(reads) == 2


def test_older_versions_are_links_and_a_delta_spans_several_changes(tmp_path):
    # The store held every version's bytes (two 9.4 MB client.keys plus the one being read)
    # and a client more than one append behind got the whole file.
    path = str(tmp_path / "client.keys")
    lines = [line(i) for i in range(3000)]
    edits = [lambda: lines.append(line(5000)),                 # an agent appended
             lambda: lines.__setitem__(2500, line(6000)),      # a key line edited
             lambda: lines.pop(2600),                          # an agent removed
             lambda: lines.append(line(5001)),
             lambda: lines.__setitem__(2990, line(6001))]
    store = versions.VersionStore(min_bytes=1000)
    seen = []
    for edit in [lambda: None] + edits:
        edit()
        with open(path, "wb") as handle:
            handle.write(b"".join(lines))
        os.utime(path, None)
        seen.append(versions.bytes_of(store.read(path, read_stable)[0]))
    newest = seen[-1]
    assert store.bytes == len(newest)  # one version's bytes, whatever came before
    for base in seen[:-1]:
        made = store.delta(sha(base), sha(newest), newest)
        assert made is not None and made.base_size == len(base)
        assert delta.apply(base, made.head, made.tail, made.middle, len(newest)) == newest
        assert len(made.middle) < len(newest) // 2
    assert store.delta(sha(b"never seen"), sha(newest), newest) is None


def test_a_delta_is_made_once_per_pair_and_needs_the_base():
    store = versions.VersionStore(min_bytes=1000)
    new = BIG + line(99999)
    assert store.delta(sha(BIG), sha(new), new) is None  # base never stored
    store.put(sha(BIG), BIG)
    made = store.delta(sha(BIG), sha(new), new)
    again = store.delta(sha(BIG), sha(new), new)
    assert made.middle == line(99999) and again is made and store.deltas_made == 1


def test_a_peer_many_appends_behind_still_gets_a_delta(tmp_path):
    # The master appends an agent a second; a client busy applying may hold a version several
    # appends old. Each version read is kept as a prefix of the next, not as bytes.
    path = str(tmp_path / "client.keys")
    store = versions.VersionStore(min_bytes=1000, budget=2 * len(BIG) + 10000)
    data, held = BIG, []
    for i in range(6):
        with open(path, "wb") as handle:
            handle.write(data)
        assert versions.bytes_of(store.read(path, read_stable)[0]) == data
        held.append(sha(data))
        data += line(90000 + i)
    newest = data[:-len(line(90005))]
    assert store.bytes == len(newest)  # one version in bytes, the others as links
    assert store.get(held[0]) is None
    made = store.delta(held[0], held[-1], newest)
    assert made == delta.make(BIG, newest) and made.middle == newest[len(BIG):]
    # A version read while the file changed (not the newest known of its path) is linked too.
    racy = newest + line(91000)
    store.put(sha(racy), racy)
    grown = racy + line(91001)
    with open(path, "wb") as handle:
        handle.write(grown)
    assert versions.bytes_of(store.read(path, read_stable)[0]) == grown
    assert store.bytes == len(grown)
    assert store.delta(sha(racy), sha(grown), grown).middle == line(91001)
    # ...and the newest known version stays linked, though the two held filled the budget:
    # the new bytes were put first and evicted it, and every peer holding it (under churn,
    # most clients) got the whole client.keys (issue 11, the master's memory at 20 clients).
    assert store.delta(held[-1], sha(grown), grown).middle == line(91000) + line(91001)
    newest = grown
    # A rewrite links the old versions too, but a delta from them is not worth it.
    rewrite = keys(3000, start=5000)
    with open(path, "wb") as handle:
        handle.write(rewrite)
    assert versions.bytes_of(store.read(path, read_stable)[0]) == rewrite
    assert store.bytes == len(rewrite)
    assert store.delta(held[0], sha(rewrite), rewrite) is None


def test_big_files_are_read_one_at_a_time_small_ones_freely(tmp_path):
    # The store's bound (versions.most) counts one big file read beside the versions it
    # holds: two sessions reading two big files at once would hold two.
    import threading
    paths = []
    for name, data in (("a", BIG), ("b", BIG + line(1)), ("small", b"x" * 10)):
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as handle:
            handle.write(data)
    store = versions.VersionStore(min_bytes=1000, budget=2 * len(BIG))
    big = {"in": 0, "most": 0}
    lock, gate = threading.Lock(), threading.Event()

    def read(p, reading=None, seen=None):
        if p.endswith("small"):
            return read_stable(p, reading, seen)
        with lock:
            big["in"] += 1
            big["most"] = max(big["most"], big["in"])
        gate.wait(30)
        with lock:
            big["in"] -= 1
        return read_stable(p, reading, seen)
    threads = [threading.Thread(target=store.read, args=(p, read)) for p in paths[:2]]
    for t in threads:
        t.start()
    while big["in"] == 0:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)   # room for the second to get in, were it let in
    assert store.read(paths[2], read)[0] == b"x" * 10   # a small file does not wait
    gate.set()
    for t in threads:
        t.join(30)
    assert big["most"] == 1
    assert [versions.bytes_of(store.read(p, read)[0]) for p in paths[:2]] == [BIG, BIG + line(1)]


# -- deltasend.PeerVersions ---------------------------------------------------------------------

def test_the_sender_uses_only_what_the_peer_acknowledged(tmp_path):
    store = versions.VersionStore(min_bytes=1000)
    store.put(sha(BIG), BIG)
    peer = deltasend.PeerVersions(store, str(tmp_path), {}, None)
    new = BIG + line(99999)
    got = (new, sha(new), BASE_NS)
    assert peer.delta_for(KEYS, got) is None  # nothing known of the peer yet
    peer.note_sent([{"name": KEYS, "sha256": sha(BIG), "size": len(BIG)}],
                   {KEYS: "synchronized"})
    base, made = peer.delta_for(KEYS, got)
    assert base == sha(BIG) and made.middle == line(99999)
    assert peer.refused([{"name": KEYS}], [KEYS, "etc/other"]) == [KEYS]
    assert peer.delta_for(KEYS, got) is None  # a refused base is forgotten
    peer.note_sent([{"name": KEYS, "sha256": sha(BIG), "size": len(BIG)}], {KEYS: "failed"})
    assert KEYS not in peer.held


def test_a_round_s_manifest_older_than_what_the_peer_applied_keeps_that_version(tmp_path):
    # A client's bucket manifest is refreshed once per scan_interval: under an append a
    # second a round read the version of seconds before, after a push the client had
    # applied; the delta from it was refused and 9.4 MB went whole (20 clients, issue 11).
    from wazuh_cluster import manifest
    store = versions.VersionStore(min_bytes=1000)
    newer = BIG + line(99998)
    store.put(sha(BIG), BIG)
    store.put(sha(newer), newer)
    items = {"client.keys": type("Item", (), {"kind": "file"})()}
    peer = deltasend.PeerVersions(store, str(tmp_path), items, None)
    peer.read = lambda name: None
    peer.note_sent([{"name": KEYS, "sha256": sha(newer), "size": len(newer),
                     "mtime_ns": BASE_NS + 2}], {KEYS: "synchronized"})
    mine = {KEYS: manifest.Entry(sha(newer), BASE_NS + 2, "client.keys")}
    peer.note_round(mine, {KEYS: manifest.Entry(sha(BIG), BASE_NS + 1, "client.keys")})
    assert peer.holds(KEYS, sha(newer))
    # A manifest as new as what it applied, or newer, is the peer's word.
    peer.note_round(mine, {KEYS: manifest.Entry(sha(BIG), BASE_NS + 3, "client.keys")})
    assert peer.holds(KEYS, sha(BIG))
    # Its mtime-only update moves what is known of that version.
    peer.note_meta([{"name": KEYS, "sha256": sha(BIG), "mtime_ns": BASE_NS + 9}],
                   {KEYS: "synchronized"})
    assert peer.held[KEYS] == (sha(BIG), BASE_NS + 9)
    peer.note_round(mine, {KEYS: manifest.Entry(sha(newer), BASE_NS + 4, "client.keys")})
    assert peer.holds(KEYS, sha(BIG))


def test_the_sender_remembers_nothing_of_small_files(tmp_path):
    # A master sends each client thousands of small shared files: a reason kept per small
    # file per peer grew with clients times files for the whole session.
    store = versions.VersionStore(min_bytes=1000)
    peer = deltasend.PeerVersions(store, str(tmp_path), {}, None)
    small = [{"name": "etc/shared/g/f%05d.conf" % i, "sha256": "0" * 64, "size": 10}
             for i in range(500)]
    peer.note_sent(small, dict((e["name"], "synchronized") for e in small))
    peer.note_sent(small, dict((e["name"], "failed") for e in small))
    assert peer.held == {} and peer.forgot == {}
    # a big file that is now small is forgotten; one held again loses its old reason
    peer.note_sent([{"name": KEYS, "sha256": sha(BIG), "size": len(BIG)}], {KEYS: "failed"})
    assert list(peer.forgot) == [KEYS]
    peer.note_sent([{"name": KEYS, "sha256": sha(BIG), "size": len(BIG)}],
                   {KEYS: "synchronized"})
    assert peer.held == {KEYS: (sha(BIG), None)} and peer.forgot == {}
    peer.note_sent([{"name": KEYS, "sha256": sha(b"x"), "size": 1}], {KEYS: "synchronized"})
    assert peer.held == {} and list(peer.forgot) == [KEYS]


def test_no_store_no_delta(tmp_path):
    peer = deltasend.PeerVersions(None, str(tmp_path), {}, None)
    peer.note_sent([{"name": KEYS, "sha256": sha(BIG), "size": len(BIG)}],
                   {KEYS: "synchronized"})
    assert peer.delta_for(KEYS, (BIG, sha(BIG + b"x"), 1)) is None


# -- deltarx.Expander (the receiver) -------------------------------------------------------------

def expander(home, log):  # noqa: F811
    return deltarx.Expander(home, ITEMS, EXCLUDE, "client", log)


def batch_for(base, new, name=KEYS, files=()):
    """A sync_files header and data: whole `files` (name, bytes) first, then one delta."""
    made = delta.make(base, new)
    header = {"files": [{"name": n, "sha256": sha(d), "mtime_ns": BASE_NS, "size": len(d)}
                        for n, d in files], "meta": [], "delete": [], "delete_dirs": [],
              "deltas": [delta.entry(name, sha(new), BASE_NS, sha(base), made)]}
    return header, b"".join([d for _, d in files] + [made.middle])


def test_a_delta_becomes_a_whole_file_after_the_batch_files(home, log):  # noqa: F811
    put(home, KEYS, BIG)
    new = BIG + line(99999)
    other = ("etc/shared/default/a.conf", b"conf")
    header, data = batch_for(BIG, new, files=[other])
    header, data, refused = expander(home, log).expand(header, data, "master", "master-1")
    assert refused == [] and "deltas" not in header
    assert [f["name"] for f in header["files"]] == [other[0], KEYS]
    assert data == b"conf" + new and header["files"][1]["size"] == len(new)


def test_the_base_we_wrote_is_not_hashed_again_while_its_fingerprint_holds(home,  # noqa
                                                                           log):  # noqa
    # Each append made every client hash its 9.4 MB client.keys before applying the delta.
    # Shown with a recorded checksum that is not the file's: trusted only while the file's
    # stat is the one recorded with it.
    put(home, KEYS, BIG)
    rx = expander(home, log)
    recorded = sha(b"what we recorded")
    rx.note_written(deltarx.written_row(home, KEYS, recorded))
    new = BIG + line(99999)
    header, data = batch_for(BIG, new)
    header["deltas"][0]["base_sha256"] = recorded
    assert rx.expand(header, data, "master", "master-1")[2] == []
    os.utime(os.path.join(home, *KEYS.split("/")), None)  # the ctime moves: hashed again
    header, data = batch_for(BIG, new)
    header["deltas"][0]["base_sha256"] = recorded
    assert rx.expand(header, data, "master", "master-1")[2] == [KEYS]


def test_the_base_we_wrote_is_not_read_again_while_its_fingerprint_holds(home,  # noqa
                                                                        log):  # noqa
    # 20 clients on one host each read their 9.4 MB client.keys twice per append (the base,
    # then the removal guard's old text): the bytes we wrote are kept and served instead.
    put(home, KEYS, BIG)
    rx = expander(home, log)
    kept = BIG[:10] + BIG[10:]   # equal bytes, another object: the one kept must come back
    rx.note_written(deltarx.written_row(home, KEYS, sha(BIG)), kept)
    path = os.path.join(home, *KEYS.split("/"))
    assert rx.kept(KEYS, os.lstat(path)) is kept
    parts = KEYS.split("/")
    assert deltarx.read_base(home, parts, len(BIG), sha(BIG), rx.written[KEYS]) is kept
    header, data = batch_for(BIG, BIG + line(99999))
    header, data, refused = rx.expand(header, data, "master", "master-1")
    assert refused == [] and data == BIG + line(99999)
    os.utime(path, None)  # the ctime moves: read from the file again
    assert rx.kept(KEYS, os.lstat(path)) is None
    again = deltarx.read_base(home, parts, len(BIG), sha(BIG), rx.written[KEYS])
    assert again == BIG and again is not kept


def test_a_delta_alone_in_its_batch_is_not_copied_after_it_is_made(home, log):  # noqa: F811
    put(home, KEYS, BIG)
    header, data = batch_for(BIG, BIG + line(99999))
    header, out, _ = expander(home, log).expand(header, data, "master", "master-1")
    # the result is the batch's data itself; parse_batch passes it on as that object, kept
    # for the next delta without a copy (a memoryview of it would hide it on 2.7)
    from wazuh_cluster import inbox
    assert out == BIG + line(99999)
    incoming, _, _ = inbox.parse_batch(header, out)
    assert incoming[0].data is out and deltarx.as_bytes(incoming[0].data) is out
    assert deltarx.as_bytes(memoryview(out)[1:]) == out[1:]


def test_a_checked_result_is_not_hashed_again_by_the_receiver(home, log):  # noqa: F811
    # Every client hashed each 9.4 MB delta result twice: in _apply, then in receive.py.
    # Only the very bytes object checked counts, under the very checksum checked.
    from wazuh_cluster import inbox
    from wazuh_cluster.receive import Incoming, Receiver
    put(home, KEYS, BIG)
    rx = expander(home, log)
    new = BIG + line(99999)
    header, data = batch_for(BIG, new)
    header, data, refused = rx.expand(header, data, "master", "master-1")
    incoming, _, _ = inbox.parse_batch(header, data)
    copy = Incoming(KEYS, memoryview(data[:1] + data[1:]), sha(new), BASE_NS)
    other = Incoming(KEYS, incoming[0].data, sha(b"other"), BASE_NS)
    assert rx.proves(copy) is False and rx.proves(other) is False
    assert rx.proves(Incoming(KEYS, data[:1] + data[1:], sha(new), BASE_NS)) is False
    assert rx.proves(incoming[0]) is True     # on 2.7 too: the very object checked
    receiver = Receiver(home, ITEMS, EXCLUDE, log, role="client")
    receiver.proven = rx.proves
    states, _ = receiver.apply_batch(incoming, [], [], sender_role="master")
    with open(os.path.join(home, *KEYS.split("/")), "rb") as handle:
        assert states == {KEYS: "synchronized"} and handle.read() == new



@pytest.mark.parametrize("case", ["append", "removal", "bytes not the result"])
def test_an_append_to_the_bytes_we_wrote_hashes_only_what_was_appended(home, log, case,  # noqa
                                                                       monkeypatch):
    # Every client hashed its whole 9.4 MB client.keys again per append to check the result
    # (10 ms each, 20 clients on 2 cores). The object that hashed the bytes we wrote goes
    # on with the appended ones; anything else is hashed whole, and a wrong checksum is
    # refused either way.
    from wazuh_cluster import compat
    hashed = []
    real = compat.sha256

    def counting(data=b""):
        hashed.append(len(data))
        return real(data)
    monkeypatch.setattr(compat, "sha256", counting)
    put(home, KEYS, BIG)
    rx = expander(home, log)
    first = BIG + line(99999)
    header, out, refused = rx.expand(*(batch_for(BIG, first) + ("master", "m")))
    assert refused == [] and out == first
    put(home, KEYS, first)
    kept = out if case != "bytes not the result" else out[:1] + out[1:]
    del hashed[:]
    rx.note_written(deltarx.written_row(home, KEYS, sha(first)), kept)
    # bytes that came whole are hashed as they are kept, not at the next append
    assert hashed == ([] if kept is out else [len(first)])
    new = first + line(100000) if case != "removal" else first.replace(line(7), b"")
    del hashed[:]
    header, out, refused = rx.expand(*(batch_for(first, new) + ("master", "m")))
    assert refused == [] and out == new
    assert hashed == ([len(new)] if case == "removal" else [])
    # the next append goes on from the result checked, as written and kept
    put(home, KEYS, new)
    rx.note_written(deltarx.written_row(home, KEYS, sha(new)), out)
    del hashed[:]
    header, last, refused = rx.expand(*(batch_for(new, new + line(7)) + ("master", "m")))
    assert refused == [] and last == new + line(7) and hashed == []
    wrong = batch_for(new, new + line(8))
    wrong[0]["deltas"][0]["sha256"] = sha(new + line(7))
    assert rx.expand(*(wrong + ("master", "m")))[2] == [KEYS]

def test_a_compressed_batch_is_expanded_too(home, log):  # noqa: F811
    put(home, KEYS, BIG)
    new = BIG.replace(line(7), b"")
    header, data = batch_for(BIG, new)
    stream = protocol.Inflater([protocol.compress(data)], 1 << 20)
    _, out, refused = expander(home, log).expand(header, stream, "master", "m")
    assert refused == [] and out == new


@pytest.mark.parametrize("case", ["hand-edited", "missing", "symlink", "wrong result sha",
                                  "master-owned from a client"])
def test_a_delta_on_another_base_is_refused_and_nothing_is_written(home, log, outside,  # noqa
                                                                   case):
    new = BIG + line(99999)
    header, data = batch_for(BIG, new)
    sender = "master"
    if case == "hand-edited":
        put(home, KEYS, BIG.replace(line(5), b""))
    elif case == "symlink":
        with open(os.path.join(outside, "keys"), "wb") as handle:
            handle.write(BIG)
        os.symlink(os.path.join(outside, "keys"), os.path.join(home, KEYS))
    elif case == "wrong result sha":
        put(home, KEYS, BIG)
        header["deltas"][0]["sha256"] = sha(b"something else")
    elif case == "master-owned from a client":
        put(home, KEYS, BIG)
        sender = "client"
    before = sorted(os.listdir(os.path.join(home, "etc")))
    rx = expander(home, log)
    header, out, refused = rx.expand(header, data, sender, "peer-9")
    assert refused == [KEYS] and header["files"] == [] and out == b""
    assert sorted(os.listdir(os.path.join(home, "etc"))) == before
    assert rx.refused == 1
    assert len(log.lines) == 1 and KEYS in log.lines[0] and "peer-9" in log.lines[0]


@pytest.mark.parametrize("mangle", [
    lambda h, d: (dict(h, deltas="nope"), d),
    lambda h, d: (dict(h, deltas=[dict(h["deltas"][0], size=10 ** 9)]), d),
    lambda h, d: (h, d + b"extra bytes"),
    lambda h, d: (h, d[:-1]),
    lambda h, d: (dict(h, deltas=[dict(h["deltas"][0], head=-1)]), d),
    lambda h, d: (dict(h, deltas=[dict(h["deltas"][0], result_size=10 ** 12)]), d),
], ids=["not a list", "size past the data", "data left over", "data short", "negative",
        "result too big"])
def test_malformed_deltas_are_all_refused_and_the_files_kept(home, log, mangle):  # noqa: F811
    put(home, KEYS, BIG)
    other = ("etc/shared/default/a.conf", b"conf")
    header, data = mangle(*batch_for(BIG, BIG + line(99999), files=[other]))
    header, out, refused = expander(home, log).expand(header, data, "master", "m")
    assert refused in ([KEYS], [])
    assert [f["name"] for f in header["files"]] == [other[0]] and out == b"conf"
    assert len(log.lines) == 1 and "refused a delta" in log.lines[0]
    with open(os.path.join(home, KEYS), "rb") as handle:
        assert handle.read() == BIG


def test_a_batch_without_deltas_is_untouched(home, log):  # noqa: F811
    header = {"files": [], "meta": []}
    assert expander(home, log).expand(header, b"", "master", "m") == (header, b"", [])


# -- the capability in HELLO_INFO ----------------------------------------------------------------

def test_only_known_features_a_peer_announces_are_taken():
    from wazuh_cluster import peers
    assert peers._features({"features": ["delta", "teleport"]}) == frozenset(["delta"])
    for hello in ({}, {"features": "delta"}, {"features": None}, [], None):
        assert peers._features(hello) == frozenset()  # an older peer: whole files
    settings = peers.make_settings(node_name="m", cluster_name="c", key="k" * 32,
                                   role="master", features=("delta",))
    assert peers._hello(settings)["features"] == ["delta"]
    assert "features" not in peers._hello(settings._replace(features=()))


# -- the internal daemon takes the receiver's hash of what it wrote ------------------------------

def test_the_scanner_takes_the_writers_hash_while_the_fingerprint_holds(tmp_path):
    from test_scanner import EXCLUDE as SCAN_EXCLUDE, ITEMS as SCAN_ITEMS
    from wazuh_cluster import scanner
    home = str(tmp_path)
    os.makedirs(os.path.join(home, "etc"))
    put(home, KEYS, BIG)
    scan = scanner.Scanner(home, SCAN_ITEMS, SCAN_EXCLUDE)
    scan.full_pass()
    new = BIG + line(99999)
    put(home, KEYS, new)
    row = deltarx.written_row(home, KEYS, "%064x" % 7)  # not the real hash: proves no read
    scan.hint(KEYS, row[1:6], row[6])
    assert scan.poll().changed == [KEYS] and scan.get(KEYS)["sha256"] == "%064x" % 7
    # A hint whose fingerprint is not the file's is ignored: the file is read.
    row = deltarx.written_row(home, KEYS, "%064x" % 8)
    put(home, KEYS, BIG)
    scan.hint(KEYS, row[1:6], row[6])
    assert scan.poll().changed == [KEYS] and scan.get(KEYS)["sha256"] == sha(BIG)


def test_each_new_version_read_is_told_with_the_fingerprint_it_was_read_at(tmp_path,
                                                                          monkeypatch):
    """The internal daemon records the checksum wazuh-clusterd took of a client.keys it read
    (hashtell.py) only at the very fingerprint of the descriptor it read: told once per new
    version, not when it is taken from memory, nor for a file that changed while read."""
    from wazuh_cluster import hashtell, scanner
    path, store, _fed = _big_keys(tmp_path, monkeypatch)
    calls = []
    newest = threading.Event()

    def call(cmd, args):
        calls.append((cmd, args))
        if args["sha256"] == sha(BIG + line(99999)):
            newest.set()
    teller = hashtell.HashTeller(call, str(tmp_path), ["client.keys"])
    told = []

    def tell(*args):
        told.append(args)
        teller.tell(*args)
    store.told = tell
    before = int(time.time() * 1e9)
    got = store.read(path, read_stable)
    assert told == [(path, scanner.fingerprint(os.lstat(path)), got[1], told[0][3])]
    assert before <= told[0][3] <= int(time.time() * 1e9)
    store.read(path, read_stable)             # the same version, from memory: not told again
    assert len(told) == 1
    with open(path, "ab") as handle:
        handle.write(line(99999))
    got = store.read(path, read_stable)
    assert len(told) == 2 and told[1][2] == got[1] == sha(BIG + line(99999))
    assert newest.wait(60)   # sent from the teller's thread
    teller.stop()
    assert calls[-1] == ("hashed", {"name": "client.keys", "sha256": got[1],
                                    "fingerprint": list(scanner.fingerprint(os.lstat(path))),
                                    "hashed_at": told[1][3]})
    assert len(calls) <= 2

    def chmodded(p, reading=None, seen=None):
        """Its mode changed during the read (a new ctime): read_stable's by-name check does
        not look at those, the fingerprint the internal daemon would record does."""
        real_fstat = os.fstat
        fstats = []

        def fstat(fd):
            fstats.append(fd)
            if len(fstats) == 2:
                os.chmod(p, 0o600)
            return real_fstat(fd)
        monkeypatch.setattr(os, "fstat", fstat)
        try:
            return read_stable(p, reading, seen)
        finally:
            monkeypatch.setattr(os, "fstat", real_fstat)
    with open(path, "ab") as handle:
        handle.write(line(99998))
    got = store.read(path, chmodded)
    assert got[1] == sha(BIG + line(99999) + line(99998)) and len(told) == 2
