"""Hard links: the receiver never changes a file in place through a name it shares.

A link planted in a synchronised folder to a file the daemon's user owns (another agent's
file, a file outside the tree) must keep that file's content and times, whatever is pushed
to the link's name: a meta-only keepalive or new content.
"""
from __future__ import absolute_import, division, print_function

import os
import stat

import pytest

from test_receive import (AI, BASE_NS, SEC, client_rx, home, inc, log, master_rx,  # noqa
                          mtime_ns, outside, put, read, temp_files)
from wazuh_cluster import fsops, receive

CONTENT = b"Linux web01 3.10.0 #1 SMP x86_64 - Wazuh v3.0.0\n#\"node_name\":client1\n"
VICTIM_NS = 1499999000 * SEC  # whole seconds: exact through 2.7's float utime too


def plant_link(home, victim, name):
    """`name` under home becomes another name of the file `victim`."""
    path = os.path.join(home, name)
    if os.path.lexists(path):
        os.unlink(path)
    os.link(victim, path)
    return path


def victim_file(folder, base="victim", content=CONTENT):
    return put(folder, base, content, VICTIM_NS)


def assert_untouched(victim, content=CONTENT):
    with open(victim, "rb") as handle:
        assert handle.read() == content
    assert mtime_ns(victim) == VICTIM_NS
    assert os.lstat(victim).st_nlink == 1  # the link's name now holds a file of its own


def test_keepalive_through_a_link_to_a_file_outside_the_tree(home, log, outside):
    victim = victim_file(outside)
    path = plant_link(home, victim, AI)
    states, reasons = master_rx(home, log).apply_batch(
        [inc(AI, CONTENT, BASE_NS + 5 * SEC, meta_only=True)])
    assert states == {AI: "synchronized"} and reasons == {}
    assert_untouched(victim)
    assert read(home, AI) == CONTENT
    assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    assert temp_files(home) == []


def test_keepalive_through_a_link_to_another_agents_file(home, log):
    other = put(home, "queue/agent-info/db01-10.0.0.5", CONTENT, VICTIM_NS)
    plant_link(home, other, AI)
    states, _ = master_rx(home, log).apply_batch(
        [inc(AI, CONTENT, BASE_NS + 5 * SEC, meta_only=True)])
    assert states == {AI: "synchronized"}
    assert_untouched(other)


def test_content_push_through_a_link_replaces_only_that_name(home, log, outside):
    victim = victim_file(outside, content=b"default")
    plant_link(home, victim, "queue/agent-groups/002")
    states, _ = client_rx(home, log).apply_batch([inc(u"queue/agent-groups/002", b"web")])
    assert states == {u"queue/agent-groups/002": "synchronized"}
    assert_untouched(victim, b"default")
    assert read(home, "queue/agent-groups/002") == b"web"


def test_a_keepalive_whose_content_differs_from_the_link_fails_and_writes_nothing(
        home, log, outside):
    victim = victim_file(outside, content=b"something else\n")
    path = plant_link(home, victim, AI)
    states, reasons = master_rx(home, log).apply_batch(
        [inc(AI, CONTENT, BASE_NS + 5 * SEC, meta_only=True)])
    assert states == {AI: "failed"} and "differs" in reasons[AI]
    assert os.lstat(path).st_ino == os.lstat(victim).st_ino  # the old file stays
    assert mtime_ns(victim) == VICTIM_NS
    assert temp_files(home) == []


def test_a_single_name_file_is_touched_in_place(home, log):
    path = put(home, AI, CONTENT, VICTIM_NS)
    inode = os.lstat(path).st_ino
    states, _ = master_rx(home, log).apply_batch(
        [inc(AI, CONTENT, BASE_NS + 5 * SEC, meta_only=True)])
    assert states == {AI: "synchronized"}
    assert os.lstat(path).st_ino == inode  # no copy when nothing else shares the file
    assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS


def test_without_times_by_descriptor_a_keepalive_is_a_verified_copy(home, log, monkeypatch):
    """Where times could only be set through the name (a second lookup), never in place."""
    monkeypatch.setattr(fsops, "UTIME_FD", False)
    monkeypatch.setattr(fsops, "FUTIMENS", None)
    path = put(home, AI, CONTENT, VICTIM_NS)
    inode = os.lstat(path).st_ino
    states, _ = master_rx(home, log).apply_batch(
        [inc(AI, CONTENT, BASE_NS + 5 * SEC, meta_only=True)])
    assert states == {AI: "synchronized"}
    assert os.lstat(path).st_ino != inode
    assert read(home, AI) == CONTENT
    assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS


def test_set_mtime_by_descriptor_refuses_to_go_by_name(monkeypatch, outside):
    monkeypatch.setattr(fsops, "UTIME_FD", False)
    monkeypatch.setattr(fsops, "FUTIMENS", None)
    assert not fsops.utime_by_fd()
    fd = os.open(os.path.join(outside, "victim"), os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            fsops.set_mtime(fd, None, BASE_NS)
    finally:
        os.close(fd)


def test_futimens_through_ctypes_sets_exact_nanoseconds(outside):
    futimens = fsops.load_futimens()
    if futimens is None:
        pytest.skip("this C library has no futimens")
    path = os.path.join(outside, "victim")
    fd = os.open(path, os.O_RDONLY)
    try:
        futimens(fd, BASE_NS)
    finally:
        os.close(fd)
    assert abs(mtime_ns(path) - BASE_NS) <= receive.MTIME_SLACK_NS
    st = os.lstat(path)
    if hasattr(st, "st_mtime_ns"):
        assert st.st_mtime_ns == BASE_NS


def test_a_folder_made_by_the_receiver_gets_its_mode_by_descriptor(home, log, monkeypatch):
    def no_chmod_by_name(*args):
        raise AssertionError("chmod by name")
    monkeypatch.setattr(os, "chmod", no_chmod_by_name)
    monkeypatch.setattr(os, "chown", no_chmod_by_name)
    states, _ = client_rx(home, log).apply_batch([inc(u"etc/shared/newgroup/agent.conf", b"x")])
    monkeypatch.undo()
    assert states == {u"etc/shared/newgroup/agent.conf": "synchronized"}
    assert stat.S_IMODE(os.lstat(os.path.join(home, "etc/shared/newgroup")).st_mode) == 0o770
