"""summary: bucket summaries of manifests, their wire form and checks, and the catalog's
"summary" command and bucket-filtered manifests (real scanner, real SQLite)."""
from __future__ import absolute_import, division, print_function

import os

import pytest

from wazuh_cluster import compat, summary
from wazuh_cluster.errors import ProtocolError, RequestError
from wazuh_cluster.manifest import Entry
from wazuh_cluster.sync import extra_dirs, plan_round

from test_catalog import Clock, home, make  # noqa: F401 - the catalog's fixtures
from test_scanner import ITEMS, SEC, write  # noqa: I100

SHA_A = "a" * 64
SHA_B = "b" * 64


def wire(entries, mtime_is_data=False, form=1):
    built = summary.Summary(form)
    for name, sha, mtime in entries:
        built.add(name, sha, mtime, mtime_is_data)
    return built.to_wire()


def test_a_name_falls_in_the_same_bucket_on_every_interpreter():
    # CRC-32 of the UTF-8 name: the same on 2.7 and 3.x, text or bytes.
    assert summary.bucket_of(u"etc/shared/default/agent.conf") == \
        summary.bucket_of(b"etc/shared/default/agent.conf") == 247
    assert all(0 <= summary.bucket_of("f%d" % n) < summary.BUCKETS for n in range(1000))


def test_an_entry_has_the_same_value_on_every_interpreter():
    # The first 16 bytes of SHA-256(name NUL sha [NUL mtime seconds]), big-endian.
    assert summary.entry_value(b"etc/shared/default/agent.conf", b"a" * 64, None) == \
        0x790d84caa76fecd696070ea9ad52b8d7
    assert summary.entry_value(b"queue/agent-info/web01-any", b"b" * 64,
                               1700000000987654321) == 0x778da5afe781d026dfbc7dfa7398fca7


def test_a_summary_does_not_depend_on_the_order_of_its_entries():
    entries = [("f%d" % n, SHA_A, n * SEC) for n in range(500)]
    assert wire(entries) == wire(list(reversed(entries)))
    assert sum(count for count, _ in wire(entries)) == 500


def test_any_change_of_name_or_checksum_changes_exactly_its_bucket():
    entries = [("f%d" % n, SHA_A, 0) for n in range(500)]
    base = wire(entries)
    for changed in ([("f7", SHA_B, 0)] + entries[:7] + entries[8:],      # edited
                    entries[:7] + entries[8:],                           # deleted
                    entries + [("extra", SHA_A, 0)]):                    # added
        new = wire(changed)
        differ = summary.differing(summary.parse(base), summary.parse(new))
        names = [e[0] for e in set(entries) ^ set(changed)]
        assert differ == sorted(set(summary.bucket_of(n) for n in names))


def test_mtime_counts_in_whole_seconds_only_where_it_is_data():
    one = [("queue/agent-info/a", SHA_A, 5 * SEC + 100)]
    # a 2.7 receiver sets mtimes through a float: nanoseconds off, the same second
    assert wire(one, True) == wire([("queue/agent-info/a", SHA_A, 5 * SEC + 900)], True)
    assert wire(one, True) != wire([("queue/agent-info/a", SHA_A, 6 * SEC + 100)], True)
    assert wire(one, False) == wire([("queue/agent-info/a", SHA_A, 9 * SEC)], False)



def test_form_2_mixes_the_mtime_seconds_into_the_base_by_a_multiplication():
    base = summary.entry_value(b"queue/agent-info/a", SHA_A.encode("ascii"), None)
    assert summary.mixed(base, 5 * SEC + 999) == (base * 11) % (1 << 128)
    one = [("queue/agent-info/a", SHA_A, 5 * SEC + 100), ("queue/agent-info/b", SHA_B, 7 * SEC)]
    assert wire(one, True, 2) == wire([("queue/agent-info/a", SHA_A, 5 * SEC + 900),
                                       ("queue/agent-info/b", SHA_B, 7 * SEC)], True, 2)
    assert wire(one, True, 2) != wire(one, True, 1)        # the forms differ where it is data
    assert wire(one, False, 2) == wire(one, False, 1)      # and nowhere else
    moved = [(name, sha, mtime + SEC) for name, sha, mtime in one]
    swapped = [(one[0][0], SHA_A, one[1][2]), (one[1][0], SHA_B, one[0][2])]
    for other in (moved, swapped, one[:1]):
        assert wire(other, True, 2) != wire(one, True, 2)


@pytest.mark.parametrize("bad", ["2", 2.0, True, 0, 3, [2]])
def test_a_bad_form_is_refused(bad):
    with pytest.raises(ProtocolError):
        summary.parse_form(bad)
    assert summary.parse_form(None) == 1 and summary.parse_form(2) == 2

@pytest.mark.parametrize("bad", [
    None, {}, [], [[0, "0" * 32]] * (summary.BUCKETS - 1), [[0, "0" * 32]] * (summary.BUCKETS + 1),
    [[-1, "0" * 32]] * summary.BUCKETS, [[True, "0" * 32]] * summary.BUCKETS,
    [[1.5, "0" * 32]] * summary.BUCKETS, [[0, "0" * 31]] * summary.BUCKETS,
    [[0, "A" * 32]] * summary.BUCKETS, [[0, 5]] * summary.BUCKETS, [[0]] * summary.BUCKETS,
    [[0, "0" * 32, 1]] * summary.BUCKETS, [{"count": 0}] * summary.BUCKETS,
])
def test_a_malformed_summary_from_a_peer_is_refused(bad):
    with pytest.raises(ProtocolError):
        summary.parse(bad)


@pytest.mark.parametrize("bad", ["1", [-1], [summary.BUCKETS], [True], [1.0], {"1": 1},
                                 list(range(summary.BUCKETS)) + [0]])
def test_bad_bucket_lists_are_refused(bad):
    with pytest.raises(ProtocolError):
        summary.parse_buckets(bad)


def test_buckets_are_compared_a_slice_at_a_time():
    assert summary.steps(list(range(70)), 32) == [list(range(32)), list(range(32, 64)),
                                                  list(range(64, 70))]
    assert summary.steps([]) == []


def test_extra_group_folders_come_from_all_our_groups_when_only_some_buckets_are_compared():
    entry = Entry("x" * 64, 0, "shared")
    items = dict((item.name, item) for item in ITEMS)
    theirs = {"etc/shared/gone/a.conf": entry, "etc/shared/web/b.conf": entry}
    # our web group has no file in the buckets compared: it is not extra
    assert extra_dirs({}, theirs, items, ["etc/shared/web"]) == ["etc/shared/gone"]
    assert plan_round({}, theirs, items, True, ["etc/shared/web"])[3] == ["etc/shared/gone"]


def _buckets_of(cat, args):
    return summary.parse(cat.handle("summary", args)["buckets"])


def test_catalog_summary_of_a_hand_edit_differs_in_one_bucket(home):  # noqa: F811
    clock = Clock()
    cat = make(home, role="client", node_name="c1", clock=clock)
    for n in range(40):
        write(home, "etc/shared/default/f%02d.conf" % n, "from master %d" % n)
    cat.tick(clock())
    before = cat.handle("summary", {"source": "master", "groups": True})
    assert before["groups"] == ["etc/shared/default"]
    assert sum(c for c, _ in before["buckets"]) == 40
    write(home, "etc/shared/default/f07.conf", "BY HAND EDITED")
    clock.t += 20  # a peer's round refreshes our copies at most once per scan_interval
    after = _buckets_of(cat, {"source": "master", "groups": True})
    assert summary.differing(summary.parse(before["buckets"]), after) == \
        [summary.bucket_of("etc/shared/default/f07.conf")]
    # the entries of that bucket, and of it only
    bucket = summary.bucket_of("etc/shared/default/f07.conf")
    files = cat.handle("manifest", {"source": "master", "buckets": [bucket]})["files"]
    assert "etc/shared/default/f07.conf" in files
    assert set(summary.bucket_of(n) for n in files) == set([bucket])


def test_master_summarises_only_the_agent_info_a_client_reports(home):  # noqa: F811
    clock = Clock()
    cat = make(home, clock=clock)
    for name in ("web01-any", "db01-any", "mail01-any"):
        write(home, "queue/agent-info/" + name, "Linux " + name)
    cat.tick(clock())
    cat.handle("agent_nodes", {"rows": [["web01-any", "c1"], ["db01-any", "c1"],
                                        ["mail01-any", "c2"]]})
    c1 = _buckets_of(cat, {"source": "client", "node": "c1"})
    assert sum(c for c, _ in c1) == 2
    clock.t += 20
    # c1 itself (a database of its own: the master's records c2 as mail01's reporter, and
    # a client sends no agent-info its agents table says another node reported)
    other = make(home, role="client", node_name="c1", clock=clock, db_name="c1.db")
    other.tick(clock())
    assert sum(c for c, _ in _buckets_of(other, {"source": "client"})) == 3
    # the master wrote and checked them: c1's round looks at their folder, so a removal is
    # seen at once, an in-place edit at the latest by the full pass over the files the
    # master receives (test_round_basis: not sooner, once the records settled)
    write(home, "queue/agent-info/db01-any", "edited on the master", mtime_ns=None)
    os.unlink(os.path.join(home, "queue/agent-info/web01-any"))
    assert summary.bucket_of("queue/agent-info/web01-any") in summary.differing(
        c1, _buckets_of(cat, {"source": "client", "node": "c1"}))
    cat.tick(clock() + cat.foreign_scan_interval)
    assert summary.differing(c1, _buckets_of(cat, {"source": "client", "node": "c1"})) == \
        sorted(summary.bucket_of("queue/agent-info/" + n) for n in ("web01-any", "db01-any"))


def test_a_client_summary_looks_at_that_clients_rows_only(home):  # noqa: F811
    # A master built each client's summary from a pass over every client's rows (100 000
    # for 10 clients: 0.33 s of CPU per client round, most of an idle master's work).
    clock = Clock()
    cat = make(home, clock=clock)
    for n in range(30):
        write(home, "queue/agent-info/agent%02d-any" % n, "Linux %d" % n)
    cat.tick(clock())
    cat.handle("agent_nodes", {"rows": [["agent%02d-any" % n, "c1" if n < 3 else "c2"]
                                        for n in range(30)]})
    seen = []
    rows = cat.scanner.rows
    cat.scanner.rows = lambda *a: (seen.append(row) or row for row in rows(*a))
    c1 = _buckets_of(cat, {"source": "client", "node": "c1"})
    assert sum(c for c, _ in c1) == 3 and seen == []
    assert sum(c for c, _ in _buckets_of(cat, {"source": "client"})) == 30 and len(seen) >= 30


def _summarised(home, master_args):  # noqa: F811
    """A master's catalog with one agent-info file of client c1 and one shared file, and
    the summaries of both: (catalog, clock, c1's summary, the master's files' summary)."""
    clock = Clock()
    cat = make(home, clock=clock)
    write(home, "queue/agent-info/web01-any", "Linux web01")
    write(home, "etc/shared/default/a.conf", "one")
    cat.tick(clock())
    cat.handle("agent_nodes", {"rows": [["web01-any", "c1"]]})
    return (cat, clock, cat.handle("summary", {"source": "client", "node": "c1"}),
            cat.handle("summary", master_args))


def test_a_client_summary_stays_cached_when_only_master_files_change(home):  # noqa: F811
    cat, clock, client, master = _summarised(home, {"source": "master"})
    write(home, "etc/shared/default/a.conf", "two!")  # a shared file (or client.keys) changes
    clock.t += 20
    cat.tick(clock())
    assert cat.handle("summary", {"source": "client", "node": "c1"}) is client
    assert cat.handle("summary", {"source": "master"}) != master
    write(home, "queue/agent-info/web01-any", "Linux web01 again", mtime_ns=None)
    clock.t += 20
    cat.tick(clock())
    cat.tick(clock() + 700)  # the received items' full pass
    assert cat.handle("summary", {"source": "client", "node": "c1"}) != client


def test_summaries_are_cached_until_something_changes(home):  # noqa: F811
    clock = Clock()
    cat = make(home, clock=clock)
    write(home, "etc/shared/default/a.conf", "one")
    cat.tick(clock())
    first = cat.handle("summary", {"source": "master"})
    assert cat.handle("summary", {"source": "master"}) is first
    write(home, "etc/shared/default/b.conf", "two")
    clock.t += 20
    cat.tick(clock())
    assert cat.handle("summary", {"source": "master"}) != first


def test_bad_summary_requests(home):  # noqa: F811
    cat = make(home)
    for cmd, args in (("summary", {"source": "nobody"}), ("summary", {"node": 5}),
                      ("manifest", {"source": "master", "buckets": [999]})):
        with pytest.raises(RequestError):
            cat.handle(cmd, args)


@pytest.mark.parametrize("change", ["agent rows", "agent-info file"])
def test_agent_info_changes_keep_the_summary_of_the_masters_files(home, change):  # noqa: F811
    cat, clock, client, master = _summarised(home, {"source": "master", "groups": True})
    everything = cat.handle("summary", {})
    if change == "agent rows":
        cat.handle("agent_nodes", {"rows": [["web01-any", "c2"]]})  # a keepalive batch's
    else:
        write(home, "queue/agent-info/web01-any", "Linux web01 again", mtime_ns=None)
        cat.tick(clock() + 700)  # the received items' full pass
    assert cat.handle("summary", {"source": "master", "groups": True}) is master
    assert cat.handle("summary", {"source": "client", "node": "c1"}) != client
    assert cat.handle("summary", {}) is not everything  # made again


def test_a_clients_summary_on_the_master_is_that_of_its_rows(home):  # noqa: F811
    clock = Clock()
    cat = make(home, clock=clock)
    for n, node in ((1, "c1"), (2, "c1"), (3, "c2")):
        write(home, "queue/agent-info/web%02d-any" % n, "Linux web%02d" % n,
              mtime_ns=(1500000000 + n) * SEC + 123)
    cat.tick(clock())
    cat.handle("agent_nodes", {"rows": [["web01-any", "c1"], ["web02-any", "c1"],
                                        ["web03-any", "c2"]]})
    rows = [cat.scanner.row("queue/agent-info/web%02d-any" % n) for n in (1, 2)]
    assert cat.handle("summary", {"source": "client", "node": "c1"})["buckets"] == \
        summary.of_rows(rows, lambda item: item == "agent-info")
    form2 = cat.handle("summary", {"source": "client", "node": "c1", "form": 2})["buckets"]
    assert form2 == summary.of_rows(rows, lambda item: item == "agent-info", 2)
    assert form2 != summary.of_rows(rows, lambda item: item == "agent-info")
    for bad in ("2", 3, True):
        with pytest.raises(RequestError):
            cat.handle("summary", {"source": "client", "node": "c1", "form": bad})



def test_unreduced_sums_reduce_to_the_summary_of_the_mixed_values():
    """Scanner.summary_sums adds form 2's values without a modulo per entry and to_wire
    reduces once a bucket: the same wire summary as mixed() of each, negative mtimes, a
    bucket's overflow and an empty bucket included."""
    import random
    rnd = random.Random(7)
    entries = [(rnd.randrange(summary.BUCKETS), rnd.getrandbits(128),
                rnd.choice([-1, 1]) * rnd.getrandbits(62)) for _ in range(3000)]
    entries += [(5, (1 << 128) - 1, 2 ** 62)] * 40   # sums far past 2**128 in one bucket
    entries = [e for e in entries if e[0] != 9]
    unreduced = summary.Summary(2)
    for bucket, base, mtime in entries:
        unreduced.counts[bucket] += 1
        unreduced.sums[bucket] += base * (2 * (mtime // 1000000000) + 1)
    want = [[sum(1 for e in entries if e[0] == b),
             "%032x" % (sum(summary.mixed(e[1], e[2]) for e in entries if e[0] == b)
                        % (1 << 128))] for b in range(summary.BUCKETS)]
    got = unreduced.to_wire()
    assert got == want and got[9] == [0, "0" * 32]


def test_a_files_summary_entry_is_made_when_it_is_hashed_and_kept_while_its_content_is(
        home):  # noqa: F811
    """Each file's bucket and base are made when the file is hashed (not at the first summary
    after: 10 000 SHA-256 in a 2.7 master's round with a client after its first sync) and
    kept with its record while its content is the same: after an edit only that file is
    hashed anew, after a keepalive none (form 2 mixes the mtime in by a multiplication),
    and the result is the summary of the rows as they are now. Form 1 (an older peer's)
    hashes each agent-info entry with its mtime. Records loaded from the database (a
    restart) get theirs at their first summary."""
    from wazuh_cluster import deltarx
    clock = Clock()
    cat = make(home, clock=clock)
    made = []

    def entry(*args):
        made.append(args[0])
        return summary.entry(*args)
    cat.scanner.summary_entry = entry
    names = ["web%02d-any" % n for n in range(20)]
    for n, name in enumerate(names):
        write(home, "queue/agent-info/" + name, "Linux %d" % n, mtime_ns=(1500000000 + n) * SEC)
    cat.tick(clock())
    while cat.scanner.backlog():
        cat.tick(clock())
    assert sorted(made) == sorted(b"queue/agent-info/" + compat.to_bytes(n) for n in names)
    del made[:]
    cat.handle("agent_nodes", {"rows": [[name, "c1"] for name in names]})

    def summed(form=2, scanner=cat.scanner):
        rows = [scanner.row("queue/agent-info/" + name) for name in names]
        totals = summary.Summary()
        scanner.summary_sums(["queue/agent-info/" + name for name in names], True, form == 2,
                             totals.counts, totals.sums)
        got = totals.to_wire()
        assert got == summary.of_rows([r for r in rows if r], lambda item: True, form)
        return got
    first = summed()
    assert made == []
    assert summed() == first and made == []
    assert summed(1) != first and len(made) == 20   # the forms differ for agent-info
    del made[:]
    path = "queue/agent-info/web03-any"
    compat.set_mtime_ns(os.path.join(home, path), 1600000000 * SEC)   # a keepalive
    cat.handle("received", {"rows": [deltarx.written_row(home, path, cat.scanner.row(path)[7])]})
    write(home, "queue/agent-info/web07-any", "Linux 7 edited")
    os.unlink(os.path.join(home, "queue/agent-info/web11-any"))
    cat.tick(clock() + cat.foreign_scan_interval)
    assert made == [b"queue/agent-info/web07-any"]
    del made[:]
    assert summed() != first
    assert made == []
    # A touch a pass finds (the file read again, same content) keeps them too.
    compat.set_mtime_ns(os.path.join(home, "queue/agent-info/web05-any"), 1600000001 * SEC)
    cat.tick(clock() + 2 * cat.foreign_scan_interval)
    assert cat.scanner.row("queue/agent-info/web05-any")[3] == 1600000001 * SEC
    now = summed()
    assert made == []
    # Restarted: the records come from the database (a keepalive's is not stored there:
    # hashed again by the first pass), the others' entries are made at the first summary.
    again = make(home, clock=clock)
    again.scanner.summary_entry = entry
    again.tick(clock())
    assert made == [b"queue/agent-info/web03-any"]
    assert summed(scanner=again.scanner) == now
    assert sorted(made) == sorted(b"queue/agent-info/" + compat.to_bytes(n)
                                  for n in names if n != "web11-any")
    del made[:]
    assert summed(scanner=again.scanner) == now and made == []


def test_a_summary_of_every_source_is_summed_from_the_kept_values(home,  # noqa: F811
                                                                    monkeypatch):
    """A master's summary of its own files (10 000 shared files, made again at its first
    round after any change of theirs or of client.keys) and a client's of its copy were a
    SHA-256 per row each time; each record keeps its entry's base, so made again they hash
    nothing, and they stay summary.of_rows of the rows, for every source and form."""
    clock = Clock()
    cat = make(home, clock=clock)
    write(home, "etc/client.keys", "001 web01 any k\n")
    for n in range(3):
        os.makedirs(os.path.join(home, "etc/shared/g%d" % n))
    for n in range(30):
        write(home, "etc/shared/g%d/f%02d.conf" % (n % 3, n), "<agent_config/> %d" % n)
        write(home, "queue/agent-info/web%02d-any" % n, "Linux %d" % n,
              mtime_ns=(1500000000 + n) * SEC)
    cat.tick(clock())
    flags = dict((item.name, item.mtime_is_data) for item in ITEMS)
    for source in ("master", "client", None):
        wanted = set(i.name for i in ITEMS if source in (None, i.source))
        rows = [r for r in cat.scanner.rows(wanted) if r[1] in wanted]
        for form in (1, 2):
            args = dict({"form": form, "groups": True}, **({"source": source} if source else {}))
            assert cat.handle("summary", args)["buckets"] == summary.of_rows(rows, flags.get,
                                                                             form)
    hashed = []
    real = summary.entry_value

    def entry_value(name, sha256, mtime_ns):
        hashed.append((name, mtime_ns))
        return real(name, sha256, mtime_ns)
    monkeypatch.setattr(summary, "entry_value", entry_value)
    cat._summaries.clear()   # as after a change: made again
    mine = cat.handle("summary", {"source": "master", "groups": True, "form": 2})
    assert hashed == []
    assert mine["groups"] == ["etc/shared/g0", "etc/shared/g1", "etc/shared/g2"]


def _kept_alive(home, cat, names, node, seconds):
    """A keepalive batch as a master's wazuh-clusterd tells it: each agent-info file given
    mtime `seconds` (+ its index), then its lstat and checksum as "received" records."""
    import base64
    from wazuh_cluster import scanner as scanner_mod
    records = []
    for n, name in enumerate(names):
        path = os.path.join(home, "queue/agent-info", name)
        compat.set_mtime_ns(path, (seconds + n) * SEC + 7)
        records.append(scanner_mod.packed_record(
            scanner_mod.fingerprint(os.lstat(path)),
            cat.scanner.row("queue/agent-info/" + name)[7]))
    return cat.handle("received", {"names": ["queue/agent-info/" + n for n in names],
                                   "records": base64.b64encode(b"".join(records)).decode(),
                                   "node": node})


def _of_files(cat, names, form=2):
    return summary.of_rows([cat.scanner.row("queue/agent-info/" + n) for n in names],
                           lambda item: item == "agent-info", form)


def _counting_sums(cat):
    made = []
    real = cat.scanner.summary_sums

    def summary_sums(names, *args):
        made.append(len(names))
        return real(names, *args)
    cat.scanner.summary_sums = summary_sums
    return made


@pytest.fixture
def followed(home):  # noqa: F811
    """A master whose clients c1 (agents 0-19) and c2 (20-29) have had their form-2
    summaries made once: (catalog, c1's names, c2's names, summary_sums' calls since)."""
    clock = Clock()
    cat = make(home, clock=clock)
    names = ["web%02d-any" % n for n in range(30)]
    for n, name in enumerate(names):
        write(home, "queue/agent-info/" + name, "Linux %d" % n,
              mtime_ns=(1500000000 + n) * SEC + 123)
    cat.tick(clock())
    while cat.scanner.backlog():
        cat.tick(clock())
    cat.handle("agent_nodes", {"rows": [[n, "c1" if i < 20 else "c2"]
                                        for i, n in enumerate(names)]})
    c1, c2 = names[:20], names[20:]
    for node, mine in (("c1", c1), ("c2", c2)):
        assert cat.handle("summary", {"source": "client", "node": node, "form": 2})[
            "buckets"] == _of_files(cat, mine)
    return cat, c1, c2, _counting_sums(cat)


def test_a_clients_summary_follows_its_keepalives_without_being_made_again(
        home, followed):  # noqa: F811
    """After every agent of a client kept alive (a master's 15-25 ms of CPU per client
    round on 2.7, made anew each time), its summary is what its keepalives moved: the
    summary of the files as they are now, and no file summed again."""
    cat, c1, c2, made = followed
    before = cat.handle("summary", {"source": "client", "node": "c1", "form": 2})
    _kept_alive(home, cat, c1, "c1", 1600000000)
    cat.handle("agent_nodes", {"rows": [[n, "c1"] for n in c1]})   # as with any batch
    after = cat.handle("summary", {"source": "client", "node": "c1", "form": 2})
    assert after["buckets"] == _of_files(cat, c1) != before["buckets"]
    assert cat.handle("summary", {"source": "client", "node": "c2", "form": 2})[
        "buckets"] == _of_files(cat, c2)
    assert made == []
    # form 1 (an older client) mixes the mtime into the hash: made anew
    assert cat.handle("summary", {"source": "client", "node": "c1"})["buckets"] == \
        _of_files(cat, c1, 1)
    assert made == [len(c1)]


def test_a_moved_agent_makes_both_clients_summaries_anew(home, followed):  # noqa: F811
    cat, c1, c2, made = followed
    _kept_alive(home, cat, c1[:1], "c2", 1600000000)   # web00 now reports through c2
    assert cat.handle("summary", {"source": "client", "node": "c1", "form": 2})[
        "buckets"] == _of_files(cat, c1[1:])
    assert cat.handle("summary", {"source": "client", "node": "c2", "form": 2})[
        "buckets"] == _of_files(cat, c1[:1] + c2)
    assert made == [len(c1) - 1, len(c2) + 1]


def test_a_summary_follows_some_keepalives_a_file_then_is_made_anew(
        home, followed):  # noqa: F811
    """Each keepalive followed costs a product; at the real rate (every file every 10 s)
    following them all would cost more than making the summary once a round."""
    from wazuh_cluster import catalog as catalog_mod
    cat, c1, c2, made = followed
    for rounds in range(2):   # a round asks again: as many followed before the next
        for wave in range(catalog_mod.NODE_SUM_KEEPALIVES):
            _kept_alive(home, cat, c1, "c1", 1600000000 + 100 * wave + 1000 * rounds)
        assert cat.handle("summary", {"source": "client", "node": "c1", "form": 2})[
            "buckets"] == _of_files(cat, c1)
    assert made == []
    for wave in range(catalog_mod.NODE_SUM_KEEPALIVES):
        _kept_alive(home, cat, c1, "c1", 1700000000 + 100 * wave)
    _kept_alive(home, cat, c1[:1], "c1", 1800000000)
    assert cat.handle("summary", {"source": "client", "node": "c1", "form": 2})[
        "buckets"] == _of_files(cat, c1)
    assert made == [len(c1)]


def test_agent_info_taken_without_a_node_makes_every_clients_summary_anew(
        home, followed):  # noqa: F811
    cat, c1, c2, made = followed
    _kept_alive(home, cat, c2[:2], None, 1600000000)
    for node, mine in (("c1", c1), ("c2", c2)):
        assert cat.handle("summary", {"source": "client", "node": node, "form": 2})[
            "buckets"] == _of_files(cat, mine)
    assert made == [len(c1), len(c2)]
