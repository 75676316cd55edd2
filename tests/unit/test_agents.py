"""client.keys handling: parsing, removals, the mass-removal guard, backups, status."""
from __future__ import absolute_import, division, print_function

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from wazuh_cluster import agents, compat
from wazuh_cluster.agents import Agent
from wazuh_cluster.errors import ClusterError

KEY = "a" * 64
LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "lib")
NOW = 1700000000.0  # 2023/Nov/14 UTC (local time in the tests is set to UTC)


class ListHandler(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def log():
    logger = logging.getLogger("wazuh_cluster.test_agents")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.lines = handler.lines
    yield logger
    logger.removeHandler(handler)


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-agents-")
    for folder in ("queue/agent-info", "queue/agent-groups", "queue/rids", "queue/syscheck",
                   "queue/rootcheck"):
        os.makedirs(os.path.join(path, folder))
    yield path
    os.chmod(path, 0o755)
    shutil.rmtree(path)


@pytest.fixture
def utc():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def keys(*lines):
    return "".join(line + "\n" for line in lines)


def line(agent_id, name, ip="any"):
    return "%s %s %s %s" % (agent_id, name, ip, KEY)


def put(path, data, mtime=None):
    with open(path, "wb") as handle:
        handle.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


# -- parsing ----------------------------------------------------------------------------------

def test_parse_client_keys():
    text = keys(line("001", "web01", "10.0.0.5"), "", "   ", line("002", "!db01", "10.0.0.6"),
                line("003", "#old", "any"), line("004", "net", "10.0.0.0/24"),
                "garbage", "005 onlythree any", "006 a b c d", "# a comment line",
                line("../x", "evil"), line("007", "../../etc"), line("008", "sl/ash"),
                line("009", ".."), line("010", "ok", "10.0.0.1;rm"))
    parsed = agents.parse_client_keys(text)
    assert list(parsed) == ["001", "002", "003", "004"]
    assert parsed["001"] == Agent("001", "web01", "10.0.0.5", KEY, False)
    assert parsed["002"] == Agent("002", "db01", "10.0.0.6", KEY, True)
    assert parsed["003"].removed and parsed["003"].name == "old"
    assert parsed["004"].ip == "10.0.0.0/24"
    assert parsed.skipped == 9
    assert [a.id for a in parsed.active()] == ["001", "004"]


def test_parse_client_keys_takes_bytes_and_crlf():
    parsed = agents.parse_client_keys(b"001 web01 any " + KEY.encode("ascii") + b"\r\n\xff\xfe\n")
    assert list(parsed) == ["001"] and parsed.skipped == 1


def test_parse_empty_file():
    parsed = agents.parse_client_keys("")
    assert len(parsed) == 0 and parsed.skipped == 0


def test_later_line_of_an_id_wins():
    parsed = agents.parse_client_keys(keys(line("001", "a"), line("001", "b")))
    assert parsed["001"].name == "b"
    parsed = agents.parse_client_keys(keys(line("001", "!a"), line("001", "#b")))
    assert parsed["001"].removed and parsed["001"].name == "b"


def test_a_marked_line_never_hides_an_active_line_of_its_id():
    # Wazuh skips marked lines when it looks an ID up, and gives a removed agent's ID to a
    # new agent: either order, the ID's agent is the active one.
    for text in (keys(line("001", "a"), line("001", "!a")),
                 keys(line("001", "!old"), line("001", "new"))):
        parsed = agents.parse_client_keys(text)
        assert not parsed["001"].removed, text
    assert agents.removed_agents(keys(line("001", "a")),
                                 keys(line("001", "a"), line("001", "!a"))) == []


# -- removals ---------------------------------------------------------------------------------

OLD = keys(line("001", "web01", "10.0.0.5"), line("002", "db01"), line("003", "mail"),
           line("004", "!gone"))


def test_removed_agents_line_gone_and_marks():
    new = keys(line("002", "!db01"), line("003", "#mail"), line("004", "!gone"))
    assert [a.id for a in agents.removed_agents(OLD, new)] == ["001", "002", "003"]


def test_removed_agents_ignores_already_removed_and_rekeyed():
    new = OLD.replace(KEY, "b" * 64)
    assert agents.removed_agents(OLD, new) == []


def test_an_id_with_a_new_name_or_ip_is_a_removal_of_the_old_agent():
    new = keys(line("001", "web01", "10.0.0.9"), line("002", "db02"), line("003", "mail"))
    assert [a.id for a in agents.removed_agents(OLD, new)] == ["001", "002"]


def test_guard_holds_back_removing_all_agents():
    ok, message = agents.RemovalGuard(0.5).check(OLD, "")
    assert not ok
    assert "all 3 agents" in message and "--confirm-removals" in message
    assert "\n" not in message
    for vanished in ("", "\n\n", keys(line("004", "!gone")), "garbage\n"):
        ok, _ = agents.RemovalGuard(1.0).check(keys(line("001", "only")), vanished)
        assert not ok, vanished


# -- removal marks (SPEC 11): deliberate, they pass -------------------------------------------

def test_guard_lets_the_only_agent_marked_removed_through():
    for mark in ("!", "#"):
        ok, message = agents.RemovalGuard(0.5).check(keys(line("001", "only", "10.0.0.20")),
                                                     keys(line("001", mark + "only",
                                                               "10.0.0.20")))
        assert ok and "1 of 1 agents (1 marked removed)" in message, mark
    ok, _ = agents.RemovalGuard(0.0).check(keys(line("001", "only")), keys(line("001", "!only")))
    assert ok


def test_guard_lets_every_agent_marked_removed_through():
    old = keys(*[line("%03d" % n, "a%d" % n) for n in range(10)])
    all_marked = keys(*[line("%03d" % n, "!a%d" % n) for n in range(10)])
    ok, message = agents.RemovalGuard(0.5).check(old, all_marked)
    assert ok and "10 of 10" in message


def test_guard_counts_only_vanished_lines_when_marks_and_vanished_mix():
    old = keys(*[line("%03d" % n, "a%d" % n) for n in range(10)])
    # 3 marked + 6 vanished: 6 of 10 vanished is more than half -> held.
    mixed = keys(*([line("%03d" % n, "!a%d" % n) for n in range(3)] + [line("009", "a9")]))
    ok, message = agents.RemovalGuard(0.5).check(old, mixed)
    assert not ok and "6 of 10" in message
    # 6 marked + 3 vanished: passes the ratio; the marks do not count against it.
    mixed = keys(*([line("%03d" % n, "!a%d" % n) for n in range(6)] + [line("009", "a9")]))
    ok, message = agents.RemovalGuard(0.5).check(old, mixed)
    assert ok and "9 of 10 agents (6 marked removed)" in message
    # Nothing active left and one line vanished: held, however many were marked.
    mixed = keys(*[line("%03d" % n, "!a%d" % n) for n in range(9)])
    ok, message = agents.RemovalGuard(0.5).check(old, mixed)
    assert not ok and "all 10 agents" in message


def test_a_mark_on_a_different_line_is_a_vanished_line():
    old = keys(line("001", "only", "10.0.0.20"))
    for changed in (line("001", "!other", "10.0.0.20"), line("001", "!only", "10.0.0.21"),
                    line("002", "!only", "10.0.0.20"),
                    line("001", "!only", "10.0.0.20").replace(KEY, "b" * 64)):
        ok, _ = agents.RemovalGuard(0.5).check(old, keys(changed))
        assert not ok, changed
    # The ID of the marked agent given to a new agent: the old agent's mark still counts.
    ok, _ = agents.RemovalGuard(0.5).check(old, keys(line("001", "!only", "10.0.0.20"),
                                                     line("001", "new", "10.0.0.30")))
    assert ok


def test_a_duplicated_mark_still_marks_and_an_active_duplicate_keeps_the_agent():
    old = keys(line("001", "a"), line("002", "b"))
    twice = keys(line("001", "!a"), line("001", "!a"), line("002", "b"))
    assert agents.RemovalGuard(0.5).check(old, twice)[0]
    kept = keys(line("001", "!a"), line("001", "a"), line("002", "b"))
    assert agents.RemovalGuard(0.5).check(old, kept) == (True, "")


def test_guard_holds_back_more_than_the_ratio():
    old = keys(*[line("%03d" % n, "a%d" % n) for n in range(10)])
    six_gone = keys(*[line("%03d" % n, "a%d" % n) for n in range(4)])
    ok, message = agents.RemovalGuard(0.5).check(old, six_gone)
    assert not ok and "6 of 10" in message
    five_gone = keys(*[line("%03d" % n, "a%d" % n) for n in range(5)])
    ok, message = agents.RemovalGuard(0.5).check(old, five_gone)
    assert ok and "5 of 10" in message


def test_guard_lets_small_changes_and_additions_through():
    guard = agents.RemovalGuard(0.5)
    assert guard.check(OLD, OLD + line("005", "new") + "\n") == (True, "")
    assert guard.check("", keys(line("001", "first"))) == (True, "")
    assert guard.check("", "") == (True, "")
    ok, message = guard.check(OLD, keys(line("001", "web01", "10.0.0.5"), line("002", "db01")))
    assert ok and "1 of 3" in message


# -- names, files, status ---------------------------------------------------------------------

def test_agent_info_name():
    assert agents.agent_info_name(Agent("001", "web01", "10.0.0.5", KEY, False)) == \
        "web01-10.0.0.5"
    assert agents.agent_info_name(Agent("002", "web02", "any", KEY, False)) == "web02-any"
    assert agents.agent_info_name(Agent("003", "net", "10.0.0.0/24", KEY, False)) == \
        "net-10.0.0.0"


def test_agent_files_follow_wazuh_layout():
    agent = Agent("004", "net", "10.0.0.0/24", KEY, True)
    home = "/some/home"
    rel = [os.path.relpath(p, home) for p in agents.agent_files(home, agent)]
    assert rel == ["queue/agent-info/net-10.0.0.0",
                   "queue/syscheck/(net) 10.0.0.0->syscheck",
                   "queue/syscheck/.(net) 10.0.0.0->syscheck.cpt",
                   "queue/syscheck/(net) 10.0.0.0->syscheck-registry",
                   "queue/syscheck/.(net) 10.0.0.0->syscheck-registry.cpt",
                   "queue/rootcheck/(net) 10.0.0.0->rootcheck",
                   "queue/agent-groups/004",
                   "queue/rids/004"]
    anyone = Agent("005", "web", "any", KEY, True)
    assert os.path.basename(agents.agent_files(home, anyone)[5]) == "(web) any->rootcheck"


class FakeStat(object):
    def __init__(self, mtime, size):
        self.st_mtime = mtime
        self.st_size = size


def test_agent_status_rules():
    assert agents.agent_status(None, NOW) == "Never connected"
    assert agents.agent_status(FakeStat(NOW - 10, 200), NOW) == "Active"
    assert agents.agent_status(FakeStat(NOW - 1830, 200), NOW) == "Active"
    assert agents.agent_status(FakeStat(NOW - 10, 0), NOW) == "Pending"
    assert agents.agent_status(FakeStat(NOW - 1831, 200), NOW) == "Disconnected"
    assert agents.agent_status(FakeStat(NOW - 5000, 0), NOW) == "Disconnected"


def test_agent_status_at_a_path(home):
    path = os.path.join(home, "queue/agent-info/web01-any")
    assert agents.agent_status_at(path, NOW) == "Never connected"
    put(path, b"", NOW - 60)
    assert agents.agent_status_at(path, NOW) == "Pending"
    put(path, b"Linux web01\n", NOW - 60)
    assert agents.agent_status_at(path, NOW) == "Active"
    assert agents.agent_status(os.stat(path), NOW + 3600) == "Disconnected"
    assert agents.agent_status(path, NOW) == "Active"
    os.unlink(path)
    os.symlink(os.path.join(home, "elsewhere"), path)
    assert agents.agent_status_at(path, NOW) == "Never connected"


# -- backup and removal -----------------------------------------------------------------------

AGENT = Agent("001", "web01", "10.0.0.0/24", KEY, True)


def make_agent_files(home, agent=AGENT):
    paths = agents.agent_files(home, agent)
    for index, path in enumerate(paths):
        put(path, ("content %d" % index).encode("ascii"), NOW - 100 - index)
    return paths


def test_backup_and_remove(home, log, utc):
    paths = make_agent_files(home)
    other = os.path.join(home, "queue/agent-info/db01-any")
    put(other, b"other agent")
    folder = agents.backup_and_remove(home, AGENT, NOW, log)
    assert folder == os.path.join(home, "backup/agents/2023/Nov/14/001-web01-10.0.0.0")
    assert sorted(os.listdir(folder)) == sorted([
        "agent-info", "syscheck", "syscheck.cpt", "syscheck-registry", "syscheck-registry.cpt",
        "rootcheck", "agent-group", "rids"])
    with open(os.path.join(folder, "syscheck.cpt"), "rb") as handle:
        assert handle.read() == b"content 2"
    assert int(os.stat(os.path.join(folder, "agent-info")).st_mtime) == int(NOW - 100)
    assert not any(os.path.exists(p) for p in paths)
    assert os.path.exists(other)
    for sub in ("backup/agents/2023", "backup/agents/2023/Nov/14", folder):
        assert stat.S_IMODE(os.stat(os.path.join(home, sub)).st_mode) == 0o750


def test_second_backup_of_the_same_day_gets_a_suffix(home, log, utc):
    make_agent_files(home)
    first = agents.backup_and_remove(home, AGENT, NOW, log)
    make_agent_files(home)
    second = agents.backup_and_remove(home, AGENT, NOW + 60, log)
    make_agent_files(home)
    third = agents.backup_and_remove(home, AGENT, NOW + 120, log)
    assert second == first + "-002" and third == first + "-003"
    assert len(os.listdir(second)) == 8


def test_only_existing_files_are_backed_up(home, log, utc):
    put(agents.agent_files(home, AGENT)[0], b"info")
    folder = agents.backup_and_remove(home, AGENT, NOW, log)
    assert os.listdir(folder) == ["agent-info"]


def test_nothing_to_back_up_makes_no_folder(home, log):
    assert agents.backup_and_remove(home, AGENT, NOW, log) is None
    assert not os.path.exists(os.path.join(home, "backup"))


def test_symlinks_are_neither_copied_nor_removed(home, log, utc):
    target = os.path.join(home, "elsewhere")
    put(target, b"not the agent's")
    info = agents.agent_files(home, AGENT)[0]
    os.symlink(target, info)
    put(agents.agent_files(home, AGENT)[6], b"default")
    folder = agents.backup_and_remove(home, AGENT, NOW, log)
    assert os.listdir(folder) == ["agent-group"]
    assert os.path.islink(info)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_nothing_is_removed_when_the_backup_is_impossible_readonly(home, log):
    paths = make_agent_files(home)
    os.makedirs(os.path.join(home, "backup"))
    os.chmod(os.path.join(home, "backup"), 0o500)
    try:
        with pytest.raises(ClusterError):
            agents.backup_and_remove(home, AGENT, NOW, log)
    finally:
        os.chmod(os.path.join(home, "backup"), 0o755)
    assert all(os.path.exists(p) for p in paths)


def test_nothing_is_removed_when_the_backup_is_impossible(home, log):
    paths = make_agent_files(home)
    put(os.path.join(home, "backup"), b"a file where the backup folder should be")
    with pytest.raises(ClusterError) as info:
        agents.backup_and_remove(home, AGENT, NOW, log)
    assert info.value.code == "backup"
    assert all(os.path.exists(p) for p in paths)
    assert any(level == "ERROR" and "backup failed" in message
               for level, message in log.lines)


FAILED_COPY = r"""
import json, logging, resource, signal, sys
from wazuh_cluster import agents
from wazuh_cluster.errors import ClusterError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
agent = agents.Agent("001", "web01", "10.0.0.0/24", "k", True)
try:
    log = logging.getLogger("x")
    log.addHandler(logging.NullHandler())
    agents.backup_and_remove(sys.argv[1], agent, 1700000000.0, log)
    sys.stdout.write("no error")
except ClusterError as err:
    sys.stdout.write(err.code)
"""


def test_a_failed_copy_removes_nothing_and_leaves_no_partial_backup(home):
    paths = make_agent_files(home)
    put(paths[0], b"small")                # copied before the failure
    put(paths[1], b"x" * 1000)             # too large for the subprocess's RLIMIT_FSIZE
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LIB] + [p for p in [env.get("PYTHONPATH")] if p])
    child = subprocess.Popen([sys.executable, "-c", FAILED_COPY, home], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate()
    assert (child.returncode, out.decode("ascii")) == (0, "backup"), err
    assert all(os.path.exists(p) for p in paths)
    day = os.path.dirname(agents.backup_folder_name(home, AGENT, NOW))
    assert os.listdir(day) == []


def test_backup_folder_name_is_in_local_time_with_english_months(utc):
    agent = Agent("007", "bond", "any", KEY, True)
    for month in range(1, 13):
        when = time.mktime((2024, month, 3, 12, 0, 0, 0, 0, -1))
        path = agents.backup_folder_name("/h", agent, when)
        assert path == "/h/backup/agents/2024/%s/03/007-bond-any" % agents.MONTHS[month - 1]
    assert compat.to_text(agents.MONTHS[8]) == u"Sep"


def test_clean_removed_agents_backs_up_each_removed_agent(home, log, utc):
    web = Agent("001", "web01", "10.0.0.5", KEY, False)
    db = Agent("002", "db01", "any", KEY, False)
    kept = Agent("003", "mail", "any", KEY, False)
    for agent in (web, db, kept):
        make_agent_files(home, agent)
    old = keys(line("001", "web01", "10.0.0.5"), line("002", "db01"), line("003", "mail"))
    new = keys(line("002", "!db01"), line("003", "mail"))
    results = agents.clean_removed_agents(home, old, new, NOW, log)
    assert [(a.id, os.path.basename(folder), err) for a, folder, err in results] == [
        ("001", "001-web01-10.0.0.5", None), ("002", "002-db01-any", None)]
    assert not any(os.path.exists(p) for p in agents.agent_files(home, web))
    assert not any(os.path.exists(p) for p in agents.agent_files(home, db))
    assert all(os.path.exists(p) for p in agents.agent_files(home, kept))


MANY = u"".join(u"%04d n%d any k\n" % (i, i) for i in range(100, 100 + 2 * agents.FEW_APPENDED))


@pytest.mark.parametrize("old,new,fast", [
    (u"001 a any k\n", u"001 a any k\n002 b any k\n", True),          # an agent added
    (u"", u"001 a any k\n", True),
    (u"001 a any k\n", u"001 a any k\n001 c any k\n", False),          # an ID reused
    (u"001 !a any k\n", u"001 !a any k\n001 c any k\n", False),
    (u"001 a any k\n", u"001 a any k\n  001 c any k\n", False),        # spaces before it
    (u"001 a any k", u"001 a any k\n002 b any k\n", False),            # not whole lines
    (u"001 a any k\n002 b any k\n", u"001 a any k\n", False),          # a line gone
    (u"001 a any 0002\n", u"001 a any 0002\n0002 b any k\n", True),    # digits in a key
    # more lines than FEW_APPENDED: the old lines' IDs are compared as a set
    (u"001 a any k\n", u"001 a any k\n" + MANY, True),
    (u"", MANY, True),                                                # a first sync
    (u"001 a any k\n\t0101 x any k\n", u"001 a any k\n\t0101 x any k\n" + MANY, False),
    (u"001 a any k\n0099 x any k\n", u"001 a any k\n0099 x any k\n" + MANY + u" 0099 y any k\n",
     False),
])
def test_appending_agents_with_new_ids_removes_none_without_a_full_parse(old, new, fast):
    assert agents.only_appended_new_ids(old, new) is fast
    full = agents._removed(agents.parse_client_keys(old), agents.parse_client_keys(new))
    assert agents.removed_agents(old, new) == full
    if fast:
        assert full == [] and agents.RemovalGuard(0.5).check(old, new) == (True, "")


@pytest.mark.parametrize("old,new,fast", [
    (u"001 a any k\n", u"001 a any k\n002 b any k\n", True),
    (u"001 a any 0002\n", u"001 a any 0002\n0002 b any k\n", True),   # digits in a key
    (u"0002 a any k\n", u"0002 a any k\n0002 b any k\n", False),      # an ID reused
    (u"001 a any k\n  0002 x any k\n", u"001 a any k\n  0002 x any k\n0002 b any k\n", False),
    (u"001 a any k\x1c0002 x any k\n", u"001 a any k\x1c0002 x any k\n0002 b any k\n", False),
    (u"001 a any k", u"001 a any k\n002 b any k\n", False),           # not whole lines
])
def test_bytes_are_decided_without_decoding_the_old_file(old, new, fast):
    # A client checked each appended agent by decoding its 9.4 MB client.keys and the new one;
    # an ID found in the bytes is looked at in its own lines only (\x1c breaks a line too).
    old, new = old.encode("utf-8"), new.encode("utf-8")
    assert agents._only_appended_bytes(old, new) is fast
    assert agents.only_appended_new_ids(old, new) is fast
    assert agents.only_appended_new_ids(old.decode("utf-8"), new.decode("utf-8")) is fast


def test_bytes_of_non_ascii_ids_or_many_lines_are_left_to_the_text():
    old = u"001 a any k\n".encode("utf-8")
    assert agents._only_appended_bytes(old, old + u"\u0661 b any k\n".encode("utf-8")) is None
    assert agents._only_appended_bytes(old, old + MANY.encode("utf-8")) is None
    assert agents.only_appended_new_ids(old, old + MANY.encode("utf-8")) is True
