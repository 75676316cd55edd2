"""Change detection: fingerprints, hashing only when needed, folder polls, exclusions."""
from __future__ import absolute_import, division, print_function

import binascii
import collections
import json
import os
import shutil
import tempfile
import time

import pytest

from wazuh_cluster import compat, scanner

Item = collections.namedtuple("Item", ("name", "path", "kind", "source", "recursive", "mode",
                                       "dir_mode", "hot", "mtime_is_data", "delete_dirs"))

ITEMS = (
    Item("client.keys", "etc/client.keys", "file", "master", False, 0o640, 0o770, True, False,
         False),
    Item("shared", "etc/shared", "dir", "master", True, 0o660, 0o770, False, False, True),
    Item("agent-groups", "queue/agent-groups", "dir", "master", False, 0o660, 0o770, False,
         False, False),
    Item("agent-info", "queue/agent-info", "dir", "client", False, 0o660, 0o770, False, True,
         False),
)
EXCLUDE = ("merged.mg", "ar.conf", "ossec.conf", "*~", ".*.tmp", "*.tmp", "*.swp", ".*")
SEC = 10 ** 9
BASE_NS = 1500000000 * SEC  # far in the past: files stamped with it are never "racy"


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-scan-")
    for folder in ("etc/shared/default", "queue/agent-groups", "queue/agent-info"):
        os.makedirs(os.path.join(path, folder))
    yield path
    shutil.rmtree(path)


def write(home, name, data, mtime_ns=BASE_NS):
    path = os.path.join(home, name)
    with open(path, "wb") as handle:
        handle.write(compat.to_bytes(data))
    if mtime_ns is not None:
        compat.set_mtime_ns(path, mtime_ns)
    return path


def make(home, **kwargs):
    notes = []
    scan = scanner.Scanner(home, ITEMS, EXCLUDE, report=lambda n, r: notes.append((n, r)),
                           **kwargs)
    return scan, notes


def test_first_pass_reports_every_file_as_changed(home):
    write(home, "etc/client.keys", "001 web01 any k\n")
    write(home, "etc/shared/default/agent.conf", "<agent_config/>")
    write(home, "queue/agent-groups/001", "default")
    scan, _ = make(home)
    changes = scan.full_pass()
    assert changes.changed == ["etc/client.keys", "etc/shared/default/agent.conf",
                               "queue/agent-groups/001"]
    assert changes.deleted == [] and changes.touched == []
    assert all(isinstance(n, str) for n in changes.changed)  # native str, ASCII
    assert len(scan) == 3
    assert scan.full_pass().is_empty()
    assert scan.poll().is_empty()


def test_poll_before_any_pass_does_a_full_pass(home):
    write(home, "etc/shared/default/agent.conf", "x")
    scan, _ = make(home)
    assert scan.poll().changed == ["etc/shared/default/agent.conf"]
    assert scan.last_full_pass is not None


def test_record_has_sha256_and_item(home):
    write(home, "etc/shared/default/agent.conf", "abc")
    scan, _ = make(home)
    scan.full_pass()
    rec = scan.get("etc/shared/default/agent.conf")
    assert rec["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rec["size"] == 3 and rec["mtime_ns"] == BASE_NS and rec["item"] == "shared"
    assert scan.get("nope") is None


def test_client_keys_edit_in_place_is_seen_by_poll(home):
    write(home, "etc/client.keys", "001 web01 any k1\n")
    scan, _ = make(home)
    scan.full_pass()
    write(home, "etc/client.keys", "001 web01 any k2\n")
    assert scan.poll().changed == ["etc/client.keys"]


def test_create_delete_rename_in_shared_seen_by_poll(home):
    write(home, "etc/shared/default/a.txt", "a")
    scan, _ = make(home)
    scan.full_pass()
    write(home, "etc/shared/default/b.txt", "b")
    assert scan.poll().changed == ["etc/shared/default/b.txt"]
    os.unlink(os.path.join(home, "etc/shared/default/a.txt"))
    changes = scan.poll()
    assert changes.deleted == ["etc/shared/default/a.txt"] and changes.changed == []
    os.rename(os.path.join(home, "etc/shared/default/b.txt"),
              os.path.join(home, "etc/shared/default/c.txt"))
    changes = scan.poll()
    assert changes.changed == ["etc/shared/default/c.txt"]
    assert changes.deleted == ["etc/shared/default/b.txt"]


def test_rename_over_existing_file_is_a_change(home):
    write(home, "etc/shared/default/agent.conf", "old")
    scan, _ = make(home)
    scan.full_pass()
    write(home, "etc/shared/default/.agent.conf.x1.tmp", "new")
    os.rename(os.path.join(home, "etc/shared/default/.agent.conf.x1.tmp"),
              os.path.join(home, "etc/shared/default/agent.conf"))
    assert scan.poll().changed == ["etc/shared/default/agent.conf"]


def test_in_place_edit_same_size_same_mtime_seen_by_full_pass(home):
    path = write(home, "etc/shared/default/agent.conf", "aaaa")
    scan, _ = make(home, wall=lambda: 4e9)  # nothing is "racy" seen from 2096
    scan.full_pass()
    write(home, "etc/shared/default/agent.conf", "bbbb")  # same size, mtime set back
    assert os.stat(path).st_size == 4
    assert scan.poll().is_empty()  # folder unchanged: the cheap pass cannot know
    assert scan.full_pass().changed == ["etc/shared/default/agent.conf"]


def test_racy_file_is_hashed_again_until_old(home):
    # Wall clock pinned to the file's own mtime: a rewrite within the same clock tick keeps
    # the fingerprint, so only the racy re-hash can see it.
    now = [BASE_NS / 1e9]
    path = write(home, "etc/client.keys", "k1\n")
    scan, _ = make(home, wall=lambda: now[0])
    scan.full_pass()
    st = os.stat(path)
    write(home, "etc/client.keys", "k2\n")
    os.utime(path, (st.st_atime, st.st_mtime))
    assert scan.poll().changed == ["etc/client.keys"]
    now[0] += 3600
    assert scan.poll().is_empty()
    assert scan.poll().is_empty()


def test_touch_is_reported_only_for_mtime_is_data(home):
    write(home, "queue/agent-info/web01-any", "Linux web01")
    write(home, "etc/shared/default/agent.conf", "conf")
    scan, _ = make(home)
    scan.full_pass()
    compat.set_mtime_ns(os.path.join(home, "queue/agent-info/web01-any"), BASE_NS + SEC)
    compat.set_mtime_ns(os.path.join(home, "etc/shared/default/agent.conf"), BASE_NS + SEC)
    changes = scan.full_pass()
    assert changes.touched == ["queue/agent-info/web01-any"]
    assert changes.changed == []
    assert scan.get("etc/shared/default/agent.conf")["mtime_ns"] == BASE_NS + SEC
    assert scan.full_pass().is_empty()


def test_group_folder_removal(home):
    os.makedirs(os.path.join(home, "etc/shared/web/sub"))
    write(home, "etc/shared/web/agent.conf", "w")
    write(home, "etc/shared/web/sub/x", "x")
    scan, _ = make(home)
    scan.full_pass()
    shutil.rmtree(os.path.join(home, "etc/shared/web"))
    changes = scan.poll()
    assert changes.deleted == ["etc/shared/web/agent.conf", "etc/shared/web/sub/x"]
    assert changes.deleted_dirs == ["etc/shared/web"]
    assert len(scan) == 0


def test_new_group_folder_with_subfolders_seen_by_poll(home):
    scan, _ = make(home)
    scan.full_pass()
    os.makedirs(os.path.join(home, "etc/shared/db/deep"))
    write(home, "etc/shared/db/deep/f", "f")
    write(home, "etc/shared/db/agent.conf", "c")
    assert scan.poll().changed == ["etc/shared/db/agent.conf", "etc/shared/db/deep/f"]


def test_folders_that_came_and_went_are_polled_from_then_on(home):
    """The poll's folder list is kept between polls: a folder found by one poll is watched by
    the next, and one removed and made again is watched again."""
    scan, _ = make(home)
    scan.full_pass()
    os.makedirs(os.path.join(home, "etc/shared/web"))
    write(home, "etc/shared/web/a", "a")
    assert scan.poll().changed == ["etc/shared/web/a"]
    write(home, "etc/shared/web/b", "b")
    assert scan.poll().changed == ["etc/shared/web/b"]
    shutil.rmtree(os.path.join(home, "etc/shared/web"))
    assert scan.poll().deleted_dirs == ["etc/shared/web"]
    os.makedirs(os.path.join(home, "etc/shared/web"))
    assert scan.poll().is_empty()
    write(home, "etc/shared/web/c", "c")
    assert scan.poll().changed == ["etc/shared/web/c"]


def test_missing_item_folders_are_empty_then_appear(home):
    shutil.rmtree(os.path.join(home, "queue"))
    scan, _ = make(home)
    assert scan.full_pass().is_empty()
    os.makedirs(os.path.join(home, "queue/agent-info"))
    write(home, "queue/agent-info/a-any", "")
    assert scan.poll().changed == ["queue/agent-info/a-any"]


def test_item_root_removed_deletes_files_but_not_the_root(home):
    write(home, "queue/agent-groups/001", "default")
    scan, _ = make(home)
    scan.full_pass()
    shutil.rmtree(os.path.join(home, "queue/agent-groups"))
    changes = scan.poll()
    assert changes.deleted == ["queue/agent-groups/001"]
    assert changes.deleted_dirs == []


def test_exclusions(home):
    for name in ("merged.mg", "ar.conf", "ossec.conf", "agent.conf~", ".agent.conf.AbC1.tmp",
                 "x.swp", ".hidden", "agent.conf"):
        write(home, "etc/shared/default/" + name, name)
    write(home, "etc/shared/ar.conf", "global")
    scan, _ = make(home)
    assert scan.full_pass().changed == ["etc/shared/default/agent.conf"]


def test_non_recursive_item_ignores_subfolders(home):
    os.makedirs(os.path.join(home, "queue/agent-groups/sub"))
    write(home, "queue/agent-groups/sub/f", "f")
    scan, notes = make(home)
    assert scan.full_pass().is_empty()
    assert [n for n, _ in notes] == ["queue/agent-groups/sub"]


def test_symlink_and_fifo_reported_once_not_followed(home):
    target = write(home, "secret", "do not send")
    os.symlink(target, os.path.join(home, "etc/shared/default/link"))
    os.mkfifo(os.path.join(home, "etc/shared/default/fifo"))
    scan, notes = make(home)
    assert scan.full_pass().is_empty()
    scan.full_pass()
    write(home, "etc/shared/default/new", "n")
    scan.poll()
    assert sorted(n for n, _ in notes) == ["etc/shared/default/fifo", "etc/shared/default/link"]
    assert "symbolic link" in dict(notes)["etc/shared/default/link"]


def test_client_keys_replaced_by_symlink_is_deleted_not_followed(home):
    write(home, "etc/client.keys", "k")
    scan, notes = make(home)
    scan.full_pass()
    target = write(home, "other", "secret")
    os.unlink(os.path.join(home, "etc/client.keys"))
    os.symlink(target, os.path.join(home, "etc/client.keys"))
    assert scan.poll().deleted == ["etc/client.keys"]
    assert notes and notes[0][0] == "etc/client.keys"


def test_unportable_name_skipped_and_reported(home):
    write(home, "etc/shared/default/back\\slash", "x")
    scan, notes = make(home)
    assert scan.full_pass().is_empty()
    assert notes[0][0] == "etc/shared/default/back\\slash"


def test_file_changing_during_hashing_is_retried_not_reported(home, monkeypatch):
    path = write(home, "etc/shared/default/agent.conf", "v1")
    scan, _ = make(home)
    real_read = os.read
    calls = []

    def racing_read(fd, size):
        data = real_read(fd, size)
        if not calls:
            calls.append(1)
            write(home, "etc/shared/default/agent.conf", "v2-longer", mtime_ns=None)
        return data
    monkeypatch.setattr(scanner.os, "read", racing_read)
    assert scan.full_pass().is_empty()
    assert "etc/shared/default/agent.conf" not in scan
    monkeypatch.setattr(scanner.os, "read", real_read)
    assert scan.poll().changed == ["etc/shared/default/agent.conf"]
    with open(path, "rb") as handle:
        assert scan.get("etc/shared/default/agent.conf")["size"] == len(handle.read())


def test_vanished_file_during_scan_is_not_an_error(home, monkeypatch):
    write(home, "etc/shared/default/a", "a")
    scan, _ = make(home)
    real_open = os.open

    def vanishing_open(path, flags, *mode):
        os.unlink(path)
        return real_open(path, flags, *mode)
    monkeypatch.setattr(scanner.os, "open", vanishing_open)
    assert scan.full_pass().is_empty()
    monkeypatch.setattr(scanner.os, "open", real_open)
    assert scan.poll().is_empty()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_reported_once_and_kept_out(home):
    path = write(home, "etc/shared/default/a", "a")
    os.chmod(path, 0)
    scan, notes = make(home)
    scan.full_pass()
    scan.full_pass()
    assert len(notes) == 1 and "a" not in scan


def test_seeded_from_rows_does_not_rehash_unchanged(home, monkeypatch):
    write(home, "etc/shared/default/a", "a")
    write(home, "etc/shared/default/b", "b")
    first, _ = make(home)
    first.full_pass()
    rows = [(r[0],) + r[2:] for r in first.rows()]
    rows.append(("etc/shared/default/gone", 1, BASE_NS, 1, BASE_NS, 0o660, "00" * 32))
    write(home, "etc/shared/default/b", "B")
    second, _ = make(home)
    second.load(rows)
    hashed = []
    real_hash = second._hash
    monkeypatch.setattr(second, "_hash", lambda rel: hashed.append(rel) or real_hash(rel))
    changes = second.full_pass()
    assert changes.changed == ["etc/shared/default/b"]
    assert changes.deleted == ["etc/shared/default/gone"]
    assert hashed == ["etc/shared/default/b"]


def test_native_str_paths_on_this_interpreter(home):
    # 2.7: names come back from listdir as bytes str; rows and events keep the native str,
    # which compares and JSON-encodes like text (printable ASCII only).
    write(home, "etc/shared/default/agent.conf", "a")
    scan = scanner.Scanner(compat.to_text(home), ITEMS, [compat.to_text(p) for p in EXCLUDE])
    changes = scan.full_pass()
    assert changes.changed == [u"etc/shared/default/agent.conf"]
    assert list(scan.rows())[0][0] == u"etc/shared/default/agent.conf"
    assert isinstance(list(scan.rows())[0][7], compat.text_type)
    event = changes.to_event()
    assert json.loads(json.dumps(event))["changed"] == [u"etc/shared/default/agent.conf"]


def test_poll_relisting_a_busy_folder_stats_only_new_or_replaced_entries(home, monkeypatch):
    for i in range(20):
        write(home, "queue/agent-info/a%02d-any" % i, "x")
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    stats = []

    class CountingEntry(object):
        def __init__(self, entry):
            self._entry = entry
            self.name = entry.name
            if hasattr(entry, "inode"):
                self.inode = entry.inode

        def stat(self, follow_symlinks=True):
            stats.append(self.name)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    real_scandir = scanner.compat.scandir
    monkeypatch.setattr(scanner.compat, "scandir",
                        lambda path: [CountingEntry(e) for e in real_scandir(path)])
    info = os.path.join(home, "queue/agent-info")
    write(home, "queue/agent-info/.a03-any.x.tmp", "y")
    os.rename(os.path.join(info, ".a03-any.x.tmp"), os.path.join(info, "a03-any"))
    write(home, "queue/agent-info/new-any", "n")
    changes = scan.poll()
    assert changes.changed == ["queue/agent-info/a03-any", "queue/agent-info/new-any"]
    if not compat.PY2:
        assert sorted(stats) == ["a03-any", "new-any"]


def test_poll_relisting_without_inodes_stats_unmoved_files_in_bulk(home, monkeypatch):
    # 2.7's listing (compat.NameListing) has no inodes: the known files are lstat-ed in
    # bulk and only those replaced, new or racy are looked at one by one (any interpreter).
    for i in range(20):
        write(home, "queue/agent-info/a%02d-any" % i, "x")
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    looked = []
    real_stat = compat.DirEntry.stat

    def counting(entry, follow_symlinks=False):
        looked.append(entry.name)
        return real_stat(entry, follow_symlinks=follow_symlinks)
    monkeypatch.setattr(compat.DirEntry, "stat", counting)
    monkeypatch.setattr(scanner.compat, "scandir", compat.NameListing)
    info = os.path.join(home, "queue/agent-info")
    write(home, "queue/agent-info/.a03-any.x.tmp", "y")
    os.rename(os.path.join(info, ".a03-any.x.tmp"), os.path.join(info, "a03-any"))
    write(home, "queue/agent-info/new-any", "n")
    os.unlink(os.path.join(info, "a07-any"))
    changes = scan.poll()
    assert changes.changed == ["queue/agent-info/a03-any", "queue/agent-info/new-any"]
    assert changes.deleted == ["queue/agent-info/a07-any"]
    assert sorted(looked) == ["a03-any", "new-any"]
    assert len(scan) == 20 and all(
        "queue/agent-info/a%02d-any" % i in scan for i in range(20) if i != 7)
    del looked[:]
    # Listed again with nothing replaced: no entry looked at, every file still known.
    write(home, "queue/agent-info/new2-any", "m")
    assert scan.poll().changed == ["queue/agent-info/new2-any"]
    assert looked == ["new2-any"] and len(scan) == 21


def _listed_without_inodes(home, monkeypatch, count=10):
    """A scanner that knows `count` settled agent-info files and relists folders as 2.7 does
    (compat.NameListing, no inodes), on any interpreter."""
    for i in range(count):
        write(home, "queue/agent-info/a%02d-any" % i, "x%d" % i)
    scan, notes = make(home, wall=lambda: 4e9)
    scan.full_pass()
    monkeypatch.setattr(scanner.compat, "scandir", compat.NameListing)
    return scan, notes, os.path.join(home, "queue/agent-info")


def test_poll_relisting_without_inodes_drops_a_file_gone_after_the_listing(home, monkeypatch):
    # A known file removed between os.listdir and the bulk lstats fails its group's lstats:
    # the group is looked at one by one, and only the vanished file is reported deleted.
    scan, _, info = _listed_without_inodes(home, monkeypatch)
    write(home, "queue/agent-info/new-any", "n")
    real_listdir = os.listdir

    def listdir_then_unlink(path):
        names = real_listdir(path)
        if path == info:
            os.unlink(os.path.join(info, "a05-any"))
        return names
    monkeypatch.setattr(compat.os, "listdir", listdir_then_unlink)
    changes = scan.poll()
    assert changes.changed == ["queue/agent-info/new-any"]
    assert changes.deleted == ["queue/agent-info/a05-any"]
    assert len(scan) == 10 and "queue/agent-info/a04-any" in scan


def test_poll_relisting_without_inodes_keeps_a_file_that_cannot_be_stat_ed(home, monkeypatch):
    # EACCES/EIO is no deletion (it would delete the file on every peer): kept and noted.
    import errno
    scan, notes, info = _listed_without_inodes(home, monkeypatch)
    write(home, "queue/agent-info/new-any", "n")
    real_lstat, real_stat = os.lstat, os.stat
    denied = os.path.join(info, "a04-any")

    def check(path, dir_fd=None):
        if path == denied or (dir_fd is not None and path == "a04-any"):
            raise OSError(errno.EACCES, "Permission denied")

    def lstat(path):
        # 2.7 in a process of one thread lstats the names from inside the folder
        check(os.path.join(os.getcwd(), path))
        return real_lstat(path)

    def stat(path, *args, **kwargs):
        check(path, kwargs.get("dir_fd"))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "stat", stat)
    changes = scan.poll()
    assert changes.changed == ["queue/agent-info/new-any"] and changes.deleted == []
    assert len(scan) == 11 and notes == [("queue/agent-info/a04-any", "cannot stat: "
                                          "Permission denied")]


def test_relisting_without_inodes_a_file_replaced_by_a_special_file_is_dropped_by_the_pass(
        home, monkeypatch):
    # Removed and replaced by a symlink, a folder and a FIFO: with a new inode the poll
    # drops each, with the old one (the kernel reuses a freed inode at once) the poll takes
    # it as unmoved, as 3.x's d_ino does, and the next full pass drops it.
    scan, notes, info = _listed_without_inodes(home, monkeypatch)
    for base, make_it in (("a01-any", lambda path: os.symlink("/etc/passwd", path)),
                          ("a02-any", os.mkdir), ("a03-any", os.mkfifo)):
        os.unlink(os.path.join(info, base))
        make_it(os.path.join(info, base))
    gone = scan.poll().deleted + scan.full_pass().deleted
    assert sorted(gone) == ["queue/agent-info/a01-any", "queue/agent-info/a02-any",
                            "queue/agent-info/a03-any"]
    assert len(scan) == 7 and scan.full_pass().is_empty() and scan.poll().is_empty()
    assert sorted(n for n, _ in notes) == ["queue/agent-info/a01-any",
                                           "queue/agent-info/a02-any",
                                           "queue/agent-info/a03-any"]


def test_relisting_without_inodes_leaves_an_in_place_edit_to_the_full_pass(home, monkeypatch):
    # SPEC 4/8: an in-place edit (same inode) is seen by the next full pass, even when a
    # poll relisted its folder in between (the relisting gave up the folder's seals).
    scan, _, info = _listed_without_inodes(home, monkeypatch)
    scan.full_pass()   # the folder's seals are kept now
    write(home, "queue/agent-info/a06-any", "changed in place", mtime_ns=BASE_NS + SEC)
    write(home, "queue/agent-info/new-any", "n")
    assert scan.poll().changed == ["queue/agent-info/new-any"]
    assert scan.full_pass().changed == ["queue/agent-info/a06-any"]
    assert scan.get("queue/agent-info/a06-any")["size"] == len("changed in place")


def test_stat_errors_other_than_missing_are_never_reported_as_deletions(home, monkeypatch):
    import errno
    write(home, "etc/client.keys", "k")
    write(home, "etc/shared/default/a", "a")
    scan, notes = make(home)
    scan.full_pass()
    real_lstat = os.lstat

    def denied(path, *args, **kwargs):
        if path.endswith("client.keys"):
            raise OSError(errno.EACCES, "Permission denied")
        return real_lstat(path, *args, **kwargs)
    monkeypatch.setattr(scanner.os, "lstat", denied)
    assert scan.poll().is_empty() and scan.full_pass().is_empty()
    assert "etc/client.keys" in scan and notes[0][0] == "etc/client.keys"


@pytest.mark.parametrize("denied", ["a", "default"])
def test_listed_entry_that_cannot_be_stat_ed_is_kept(home, monkeypatch, denied):
    import errno
    write(home, "etc/shared/default/a", "a")
    scan, notes = make(home)
    scan.full_pass()

    class DeniedEntry(object):
        def __init__(self, entry):
            self.name = entry.name
            self._entry = entry

        def stat(self, follow_symlinks=True):
            if self.name == denied:
                raise OSError(errno.EIO, "Input/output error")
            return self._entry.stat(follow_symlinks=follow_symlinks)

    real_scandir = scanner.compat.scandir
    monkeypatch.setattr(scanner.compat, "scandir",
                        lambda path: [DeniedEntry(e) for e in real_scandir(path)])
    assert scan.full_pass().is_empty()
    assert "etc/shared/default/a" in scan
    assert [n for n, _ in notes] == ["etc/shared/default/a" if denied == "a"
                                     else "etc/shared/default"]
    monkeypatch.setattr(scanner.compat, "scandir", real_scandir)
    os.unlink(os.path.join(home, "etc/shared/default/a"))
    assert scan.full_pass().deleted == ["etc/shared/default/a"]


def test_item_folder_replaced_by_a_symlink_is_not_followed_nor_deleted(home):
    write(home, "etc/shared/default/a", "a")
    scan, notes = make(home)
    scan.full_pass()
    os.rename(os.path.join(home, "etc/shared"), os.path.join(home, "elsewhere"))
    os.symlink(os.path.join(home, "elsewhere"), os.path.join(home, "etc/shared"))
    assert scan.poll().is_empty() and scan.full_pass().is_empty()
    write(home, "elsewhere/default/b", "b")  # seen only through the symlink: ignored
    assert scan.poll().is_empty() and scan.full_pass().is_empty()
    assert "etc/shared/default/a" in scan and notes[0][0] == "etc/shared"
    os.unlink(os.path.join(home, "etc/shared"))
    os.rename(os.path.join(home, "elsewhere"), os.path.join(home, "etc/shared"))
    assert scan.poll().changed == ["etc/shared/default/b"]


def test_racy_file_is_hashed_once_more_when_old_not_at_every_poll(home):
    path = write(home, "queue/agent-info/web01-any", "Linux", mtime_ns=None)
    changed_at = max(compat.stat_mtime_ns(os.stat(path)), compat.stat_ctime_ns(os.stat(path)))
    now = [changed_at / 1e9]  # hashed in the very tick it was written: racy
    scan, _ = make(home, wall=lambda: now[0])
    assert scan.full_pass().changed == ["queue/agent-info/web01-any"]
    hashed = scan.hashed
    for _ in range(3):
        now[0] += 0.5
        assert scan.poll().is_empty()
        scan.full_pass()
    assert scan.hashed == hashed  # a hash now could still be racy: it would settle nothing
    now[0] += 1.0      # RACY_NS after the change
    assert scan.poll().is_empty()
    assert scan.hashed == hashed + 1
    now[0] += 5
    scan.poll()
    scan.full_pass()
    assert scan.hashed == hashed + 1  # settled


def test_racy_rewrite_in_the_same_tick_is_seen_by_the_settling_hash(home, monkeypatch):
    # A rewrite that keeps the fingerprint (same size, same stamps, as within one coarse
    # clock tick) is found by the one hash taken once the file is RACY_NS old.
    path = write(home, "etc/shared/default/agent.conf", "aaaa", mtime_ns=None)
    st = os.stat(path)
    now = [max(compat.stat_mtime_ns(st), compat.stat_ctime_ns(st)) / 1e9]
    scan, _ = make(home, wall=lambda: now[0])
    scan.full_pass()
    with open(path, "r+b") as handle:
        handle.write(b"bbbb")
    # This file system's clock is finer than a tick: stamps pinned to the first write's.
    monkeypatch.setattr(scanner, "_fingerprint", lambda s: (
        s.st_size, compat.stat_mtime_ns(st), s.st_ino, compat.stat_ctime_ns(st), s.st_mode))
    assert scan.poll().is_empty() and scan.full_pass().is_empty()
    now[0] += 2.5
    assert scan.poll().changed == ["etc/shared/default/agent.conf"]


def test_item_of_names_items_files_and_strangers_alike_twice(home):
    scan, _ = make(home)
    expected = [("etc/client.keys", "client.keys"), ("etc/shared", "shared"),
                ("etc/shared/default", "shared"), ("etc/shared/default/a.conf", "shared"),
                ("etc/shared/web/sub/b", "shared"), ("queue/agent-info/web01-any", "agent-info"),
                (u"queue/agent-groups/001", "agent-groups"), ("etc/client.keys.bak", None),
                ("etc/client.keys/x", "client.keys"), ("etc/sharedx/a", None), ("etc", None),
                ("", None), ("queue/agent-info", "agent-info")]
    for _ in range(2):  # the second time from what the first remembered
        got = [(name, getattr(scan.item_of(name), "name", None)) for name, _ in expected]
        assert got == expected


def test_check_files_sees_the_named_known_files_edits_deletions_and_links_only(home):
    names = ["queue/agent-info/%s-any" % n for n in ("a", "b", "c", "d")]
    for name in names:
        write(home, name, "Linux")
    scan, notes = make(home, wall=lambda: 4e9)
    scan.full_pass()
    write(home, names[0], "LINUX")  # in place, same size and mtime: the folder is unchanged
    write(home, names[1], "LINUX")  # not asked about
    os.unlink(os.path.join(home, names[2]))
    os.unlink(os.path.join(home, names[3]))
    os.symlink("/etc/passwd", os.path.join(home, names[3]))
    write(home, "queue/agent-info/new-any", "new")
    changes = scan.check_files([names[0], names[2], names[3], "queue/agent-info/new-any",
                                "queue/agent-info/../../../etc/passwd", "etc/shared"])
    assert changes.changed == [names[0]]
    assert changes.deleted == [names[2], names[3]]
    assert "queue/agent-info/new-any" not in scan  # new files are the folder polls' job
    assert [n for n, _ in notes] == [names[3]]
    assert scan.full_pass().changed == [names[1], "queue/agent-info/new-any"]


def test_racy_hot_file_is_hashed_at_every_poll_until_settled(home):
    # client.keys edited twice in one clock tick: the second edit must not wait RACY_NS.
    path = write(home, "etc/client.keys", "k1\n", mtime_ns=None)
    st = os.stat(path)
    now = [max(compat.stat_mtime_ns(st), compat.stat_ctime_ns(st)) / 1e9]
    scan, _ = make(home, wall=lambda: now[0])
    scan.full_pass()
    hashed = scan.hashed
    now[0] += 0.5
    assert scan.poll().is_empty()
    assert scan.hashed == hashed + 1
    now[0] += 5
    scan.poll()
    scan.poll()
    assert scan.hashed == hashed + 2  # the settling hash, then nothing


def _count_listings(monkeypatch):
    listed = []
    real_scandir = scanner.compat.scandir

    def counting(path):
        listed.append(path)
        return real_scandir(path)
    monkeypatch.setattr(scanner.compat, "scandir", counting)
    return listed


def test_full_pass_stats_the_files_of_unchanged_folders_without_listing_them(home,
                                                                             monkeypatch):
    os.makedirs(os.path.join(home, "etc/shared/web/sub"))
    write(home, "etc/shared/default/agent.conf", "aaaa")
    write(home, "etc/shared/web/sub/x", "x")
    scan, _ = make(home, wall=lambda: 4e9)  # nothing is "racy" seen from 2096
    scan.full_pass()
    listed = _count_listings(monkeypatch)
    write(home, "etc/shared/default/agent.conf", "bbbb")  # in place: no folder changes
    write(home, "etc/shared/web/sub/x", "y")
    assert scan.full_pass().changed == ["etc/shared/default/agent.conf",
                                        "etc/shared/web/sub/x"]
    assert listed == []
    write(home, "etc/shared/web/new", "n")  # a folder that changed is listed
    os.unlink(os.path.join(home, "etc/shared/default/agent.conf"))
    changes = scan.full_pass()
    assert changes.changed == ["etc/shared/web/new"]
    assert changes.deleted == ["etc/shared/default/agent.conf"]
    assert sorted(os.path.relpath(p, home) for p in listed) == ["etc/shared/default",
                                                                "etc/shared/web"]


@pytest.mark.parametrize("change", ["create", "delete"])
def test_folder_listed_in_the_tick_of_its_change_is_listed_by_the_next_full_pass(home, change):
    write(home, "etc/shared/default/a", "a")
    scan, _ = make(home)  # the real clock: the folder changed just before it was listed
    scan.full_pass()
    folder = "etc/shared/default"
    if change == "create":
        write(home, "etc/shared/default/b", "b")
    else:
        os.unlink(os.path.join(home, "etc/shared/default/a"))
    # What a coarse clock does: the change left the folder's stamps as they were listed.
    scan._dirs[folder] = scanner._dir_fingerprint(os.lstat(os.path.join(home, folder))) + \
        scan._dirs[folder][3:]
    changes = scan.full_pass()
    if change == "create":
        assert changes.changed == ["etc/shared/default/b"]
    else:
        assert changes.deleted == ["etc/shared/default/a"]


def test_folder_listed_slowly_in_the_tick_of_its_change_is_listed_by_the_next_full_pass(
        home, monkeypatch):
    # Whether a folder is "racy" depends on when its times were read, not on when its
    # listing (hashing its changed files too) ended: here that takes longer than RACY_NS.
    write(home, "etc/shared/default/a", "a")
    folder = "etc/shared/default"
    slow = [0.0]
    start = time.time()
    real_scandir = compat.scandir

    def scandir(path):
        if os.path.relpath(path, home) == folder:
            slow[0] += 2.0 * scanner.RACY_NS / 1e9
        return real_scandir(path)
    monkeypatch.setattr(compat, "scandir", scandir)
    scan, _ = make(home, wall=lambda: start + slow[0] + (time.time() - start))
    scan.full_pass()
    write(home, "etc/shared/default/b", "b")
    scan._dirs[folder] = scanner._dir_fingerprint(os.lstat(os.path.join(home, folder))) + \
        scan._dirs[folder][3:]
    assert scan.full_pass().changed == ["etc/shared/default/b"]


def test_a_folder_listed_in_the_tick_of_its_change_is_listed_again_when_asked(home, monkeypatch):
    # A master's answer to a client's round looks at the agent-info folder only: a removal
    # made in the clock tick of the folder's last listing keeps its fingerprint, so that
    # look lists a "racy" folder again (a plain poll leaves it to the next full pass).
    names = ["queue/agent-info/%s-any" % n for n in ("a", "b")]
    for name in names:
        write(home, name, "Linux")
    folder = os.path.join(home, "queue", "agent-info")
    st = os.stat(folder)
    now = max(compat.stat_mtime_ns(st), compat.stat_ctime_ns(st)) / 1e9
    scan, _ = make(home, wall=lambda: now + 0.5)   # racy files are not due again yet
    scan.full_pass()
    os.unlink(os.path.join(home, names[1]))
    # This file system's clock is finer than a tick: the folder's stamps pinned to the listing's.
    pinned = scanner._dir_fingerprint(st)
    monkeypatch.setattr(scanner, "_dir_fingerprint", lambda s: pinned if s.st_ino == st.st_ino
                        else (compat.stat_mtime_ns(s), compat.stat_ctime_ns(s), s.st_ino))
    assert scan.poll(frozenset(["agent-info"])).is_empty()
    assert scan.poll(frozenset(["agent-info"]), racy_folders=True).deleted == [names[1]]
    assert scan.poll(frozenset(["agent-info"]), racy_folders=True).is_empty()


class _CountingDict(dict):
    """The scanner's map, counting the per-file lookups of a pass."""
    gets = 0

    def get(self, *args):
        self.gets += 1
        return dict.get(self, *args)


def _count_lookups(scan):
    scan._files = _CountingDict(scan._files)
    return scan._files


def test_a_sealed_folder_is_passed_without_a_lookup_per_file_until_a_file_changes(home):
    names = ["etc/shared/default/f%03d" % i for i in range(50)]
    for name in names:
        write(home, name, "x")
    scan, _ = make(home, wall=lambda: 4e9)  # nothing is "racy" seen from 2096
    scan.full_pass()      # lists the folders
    scan.full_pass()      # every file matched its settled record: sealed
    files = _count_lookups(scan)
    assert scan.full_pass().is_empty()
    assert files.gets == 0
    write(home, names[7], "y")    # in place, same size and mtime
    assert scan.full_pass().changed == [names[7]]
    assert files.gets >= len(names)   # its group compared file by file
    assert scan.full_pass().is_empty()  # all settled again: sealed anew
    files.gets = 0
    assert scan.full_pass().is_empty()
    assert files.gets == 0


def _rename_over(home, name):
    # Same size and mtime as the file it replaces; made outside the folder, so the folder's
    # stamps only move with the rename itself (pinned below, as a coarse clock would).
    os.makedirs(os.path.join(home, "var"))
    write(home, "var/new", "y")
    os.rename(os.path.join(home, "var/new"), os.path.join(home, name))


@pytest.mark.parametrize("edit", ["rewrite", "chmod", "utime", "rename-over"])
def test_a_sealed_folder_sees_every_kind_of_edit_in_place_at_the_next_full_pass(
        home, monkeypatch, edit):
    # What breaks a seal: each of these keeps the size and the mtime of the file (and the
    # folder's names), only the ctime or the inode moves.
    name = "etc/shared/default/agent.conf"
    path = write(home, name, "x")
    write(home, "etc/shared/default/other.conf", "o")
    folder = os.path.join(home, "etc/shared/default")
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    scan.full_pass()
    assert "etc/shared/default" in scan._seals
    st = os.lstat(folder)
    pinned = scanner._dir_fingerprint(st)
    monkeypatch.setattr(scanner, "_dir_fingerprint", lambda s: pinned if s.st_ino == st.st_ino
                        else (compat.stat_mtime_ns(s), compat.stat_ctime_ns(s), s.st_ino))
    time.sleep(0.01)  # past the file system clock's tick (a few ms at most)
    if edit == "rewrite":
        write(home, name, "y")
    elif edit == "chmod":
        os.chmod(path, 0o600)
    elif edit == "utime":
        compat.set_mtime_ns(path, BASE_NS)  # the same mtime again
    else:
        _rename_over(home, name)
    changes = scan.full_pass()
    assert changes.changed == ([name] if edit in ("rewrite", "rename-over") else [])
    now = os.lstat(path)
    assert scan.row(name)[2:7] == (now.st_size, compat.stat_mtime_ns(now), now.st_ino,
                                   compat.stat_ctime_ns(now), now.st_mode & 0o7777)


def test_a_record_written_between_passes_takes_its_folders_seal_away(home):
    name = "queue/agent-info/web01-any"
    write(home, name, "Linux")
    write(home, "etc/shared/default/agent.conf", "x")
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    scan.full_pass()
    assert sorted(scan._seals) == ["etc/shared/default", "queue/agent-info"]
    write(home, name, "LINUX")
    assert scan.check_files([name]).changed == [name]
    assert sorted(scan._seals) == ["etc/shared/default"]  # a seal speaks for records unchanged


def test_learned_records_take_the_seals_of_their_folders_only(home):
    # Learned in one call (a batch), the folders of the records taken are unsealed, each
    # once, and only theirs: one refused leaves its folder's seal.
    names = ["queue/agent-info/web01-any", "etc/shared/default/agent.conf",
             "etc/shared/other/agent.conf", "queue/agent-info/web02-any"]
    os.makedirs(os.path.join(home, "etc/shared/other"))
    for name in names:
        write(home, name, "x" + name)
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    scan.full_pass()
    folders = ["etc/shared/default", "etc/shared/other", "queue/agent-info"]
    assert all(folder in scan._seals for folder in folders)
    rows, digests = [], []
    for name in names:
        digest = binascii.unhexlify(scan.get(name)["sha256"])
        compat.set_mtime_ns(os.path.join(home, name), 5 * 10 ** 18)
        rows.append([name] + list(scanner.fingerprint(os.lstat(os.path.join(home, name)))))
        digests.append(digest if name != "etc/shared/other/agent.conf" else b"\1" * 32)
    assert [row[0] for row in scan.learn_rows(rows, digests)] == [names[2]]
    assert "etc/shared/other" in scan._seals
    assert not any(folder in scan._seals for folder in (folders[0], folders[2]))


def test_a_learned_keepalive_takes_its_folders_seal_away(home):
    # Scanner.learn_rows writes a record as check_files does (a receiver's keepalive).
    name = "queue/agent-info/web01-any"
    path = write(home, name, "Linux")
    write(home, "etc/shared/default/agent.conf", "x")
    scan, _ = make(home, wall=lambda: 4e9)
    scan.full_pass()
    scan.full_pass()
    assert "queue/agent-info" in scan._seals
    digest = binascii.unhexlify(scan.get(name)["sha256"])
    compat.set_mtime_ns(path, 5 * 10 ** 18)
    assert scan.learn(name, scanner.fingerprint(os.lstat(path)), digest)
    assert sorted(scan._seals) == ["etc/shared/default"]
