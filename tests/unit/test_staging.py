"""Temporary files never appear under a name that a Wazuh daemon reads (SPEC sections 4, 11).

wazuh-modulesd reads every new name in queue/agent-groups as an agent ID, remoted scans
etc/shared and its group folders, the framework lists queue/agent-info. The folders are
observed while a batch is applied: between two files of a generator batch (the files before
are written, not yet renamed) and right after every rename; only final names may be seen.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from test_receive import (ITEMS, LIB, _can_mount_tmpfs, client_rx, home, inc,  # noqa
                          log, master_rx, outside, put, read)
from wazuh_cluster import compat, paths, scanner, staging

WATCHED = ("queue/agent-groups", "etc/shared", "etc/shared/default", "etc/shared/web",
           "queue/agent-info", "etc")


def listing(home, folders=WATCHED):
    """{folder: set of names} right now."""
    found = {}
    for folder in folders:
        try:
            found[folder] = set(os.listdir(os.path.join(home, folder)))
        except OSError:
            found[folder] = set()
    return found


class Observer(object):
    """Lists the watched folders at every step of a batch; keeps every name ever seen."""

    def __init__(self, home, monkeypatch):
        self.home = home
        self.seen = dict((folder, set()) for folder in WATCHED)
        self.looks = 0
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            self.look()
        monkeypatch.setattr(os, "rename", rename)

    def look(self):
        self.looks += 1
        for folder, names in listing(self.home).items():
            self.seen[folder] |= names

    def files(self, records):
        """A generator batch that looks at the folders before handing out each record."""
        for record in records:
            self.look()
            yield record
        self.look()

    def unexpected(self, finals):
        """Names seen that are not final names (`finals`: {folder: allowed names})."""
        return dict((folder, sorted(names - finals.get(folder, set())))
                    for folder, names in self.seen.items() if names - finals.get(folder, set()))


def big_batch():
    groups = [inc(u"queue/agent-groups/%03d" % n, b"web" if n % 2 else b"default")
              for n in range(1, 301)]
    shared = [inc(u"etc/shared/%s/file%03d.conf" % ("web" if n % 2 else "default", n),
                  b"<agent_config>%d</agent_config>\n" % n) for n in range(200)]
    keys = [inc(u"etc/client.keys", b"001 web01 any " + b"k" * 64 + b"\n")]
    return groups + shared + keys


def finals_of(records, home):
    finals = listing(home)
    for record in records:
        folder, base = record.name.rsplit(u"/", 1)
        finals.setdefault(folder, set()).add(compat.native_str(base))
        if folder.startswith(u"etc/shared/"):
            finals["etc/shared"].add(compat.native_str(folder.split(u"/")[2]))
    return finals


def test_no_temporary_name_appears_in_a_watched_folder_during_a_large_batch(home, log,
                                                                             monkeypatch):
    os.makedirs(os.path.join(home, "etc/shared/web"))
    records = big_batch()
    finals = finals_of(records, home)
    observer = Observer(home, monkeypatch)
    states, reasons = client_rx(home, log).apply_batch(observer.files(records))
    assert reasons == {} and set(states.values()) == set(["synchronized"])
    assert observer.looks > 2 * len(records)
    assert observer.unexpected(finals) == {}
    assert read(home, "queue/agent-groups/007") == b"web"
    assert os.listdir(paths.Paths(home).staging_dir) == []


def test_agent_info_on_the_master_shows_only_final_names(home, log, monkeypatch):
    owned = [inc(u"queue/agent-info/agent%d-any" % n, b"Linux agent%d\n" % n)
             for n in range(100)]
    rx = master_rx(home, log)
    rx.apply_batch(owned)
    touches = [inc(r.name, r.data, r.mtime_ns + 10 ** 9, meta_only=True) for r in owned]
    # Files with another name are copied, never touched in place: they go through staging too.
    os.link(os.path.join(home, "queue/agent-info/agent1-any"),
            os.path.join(home, "queue/agent-info/agent1-other"))
    finals = listing(home)
    observer = Observer(home, monkeypatch)
    states, reasons = rx.apply_batch(observer.files(touches + [
        inc(u"queue/agent-info/new-any", b"Linux new\n")]))
    assert reasons == {} and set(states.values()) == set(["synchronized"])
    finals["queue/agent-info"].add("new-any")
    assert observer.unexpected(finals) == {}


def test_staging_folder_is_ours_and_private(home, log):
    folder = paths.Paths(home).staging_dir
    os.mkdir(folder, 0o777)
    os.chmod(folder, 0o777)
    client_rx(home, log).apply_batch([inc(u"queue/agent-groups/001", b"default")])
    assert stat.S_IMODE(os.lstat(folder).st_mode) == staging.STAGING_MODE


def test_a_symlinked_staging_folder_is_not_used(home, log, outside):
    os.symlink(outside, paths.Paths(home).staging_dir)
    before = sorted(os.listdir(outside))
    records = [inc(u"queue/agent-groups/%03d" % n, b"default") for n in range(1, 20)]
    states, _ = client_rx(home, log).apply_batch(records)
    assert set(states.values()) == set(["synchronized"])
    assert sorted(os.listdir(outside)) == before
    assert sum("staging folder" in line and "not usable" in line for line in log.lines) == 1
    assert sorted(os.listdir(os.path.join(home, "queue/agent-groups")))[:2] == ["001", "002"]


def test_staging_on_another_file_system_falls_back_to_wazuh_30_names(home, log, monkeypatch):
    """A staging folder on another device: temporary files get 3.0's `NAME.tmp.cluster`."""
    other = tempfile.mkdtemp(prefix="wzc-staging-", dir="/dev/shm") \
        if os.path.isdir("/dev/shm") else None
    try:
        if other is None or os.stat(other).st_dev == os.stat(home).st_dev:
            pytest.skip("needs /dev/shm on another file system than the test folder")
        rx = client_rx(home, log, staging_dir=os.path.join(other, "staging"))
        records = [inc(u"queue/agent-groups/%03d" % n, b"db") for n in range(1, 50)]
        finals = finals_of(records, home)
        observer = Observer(home, monkeypatch)
        states, reasons = rx.apply_batch(observer.files(records))
        assert reasons == {} and set(states.values()) == set(["synchronized"])
        extra = observer.unexpected(finals)
        assert sorted(extra) == ["queue/agent-groups"]
        assert all(n.endswith(".tmp.cluster") for n in extra["queue/agent-groups"])
        assert "queue/agent-groups/001.tmp.cluster" in [
            "queue/agent-groups/" + n for n in extra["queue/agent-groups"]]
        assert sorted(os.listdir(os.path.join(home, "queue/agent-groups"))) == \
            sorted(compat.native_str(r.name.rsplit(u"/", 1)[1]) for r in records)
        assert sum("written in place" in line for line in log.lines) == 1
    finally:
        if other is not None:
            shutil.rmtree(other)


BIND_MOUNT = r"""
import hashlib, json, logging, os, subprocess, sys
from wazuh_cluster import receive
from wazuh_cluster.config import Item
home = sys.argv[1]
groups = os.path.join(home, "queue", "agent-groups")
subprocess.check_call(["mount", "--bind", groups, groups])  # same st_dev, another mount
items = (Item("agent-groups", "queue/agent-groups", "dir", "master", False, 0o660, 0o770,
              False, False, False),)
log = logging.getLogger("x")
log.addHandler(logging.NullHandler())
rx = receive.Receiver(home, items, (), log, role="client")
def inc(name, data):
    return receive.Incoming(name, data, hashlib.sha256(data).hexdigest(), 10 ** 18)
first = rx.apply_batch([inc(u"queue/agent-groups/001", b"web")])
second = rx.apply_batch([inc(u"queue/agent-groups/001", b"web")])
with open(os.path.join(groups, "001"), "rb") as handle:
    content = handle.read().decode("ascii")
sys.stdout.write(json.dumps([first, second, content, os.listdir(groups),
                             os.listdir(rx.staging.folder)]))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare for a bind mount")
def test_a_rename_across_mounts_fails_once_then_the_folder_is_written_in_place(home):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LIB] + [p for p in [env.get("PYTHONPATH")] if p])
    child = subprocess.Popen(["unshare", "-m", "sh", "-c",
                              'mount --make-rprivate / && exec "$0" -c "$1" "$2"',
                              sys.executable, BIND_MOUNT, home], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate()
    assert child.returncode == 0, err
    first, second, content, left, staged = json.loads(out.decode("utf-8"))
    assert first[0] == {u"queue/agent-groups/001": u"failed"}
    assert u"cross-device" in first[1][u"queue/agent-groups/001"]
    assert second == [{u"queue/agent-groups/001": u"synchronized"}, {}]
    assert content == u"web" and left == [u"001"] and staged == []


def test_cleanup_at_start_empties_staging_and_removes_in_place_names(home, log, outside):
    folder = paths.Paths(home).staging_dir
    os.mkdir(folder, 0o700)
    ours = [put(home, "queue/cluster-staging/001.0123456789ab.tmp", b"x"),
            put(home, "queue/cluster-staging/anything", b"x"),
            put(home, "queue/agent-groups/001.tmp.cluster", b"x"),
            put(home, "etc/shared/default/agent.conf.tmp.cluster", b"x"),
            put(home, "etc/shared/a/b/c.tmp.cluster", b"x"),
            put(home, "queue/agent-info/web01-any.tmp.cluster", b"x"),
            put(home, "etc/client.keys.tmp.cluster", b"x"),
            put(home, "queue/agent-groups/.002.0123456789ab.tmp", b"x")]   # older versions
    os.symlink(os.path.join(outside, "victim"), os.path.join(folder, "link"))
    ours.append(os.path.join(folder, "link"))
    kept = [put(home, "etc/ossec.conf.tmp.cluster", b"x"),       # not an item's file
            put(home, "queue/rids/001.tmp.cluster", b"x"),
            put(home, "queue/agent-groups/001", b"x"),
            put(home, "queue/agent-groups/.tmp.cluster", b"x"),  # no name before the suffix
            os.path.join(outside, "victim")]
    os.mkdir(os.path.join(folder, "sub"))
    assert client_rx(home, log).cleanup_temp_files() == len(ours)
    assert not any(os.path.lexists(p) for p in ours)
    assert all(os.path.exists(p) for p in kept)
    assert os.listdir(folder) == ["sub"]


def test_an_in_place_name_left_by_a_crash_does_not_block_the_file(home, log, monkeypatch):
    put(home, "queue/agent-groups/001.tmp.cluster", b"half")
    rx = client_rx(home, log)
    monkeypatch.setattr(rx.staging, "check", lambda: None)  # nothing staged: all in place
    rx.staging.dev = None
    states, _ = rx.apply_batch([inc(u"queue/agent-groups/001", b"web")])
    assert states == {u"queue/agent-groups/001": "synchronized"}
    assert os.listdir(os.path.join(home, "queue/agent-groups")) == ["001"]


def test_in_place_names_are_never_synchronised(home, log):
    """Neither received (whatever the items table says) nor picked up by the scanner."""
    states, reasons = client_rx(home, log).apply_batch(
        [inc(u"queue/agent-groups/001.tmp.cluster", b"x"),
         inc(u"etc/shared/default/a.tmp.cluster", b"x")])
    assert set(states.values()) == set(["invalid"])
    assert all("excluded" in reason for reason in reasons.values())
    put(home, "queue/agent-groups/001", b"web")
    put(home, "queue/agent-groups/002.tmp.cluster", b"web")
    scan = scanner.Scanner(home, ITEMS, ())
    assert scan.full_pass().changed == ["queue/agent-groups/001"]


def test_staged_names_fit_a_component_and_in_place_names_keep_the_id():
    assert len(staging.staged_name(u"n" * 255)) <= 255
    assert staging.in_place_name(u"001") == u"001.tmp.cluster"
    assert len(staging.in_place_name(u"n" * 255)) == 255


def test_an_unreadable_staging_folder_is_logged_once_per_reason(home, log):
    folder = paths.Paths(home).staging_dir
    put(home, "queue/cluster-staging", b"a file where the folder should be")
    rx = client_rx(home, log)
    for _ in range(3):
        states, _ = rx.apply_batch([inc(u"queue/agent-groups/001", b"web")])
        assert states == {u"queue/agent-groups/001": "synchronized"}
    assert sum("not usable" in line for line in log.lines) == 1
    os.unlink(folder)
    rx.apply_batch([inc(u"queue/agent-groups/002", b"web")])
    assert os.path.isdir(folder) and os.listdir(folder) == []
    assert any("usable again" in line for line in log.lines)
