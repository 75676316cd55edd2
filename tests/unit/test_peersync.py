"""When PeerSync sends: full rounds first, a push at once on a quiet line, then at most one
push per push_delay, with what arrived meanwhile travelling together."""
from __future__ import absolute_import, division, print_function

import collections
import contextlib
import hashlib
import os
import threading
import time

import pytest

from wazuh_cluster import budget, compat, config, manifest, summary
from wazuh_cluster.errors import RequestError
from wazuh_cluster.session import Session as RealSession
from wazuh_cluster.sync import (Batch, InFlight, PeerSync, SyncManager, fresh_touch,
                                round_phase)

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
    # Its slot in each interval is where this round ended: the next one is INTERVAL away.
    sync = PeerSync(Session(), "/nonexistent", "master", None, ITEMS, INTERVAL, DELAY, 30.0,
                    clock=clock, phase=clock() % INTERVAL)
    job, _ = sync.due(clock())
    assert job == sync.full_round
    sync.finished_round(clock())
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


def test_rounds_with_different_peers_fall_in_different_slots_of_the_interval():
    # All clients' rounds fired within seconds of each other every interval.
    phases = sorted(round_phase("master", "client%02d" % k, INTERVAL) for k in range(1, 11))
    assert all(0 <= p < INTERVAL for p in phases)
    assert len(set(phases)) == 10 and phases[-1] - phases[0] > INTERVAL / 2
    assert round_phase("master", "client01", INTERVAL) == \
        round_phase("master", "client01", INTERVAL)  # stable: the same slot every interval
    # A client's rounds with its master: by its own name too, not only the master's.
    assert round_phase("client01", "master", INTERVAL) != \
        round_phase("client02", "master", INTERVAL)


def test_the_next_round_is_in_the_peer_slot_every_interval():
    clock = Clock()
    sync = PeerSync(Session(), "/nonexistent", "master", None, ITEMS, INTERVAL, DELAY, 30.0,
                    clock=clock, phase=30.0)
    assert sync.due(clock())[0] == sync.full_round  # at once when the session starts
    sync.finished_round(1000.0)
    assert sync.next_round == 1110.0  # its slot, at least half an interval later
    job, wait = sync.due(1109.0)
    assert job is None and wait == pytest.approx(1.0)
    assert sync.due(1110.0)[0] == sync.full_round
    sync.finished_round(1115.0)
    assert sync.next_round == 1230.0  # then every interval, in the same slot


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


def test_the_last_batch_of_a_send_is_called_from_the_sending_thread():
    """A push of one client.keys append to ten clients started and joined a thread per
    client for its one batch; the last batch runs in the sender's thread, the others still
    in flight meanwhile, and its error is raised by finish() once all ended."""
    threads, finished = [], []

    def call(batch):
        name = batch.files[0]["name"]
        threads.append((name[-2:], threading.current_thread()))
        if name.endswith("f1"):
            raise RequestError("no answer", "timeout")
        finished.append(name)
        return {name: "synchronized"}
    one = Batch()
    one.add_file(u"etc/shared/default/f0", b"x", "0" * 64, 1)
    calls = InFlight(call, 2)
    calls.submit(one, last=True)
    assert calls.finish() == {u"etc/shared/default/f0": "synchronized"}
    assert threads == [("f0", threading.current_thread())]
    calls = InFlight(call, 2)
    for n in (2, 1):
        batch = Batch()
        batch.add_file(u"etc/shared/default/f%d" % n, b"x", "0" * 64, 1)
        calls.submit(batch, last=n == 1)
    with pytest.raises(RequestError):
        calls.finish()
    assert finished == [u"etc/shared/default/f0", u"etc/shared/default/f2"]
    where = dict(threads[1:])
    assert where["f2"] is not threading.current_thread()
    assert where["f1"] is threading.current_thread()


def test_batches_are_read_under_grants_of_the_budget_and_give_them_back(tmpdir):
    """A master's batches are counted in its process budget (issue 11 item 4): granted
    before they are read, within the send pool, and all given back once sent."""
    from test_channel import channel_pair
    folder = tmpdir.mkdir("etc").mkdir("shared").mkdir("default")
    names = []
    for n in range(6):
        folder.join("f%d.bin" % n).write_binary(os.urandom(1500000))
        names.append(u"etc/shared/default/f%d.bin" % n)
    shared = budget.Budget(12 << 20, share=6 << 20, send_limit=6 << 20, cache=1 << 20)  # pool 5
    seen = []

    def sync_files(session, args, data):
        seen.append((len(data), shared.stats()["sending"]))
        return {"states": dict((f["name"], "synchronized") for f in args["files"])}, b""
    ours, theirs = channel_pair()
    peer = RealSession(theirs, {"sync_files": sync_files}, 5.0, address=("127.0.0.1", 1)).start()
    master = RealSession(ours, {}, 5.0, address=("127.0.0.1", 2), budget=shared).start()
    try:
        sync = PeerSync(master, str(tmpdir), "master", None, ITEMS, INTERVAL, DELAY, 30.0)
        states = sync.send({}, names, [], [], [])
    finally:
        master.close()
        peer.close()
    assert states == dict((name, "synchronized") for name in names)
    assert sum(n for n, _ in seen) == 6 * 1500000
    assert all(shared.cache <= s <= shared.send_limit for _, s in seen)
    assert shared.cache + 2 * 1500000 < shared.peak <= shared.total   # counted, and bounded
    assert sync.room().holder.held == 0
    wait_until(lambda: shared.used == shared.cache)   # the readers give their windows back too


def test_a_push_of_one_small_file_is_granted_what_it_holds_not_the_send_pool(tmpdir):
    """Issue 11 item 4: a batch was granted its bound (2000 names, 2 MiB of data, a 1 MiB
    frame twice) whatever it held; with cluster.max_inflight_bytes=24 MiB that is the whole
    send pool, and the pushes of one client.keys line to ten clients went one at a time."""
    from test_channel import channel_pair
    tmpdir.mkdir("etc").join("client.keys").write_binary(b"001 agent any key\n")
    shared = budget.for_daemon(24 << 20)
    ours, theirs = channel_pair()
    peer = RealSession(theirs, {"sync_files": lambda session, args, data: (
        {"states": dict((f["name"], "synchronized") for f in args["files"])}, b"")}, 5.0,
        address=("127.0.0.1", 1)).start()
    master = RealSession(ours, {}, 5.0, address=("127.0.0.1", 2), budget=shared).start()
    try:
        sync = PeerSync(master, str(tmpdir), "master", None, ITEMS, INTERVAL, DELAY, 30.0)
        assert sync.send({}, [u"etc/client.keys"], [], [], []) == \
            {u"etc/client.keys": "synchronized"}
    finally:
        master.close()
        peer.close()
    pool = shared.send_limit - shared.cache
    assert shared.peak - shared.cache < 128 << 10 < pool // 8


def test_a_batch_is_full_at_the_data_bound_it_was_granted_not_the_default():
    """Under a tight budget room.batch_bytes() gives a batch less than BATCH_BYTES, and its
    grant covers only that: a batch filled to the default bound held more than it was
    granted (its bound was checked against the constant)."""
    batch = Batch(1000)
    assert not batch.full(5000)            # an empty batch takes one file beyond its bound
    batch.add_file(u"etc/shared/default/a", b"x" * 600, "0" * 64, 1)
    assert not batch.full(400)
    assert batch.full(401)


def test_a_batch_holds_no_file_data_while_the_peer_applies_it(tmpdir):
    """Once encoded, a batch's files leave the sender's memory: its grant counts only the
    encoded message. A joined copy of the list kept them all until the peer answered,
    uncounted (every session's batches in flight: the master's first sync at 20 clients)."""
    from test_channel import channel_pair
    batch = Batch()
    for n in range(3):
        data = os.urandom(5000)
        batch.add_file(u"etc/shared/default/f%d" % n, data, hashlib.sha256(data).hexdigest(),
                       10 ** 18)
    held = []

    def sync_files(session, args, data):
        held.append(len(batch.data) + len(batch.delta_data))
        return {"states": dict((f["name"], "synchronized") for f in args["files"])}, b""
    ours, theirs = channel_pair()
    peer = RealSession(theirs, {"sync_files": sync_files}, 5.0, address=("127.0.0.1", 1)).start()
    master = RealSession(ours, {}, 5.0, address=("127.0.0.1", 2)).start()
    try:
        sync = PeerSync(master, str(tmpdir), "master", None, ITEMS, INTERVAL, DELAY, 30.0)
        states = sync.call_files(batch)
    finally:
        master.close()
        peer.close()
    assert held == [0] and sorted(states) == [u"etc/shared/default/f%d" % n for n in range(3)]


@contextlib.contextmanager
def delta_master(tmpdir, sync_files):
    """A master's PeerSync over a real session pair to a peer that knows deltas and answers
    sync_files with `sync_files`; files of 1 000 bytes and more go through the version store."""
    from test_channel import channel_pair
    from wazuh_cluster import versions
    ours, theirs = channel_pair()
    peer = RealSession(theirs, {"sync_files": sync_files}, 5.0, address=("127.0.0.1", 1)).start()
    master = RealSession(ours, {}, 5.0, address=("127.0.0.1", 2)).start()
    master.features = ("delta",)
    try:
        yield PeerSync(master, str(tmpdir), "master", None, ITEMS, INTERVAL, DELAY, 30.0,
                       store=versions.VersionStore(min_bytes=1000))
    finally:
        master.close()
        peer.close()


def test_a_big_file_the_peer_holds_already_goes_as_its_mtime_only(tmpdir):
    """A change event that comes after the push that read its version (client.keys appended
    while a push was under way) had that 9.4 MB version sent whole to every client again,
    all at once: the master's peak memory at 20 clients (issue 11)."""
    keys = b"".join(b"%05d agent%05d any %064x\n" % (i, i, i) for i in range(1, 3000))
    tmpdir.mkdir("etc").join("client.keys").write_binary(keys)
    seen = []

    def sync_files(session, args, data):
        seen.append((len(data), [f["name"] for f in args.get("meta", ())]))
        names = [f["name"] for f in args.get("files", []) + args.get("meta", [])]
        return {"states": dict((name, "synchronized") for name in names)}, b""
    with delta_master(tmpdir, sync_files) as sync:
        first = sync.send({}, [u"etc/client.keys"], [], [], [])
        path = str(tmpdir.join("etc", "client.keys"))
        os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime + 5))
        again = sync.send({}, [u"etc/client.keys"], [], [], [])
    assert first == again == {u"etc/client.keys": "synchronized"}
    assert seen == [(len(keys), []), (0, [u"etc/client.keys"])]


def test_a_big_file_the_peer_holds_with_its_mtime_goes_no_more(tmpdir):
    """client.keys is announced before the internal daemon hashes it (catalog.look_hot),
    then named again by the tick that did: the second push finds the peer holding that very
    version and sends nothing (a metadata update cost every client a call, and held its next
    append behind it), yet reports it synchronized (its states rows)."""
    keys = b"".join(b"%05d agent%05d any %064x\n" % (i, i, i) for i in range(1, 3000))
    tmpdir.mkdir("etc").join("client.keys").write_binary(keys)
    seen = []

    def sync_files(session, args, data):
        seen.append(len(data))
        names = [f["name"] for f in args.get("files", []) + args.get("meta", [])]
        return {"states": dict((name, "synchronized") for name in names)}, b""
    with delta_master(tmpdir, sync_files) as sync:
        first = sync.send({}, [u"etc/client.keys"], [], [], [])
        again = sync.send({}, [u"etc/client.keys"], [], [], [])
    assert first == again == {u"etc/client.keys": "synchronized"}
    assert seen == [len(keys)]


@pytest.mark.parametrize("torn", [True, False], ids=["changed while read", "grown since lstat"])
def test_a_big_file_appended_while_it_is_read_goes_at_once_in_its_newer_version(tmpdir, torn):
    """Under an append a second, a read of client.keys on a busy master often spanned the
    next append (read_stable: None), or came after it (another size than the lstat before):
    either postponed the file by RETRY_DELAY for that client, its append 2-4 s late
    (issue 11). What changed it is newer: it is read again at once and sent."""
    from wazuh_cluster import sync as sync_mod
    keys = b"".join(b"%05d agent%05d any %064x\n" % (i, i, i) for i in range(1, 3000))
    path = tmpdir.mkdir("etc").join("client.keys")
    path.write_binary(keys)
    added = b"03000 agent03000 any %064x\n" % 3000
    seen, reads = [], []

    def read(p, reading=None, seen=None):
        reads.append(p)
        if len(reads) == 1:
            with open(p, "ab") as handle:
                handle.write(added)     # the next append, during (or just before) the read
            if torn:
                return None
        return sync_mod.read_stable(p, reading, seen)

    def sync_files(session, args, data):
        seen.append(data)
        names = [f["name"] for f in args.get("files", []) + args.get("meta", [])]
        return {"states": dict((name, "synchronized") for name in names)}, b""
    with delta_master(tmpdir, sync_files) as sync:
        sync.versions.read_func = read
        states = sync.send({}, [u"etc/client.keys"], [], [], [])
    assert states == {u"etc/client.keys": "synchronized"}
    assert sync.postponed == 0 and not sync.has_push()
    assert seen == [keys + added] and len(reads) == (2 if torn else 1)


# -- change events and touched files (issue 11: cheap keepalives) -------------------------------

class CountingSync(PeerSync):
    """A PeerSync that counts the names it is asked about."""
    asked = [0]

    def owns(self, name):
        CountingSync.asked[0] += 1
        return PeerSync.owns(self, name)


def test_a_change_event_is_filtered_once_for_every_peer():
    manager = SyncManager.__new__(SyncManager)
    manager.lock = threading.Lock()
    manager.peers = {}
    for index in range(5):
        session = Session()
        session.peer_name = "client-%d" % index
        manager.peers[session.peer_name] = CountingSync(
            session, "/nonexistent", "master", None, ITEMS, INTERVAL, DELAY, 30.0)
    own = [u"etc/shared/default/f%d" % i for i in range(50)]
    foreign = [u"queue/agent-info/a%d-any" % i for i in range(50)]
    CountingSync.asked[0] = 0
    manager.on_event({"event": "changes", "changed": own + foreign, "touched": [],
                      "deleted": [], "deleted_dirs": []})
    assert CountingSync.asked[0] == len(own + foreign)
    assert all(worker.changed == set(own) for worker in manager.peers.values())


def test_a_touch_goes_with_the_checksum_of_the_same_look_at_the_file(tmp_path):
    path = str(tmp_path / "a-any")
    with open(path, "wb") as handle:
        handle.write(b"Linux a\n")
    os.utime(path, (1000, 1000))
    recorded = manifest.Entry(hashlib.sha256(b"Linux a\n").hexdigest(), 1000 * 10 ** 9,
                              "agent-info")
    assert fresh_touch(path, recorded) == (None, recorded.sha256, recorded.mtime_ns)
    os.utime(path, (1010, 1010))  # touched again since the scan: the newest mtime goes
    data, sha, mtime_ns = fresh_touch(path, recorded)
    assert (sha, mtime_ns) == (recorded.sha256, 1010 * 10 ** 9)
    with open(path, "wb") as handle:
        handle.write(b"Linux b\n")  # written since the scan: its new content goes as data
    os.utime(path, (1020, 1020))
    assert fresh_touch(path, recorded) == (b"Linux b\n", hashlib.sha256(b"Linux b\n").hexdigest(),
                                           1020 * 10 ** 9)
    os.unlink(path)
    assert fresh_touch(path, recorded) is None


# -- a small push does not queue behind bulk work (issue 11: append latency) -------------------

class CatalogLink(object):
    """The internal daemon's answers a push needs, over the files of `home`; `calls` is
    shared with the link's urgent() connection and records (which link, command)."""

    def __init__(self, home, calls, which="shared"):
        self.home, self.calls, self.which = home, calls, which
        self.quick = None

    def urgent(self):
        if self.quick is None:
            self.quick = CatalogLink(self.home, self.calls, "urgent")
        return self.quick

    def call(self, cmd, args=None):
        self.calls.append((self.which, cmd))
        return {}

    def call_data(self, cmd, args=None):
        self.calls.append((self.which, cmd))
        rows = []
        for name in args.get("names") or ():
            with open(os.path.join(self.home, *name.split("/")), "rb") as handle:
                data = handle.read()
            rows.append((name, "shared", len(data), 0, 0, 0, 0o640,
                         hashlib.sha256(data).hexdigest()))
        return {}, manifest.to_json(rows)


@pytest.mark.parametrize("touched", [False, True])
@pytest.mark.parametrize("count", [1, 65])
def test_a_small_push_asks_and_records_on_the_urgent_link_only(tmpdir, count, touched):
    """The shared link queues every session's calls (keepalive batches of 1 000 rows): an
    append's push writes its states on a connection of its own, and asks for no manifest
    (changed files are read anyway); touched files need their recorded checksums, asked
    on the same connection; a big push stays on the shared link."""
    from test_channel import channel_pair
    folder = tmpdir.mkdir("etc").mkdir("shared").mkdir("default")
    names = []
    for n in range(count):
        folder.join("f%d" % n).write_binary(b"conf %d\n" % n)
        names.append(u"etc/shared/default/f%d" % n)
    calls = []
    options = config.Options(*[default for _, _, default in config.OPTIONS])
    cfg = collections.namedtuple("Cfg", "options node_type items")(
        options._replace(delta_min_bytes=0), "master", ITEMS)
    manager = SyncManager(cfg, collections.namedtuple("Layout", "home")(str(tmpdir)),
                          CatalogLink(str(tmpdir), calls))

    def sync_files(session, args, data):
        return {"states": dict((f["name"], "synchronized")
                               for f in args["files"] + args["meta"])}, b""
    ours, theirs = channel_pair()
    peer = RealSession(theirs, {"sync_files": sync_files}, 5.0, address=("127.0.0.1", 1)).start()
    master = RealSession(ours, {}, 5.0, address=("127.0.0.1", 2),
                         budget=budget.Budget(64 << 20)).start()
    try:
        sync = PeerSync(master, str(tmpdir), "master", manager.link, ITEMS, INTERVAL, DELAY,
                        30.0)
        sync.urgent_link, sync.urgent_writer = manager.urgent_link, manager.urgent_writer
        sync.state_writer = manager.state_writer
        states = sync.push([], names, [], []) if touched else sync.push(names, [], [], [])
        sync.recorded()
    finally:
        master.close()
        peer.close()
    assert states == dict((name, "synchronized") for name in names)
    used = "urgent" if count == 1 else "shared"
    assert calls == ([(used, "manifest")] if touched else []) + [(used, "set_states")]


class PendingLink(object):
    """The internal daemon as a round's start asks it: nothing pending for the peer."""

    def call(self, cmd, args):
        assert cmd == "pending"
        return {"files": []}


class StepRows(object):
    """A state writer (groupcommit.GroupCommit's write) that notes the rows of each write."""

    def __init__(self):
        self.writes = []

    def write(self, rows):
        if rows:  # as GroupCommit: an empty write is none
            self.writes.append([row[1] for row in rows])


def round_sync():
    """A master's PeerSync at the start of its slot, its internal daemon a PendingLink and
    its steps' rows kept (StepRows)."""
    sync = PeerSync(Session(), "/nonexistent", "master", PendingLink(), ITEMS, INTERVAL,
                    DELAY, 30.0, clock=Clock(), phase=0.0)
    sync.state_writer = StepRows()
    return sync


def test_a_round_writes_each_steps_rows_before_the_next_step():
    # A master's first rounds with 20 new clients each held the {name: state} of every step
    # (10 000 names) until the round's last step, then all its rows at once: the peak of
    # the 20-client first sync. Each step's rows go as it ends, and the round is still
    # "ok" only when every step was.
    sync = round_sync()
    sync.rows_held = 1      # a round of 10 000 names, at the scale of one name a step
    steps = []

    def round_step(buckets, groups, counts):
        steps.append((list(buckets), len(sync.state_writer.writes)))
        name = "etc/shared/default/step%d.conf" % len(steps)
        sync.written.add(summary.bucket_of(name))   # sent: its transfer confirms it
        return {name: "failed" if len(steps) == 2 else "synchronized"}
    basis = [(0, 0)] * summary.BUCKETS
    sync.compare_summaries = lambda everything: (list(range(256)), [], basis)
    sync.round_step = round_step
    sync.full_round()
    assert len(steps) > 2 and [written for _, written in steps] == list(range(len(steps)))
    assert sync.state_writer.writes == [["etc/shared/default/step%d.conf" % (k + 1)]
                                        for k in range(len(steps))]
    assert sync.last_round_ok is False
    # A file compared equal (not sent) is confirmed only after settle() saw the peer's
    # summary again: its row waits for the round's end however many rows went before.
    steps[:] = []
    sync.state_writer = StepRows()
    asked = []
    sync.peer_summary = lambda: asked.append(len(sync.state_writer.writes)) or basis

    def equal_step(buckets, groups, counts):
        steps.append(buckets)
        name = "etc/shared/default/same%d.conf" % len(steps)
        return {name: "synchronized" if len(steps) == 1 else "failed"}
    sync.round_step = equal_step
    sync.full_round()
    assert len(steps) > 2 and asked == [len(steps) - 1]
    assert sync.state_writer.writes[-1] == ["etc/shared/default/same1.conf"]
    steps[:] = []
    sync.state_writer = StepRows()
    sync.rows_held = PeerSync.rows_held   # a small round: its rows go at once, at its end
    sync.round_step = lambda buckets, groups, counts: {"etc/shared/default/a.conf":
                                                      "synchronized"}
    sync.full_round()
    assert sync.last_round_ok is True
    assert sync.state_writer.writes == [["etc/shared/default/a.conf"]]


def test_reading_a_small_file_to_send_allocates_its_size_not_the_file_limit(tmpdir):
    # read(n) allocates n bytes first: every 2 KB shared file sent cost a 48 MB allocation
    # (MAX_FILE_BYTES), shrunk and freed, 200 000 times in a 20-client first sync.
    tracemalloc = pytest.importorskip("tracemalloc")  # 3.x only
    from wazuh_cluster.sync import read_stable
    path = str(tmpdir.join("small.conf"))
    with open(path, "wb") as handle:
        handle.write(b"x" * 2000)
    tracemalloc.start()
    try:
        got = read_stable(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got is not None and got[0] == b"x" * 2000 and peak < 1 << 20
    with open(path, "ab") as handle:   # what the stable check needs still holds: whole file
        handle.write(b"y")
    assert read_stable(path)[0] == b"x" * 2000 + b"y"


class HeldRows(object):
    """A state writer whose writes wait for `release` (an internal daemon busy with other
    sessions' keepalive batches); notes the rows of each write, raises `error` once."""

    def __init__(self):
        self.release = threading.Event()
        self.writes = []
        self.error = None

    def write(self, rows):
        assert self.release.wait(30)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.writes.append([row[1] for row in rows])


def test_a_push_goes_without_waiting_for_the_last_push_s_rows_which_keep_their_order(tmpdir):
    # Under churn at 20 clients a push's states waited up to 3.5 s for the master's internal
    # daemon, and that client's next append waited with them (issue 11: append p99).
    folder = tmpdir.mkdir("etc").mkdir("shared").mkdir("default")
    for name in ("a", "b", "c"):
        folder.join(name).write_binary(b"conf\n")
    sync = PeerSync(Session(), str(tmpdir), "master", None, ITEMS, INTERVAL, DELAY, 30.0)
    sync.state_writer = sync.urgent_writer = HeldRows()
    sync.send = lambda mine, data, meta, delete, dirs: dict((n, "synchronized") for n in data)
    names = [u"etc/shared/default/%s" % n for n in ("a", "b", "c")]
    # changed files only: no manifest asked (the link is None), the rows written later
    assert sync.push(names[:1], [], [], []) == {names[0]: "synchronized"}
    assert sync.state_writer.writes == []
    # Nor does a push wait for the rows of the pushes before it: a full pass of the
    # master's internal daemon (1.1-1.4 s under load) held a client's next append that long.
    for name in names[1:] * 3:
        assert sync.push([name], [], [], []) == {name: "synchronized"}
    from wazuh_cluster import sync as sync_mod
    assert len(sync._recording) == 7 < sync_mod.RECORDS_AHEAD
    assert sync.push(names[:1], [], [], []) == {names[0]: "synchronized"}   # the eighth
    beyond = threading.Thread(target=sync.push, args=(names[1:2], [], [], []))
    beyond.start()
    time.sleep(0.05)
    assert beyond.is_alive()      # the ninth waits for the oldest
    sync.state_writer.release.set()
    beyond.join(30)
    sync.recorded()
    assert sync.state_writer.writes == [names[:1]] + [[n] for n in names[1:] * 3] + \
        [names[:1], names[1:2]]
    # A write that failed is raised in the sync thread, once it ended: at a later record, or
    # before a round (which waits for them all).
    sync.state_writer.error = RequestError("internal daemon restarting", "internal_unavailable")
    sync.push(names[2:], [], [], [])
    with pytest.raises(RequestError):
        sync.recorded()
    # A file gone since the change event is not sent (the deletion's event follows).
    os.unlink(str(folder.join("a")))
    assert sync.push(names[:2], [], [], []) == {names[1]: "synchronized"}


def test_a_push_goes_while_a_round_waits_for_its_summaries():
    # A master's round with a client waited 8 s for the first answers (both internal
    # daemons and the client busy with keepalive batches, 20 clients) and that client's
    # appends waited with it: 11 s late, the run's p99 (issue 11).
    sync = round_sync()
    pushed = threading.Event()
    sync.push = lambda *job: pushed.set() or {}
    basis = [(0, 0)] * summary.BUCKETS

    def slow_summaries(everything):
        sync.notify({"changed": [u"etc/client.keys"]})   # an append while the round waits
        assert pushed.wait(10), "the push waited for the round"
        return [], [], basis
    sync.compare_summaries = slow_summaries
    sync.full_round()
    assert pushed.is_set() and not sync.has_push()
    assert summary.bucket_of(u"etc/client.keys") in sync.written   # settle() knows it
    # An error of those first calls is the round's.

    def fails(everything):
        raise RequestError("internal daemon restarting", "internal_unavailable")
    sync.compare_summaries = fails
    with pytest.raises(RequestError):
        sync.full_round()


def test_a_push_goes_while_a_round_step_waits_for_the_manifests():
    # A round step held the client's pushes while both manifests of its buckets were
    # fetched: seconds under churn at 20 clients (issue 11).
    sync = round_sync()
    pushed = threading.Event()
    sync.push = lambda *job: pushed.set() or {}
    basis = [(0, 0)] * summary.BUCKETS
    keys = u"etc/client.keys"
    sync.compare_summaries = lambda everything: ([summary.bucket_of(keys)], [], basis)
    sync.peer_summary = lambda: basis

    def slow_manifests(buckets=None, names=None):
        sync.notify({"changed": [keys]})   # an append while the step waits
        assert pushed.wait(10), "the push waited for the manifests"
        return {}, {}
    sync.manifests = slow_manifests
    sync.send = lambda *lists: {}
    sync.full_round()
    assert pushed.is_set() and not sync.has_push()
    assert summary.bucket_of(keys) in sync.written   # settle() knows it


def test_a_round_step_deletes_nothing_a_push_sent_while_it_fetched_the_manifests():
    # Our manifest is taken before the peer's: a file made meanwhile and pushed is on the
    # peer and not in ours. The step must not delete it, nor its new group folder.
    sync = round_sync()
    made = [u"etc/shared/default/new.conf", u"etc/shared/newgroup/agent.conf"]
    gone = u"etc/shared/default/old.conf"
    pushed, sent = threading.Event(), []
    sync.push = lambda *job: pushed.set() or {}
    basis = [(0, 0)] * summary.BUCKETS
    sync.compare_summaries = lambda everything: (list(range(summary.BUCKETS)), [], basis)
    sync.peer_summary = lambda: basis
    entry = manifest.Entry(u"a" * 64, 1, u"shared")

    def slow_manifests(buckets=None, names=None):
        pushed.clear()
        sync.clock.now += 1.0      # past push_delay: each step's push is due
        sync.notify({"changed": made})
        assert pushed.wait(10), "the push waited for the manifests"
        return {}, dict((name, entry) for name in made + [gone]
                        if summary.bucket_of(name) in buckets)
    sync.manifests = slow_manifests
    sync.send = lambda mine, data, meta, delete, dirs: sent.append((delete, dirs)) or {}
    sync.full_round()
    assert sorted(sum([d for d, _ in sent], [])) == [gone]
    assert sum([f for _, f in sent], []) == []


class AgentLink(object):
    """The internal daemon as kept_newer tells it: the agent_nodes rows noted."""

    def __init__(self):
        self.rows = []

    def call(self, cmd, args):
        assert cmd == "agent_nodes"
        self.rows.extend(args["rows"])
        return {"updated": len(args["rows"])}


def test_a_client_records_only_the_agent_info_it_sent_that_the_master_kept_newer():
    """The master's "kept_newer" (an agent that moved to another node) is the peer's word:
    only agent-info names this batch sent and found synchronized are recorded, each as
    reported by no node we know at the mtime we sent; anything else is ignored."""
    link = AgentLink()
    sync = PeerSync(Session(), "/nonexistent", "client", link, ITEMS, INTERVAL, DELAY, 30.0)
    batch = Batch()
    info, other = "queue/agent-info/db01-10.0.0.5", "queue/agent-info/web01-any"
    batch.add_file(info, b"x", "0" * 64, 111)
    batch.meta.append({"name": other, "sha256": "1" * 64, "mtime_ns": 222})
    states = {info: "synchronized", other: "failed"}
    sync.kept_newer(batch, [info, other, "queue/agent-info/never-sent", 5, None,
                            "etc/client.keys"], states)
    assert link.rows == [["db01-10.0.0.5", u"", 111]]
    for hostile in ("queue/agent-info/db01-10.0.0.5", {"a": 1}, None, 7):
        sync.kept_newer(batch, hostile, states)
    assert link.rows == [["db01-10.0.0.5", u"", 111]]


def test_a_clients_round_step_reports_its_equal_agent_info_as_metadata(tmpdir):
    """Equal agent-info of a bucket whose summaries differed goes as our report (the master
    lost the row), but for a copy naming another node (a master made a client)."""
    sync = PeerSync(Session(), str(tmpdir), "client", None, ITEMS, INTERVAL, DELAY, 30.0)
    sync.node_name = "client-9"
    info = ["queue/agent-info/a-any", "queue/agent-info/b-any", "queue/agent-info/c-any"]
    folder = tmpdir.mkdir("queue").mkdir("agent-info")
    folder.join("a-any").write('Linux a\n#"manager_hostname":m\n#"node_name":client-9\n')
    folder.join("b-any").write("")  # pending: names no node
    folder.join("c-any").write('Linux c\n#"node_name":client-2\n')
    meta, same = sync.reported(["queue/agent-info/d-any"], info + ["etc/other"])
    assert meta == info[:2] + ["queue/agent-info/d-any"]
    assert same == ["queue/agent-info/c-any", "etc/other"]
    master = PeerSync(Session(), "/nonexistent", "master", None, ITEMS, INTERVAL, DELAY, 30.0)
    assert master.reported([], info) == ([], info)   # a master's items hold no agent-info
