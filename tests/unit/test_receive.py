"""The receiving side (SPEC section 4): name rules, item/role rules, safe writes, deletions."""
from __future__ import absolute_import, division, print_function

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from wazuh_cluster import compat, fsops, pathrules, receive
from wazuh_cluster.config import Item
from wazuh_cluster.errors import PathRefused
from wazuh_cluster.receive import Incoming, Receiver

ITEMS = (
    Item("client.keys", "etc/client.keys", "file", "master", False, 0o640, 0o770, True, False,
         False),
    Item("shared", "etc/shared", "dir", "master", True, 0o660, 0o770, False, False, True),
    Item("agent-groups", "queue/agent-groups", "dir", "master", False, 0o660, 0o770, False,
         False, False),
    Item("agent-info", "queue/agent-info", "dir", "client", False, 0o660, 0o770, False, True,
         False),
)
EXCLUDE = ("merged.mg", "ar.conf", "ossec.conf", "*~", ".*", "*.tmp", "*.swp")
SEC = 10 ** 9
BASE_NS = 1500000000 * SEC + 123456789
LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "lib")


class ListHandler(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log():
    logger = logging.getLogger("wazuh_cluster.test_receive")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # not the per-batch timing line (DEBUG)
    logger.lines = handler.lines
    yield logger
    logger.removeHandler(handler)


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-recv-")
    for folder in ("etc/shared/default", "queue/agent-groups", "queue/agent-info"):
        os.makedirs(os.path.join(path, folder))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def outside():
    path = tempfile.mkdtemp(prefix="wzc-outside-")
    with open(os.path.join(path, "victim"), "wb") as handle:
        handle.write(b"precious")
    yield path
    shutil.rmtree(path)


def client_rx(home, log, **kwargs):
    return Receiver(home, ITEMS, EXCLUDE, log, role="client", **kwargs)


def master_rx(home, log, **kwargs):
    return Receiver(home, ITEMS, EXCLUDE, log, role="master", **kwargs)


def inc(name, data, mtime_ns=BASE_NS, meta_only=False, sha=None):
    return Incoming(name, data, sha or hashlib.sha256(data).hexdigest(), mtime_ns, meta_only)


def put(home, name, data, mtime_ns=None):
    path = os.path.join(home, name)
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, "wb") as handle:
        handle.write(data)
    if mtime_ns is not None:
        compat.set_mtime_ns(path, mtime_ns)
    return path


def read(home, name):
    with open(os.path.join(home, name), "rb") as handle:
        return handle.read()


def temp_files(home):
    found = []
    for folder, dirs, files in os.walk(home):
        found.extend(os.path.join(folder, f) for f in files if f.endswith(".tmp"))
    return found


def mtime_ns(path):
    return compat.stat_mtime_ns(os.lstat(path))


# -- names ------------------------------------------------------------------------------------

def test_check_name_splits_a_good_name():
    assert pathrules.check_name(u"etc/shared/default/agent.conf") == [
        u"etc", u"shared", u"default", u"agent.conf"]
    assert pathrules.check_name(u"etc/shared/a b/c-d_e.f+g(h)") [-1] == u"c-d_e.f+g(h)"


@pytest.mark.parametrize("name,reason", [
    (u"", "empty name"),
    (u"/etc/client.keys", "absolute"),
    (u"etc//client.keys", "empty component"),
    (u"etc/shared/", "empty component"),
    (u".", "'.' component"),
    (u"etc/./client.keys", "'.' component"),
    (u"..", "'..' component"),
    (u"etc/shared/../../x", "'..' component"),
    (u"etc/shared/a\x00b", "NUL"),
    (u"etc/shared/a\nb", "control character 0x0a"),
    (u"etc/shared/a\x1bb", "control character 0x1b"),
    (u"etc/shared/a\x7fb", "control character 0x7f"),
    (u"etc/shared/a\\b", "backslash"),
    (u"etc/shared/caf\u00e9", "non-ASCII"),
    (u"etc/shared/\u2215etc", "non-ASCII"),
    (b"etc/shared/caf\xc3\xa9", "not ASCII"),
    (u"etc/shared/" + u"a" * 256, "component longer than 255"),
    (u"etc/shared/" + u"/".join([u"d" * 200] * 6), "longer than 1024"),
    (None, "not text"),
    (42, "not text"),
])
def test_check_name_refuses(name, reason):
    with pytest.raises(PathRefused) as info:
        pathrules.check_name(name)
    assert reason in info.value.message
    assert info.value.code == "invalid"


def test_check_name_limits_are_inclusive():
    assert pathrules.check_name(u"etc/shared/" + u"a" * 255)[-1] == u"a" * 255
    name = u"etc/shared/" + u"/".join([u"d" * 200] * 4) + u"/" + u"f" * 209
    assert len(name) == 1024
    assert len(pathrules.check_name(name)) == 7


def test_check_name_takes_ascii_native_str():
    assert pathrules.check_name(compat.native_str("etc/client.keys")) == [u"etc", u"client.keys"]


def test_names_are_refused_before_any_system_call(home, log, monkeypatch):
    calls = []

    def spy(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError("system call %s" % name)
        return fail
    rx = client_rx(home, log)
    for name in ("lstat", "stat", "open", "mkdir", "unlink", "rename", "listdir"):
        monkeypatch.setattr(os, name, spy(name))
    bad = [u"../etc/passwd", u"/etc/passwd", u"etc/shared/a\x00", u"etc/shared/\u00e9",
           u"etc/shared/a\\b", u"etc/shared/../../x"]
    states, reasons = rx.apply_batch([inc(n, b"x") for n in bad], deletes=bad,
                                     deleted_dirs=bad)
    monkeypatch.undo()
    assert calls == []
    assert set(states.values()) == set(["invalid"])
    assert len(states) == len(bad)


def test_escape_is_bounded_printable_ascii():
    assert pathrules.escape(u"etc/shared/x") == "'etc/shared/x'"
    shown = pathrules.escape(u"a\nb\x00c\u00e9\U0001f600'\\")
    assert shown == "'a\\x0ab\\x00c\\xe9\\U0001f600\\'\\\\'"
    assert pathrules.escape(b"\xff\n") == "'\\xff\\x0a'"
    long_text = pathrules.escape(u"x" * 100000)
    assert len(long_text) < 200 and long_text.endswith("...(100000 characters)")
    assert pathrules.escape(None) == "<NoneType>"
    for value in (u"\r\n\t", b"\x1b[31m", u"\u202e"):
        out = pathrules.escape(value)
        assert all(0x20 <= ord(c) < 0x7f for c in out)


# -- items and roles --------------------------------------------------------------------------

@pytest.mark.parametrize("name,item", [
    (u"etc/client.keys", "client.keys"),
    (u"etc/shared/default/agent.conf", "shared"),
    (u"etc/shared/agent.conf", "shared"),
    (u"etc/shared/a/b/c/d.conf", "shared"),
    (u"queue/agent-groups/001", "agent-groups"),
])
def test_item_for_master_owned_on_a_client(name, item):
    assert pathrules.item_for(name, ITEMS, "master", "client", EXCLUDE).name == item


def test_item_for_agent_info_on_the_master():
    found = pathrules.item_for(u"queue/agent-info/web01-10.0.0.5", ITEMS, "client", "master",
                             EXCLUDE)
    assert found.name == "agent-info"


@pytest.mark.parametrize("name", [
    u"etc/shared",                      # an item root is no file
    u"queue/agent-info",
    u"etc/ossec.conf",                  # outside every item
    u"etc/client.keys.bak",
    u"etc/client.keys/x",
    u"queue/agent-groups/sub/001",      # below a non-recursive item
    u"queue/rids/001",
    u"var/db/cluster.db",
])
def test_item_for_refuses_names_outside_items(name):
    with pytest.raises(PathRefused) as info:
        pathrules.item_for(name, ITEMS, "master", "client", EXCLUDE)
    assert "not inside any item" in info.value.message


@pytest.mark.parametrize("name", [
    u"etc/shared/default/merged.mg", u"etc/shared/ar.conf", u"etc/shared/default/ossec.conf",
    u"etc/shared/default/agent.conf~", u"etc/shared/.git/config",
    u"etc/shared/default/.agent.conf.0123456789ab.tmp", u"etc/shared/default/x.swp",
])
def test_item_for_refuses_excluded_names(name):
    with pytest.raises(PathRefused) as info:
        pathrules.item_for(name, ITEMS, "master", "client", EXCLUDE)
    assert "excluded" in info.value.message


def test_the_exclude_patterns_matched_at_once_refuse_what_each_pattern_refuses():
    # One compiled match of all the patterns stands for fnmatchcase on each, and the
    # refusal still names the first pattern that matched.
    patterns = ("merged.mg", "*~", ".*", "*.tmp", "[ab]?.conf", "x[!0-9]")
    for base in (u"merged.mg", u"merged.mgx", u"a~", u"~a", u".a", u"a.tmp", u"a.tmpx",
                 u"ab.conf", u"cb.conf", u"bzz.conf", u"xa", u"x1", u"agent-1"):
        wanted = [p for p in patterns if fnmatch.fnmatchcase(base, p)]
        try:
            pathrules.item_for(u"etc/shared/default/" + base, ITEMS, "master", "client",
                               patterns)
            refused = None
        except PathRefused as exc:
            refused = exc.message
        assert (refused is not None) == bool(wanted), base
        assert refused is None or "matches '%s'" % wanted[0] in refused


@pytest.mark.parametrize("name", [u"etc/client.keys", u"etc/shared/default/agent.conf",
                                  u"queue/agent-groups/001"])
def test_master_refuses_master_owned_files_from_a_client(name):
    with pytest.raises(PathRefused) as info:
        pathrules.item_for(name, ITEMS, "client", "master", EXCLUDE)
    assert info.value.message == "master-owned file pushed by a client"
    assert info.value.code == "invalid"


def test_client_refuses_agent_info_from_the_master():
    with pytest.raises(PathRefused) as info:
        pathrules.item_for(u"queue/agent-info/web01-any", ITEMS, "master", "client", EXCLUDE)
    assert "written by the client" in info.value.message


def test_same_role_peers_write_nothing():
    with pytest.raises(PathRefused):
        pathrules.item_for(u"queue/agent-info/web01-any", ITEMS, "client", "client", EXCLUDE)
    with pytest.raises(PathRefused):
        pathrules.item_for(u"etc/client.keys", ITEMS, "master", "master", EXCLUDE)


def test_unknown_roles_are_a_programming_error(home, log):
    with pytest.raises(ValueError):
        pathrules.item_for(u"etc/client.keys", ITEMS, "boss", "client", EXCLUDE)
    with pytest.raises(ValueError):
        Receiver(home, ITEMS, EXCLUDE, log)


def test_most_specific_item_wins():
    items = ITEMS + (Item("special", "etc/shared/special", "dir", "client", False, 0o600,
                          0o700, False, False, False),)
    assert pathrules.item_for(u"etc/shared/special/x", items, "client", "master").name == \
        "special"
    assert pathrules.item_for(u"etc/shared/other/x", items, "master", "client").name == "shared"
    with pytest.raises(PathRefused):  # below the nested non-recursive item: not "shared"
        pathrules.item_for(u"etc/shared/special/a/b", items, "master", "client")


# -- writing ----------------------------------------------------------------------------------

def test_new_file_gets_content_mode_mtime_and_new_folders(home, log):
    old_umask = os.umask(0o077)
    try:
        rx = client_rx(home, log)
        states, reasons = rx.apply_batch([
            inc(u"etc/shared/newgroup/sub/agent.conf", b"<agent_config/>\n"),
            inc(u"etc/client.keys", b"001 web01 any " + b"k" * 64 + b"\n", BASE_NS + 7),
        ])
        assert os.umask(0o077) == 0o077  # the receiver never changed the umask
    finally:
        os.umask(old_umask)
    assert states == {u"etc/shared/newgroup/sub/agent.conf": "synchronized",
                      u"etc/client.keys": "synchronized"}
    assert reasons == {}
    path = os.path.join(home, "etc/shared/newgroup/sub/agent.conf")
    assert read(home, "etc/shared/newgroup/sub/agent.conf") == b"<agent_config/>\n"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    assert stat.S_IMODE(os.lstat(os.path.join(home, "etc/client.keys")).st_mode) == 0o640
    for folder in ("etc/shared/newgroup", "etc/shared/newgroup/sub"):
        assert stat.S_IMODE(os.lstat(os.path.join(home, folder)).st_mode) == 0o770
    assert abs(mtime_ns(path) - BASE_NS) <= receive.MTIME_SLACK_NS
    assert abs(mtime_ns(os.path.join(home, "etc/client.keys")) - BASE_NS - 7) <= \
        receive.MTIME_SLACK_NS
    if not compat.PY2:
        assert mtime_ns(path) == BASE_NS  # nanoseconds where the interpreter has them
    assert temp_files(home) == []


def test_existing_file_is_replaced(home, log):
    put(home, "etc/shared/default/agent.conf", b"old")
    states, _ = client_rx(home, log).apply_batch([inc(u"etc/shared/default/agent.conf",
                                                      b"new")])
    assert states[u"etc/shared/default/agent.conf"] == "synchronized"
    assert read(home, "etc/shared/default/agent.conf") == b"new"


def test_every_file_of_a_generator_batch_lands(home, log):
    names = [u"etc/shared/g%d/f%d" % (n % 7, n) for n in range(300)]
    files = (inc(name, name.encode("ascii") * 3) for name in names)
    states, reasons = client_rx(home, log).apply_batch(files)
    assert reasons == {}
    assert all(states[name] == "synchronized" for name in names)
    assert read(home, names[123]) == names[123].encode("ascii") * 3
    assert temp_files(home) == []


def test_per_file_fsync_when_syncfs_is_missing(home, log, monkeypatch):
    monkeypatch.setattr(fsops, "SYNCFS", None)
    states, _ = client_rx(home, log).apply_batch([inc(u"etc/shared/default/a", b"a"),
                                                  inc(u"queue/agent-groups/001", b"default")])
    assert set(states.values()) == set(["synchronized"])
    assert read(home, "queue/agent-groups/001") == b"default"


def test_a_failed_flush_fails_the_batch_and_keeps_old_files(home, log, monkeypatch):
    put(home, "etc/shared/default/agent.conf", b"old")

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fsops, "SYNCFS", broken)
    monkeypatch.setattr(receive, "FSYNC_EACH_UP_TO", 0)  # every file waits for the syncfs
    states, reasons = client_rx(home, log).apply_batch([inc(u"etc/shared/default/agent.conf",
                                                            b"new")])
    assert states[u"etc/shared/default/agent.conf"] == "failed"
    assert "Input/output error" in reasons[u"etc/shared/default/agent.conf"]
    assert read(home, "etc/shared/default/agent.conf") == b"old"
    assert temp_files(home) == []


def test_long_base_name_fits_its_temporary_file(home, log):
    name = u"etc/shared/default/" + u"n" * 255
    states, _ = client_rx(home, log).apply_batch([inc(name, b"x")])
    assert states[name] == "synchronized"
    assert read(home, name) == b"x"


def test_checksum_mismatch_keeps_the_old_file(home, log):
    put(home, "etc/shared/default/agent.conf", b"old")
    bad = inc(u"etc/shared/default/agent.conf", b"new", sha=hashlib.sha256(b"other").hexdigest())
    states, reasons = client_rx(home, log).apply_batch([bad])
    assert states[u"etc/shared/default/agent.conf"] == "failed"
    assert "checksum" in reasons[u"etc/shared/default/agent.conf"]
    assert read(home, "etc/shared/default/agent.conf") == b"old"
    assert temp_files(home) == []


@pytest.mark.parametrize("field", ["sha256", "mtime_ns", "data"])
def test_malformed_records_are_invalid(home, log, field):
    good = inc(u"etc/shared/default/a", b"a")
    bad = good._replace(**{field: {"sha256": u"zz", "mtime_ns": -1, "data": 5}[field]})
    states, _ = client_rx(home, log).apply_batch([bad, "not a record"])
    assert states[u"etc/shared/default/a"] == "invalid"
    assert states["<NoneType>"] == "invalid"  # no name: keyed by its escaped form
    assert not os.path.exists(os.path.join(home, "etc/shared/default/a"))


def test_symlink_in_a_parent_folder_is_not_followed(home, log, outside):
    os.symlink(outside, os.path.join(home, "etc/shared/evil"))
    states, reasons = client_rx(home, log).apply_batch([inc(u"etc/shared/evil/victim", b"pwn"),
                                                        inc(u"etc/shared/evil/new", b"pwn")])
    assert states == {u"etc/shared/evil/victim": "invalid", u"etc/shared/evil/new": "invalid"}
    assert "symlink" in reasons[u"etc/shared/evil/victim"]
    assert os.listdir(outside) == ["victim"]
    with open(os.path.join(outside, "victim"), "rb") as handle:
        assert handle.read() == b"precious"


def test_symlinked_item_root_is_not_followed(home, log, outside):
    shutil.rmtree(os.path.join(home, "queue/agent-groups"))
    os.symlink(outside, os.path.join(home, "queue/agent-groups"))
    states, _ = client_rx(home, log).apply_batch([inc(u"queue/agent-groups/victim", b"x")])
    assert states[u"queue/agent-groups/victim"] == "invalid"
    with open(os.path.join(outside, "victim"), "rb") as handle:
        assert handle.read() == b"precious"


def test_symlink_as_the_target_is_not_followed(home, log, outside):
    link = os.path.join(home, "etc/shared/default/agent.conf")
    os.symlink(os.path.join(outside, "victim"), link)
    states, reasons = client_rx(home, log).apply_batch([inc(u"etc/shared/default/agent.conf",
                                                            b"pwn")])
    assert states[u"etc/shared/default/agent.conf"] == "invalid"
    assert "symlink" in reasons[u"etc/shared/default/agent.conf"]
    assert os.path.islink(link)
    with open(os.path.join(outside, "victim"), "rb") as handle:
        assert handle.read() == b"precious"
    assert temp_files(home) == []


def test_folder_where_the_file_should_be(home, log):
    os.makedirs(os.path.join(home, "etc/shared/default/agent.conf/inner"))
    states, reasons = client_rx(home, log).apply_batch([inc(u"etc/shared/default/agent.conf",
                                                            b"x")])
    assert states[u"etc/shared/default/agent.conf"] == "invalid"
    assert "folder" in reasons[u"etc/shared/default/agent.conf"]
    assert os.path.isdir(os.path.join(home, "etc/shared/default/agent.conf/inner"))


def test_file_where_a_folder_should_be(home, log):
    put(home, "etc/shared/grp", b"a file")
    states, _ = client_rx(home, log).apply_batch([inc(u"etc/shared/grp/agent.conf", b"x")])
    assert states[u"etc/shared/grp/agent.conf"] == "invalid"
    assert read(home, "etc/shared/grp") == b"a file"


def test_refused_and_failed_files_are_logged_escaped_and_bounded(home, log):
    files = [inc(u"etc/shared/x\n%d" % n, b"x") for n in range(receive.LOG_DETAIL_LINES + 5)]
    states, _ = client_rx(home, log).apply_batch(files)
    assert set(states.values()) == set(["invalid"])
    assert len(log.lines) == receive.LOG_DETAIL_LINES + 1
    assert all("\n" not in line for line in log.lines)
    assert "5 more" in log.lines[-1]


def test_master_records_master_owned_pushes_invalid_and_writes_nothing(home, log):
    put(home, "etc/client.keys", b"master's keys")
    states, reasons = master_rx(home, log).apply_batch(
        [inc(u"etc/client.keys", b"forged"), inc(u"etc/shared/default/agent.conf", b"forged")],
        deletes=[u"etc/shared/default/x"], deleted_dirs=[u"etc/shared/default"],
        peer=u"node02")
    assert set(states.values()) == set(["invalid"])
    assert reasons[u"etc/client.keys"] == "master-owned file pushed by a client"
    assert read(home, "etc/client.keys") == b"master's keys"
    assert os.path.isdir(os.path.join(home, "etc/shared/default"))
    assert "refused 'etc/client.keys' from client 'node02': master-owned file pushed by a " \
        "client" in log.lines


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_group_is_set_when_running_as_root(home, log):
    gid = 54321
    states, _ = client_rx(home, log, owner_gid=gid).apply_batch(
        [inc(u"etc/shared/newgrp/agent.conf", b"x")])
    assert states[u"etc/shared/newgrp/agent.conf"] == "synchronized"
    assert os.lstat(os.path.join(home, "etc/shared/newgrp/agent.conf")).st_gid == gid
    assert os.lstat(os.path.join(home, "etc/shared/newgrp")).st_gid == gid


# -- agent-info: newest wins, meta-only -------------------------------------------------------

AI = u"queue/agent-info/web01-10.0.0.5"


def test_newest_agent_info_wins_on_the_master(home, log):
    path = put(home, AI, b"from node02\n", BASE_NS)
    rx = master_rx(home, log)
    states, reasons = rx.apply_batch([inc(AI, b"from node03\n", BASE_NS - 10 * SEC)])
    assert states[AI] == "synchronized"
    assert "newer" in reasons[AI]
    assert read(home, AI) == b"from node02\n"
    assert abs(mtime_ns(path) - BASE_NS) <= receive.MTIME_SLACK_NS
    states, reasons = rx.apply_batch([inc(AI, b"from node03\n", BASE_NS + 10 * SEC)])
    assert states[AI] == "synchronized" and AI not in reasons
    assert read(home, AI) == b"from node03\n"
    assert abs(mtime_ns(path) - BASE_NS - 10 * SEC) <= receive.MTIME_SLACK_NS


def test_same_keepalive_is_not_rewritten(home, log):
    path = put(home, AI, b"a\n", BASE_NS)
    inode = os.lstat(path).st_ino
    states, reasons = master_rx(home, log).apply_batch([inc(AI, b"a\n", BASE_NS)])
    assert states[AI] == "synchronized" and reasons[AI] == receive.KEPT_SAME
    assert read(home, AI) == b"a\n" and os.lstat(path).st_ino == inode


def test_other_content_at_the_same_keepalive_is_taken(home, log):
    """An agent-info edited in place on its node, its time kept: the same mtime with other
    content is no older than ours (SPEC section 8: an in-place edit is seen within one full
    pass). It was kept out, and sent again in every round."""
    put(home, AI, b"a\n", BASE_NS)
    states, reasons = master_rx(home, log).apply_batch([inc(AI, b"b\n", BASE_NS)])
    assert states[AI] == "synchronized" and AI not in reasons
    assert read(home, AI) == b"b\n"
    assert abs(mtime_ns(os.path.join(home, AI)) - BASE_NS) <= receive.MTIME_SLACK_NS
    states, reasons = master_rx(home, log).apply_batch([inc(AI, b"c\n", BASE_NS - SEC)])
    assert reasons[AI] == receive.KEPT_NEWER and read(home, AI) == b"b\n"


def test_newer_only_can_be_turned_off(home, log):
    put(home, AI, b"newer\n", BASE_NS)
    states, _ = master_rx(home, log, newer_only=False).apply_batch(
        [inc(AI, b"older\n", BASE_NS - SEC)])
    assert states[AI] == "synchronized"
    assert read(home, AI) == b"older\n"


def test_meta_only_update_sets_the_mtime(home, log):
    path = put(home, AI, b"Linux web01\n", BASE_NS)
    touch = inc(AI, b"Linux web01\n", BASE_NS + 5 * SEC, meta_only=True)
    states, reasons = master_rx(home, log).apply_batch([touch._replace(data=None)])
    assert states[AI] == "synchronized" and reasons == {}
    assert read(home, AI) == b"Linux web01\n"
    assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS


def test_meta_only_update_fails_when_the_content_differs(home, log):
    path = put(home, AI, b"local\n", BASE_NS)
    touch = inc(AI, b"remote\n", BASE_NS + 5 * SEC, meta_only=True)
    states, reasons = master_rx(home, log).apply_batch([touch])
    assert states[AI] == "failed"
    assert "differs" in reasons[AI]
    assert abs(mtime_ns(path) - BASE_NS) <= receive.MTIME_SLACK_NS


def test_meta_only_update_of_a_missing_file_fails(home, log):
    states, _ = master_rx(home, log).apply_batch([inc(AI, b"x", meta_only=True)])
    assert states[AI] == "failed"
    assert not os.path.exists(os.path.join(home, AI))


def odd_agent_infos(home, outside):
    """Three agent-info names that are no regular file: a symlink to a file outside the
    tree, a folder and a FIFO; (the symlink's target, its mtime, the names)."""
    victim = os.path.join(outside, "victim")
    before = mtime_ns(victim)
    names = [AI, AI + "2", AI + "3"]
    os.symlink(victim, os.path.join(home, names[0]))
    os.mkdir(os.path.join(home, names[1]))
    os.mkfifo(os.path.join(home, names[2]))
    return victim, before, names


def test_meta_only_update_refuses_what_is_not_a_regular_file(home, log, outside):
    # The touch opens the name (no lstat first): a symlink, a folder or a FIFO there is
    # refused as before, the symlink's target keeps its time, and a FIFO does not block.
    victim, before, names = odd_agent_infos(home, outside)
    states, reasons = master_rx(home, log).apply_batch(
        [inc(name, b"x", BASE_NS + 5 * SEC, meta_only=True) for name in names])
    assert states == dict((name, "invalid") for name in names)
    assert "symlink" in reasons[names[0]] and "folder" in reasons[names[1]]
    assert "not a regular file" in reasons[names[2]]
    assert mtime_ns(victim) == before and os.path.islink(os.path.join(home, names[0]))


def test_meta_only_update_older_than_the_local_file_is_kept_out(home, log):
    path = put(home, AI, b"Linux web01\n", BASE_NS + 9 * SEC)
    touch = inc(AI, b"Linux web01\n", BASE_NS + 5 * SEC, meta_only=True)
    states, reasons = master_rx(home, log).apply_batch([touch._replace(data=None)])
    assert states[AI] == "synchronized" and "newer" in reasons[AI]
    assert abs(mtime_ns(path) - BASE_NS - 9 * SEC) <= receive.MTIME_SLACK_NS


# -- deletions --------------------------------------------------------------------------------

def test_delete_removes_a_regular_file(home, log):
    put(home, "etc/shared/default/agent.conf", b"x")
    states, _ = client_rx(home, log).apply_batch(deletes=[u"etc/shared/default/agent.conf",
                                                          u"queue/agent-groups/404"])
    assert states == {u"etc/shared/default/agent.conf": "synchronized",
                      u"queue/agent-groups/404": "synchronized"}
    assert not os.path.exists(os.path.join(home, "etc/shared/default/agent.conf"))


def test_delete_does_not_follow_symlinks(home, log, outside):
    os.symlink(os.path.join(outside, "victim"), os.path.join(home, "etc/shared/default/link"))
    os.symlink(outside, os.path.join(home, "etc/shared/evil"))
    states, _ = client_rx(home, log).apply_batch(deletes=[u"etc/shared/default/link",
                                                          u"etc/shared/evil/victim"])
    assert states == {u"etc/shared/default/link": "invalid",
                      u"etc/shared/evil/victim": "invalid"}
    assert os.path.islink(os.path.join(home, "etc/shared/default/link"))
    assert os.listdir(outside) == ["victim"]


def test_delete_of_a_folder_is_refused(home, log):
    os.makedirs(os.path.join(home, "etc/shared/default/sub"))
    states, _ = client_rx(home, log).apply_batch(deletes=[u"etc/shared/default/sub"])
    assert states == {u"etc/shared/default/sub": "invalid"}
    assert os.path.isdir(os.path.join(home, "etc/shared/default/sub"))


def test_a_file_item_deleted_on_the_master_is_deleted_on_a_client(home, log):
    put(home, "etc/client.keys", b"keys")
    states, _ = client_rx(home, log).apply_batch(deletes=[u"etc/client.keys"])
    assert states == {u"etc/client.keys": "synchronized"}
    assert not os.path.exists(os.path.join(home, "etc/client.keys"))
    put(home, "etc/client.keys", b"keys")
    states, _ = master_rx(home, log).apply_batch(deletes=[u"etc/client.keys"])
    assert states == {u"etc/client.keys": "invalid"}
    assert read(home, "etc/client.keys") == b"keys"


def test_data_may_be_a_memoryview_slice(home, log):
    buf = b"headerAAAABBBBBtrailer"
    view = memoryview(buf)
    states, _ = client_rx(home, log).apply_batch([
        Incoming(u"etc/shared/default/a", view[6:10], hashlib.sha256(b"AAAA").hexdigest(),
                 BASE_NS),
        Incoming(u"etc/shared/default/b", view[10:15], hashlib.sha256(b"BBBBB").hexdigest(),
                 BASE_NS)])
    assert set(states.values()) == set(["synchronized"])
    assert read(home, "etc/shared/default/a") == b"AAAA"
    assert read(home, "etc/shared/default/b") == b"BBBBB"


def test_group_folder_removal_does_not_follow_symlinks(home, log, outside):
    put(home, "etc/shared/old/agent.conf", b"x")
    put(home, "etc/shared/old/deep/er/file", b"y")
    os.symlink(outside, os.path.join(home, "etc/shared/old/link"))
    os.symlink(os.path.join(outside, "victim"), os.path.join(home, "etc/shared/old/deep/vl"))
    states, _ = client_rx(home, log).apply_batch(deleted_dirs=[u"etc/shared/old",
                                                               u"etc/shared/never"])
    assert states == {u"etc/shared/old": "synchronized", u"etc/shared/never": "synchronized"}
    assert not os.path.lexists(os.path.join(home, "etc/shared/old"))
    assert os.listdir(outside) == ["victim"]
    with open(os.path.join(outside, "victim"), "rb") as handle:
        assert handle.read() == b"precious"


def test_group_folder_removal_refuses_symlinks_and_other_items(home, log, outside):
    os.symlink(outside, os.path.join(home, "etc/shared/linked"))
    os.makedirs(os.path.join(home, "queue/agent-groups/sub"))
    put(home, "etc/shared/afile", b"x")
    states, _ = client_rx(home, log).apply_batch(deleted_dirs=[
        u"etc/shared/linked", u"etc/shared/linked/inner", u"queue/agent-groups/sub",
        u"etc/shared/afile", u"etc/shared", u"etc"])
    assert set(states.values()) == set(["invalid"])
    assert os.path.islink(os.path.join(home, "etc/shared/linked"))
    assert os.listdir(outside) == ["victim"]
    assert os.path.isdir(os.path.join(home, "queue/agent-groups/sub"))
    assert os.path.isfile(os.path.join(home, "etc/shared/afile"))


def test_removed_group_can_come_back_in_the_same_batch(home, log):
    put(home, "etc/shared/grp/old.conf", b"old")
    states, _ = client_rx(home, log).apply_batch(
        [inc(u"etc/shared/grp/agent.conf", b"new")], deleted_dirs=[u"etc/shared/grp"])
    assert states[u"etc/shared/grp/agent.conf"] == "synchronized"
    assert os.listdir(os.path.join(home, "etc/shared/grp")) == ["agent.conf"]


# -- temporary files --------------------------------------------------------------------------

def test_cleanup_removes_only_our_leftover_temporary_files(home, log, outside):
    ours = [put(home, "etc/shared/default/.agent.conf.0123456789ab.tmp", b"x"),
            put(home, "etc/shared/a/b/.f.aaaaaaaaaaaa.tmp", b"x"),
            put(home, "queue/agent-info/.web01-any.bbbbbbbbbbbb.tmp", b"x"),
            put(home, "etc/.client.keys.cccccccccccc.tmp", b"x")]
    kept = [put(home, "etc/shared/default/agent.conf", b"x"),
            put(home, "etc/shared/default/other.tmp", b"x"),
            put(home, "etc/.ossec.conf.dddddddddddd.tmp", b"x"),    # not an item of ours
            put(home, "queue/rids/.001.eeeeeeeeeeee.tmp", b"x"),
            put(outside, ".victim.ffffffffffff.tmp", b"x")]
    os.symlink(outside, os.path.join(home, "etc/shared/link"))
    assert client_rx(home, log).cleanup_temp_files() == len(ours)
    assert not any(os.path.exists(p) for p in ours)
    assert all(os.path.exists(p) for p in kept)


FULL_DISK = r"""
import hashlib, json, logging, resource, signal, sys
from wazuh_cluster import receive
from wazuh_cluster.config import Item
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
items = (Item("shared", "etc/shared", "dir", "master", True, 0o660, 0o770, False, False, True),)
log = logging.getLogger("x")
log.addHandler(logging.NullHandler())
rx = receive.Receiver(sys.argv[1], items, (), log, role="client")
def inc(name, data):
    return receive.Incoming(name, data, hashlib.sha256(data).hexdigest(), 10 ** 18)
states, reasons = rx.apply_batch([inc(u"etc/shared/default/agent.conf", b"n" * 100000),
                                  inc(u"etc/shared/default/small", b"fits")])
sys.stdout.write(json.dumps([states, reasons]))
"""


def test_full_disk_keeps_the_old_file_and_reports_failed(home):
    put(home, "etc/shared/default/agent.conf", b"old content")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LIB] + [p for p in [env.get("PYTHONPATH")] if p])
    child = subprocess.Popen([sys.executable, "-c", FULL_DISK, home], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate()
    assert child.returncode == 0, err
    states, reasons = json.loads(out.decode("utf-8"))
    assert states == {u"etc/shared/default/agent.conf": "failed",
                      u"etc/shared/default/small": "synchronized"}
    assert "too large" in reasons[u"etc/shared/default/agent.conf"].lower()
    assert read(home, "etc/shared/default/agent.conf") == b"old content"
    assert read(home, "etc/shared/default/small") == b"fits"
    assert temp_files(home) == []


ENOSPC = r"""
import hashlib, json, logging, os, sys
from wazuh_cluster import receive
from wazuh_cluster.config import Item
home = sys.argv[1]
os.makedirs(os.path.join(home, "etc/shared/default"))
with open(os.path.join(home, "etc/shared/default/agent.conf"), "wb") as handle:
    handle.write(b"old content")
items = (Item("shared", "etc/shared", "dir", "master", True, 0o660, 0o770, False, False, True),)
log = logging.getLogger("x")
log.addHandler(logging.NullHandler())
rx = receive.Receiver(home, items, (), log, role="client")
def inc(name, data):
    return receive.Incoming(name, data, hashlib.sha256(data).hexdigest(), 10 ** 18)
states, reasons = rx.apply_batch([inc(u"etc/shared/default/agent.conf", b"n" * 200000)])
with open(os.path.join(home, "etc/shared/default/agent.conf"), "rb") as handle:
    old = handle.read().decode("ascii")
left = sorted(os.listdir(os.path.join(home, "etc/shared/default")))
sys.stdout.write(json.dumps([states, reasons, old, left]))
"""


def _can_mount_tmpfs():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        return subprocess.call(["unshare", "-m", "true"]) == 0
    except OSError:
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a tmpfs")
def test_no_space_left_keeps_the_old_file_and_reports_failed():
    mountpoint = tempfile.mkdtemp(prefix="wzc-enospc-")
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([LIB] + [p for p in [env.get("PYTHONPATH")] if p])
        # A private mount namespace: the 64 KiB tmpfs disappears with the child.
        shell = ('mount --make-rprivate / && mount -t tmpfs -o size=64k tmpfs "$1" && '
                 'exec "$2" -c "$3" "$1"')
        child = subprocess.Popen(["unshare", "-m", "sh", "-c", shell, "sh", mountpoint,
                                  sys.executable, ENOSPC], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = child.communicate()
        assert child.returncode == 0, err
        states, reasons, old, left = json.loads(out.decode("utf-8"))
    finally:
        os.rmdir(mountpoint)
    assert states == {u"etc/shared/default/agent.conf": "failed"}
    assert "No space left" in reasons[u"etc/shared/default/agent.conf"]
    assert old == u"old content"
    assert left == [u"agent.conf"]


def test_an_unexpected_error_mid_batch_leaves_no_temporary_file(home, log):
    def files():
        yield inc(u"etc/shared/default/a", b"a")
        raise RuntimeError("the session broke")
    with pytest.raises(RuntimeError):
        client_rx(home, log).apply_batch(files())
    assert temp_files(home) == []
    assert not os.path.exists(os.path.join(home, "etc/shared/default/a"))


def _in_child_as(uid, gid, function):
    """Run function() in a forked child under uid/gid; return what it returned (JSON)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_end, json.dumps(function()).encode("utf-8"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return json.loads(b"".join(chunks).decode("utf-8"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to act as two users")
def test_meta_only_update_of_another_users_file_replaces_it(home, log):
    """Only a file's owner may set its times: Wazuh's remoted owns agent-info files."""
    os.chmod(home, 0o755)
    for folder in ("queue", "queue/agent-info"):
        os.chmod(os.path.join(home, folder), 0o777)
    path = put(home, AI, b"Linux web01\n", BASE_NS)
    os.chmod(path, 0o666)
    touch = inc(AI, b"Linux web01\n", BASE_NS + 5 * SEC, meta_only=True)

    def apply():
        return master_rx(home, log).apply_batch([touch])
    states, reasons = _in_child_as(65534, 65534, apply)
    assert states == {AI: "synchronized"} and reasons == {}
    assert read(home, AI) == b"Linux web01\n"
    assert abs(mtime_ns(path) - BASE_NS - 5 * SEC) <= receive.MTIME_SLACK_NS
    assert os.lstat(path).st_uid == 65534
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
    assert temp_files(home) == []


def test_group_folder_deeper_than_the_recursion_limit_is_removed(home, log):
    path = os.path.join(home, "etc/shared/deep")
    current = path
    os.mkdir(current)
    for _ in range(sys.getrecursionlimit() + 50):  # os.makedirs would recurse itself
        current = os.path.join(current, "d")
        os.mkdir(current)
    states, reasons = client_rx(home, log).apply_batch(deleted_dirs=[u"etc/shared/deep"])
    assert states == {u"etc/shared/deep": "synchronized"}, reasons
    assert not os.path.lexists(path)


def test_small_batches_fsync_each_file_large_ones_flush_once(home, log, monkeypatch):
    def counting(real, calls):
        def call(fd):
            calls.append(fd)
            real(fd)
        return call
    calls, fsyncs = [], []
    monkeypatch.setattr(fsops, "SYNCFS", counting(fsops.SYNCFS, calls))
    monkeypatch.setattr(os, "fsync", counting(os.fsync, fsyncs))
    rx = client_rx(home, log)
    small = [inc(u"etc/shared/default/s%d" % n, b"s") for n in range(receive.FSYNC_EACH_UP_TO)]
    assert set(rx.apply_batch(small)[0].values()) == set(["synchronized"])
    assert calls == [] and len(fsyncs) == receive.FSYNC_EACH_UP_TO + 1  # files, then the folder
    del fsyncs[:]
    large = [inc(u"etc/shared/g%d/l%d" % (n % 3, n), b"l") for n in range(50)]
    assert set(rx.apply_batch(large)[0].values()) == set(["synchronized"])
    assert len(calls) == 1  # one file system; the first files were not fsync'd on their own
    # the three group folders, and etc/shared which got them: fsync'd one by one
    assert len(fsyncs) == 4
    del calls[:], fsyncs[:]
    spread = [inc(u"etc/shared/h%d/l%d" % (n, n), b"l") for n in range(50)]
    assert set(rx.apply_batch(spread)[0].values()) == set(["synchronized"])
    assert len(calls) == 2 and fsyncs == []  # the data, then the 51 folders at once


def test_a_failed_folder_flush_fails_its_files(home, log, monkeypatch):
    calls = []

    def fails_second_time(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fsops, "SYNCFS", fails_second_time)
    names = [u"etc/shared/h%d/f" % n for n in range(receive.FSYNC_EACH_UP_TO + 1)]
    states, reasons = client_rx(home, log).apply_batch([inc(n, b"x") for n in names])
    assert set(states.values()) == set(["failed"])
    assert "folder flush failed: Input/output error" in reasons[names[0]]


def test_concurrent_reports_of_one_agent_keep_the_newest(home, log):
    import threading
    rx = master_rx(home, log)
    errors = []

    def report(node, mtime):
        try:
            for _ in range(20):
                rx.apply_batch([inc(AI, node.encode("ascii"), mtime)])
        except Exception as exc:  # any error in a thread is reported by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=report, args=("node%d" % n, BASE_NS + n * SEC))
               for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert read(home, AI) == b"node3"
    assert temp_files(home) == []


def test_data_the_caller_proved_is_not_hashed_again(home, log):  # noqa: F811
    # deltarx checks a delta's result against its checksum before the receiver sees it:
    # Receiver.proven lets that check stand (it is asked for this very record).
    name = u"etc/shared/default/agent.conf"
    unproven = inc(name, b"new", sha=hashlib.sha256(b"other").hexdigest())
    states, _ = client_rx(home, log).apply_batch([unproven])
    assert states[name] == "failed"                    # hashed: the checksum does not match
    rx = client_rx(home, log)
    rx.proven = lambda incoming: incoming is unproven  # (a deliberately wrong proof here)
    states, _ = rx.apply_batch([unproven])
    assert states[name] == "synchronized" and read(home, name) == b"new"
