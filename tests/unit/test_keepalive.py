"""Cheap keepalives (issue 11): touches proven by the internal daemon's record, per-name claims
instead of one apply lock, the new fingerprint learned by the scanner, newest node wins."""
from __future__ import absolute_import, division, print_function

import binascii
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time

import pytest

from wazuh_cluster import claims, compat, keepalive, localsock, scanner
from wazuh_cluster import db as dbmod
from wazuh_cluster.config import Item
from wazuh_cluster.errors import RequestError
from wazuh_cluster.receive import MTIME_SLACK_NS, Incoming, Receiver

ITEMS = (
    Item("agent-info", "queue/agent-info", "dir", "client", False, 0o660, 0o770, False, True,
         False),
)
EXCLUDE = (".*", "*.tmp")
SEC = 10 ** 9
BASE_NS = 1500000000 * SEC
WAIT = 60.0  # a bound on waits for another thread, never a performance limit
A = u"queue/agent-info/a-any"
B = u"queue/agent-info/b-any"
LOG = logging.getLogger("wazuh_cluster.test_keepalive")


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-keepalive-")
    os.makedirs(os.path.join(path, "queue", "agent-info"))
    yield path
    shutil.rmtree(path)


def put(home, name, data, mtime_ns=BASE_NS):
    path = os.path.join(home, name)
    with open(path, "wb") as handle:
        handle.write(data)
    compat.set_mtime_ns(path, mtime_ns)
    return path


def mtime(home, name):
    return compat.stat_mtime_ns(os.lstat(os.path.join(home, name)))


def sha(data):
    return hashlib.sha256(data).hexdigest()


def record_of(home, name, digest):
    """What the internal daemon's "fingerprints" answers for a file (keepalive.records)."""
    return tuple(scanner.fingerprint(os.lstat(os.path.join(home, name)))[:4]) + (digest,)


def master(home):
    return Receiver(home, ITEMS, EXCLUDE, LOG, role="master")


# -- a touch proven by the record is not read ---------------------------------------------------

def test_a_touch_proven_by_the_record_is_applied_without_reading_the_file(home):
    # The record claims the content hashes to what the sender announced while the file holds
    # other bytes: only a receiver that does not read the file applies the mtime.
    put(home, A, b"other bytes\n")
    announced = sha(b"Linux a\n")
    learned = []
    states, reasons = master(home).apply_batch(
        [Incoming(A, None, announced, BASE_NS + 5 * SEC, True)],
        known={A: record_of(home, A, announced)}, learned=learned)
    assert states[A] == "synchronized" and reasons == {}
    assert abs(mtime(home, A) - (BASE_NS + 5 * SEC)) <= MTIME_SLACK_NS
    st = os.lstat(os.path.join(home, A))
    assert learned == [(A, scanner.packed_record(scanner.fingerprint(st), announced))]


def test_a_stale_record_falls_back_to_reading_and_refuses_other_content(home):
    put(home, A, b"Linux a\n")
    announced = sha(b"Linux a\n")
    record = record_of(home, A, announced)
    put(home, A, b"Linux A\n")  # changed by hand on the master since: same size, new ctime
    states, reasons = master(home).apply_batch(
        [Incoming(A, None, announced, BASE_NS + 5 * SEC, True)], known={A: record})
    assert states[A] == "failed" and "differs" in reasons[A]
    assert abs(mtime(home, A) - BASE_NS) <= MTIME_SLACK_NS


def test_a_wrong_checksum_is_not_proven_by_a_record_of_another(home):
    put(home, A, b"Linux a\n")
    record = record_of(home, A, sha(b"Linux a\n"))
    states, reasons = master(home).apply_batch(
        [Incoming(A, None, sha(b"forged\n"), BASE_NS + 5 * SEC, True)], known={A: record})
    assert states[A] == "failed" and "differs" in reasons[A]
    assert abs(mtime(home, A) - BASE_NS) <= MTIME_SLACK_NS


# -- the scanner learns the fingerprint ---------------------------------------------------------

def scanned_a(home):
    """A scanner that passed once over agent-info file A (b"Linux a\n"), and A's digest."""
    put(home, A, b"Linux a\n")
    scan = scanner.Scanner(home, ITEMS, EXCLUDE)
    scan.full_pass()
    return scan, binascii.unhexlify(scan.get(A)["sha256"])


def test_the_scanner_takes_a_learned_fingerprint_and_does_not_report_the_touch(home):
    scan, digest = scanned_a(home)
    learned = []
    master(home).apply_batch([Incoming(A, None, sha(b"Linux a\n"), BASE_NS + 5 * SEC, True)],
                             known={A: record_of(home, A, sha(b"Linux a\n"))}, learned=learned)
    fields = scanner.FINGERPRINT.unpack(learned[0][1])
    assert scan.learn(A, fields[:5], digest)
    assert scan.full_pass().is_empty()
    assert scan.get(A)["mtime_ns"] == fields[1]


def test_the_scanner_refuses_a_fingerprint_older_than_its_record(home):
    # Two sessions' keepalives of one file may be told in the other order: the older look
    # (an older ctime) must not replace the newer record, nor one of another inode.
    scan, digest = scanned_a(home)
    old = scanner.fingerprint(os.lstat(os.path.join(home, A)))
    time.sleep(0.05)  # past the coarse clock's tick: the touch's ctime is later
    compat.set_mtime_ns(os.path.join(home, A), BASE_NS + SEC)
    assert scan.full_pass().touched == [A]
    now = scanner.fingerprint(os.lstat(os.path.join(home, A)))
    assert now[3] > old[3]
    assert not scan.learn(A, old, digest)              # older than the record
    assert not scan.learn(A, now[:2] + (now[2] + 1,) + now[3:], digest)  # another inode
    assert not scan.learn(A, now, b"\0" * 32)         # another content than recorded
    assert scan.get(A)["mtime_ns"] == BASE_NS + SEC


def test_a_learned_fingerprint_the_file_does_not_have_costs_a_hash_not_a_change(home):
    # Taken without an lstat: a fingerprint the file no longer has (written since) makes the
    # next pass hash the file and report what it finds.
    scan, digest = scanned_a(home)
    fp = scanner.fingerprint(os.lstat(os.path.join(home, A)))
    stale = (fp[0], BASE_NS + 3 * SEC, fp[2], fp[3] + 1, fp[4])
    assert scan.learn(A, stale, digest)
    assert scan.full_pass().touched == [A]             # hashed: same content, its own mtime
    assert scan.get(A)["mtime_ns"] == fp[1]
    with open(os.path.join(home, A), "wb") as handle:
        handle.write(b"Linux b\n")
    now = scanner.fingerprint(os.lstat(os.path.join(home, A)))
    assert scan.learn(A, (now[0], BASE_NS, now[2], now[3] + 1, now[4]), digest)
    assert scan.full_pass().changed == [A]             # the new content is still seen


# -- batches of several peers -------------------------------------------------------------------

class Held(object):
    """A batch's files that stop after the first one until released (a slow peer's batch)."""

    def __init__(self, files):
        self.files = files
        self.reached = threading.Event()
        self.release = threading.Event()

    def __iter__(self):
        for index, incoming in enumerate(self.files):
            if index == 1:
                self.reached.set()
                self.release.wait(WAIT)
            yield incoming


class Apply(threading.Thread):
    """rx.apply_batch(files, **kwargs) in a thread of its own; its answer in `result`."""

    def __init__(self, rx, files, **kwargs):
        threading.Thread.__init__(self)
        self.daemon = True
        self.rx, self.files, self.kwargs, self.result = rx, files, kwargs, None

    def run(self):
        self.result = self.rx.apply_batch(self.files, **self.kwargs)


def content(name, data, mtime_ns):
    return Incoming(name, data, sha(data), mtime_ns, False)


def test_a_held_batch_does_not_delay_another_peers_batch_of_other_names(home):
    rx = master(home)
    held = Held([content(A, b"a\n", BASE_NS), content(u"queue/agent-info/c-any", b"c\n",
                                                       BASE_NS)])
    slow = Apply(rx, held)
    slow.start()
    assert held.reached.wait(WAIT)
    quick = Apply(rx, [content(B, b"b\n", BASE_NS)])
    quick.start()
    quick.join(WAIT)
    # The order is the assertion: the quick batch ended while the slow one was still held.
    done_first = not quick.is_alive() and slow.is_alive()
    held.release.set()
    slow.join(WAIT)
    assert done_first
    assert quick.result[0] == {B: "synchronized"}
    assert rx.claims.waits == 0


@pytest.mark.parametrize("held_first_ns,other_ns", [(BASE_NS + SEC, BASE_NS + 2 * SEC),
                                                    (BASE_NS + 2 * SEC, BASE_NS + SEC)])
def test_two_peers_reporting_one_agent_newest_wins_whatever_the_order(home, held_first_ns,
                                                                      other_ns):
    put(home, A, b"old\n", BASE_NS)
    rx = master(home)
    held = Held([content(A, b"first\n", held_first_ns), content(B, b"b\n", BASE_NS)])
    slow = Apply(rx, held)
    slow.start()
    assert held.reached.wait(WAIT)
    other = Apply(rx, [content(A, b"second\n", other_ns)])
    other.start()
    for _ in range(int(WAIT * 100)):  # the other batch waits for A, which the slow one holds
        if rx.claims.waits or not other.is_alive():
            break
        other.join(0.01)
    assert rx.claims.waits == 1 and other.is_alive()
    held.release.set()
    slow.join(WAIT)
    other.join(WAIT)
    newest = max(held_first_ns, other_ns)
    assert abs(mtime(home, A) - newest) <= MTIME_SLACK_NS
    with open(os.path.join(home, A), "rb") as handle:
        assert handle.read() == (b"first\n" if newest == held_first_ns else b"second\n")
    assert slow.result[0][A] == other.result[0][A] == "synchronized"


def test_batches_crossing_names_finish_both():
    # Each waiter first gives back what it holds (the receiver finishes its part): no cycle.
    table = claims.Claims()
    first, second = object(), object()
    assert table.try_claim(A, first) and table.try_claim(B, second)
    assert not table.try_claim(B, first)
    table.release(first, [A])                 # what Receiver._claim does before waiting
    waiter = threading.Thread(target=table.claim, args=(B, first))
    waiter.daemon = True
    waiter.start()
    for _ in range(int(WAIT * 100)):
        if table.wanted(second):
            break
        waiter.join(0.01)
    assert table.wanted(second)
    assert table.try_claim(A, second)         # A is free: the second batch goes on
    table.release(second, [A, B])
    waiter.join(WAIT)
    assert not waiter.is_alive() and table.try_claim(B, first)


# -- which node an agent reports to -------------------------------------------------------------

def test_agent_rows_arriving_out_of_order_keep_the_newest_keepalives_node(home):
    db = dbmod.ClusterDB(os.path.join(home, "cluster.db"), LOG)
    try:
        db.record_agents([["a-any", "node02", BASE_NS + 2 * SEC]])
        db.record_agents([["a-any", "node03", BASE_NS + SEC]])   # older, recorded later
        assert db.agents()["a-any"] == ("node02", BASE_NS + 2 * SEC)
        db.record_agents([["a-any", "node03", BASE_NS + 3 * SEC]])
        assert db.agents()["a-any"] == ("node03", BASE_NS + 3 * SEC)
    finally:
        db.close()


# -- wazuh-clusterd's requests to the internal daemon --------------------------------------------

class Link(object):
    """The internal daemon's side of "fingerprints" and "received", recorded."""

    def __init__(self, down=False):
        self.calls, self.down = [], down

    def call(self, cmd, args):
        result, data = self.call_data(cmd, args)
        assert data is None
        return result

    def call_data(self, cmd, args):
        if self.down:
            raise RequestError("internal daemon unavailable", "internal_unavailable")
        self.calls.append((cmd, args))
        if cmd == "fingerprints":
            return {"count": len(args["names"])}, b"".join(
                scanner.FINGERPRINT.pack(1, 2, 3, 4, 0o100660, b"\xab" * 32)
                for _name in args["names"])
        return {"learned": len(args.get("names", []))}, None


def learned_row(row):
    """A learned row (Receiver.apply_batch) of [name, size, mtime_ns, ino, ctime_ns, mode,
    sha256 hex]."""
    return (row[0], scanner.packed_record(row[1:6], row[6]))


def told_rows(args):
    """The learned rows a "received" request carries as names and packed records."""
    data = binascii.a2b_base64(args.get("records", "").encode("ascii"))
    size = scanner.FINGERPRINT.size
    rows = []
    for index, name in enumerate(args.get("names", [])):
        fields = scanner.FINGERPRINT.unpack_from(data, index * size)
        rows.append([name] + list(fields[:5]) + [binascii.hexlify(fields[5]).decode("ascii")])
    return rows


def test_records_and_fingerprints_travel_in_bounded_requests():
    names = [u"queue/agent-info/%s-%05d" % ("a" * 200, i) for i in range(20000)]
    link = Link()
    incoming = [Incoming(n, None, "ab" * 32, BASE_NS, True) for n in names] + \
        [Incoming(u"bad\\name", None, "ab" * 32, BASE_NS, True)]
    known = keepalive.records(link, incoming)
    assert sorted(known) == sorted(names) and known[names[0]] == (1, 2, 3, 4, "ab" * 32)
    rows = [[n, 1, 2, 3, 4, 0o100660, "ab" * 32] for n in names]
    agents = [[n.rpartition("/")[2], "client1", BASE_NS] for n in names]
    fingerprint_calls = len(link.calls)
    keepalive.tell(link, [learned_row(row) for row in rows], agents)
    assert len(link.calls) > fingerprint_calls + 2
    for cmd, args in link.calls:
        assert len(json.dumps({"id": 1, "cmd": cmd, "args": args})) < \
            keepalive.REQUEST_BYTES + 1024 < localsock.MAX_MESSAGE
    from wazuh_cluster import catalog
    assert all(len(args["names"]) <= catalog.MAX_FINGERPRINT_NAMES
               for cmd, args in link.calls[:fingerprint_calls])
    told = link.calls[fingerprint_calls:]
    assert set(cmd for cmd, _args in told) == set(["received"])
    assert [r for _c, args in told for r in told_rows(args)] == rows         # all, in order
    assert [r for _c, args in told for r in args.get("agents", [])] == agents


def test_a_clients_whole_keepalive_batch_asks_once_and_tells_once():
    # sync.BATCH_FILES meta-only updates of agent-info files named as Wazuh names them: one
    # "fingerprints" and one "received" request (five before: two, two and one agent_nodes).
    from wazuh_cluster import sync
    names = [u"queue/agent-info/agent-%05d-10.0.%d.%d" % (i, i // 250, i % 250)
             for i in range(sync.BATCH_FILES)]
    link = Link()
    keepalive.records(link, [Incoming(n, None, "ab" * 32, BASE_NS, True) for n in names])
    keepalive.tell(link, [learned_row([n, 8, BASE_NS, 3, BASE_NS, 0o100660, "ab" * 32])
                          for n in names],
                   [[n.rpartition("/")[2], "client-01", BASE_NS] for n in names])
    assert [cmd for cmd, _args in link.calls] == ["fingerprints", "received"]
    for cmd, args in link.calls:
        assert len(json.dumps({"id": 1, "cmd": cmd, "args": args})) < localsock.MAX_MESSAGE


def test_a_keepalive_batch_is_told_in_one_request():
    link = Link()
    keepalive.tell(link, [learned_row([A, 1, 2, 3, 4, 0o100660, "ab" * 32])],
                   [["b-any", "client1", 5]], "client1")
    [(cmd, args)] = link.calls
    assert cmd == "received" and told_rows(args) == [[A, 1, 2, 3, 4, 0o100660, "ab" * 32]]
    assert args["node"] == "client1" and args["agents"] == [["b-any", "client1", 5]]
    link = Link()
    keepalive.tell(link, [], [])
    assert link.calls == []


class Answering(Link):
    """An internal daemon answering "fingerprints" with these bytes (for two names), or
    with data(names)."""

    def __init__(self, data):
        Link.__init__(self)
        self.data = data

    def call_data(self, cmd, args):
        self.calls.append((cmd, args))
        data = self.data(args["names"]) if callable(self.data) else self.data
        return {"count": len(args["names"])}, data


def test_fingerprints_are_read_from_the_records_after_the_reply():
    # One record, then none (a file the daemon does not vouch for), in the names' order.
    digest = hashlib.sha256(b"Linux a\n").digest()
    record = scanner.FINGERPRINT.pack(8, BASE_NS, 77, BASE_NS + 1, 0o100660, digest)
    incoming = [Incoming(n, None, "ab" * 32, BASE_NS, True) for n in (B, A, A)] + \
        [Incoming(u"queue/agent-info/c-any", b"c\n", sha(b"c\n"), BASE_NS, False)]
    link = Answering(lambda names: b"".join(
        record if name == A else scanner.NO_FINGERPRINT for name in names))
    assert keepalive.records(link, incoming) == {
        A: (8, BASE_NS, 77, BASE_NS + 1, binascii.hexlify(digest).decode("ascii"))}
    [(cmd, args)] = link.calls
    assert cmd == "fingerprints" and sorted(args["names"]) == [A, B]  # meta-only, once
    # An answer of another size proves nothing: every file is read, as without the daemon.
    for data in (record, record * 2 + b"\0", None):
        assert keepalive.records(Answering(data), incoming) == {}


def test_without_the_internal_daemon_touches_are_read_as_before():
    link = Link(down=True)
    assert keepalive.records(link, [Incoming(A, None, "ab" * 32, BASE_NS, True)]) == {}
    keepalive.tell(link, [learned_row([A, 1, 2, 3, 4, 0o100660, "ab" * 32])])  # no raise
    with pytest.raises(RequestError):  # agents untold: the batch fails, the peer retries
        keepalive.tell(link, [], [["a-any", "client1", 5]])


def test_a_batch_of_known_agents_mixed_with_new_and_stale_rows_records_each_rightly(home):
    # The usual batch (every agent known, every keepalive newer) skips the insert: a batch
    # where one row is new or one update is refused (an older keepalive) must still insert
    # the new agent and keep the newer node of the refused one.
    db = dbmod.ClusterDB(os.path.join(home, "cluster.db"), LOG)
    try:
        db.record_agents([["a-any", "node02", BASE_NS + 2 * SEC], ["b-any", "node02", BASE_NS]])
        db.record_agents([["a-any", "node02", BASE_NS + 4 * SEC],
                          ["b-any", "node03", BASE_NS + SEC]])   # every row updates
        assert db.agents() == {"a-any": ("node02", BASE_NS + 4 * SEC),
                               "b-any": ("node03", BASE_NS + SEC)}
        db.record_agents([["a-any", "node03", BASE_NS + 3 * SEC],   # older: refused
                          ["b-any", "node02", BASE_NS + 2 * SEC],
                          ["c-any", "node03", BASE_NS + 3 * SEC]])  # new agent
        assert db.agents() == {"a-any": ("node02", BASE_NS + 4 * SEC),
                               "b-any": ("node02", BASE_NS + 2 * SEC),
                               "c-any": ("node03", BASE_NS + 3 * SEC)}
        # One row refused and one new agent: as many rows updated as there are known ones.
        db.record_agents([["a-any", "node03", BASE_NS + SEC], ["d-any", "node02", BASE_NS]])
        assert db.agents()["d-any"] == ("node02", BASE_NS)
        assert db.agents()["a-any"] == ("node02", BASE_NS + 4 * SEC)
    finally:
        db.close()


def test_two_touches_in_one_ctime_tick_told_in_the_other_order_keep_the_newer(home):
    # Two sessions touch one agent-info file in place one after the other (the newer
    # keepalive last: claims, newer_only) within one tick of a coarse ctime clock (a kernel
    # without fine-grained ctime: the same ctime for both). Their "received" requests may
    # reach the internal daemon in either order: the older record told last must not replace
    # the newer one (the summary of that client's round would then use the older mtime until
    # the next pass over agent-info, up to foreign_scan_interval).
    scan, digest = scanned_a(home)
    fp = scanner.fingerprint(os.lstat(os.path.join(home, A)))
    tick = fp[3] + SEC  # both touches' ctime, after the record's
    newer = scanner.FINGERPRINT.pack(fp[0], BASE_NS + 20 * SEC, fp[2], tick, fp[4], digest)
    older = scanner.FINGERPRINT.pack(fp[0], BASE_NS + 10 * SEC, fp[2], tick, fp[4], digest)
    assert scan.learn_records([A], newer) == [True]
    scan.learn_records([A], older)
    assert scan.get(A)["mtime_ns"] == BASE_NS + 20 * SEC


class Ticketing(Link):
    """An internal daemon whose "fingerprints" answers carry a ticket (catalog)."""

    def call_data(self, cmd, args):
        result, data = Link.call_data(self, cmd, args)
        if cmd == "fingerprints":
            result["ticket"] = 7
        return result, data


def test_the_names_are_asked_in_the_batchs_order_and_told_by_their_indexes():
    # A keepalive batch set in place whole refers to the names it asked, in that order, by
    # their indexes there (no map of the names to build); any other rows by theirs.
    names = [u"queue/agent-info/agent-%05d-any" % i for i in range(300)]
    incoming = [Incoming(n, None, "ab" * 32, BASE_NS, True) for n in names + names[:3]] + \
        [Incoming(u"bad\\name", None, "ab" * 32, BASE_NS, True)]
    for told in (names, names[::-1], names[5:9] + names[:2]):
        link = Ticketing()
        known = keepalive.records(link, incoming)
        assert [args["names"] for cmd, args in link.calls] == [names]  # once each, in order
        rows = [[n, 1, 2, 3, 4, 0o100660, "ab" * 32] for n in told]
        keepalive.tell(link, [learned_row(row) for row in rows], [], "client1", known)
        cmd, args = link.calls[-1]
        assert cmd == "received" and args["ticket"] == 7 and args["of"] == len(names)
        assert [names[at] for at in args["at"]] == told
        data = binascii.a2b_base64(args["records"].encode("ascii"))
        assert data == b"".join(learned_row(row)[1] for row in rows)
