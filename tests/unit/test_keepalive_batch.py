"""A batch of keepalives alone (touches.touch_all, issue 11): the same rules as the
per-file path (SPEC section 4: names checked first, no symlink followed, times in place only
on a file with one name, mtime sanity, newest keepalive wins, a proof by the record), checked
here on batches that take it: every update meta-only, with the internal daemon's records."""
from __future__ import absolute_import, division, print_function

import hashlib
import os

import pytest

from test_keepalive import Apply, Held
from test_receive import (AI, BASE_NS, EXCLUDE, ITEMS, SEC, home, log,  # noqa: F401
                          master_rx, mtime_ns, odd_agent_infos, outside, put, read, temp_files)
from wazuh_cluster import claims, compat, fsops, pathrules, receive, scanner, touches
from wazuh_cluster.errors import PathRefused
from wazuh_cluster.receive import Incoming

CONTENT = b"Linux web01 3.10.0 #1 SMP x86_64 - Wazuh v3.0.0\n"
DIGEST = hashlib.sha256(CONTENT).hexdigest()
WAIT = 60.0  # a bound on waits for another thread, never a performance limit


def info(index):
    return u"queue/agent-info/agent%03d-10.0.0.%d" % (index, index)


def agents(home, count, mtime=BASE_NS):
    names = [info(index) for index in range(count)]
    for name in names:
        put(home, name, CONTENT, mtime)
    return names


def record(home, name, digest=DIGEST, path=None):
    """The internal daemon's record of a file (keepalive.records): its lstat and checksum."""
    st = os.lstat(path or os.path.join(home, name))
    return tuple(scanner.fingerprint(st)[:4]) + (digest,)


def touch(name, mtime, digest=DIGEST):
    return Incoming(name, None, digest, mtime, True)


@pytest.fixture
def per_file(monkeypatch):
    """Names the per-file path (stage) was given: the keepalive path left them to it."""
    staged = []
    real = receive._Batch.stage

    def stage(batch, incoming):
        staged.append(getattr(incoming, "name", None))
        return real(batch, incoming)
    monkeypatch.setattr(receive._Batch, "stage", stage)
    return staged


# -- the names: pathrules.Locator gives locate()'s answers ---------------------------------------

NAMES = [
    AI, info(1), u"queue/agent-info/" + u"x" * 255, u"queue/agent-info/" + u"x" * 256,
    u"queue/agent-info/.hidden", u"queue/agent-info/a.tmp", u"queue/agent-info/a~",
    u"queue/agent-info/.", u"queue/agent-info/..", u"queue/agent-info/", u"queue/agent-info",
    u"queue/agent-info/../agent-groups/x", u"queue/agent-info//x", u"/queue/agent-info/x",
    u"queue/agent-info/a\\b", u"queue/agent-info/a\x01", u"queue/agent-info/\u00e9",
    u"queue/agent-info/sub/x", u"queue/agent-groups/001", u"etc/client.keys",
    u"etc/client.keys/x", u"etc/shared/default/agent.conf", u"etc/shared/a/b/c/d",
    u"etc/shared/.git/x", u"etc/shared/default/ar.conf", u"etc/shared/default/.x",
    u"x", u"", u"queue/x", u"queue/agent-info/" + u"a" * 1010,
    u"etc/shared/" + u"/".join([u"d" * 200] * 5) + u"/x",
]


def answer(call, name):
    try:
        return call(name)
    except PathRefused as exc:
        return exc.message


@pytest.mark.parametrize("sender,receiver", [("client", "master"), ("master", "client")])
def test_the_locator_answers_as_locate_for_every_name(sender, receiver):
    locator = pathrules.Locator(ITEMS, sender, receiver, EXCLUDE)
    for _ in range(2):  # the second time from what it keeps per folder
        for name in NAMES:
            assert answer(locator.locate, name) == answer(
                lambda n: pathrules.locate(n, ITEMS, sender, receiver, EXCLUDE), name), name


# Boundaries of the per-folder expression (Locator.folder): the whole name's length (1024)
# with a deep folder, a folder that leaves no room for a name, an item's exact path inside
# another item's folder, exclusion patterns and dots.
DEEP = u"etc/shared/" + u"/".join([u"d" * 200] * 5)  # 1015 characters
EDGES = [
    DEEP + u"/" + u"x" * 8, DEEP + u"/" + u"x" * 9, DEEP + u"/x", DEEP + u"/.x", DEEP + u"/..",
    DEEP + u"/" + u"d" * 7 + u"/x", DEEP + u"/" + u"d" * 8 + u"/x",
    u"queue/agent-info/pinned", u"queue/agent-info/pinned2", u"queue/agent-info/xpinned",
    u"queue/agent-info/a.swp", u"queue/agent-info/a.swpx", u"queue/agent-info/merged.mg",
    u"queue/agent-info/amerged.mg", u"queue/agent-info/a\n", u"queue/agent-info/a\nb",
    u"queue/agent-info/" + u"x" * 255, u"queue/agent-info/" + u"x" * 256,
    u"queue/agent-info/a/", u"queue/agent-info/a b", u"queue/agent-info/~",
]
PINNED = ITEMS + (ITEMS[3]._replace(name="pinned", path="queue/agent-info/pinned", kind="file"),)


@pytest.mark.parametrize("sender,receiver", [("client", "master"), ("master", "client")])
@pytest.mark.parametrize("items", [ITEMS, PINNED])
@pytest.mark.parametrize("exclude", [EXCLUDE, ()])
def test_the_locator_answers_as_locate_at_the_edges_of_a_folder(sender, receiver, items,
                                                                exclude):
    locator = pathrules.Locator(items, sender, receiver, exclude)
    for name in NAMES + EDGES:
        expected = answer(lambda n: pathrules.locate(n, items, sender, receiver, exclude), name)
        assert answer(locator.locate, name) == expected, name
        # the keepalive loop's own check: the folder's match of the last component
        folder, _, base = name.rpartition(u"/")
        found = locator.folder(folder)
        if found and found[1](base):
            assert isinstance(expected, tuple) and expected[0] is found[0], name


def test_the_locator_keeps_a_bounded_number_of_folders():
    locator = pathrules.Locator(ITEMS, "master", "client", EXCLUDE)
    for index in range(3 * locator.MAX_FOLDERS):
        name = u"etc/shared/g%d/agent.conf" % index
        assert locator.locate(name)[1] == name.split(u"/")
    assert len(locator.folders) == locator.MAX_FOLDERS


# -- the keepalive path is taken, and proves what it sets ---------------------------------------

def test_a_keepalive_batch_is_applied_in_place_without_the_per_file_path(home, log, per_file):
    names = agents(home, 20)
    inodes = [os.lstat(os.path.join(home, name)).st_ino for name in names]
    known = dict((name, record(home, name)) for name in names)
    learned = []
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known, learned=learned)
    assert states == dict((name, "synchronized") for name in names) and reasons == {}
    assert per_file == []
    for name, inode in zip(names, inodes):
        path = os.path.join(home, name)
        assert os.lstat(path).st_ino == inode
        assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS
    assert sorted(learned) == sorted(
        (name, scanner.packed_record(scanner.fingerprint(os.lstat(os.path.join(home, name))),
                                     DIGEST))
        for name in names)


class Serial(object):
    """A lock that notes whether it is held."""

    def __init__(self):
        self.held = False

    def __enter__(self):
        assert not self.held
        self.held = True

    def __exit__(self, *exc):
        self.held = False


def test_a_serial_lock_is_held_while_setting_in_place_not_while_flushing(home, log, per_file,
                                                                        monkeypatch):
    # Keepalive batches wait for each other while they set times (inbox._TOUCHING), not
    # while they flush: a syncfs each, one after another, would queue behind a busy disk.
    names = agents(home, 20)
    known = dict((name, record(home, name)) for name in names)
    serial, seen = Serial(), []
    touch_all, finish = touches.touch_all, receive.Receiver._finish

    def touching(batch, files):
        seen.append(("touch", serial.held))
        return touch_all(batch, files)

    def finishing(rx, batch):
        seen.append(("finish", serial.held))
        return finish(rx, batch)
    monkeypatch.setattr(touches, "touch_all", touching)
    monkeypatch.setattr(receive.Receiver, "_finish", finishing)
    states, _reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known, serial=serial)
    assert states == dict((name, "synchronized") for name in names) and per_file == []
    assert seen[0] == ("touch", True) and ("finish", False) in seen
    assert ("finish", True) not in seen and not serial.held


def test_a_record_that_no_longer_holds_sends_the_file_to_be_read(home, log, per_file):
    names = agents(home, 3)
    known = dict((name, record(home, name)) for name in names)
    put(home, names[1], b"other content\n", BASE_NS)  # a new ctime: the record is stale
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known)
    assert per_file == [names[1]]
    assert states[names[1]] == "failed" and "differs" in reasons[names[1]]
    assert abs(mtime_ns(os.path.join(home, names[1])) - BASE_NS) <= receive.MTIME_SLACK_NS
    assert states[names[0]] == states[names[2]] == "synchronized"


def test_a_checksum_other_than_the_records_is_read_and_refused(home, log, per_file):
    names = agents(home, 2)
    known = dict((name, record(home, name)) for name in names)
    forged = hashlib.sha256(b"forged\n").hexdigest()
    states, reasons = master_rx(home, log).apply_batch(
        [touch(names[0], BASE_NS + 5 * SEC, forged), touch(names[1], BASE_NS + 5 * SEC,
                                                           DIGEST.upper())], known=known)
    assert per_file == names
    assert states[names[0]] == "failed" and "differs" in reasons[names[0]]
    assert states[names[1]] == "synchronized"  # upper-case hex: read, and the same content


@pytest.mark.parametrize("valid_first", [False, True])
def test_hostile_names_in_a_keepalive_batch_are_refused_before_any_system_call(
        home, log, outside, per_file, valid_first):
    # valid_first: after a name of the folder, its folder is known to the loop (the names
    # that begin with it are checked by its last component alone: a "/" in the rest fails)
    names = agents(home, 2 if valid_first else 1)
    victim = os.path.join(outside, "victim")
    before = mtime_ns(victim)
    hostile = [u"queue/agent-info/../../../" + os.path.relpath(victim, "/"),
               u"queue/agent-info/.hidden", u"etc/client.keys", u"queue/agent-info/a\x01",
               u"queue/agent-info//" + os.path.relpath(victim, "/")]
    known = dict((name, record(home, name, path=victim)) for name in hostile)
    for name in names:
        known[name] = record(home, name)
    batch = names[:1] + hostile + names[1:] if valid_first else hostile + names
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in batch], known=known)
    assert dict((name, states[name]) for name in hostile) == dict.fromkeys(hostile, "invalid")
    assert "'..' component" in reasons[hostile[0]] and "excluded" in reasons[hostile[1]]
    assert "master-owned" in reasons[hostile[2]] and "control" in reasons[hostile[3]]
    assert "empty" in reasons[hostile[4]]
    assert mtime_ns(victim) == before
    assert [states[name] for name in names] == ["synchronized"] * len(names)
    assert sorted(per_file) == sorted(hostile)


def test_a_symlink_folder_or_fifo_in_a_keepalive_batch_is_refused_and_not_followed(
        home, log, outside):
    victim, before, names = odd_agent_infos(home, outside)
    # forged records: what the file behind each would show
    known = dict((name, record(home, name, path=victim)) for name in names)
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known)
    assert states == dict((name, "invalid") for name in names)
    assert "symlink" in reasons[names[0]] and "folder" in reasons[names[1]]
    assert "not a regular file" in reasons[names[2]]
    assert mtime_ns(victim) == before and os.path.islink(os.path.join(home, names[0]))


def test_a_symlinked_agent_info_folder_is_not_followed(home, log, outside):
    victim = os.path.join(outside, "victim")
    before = mtime_ns(victim)
    os.rmdir(os.path.join(home, "queue/agent-info"))
    os.symlink(outside, os.path.join(home, "queue/agent-info"))
    name = u"queue/agent-info/victim"
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC)], known={name: record(home, name, path=victim)})
    assert states == {name: "invalid"} and "symlink" in reasons[name]
    assert mtime_ns(victim) == before


def test_a_hard_link_in_a_keepalive_batch_gets_a_copy_and_its_other_name_keeps_its_time(
        home, log, outside, per_file):
    victim = put(outside, "agent", CONTENT, BASE_NS)
    os.link(victim, os.path.join(home, AI))
    names = [AI] + agents(home, 2)
    known = dict((name, record(home, name)) for name in names)
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known)
    assert states == dict((name, "synchronized") for name in names) and reasons == {}
    assert per_file == [AI]
    assert abs(mtime_ns(victim) - BASE_NS) <= receive.MTIME_SLACK_NS
    assert os.lstat(victim).st_nlink == 1
    assert read(home, AI) == CONTENT
    assert abs(mtime_ns(os.path.join(home, AI)) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS
    assert temp_files(home) == []


def test_times_from_peers_are_checked_in_a_keepalive_batch(home, log):
    names = agents(home, 4)
    known = dict((name, record(home, name)) for name in names)
    rx = master_rx(home, log)
    now_ns = rx.times.now_ns()
    future = now_ns + rx.times.max_future_ns + 3600 * SEC
    states, reasons = rx.apply_batch(
        [touch(names[0], -1), touch(names[1], True), touch(names[2], future),
         touch(names[3], BASE_NS - SEC)], known=known)
    assert states[names[0]] == states[names[1]] == "invalid"
    assert "mtime" in reasons[names[0]] and "mtime" in reasons[names[1]]
    assert states[names[2]] == "synchronized"  # applied as our present
    applied = mtime_ns(os.path.join(home, names[2]))
    assert now_ns - receive.MTIME_SLACK_NS <= applied < future - 3000 * SEC
    assert states[names[3]] == "synchronized" and "newer" in reasons[names[3]]  # kept
    assert abs(mtime_ns(os.path.join(home, names[3])) - BASE_NS) <= receive.MTIME_SLACK_NS


def test_a_local_time_beyond_the_bound_never_wins_a_keepalive_batch(home, log):
    rx = master_rx(home, log)
    far = rx.times.now_ns() + rx.times.max_future_ns + 3600 * SEC
    names = agents(home, 1, far)
    states, reasons = rx.apply_batch([touch(names[0], BASE_NS)],
                                     known={names[0]: record(home, names[0])})
    assert states == {names[0]: "synchronized"} and reasons == {}
    assert abs(mtime_ns(os.path.join(home, names[0])) - BASE_NS) <= receive.MTIME_SLACK_NS


def test_a_failed_flush_fails_what_the_keepalive_batch_set_in_place(home, log, monkeypatch):
    if fsops.SYNCFS is None:
        pytest.skip("no syncfs here: every file is fsync'd one by one")
    names = agents(home, receive.FSYNC_EACH_UP_TO + 2)  # a batch this large goes to syncfs
    known = dict((name, record(home, name)) for name in names)

    def broken(path):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(fsops, "syncfs_folder", broken)
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known)
    assert states == dict((name, "failed") for name in names)
    assert all("flush failed" in reasons[name] for name in names)


def test_a_fence_refuses_each_keepalive_of_a_deposed_sender(home, log):
    names = agents(home, 3)
    known = dict((name, record(home, name)) for name in names)
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known,
        fence=lambda change: False)
    assert states == dict((name, "invalid") for name in names)
    assert all(reasons[name] == receive.FENCED for name in names)
    assert all(abs(mtime_ns(os.path.join(home, name)) - BASE_NS) <= receive.MTIME_SLACK_NS
               for name in names)


# -- newest keepalive wins between two clients --------------------------------------------------

@pytest.mark.parametrize("held_ns,touch_ns", [(BASE_NS + SEC, BASE_NS + 2 * SEC),
                                              (BASE_NS + 2 * SEC, BASE_NS + SEC)])
def test_a_keepalive_batch_waits_for_a_name_another_batch_holds_and_newest_wins(
        home, log, held_ns, touch_ns):
    names = agents(home, 3)
    known = dict((name, record(home, name)) for name in names)
    rx = master_rx(home, log)
    other = names[0]
    held = Held([Incoming(other, CONTENT, DIGEST, held_ns, False),
                 Incoming(AI, CONTENT, DIGEST, BASE_NS, False)])
    slow = Apply(rx, held)
    slow.start()
    assert held.reached.wait(WAIT)
    quick = Apply(rx, [touch(name, touch_ns) for name in names], known=known)
    quick.start()
    for _ in range(int(WAIT * 100)):  # the others are set while `other` waits
        if rx.claims.waits:
            break
        quick.join(0.01)
    assert rx.claims.waits == 1 and quick.is_alive()
    for name in names[1:]:
        assert abs(mtime_ns(os.path.join(home, name)) - touch_ns) <= receive.MTIME_SLACK_NS
    held.release.set()
    slow.join(WAIT)
    quick.join(WAIT)
    newest = max(held_ns, touch_ns)
    assert abs(mtime_ns(os.path.join(home, other)) - newest) <= receive.MTIME_SLACK_NS
    assert quick.result[0] == dict((name, "synchronized") for name in names)


def test_two_keepalive_batches_of_one_agent_keep_the_newest(home, log):
    names = agents(home, 1)
    rx = master_rx(home, log)
    for mtime in (BASE_NS + 9 * SEC, BASE_NS + 4 * SEC):
        states, reasons = rx.apply_batch([touch(names[0], mtime)],
                                         known={names[0]: record(home, names[0])})
        assert states == {names[0]: "synchronized"}
    assert "newer" in reasons[names[0]]
    assert abs(mtime_ns(os.path.join(home, names[0])) - BASE_NS - 9 * SEC) <= \
        receive.MTIME_SLACK_NS


def test_claim_free_claims_the_free_names_at_once_and_gives_back_the_others():
    table = claims.Claims()
    first, second = object(), object()
    assert table.try_claim(u"b", first)
    assert table.claim_free([u"a", u"b", u"c", u"a"], second) == [u"b"]
    assert not table.try_claim(u"a", first) and not table.try_claim(u"c", first)
    assert table.try_claim(u"b", first)
    table.release(second, [u"a", u"c"])
    assert table.try_claim(u"a", first)


def test_a_mixed_batch_goes_the_per_file_way(home, log, per_file):
    names = agents(home, 2)
    known = dict((name, record(home, name)) for name in names)
    states, _ = master_rx(home, log).apply_batch(
        [touch(names[0], BASE_NS + 5 * SEC),
         Incoming(names[1], b"new\n", hashlib.sha256(b"new\n").hexdigest(),
                  BASE_NS + 5 * SEC, False)], known=known)
    assert states == dict((name, "synchronized") for name in names)
    assert per_file == names
    assert compat.to_bytes(read(home, names[1])) == b"new\n"


def replace_at_time_set(monkeypatch, home, name):
    """The first time a time is set by descriptor on the file `name` has, a copy of it
    with an older time (a restored backup) is renamed over it just before."""
    victim = os.path.join(home, name)
    done = []

    def replacing(real):  # the time set by descriptor: os.utime (3.3+) or fsops.set_mtime
        def set_time(target, *args, **kwargs):
            if isinstance(target, int) and not done and \
                    os.fstat(target).st_ino == os.lstat(victim).st_ino:
                done.append(True)
                put(home, name + u".restored", CONTENT, BASE_NS - 100 * SEC)
                os.rename(victim + ".restored", victim)
            return real(target, *args, **kwargs)
        return set_time
    monkeypatch.setattr(os, "utime", replacing(os.utime))
    monkeypatch.setattr(fsops, "set_mtime", replacing(fsops.set_mtime))
    return done


def test_a_file_replaced_between_the_check_and_the_time_set_is_left_to_the_per_file_path(
        home, log, per_file, monkeypatch):
    """Renamed over (a restored backup: the same content, an older time) after the
    keepalive path checked its descriptor and before it set the time: the time went to the
    replaced inode, the name kept the older time, the batch said synchronized and the
    internal daemon was told the replaced inode's record. The per-file path now decides
    that name again on the file that has it."""
    names = agents(home, 3)
    known = dict((name, record(home, name)) for name in names)
    done = replace_at_time_set(monkeypatch, home, names[1])
    learned = []
    states, _reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names], known=known, learned=learned)
    assert done and per_file == [names[1]]
    assert states == dict((name, "synchronized") for name in names)
    for name in names:  # the newest keepalive on every name
        assert abs(mtime_ns(os.path.join(home, name)) - BASE_NS - 5 * SEC) <= \
            receive.MTIME_SLACK_NS
    assert [row[0] for row in learned if row[0] == names[1]] in ([], [names[1]])
    for name, packed in learned:
        assert scanner.FINGERPRINT.unpack(packed)[2] == os.lstat(os.path.join(home, name)).st_ino


def test_a_file_replaced_while_the_per_file_path_sets_its_time_is_not_synchronized(
        home, log, monkeypatch):
    """The same race on the per-file path (no record): the batch said synchronized of a
    time that went to the replaced inode; the name is now failed, and sent again."""
    names = agents(home, 2)
    done = replace_at_time_set(monkeypatch, home, names[0])
    states, reasons = master_rx(home, log).apply_batch(
        [touch(name, BASE_NS + 5 * SEC) for name in names])
    assert done
    assert states[names[0]] == "failed" and "replaced" in reasons[names[0]]
    assert states[names[1]] == "synchronized"
