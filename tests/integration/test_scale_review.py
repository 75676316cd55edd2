"""Cases of issue 11's guarantees the rounds that built them did not write (an outside
review): an agent that moved between clients, keepalives and rounds around it, deltas of
client.keys across restarts, hints of the hot files. Real daemons on loopback, real SQLite,
temporary installations; every wait polls a condition with a bound.
"""
from __future__ import absolute_import, division, print_function

import os
import time

from harness import make_node, read_text, wait_for  # noqa: F401
from harness import base_install, python, tmp_prefix_dir, workspace  # noqa: F401
from test_delta import KEYS, KEYS_ONLY, applied, cluster, line, replace  # noqa: F401
from test_hostile import hostile, still_serves_real_client  # noqa: F401
from test_keepalive import reporting_node
from test_rounds import WAIT, nothing_to_compare, rounds, started_cluster, wait_rounds
from test_sync import agent_info, converge, put, stop

INFO = "queue/agent-info/db01-10.0.0.5"


def _mtime(node, rel):
    try:
        return int(os.stat(node.path(*rel.split("/"))).st_mtime)
    except OSError:
        return None


def test_an_agent_moved_to_another_client_keeps_the_newest_and_rounds_go_quiet(make_node):
    """db01 reported to client1, then moved to client2: client1 keeps its stale copy (Wazuh
    leaves it). The master keeps client2's newer report whatever client1's rounds send,
    and the rounds with client1 find nothing to compare again once that is settled."""
    master, client1, client2 = started_cluster(make_node, ("master", "client1", "client2"),
                                               "3s")
    now = int(time.time())
    put(client1, INFO, agent_info("client1"), mtime=now - 300)
    wait_for(lambda: _mtime(master, INFO) == now - 300, WAIT, 0.1, what="client1's report")
    put(client2, INFO, agent_info("client2"), mtime=now - 60)
    wait_for(lambda: _mtime(master, INFO) == now - 60, WAIT, 0.1, what="client2's report")
    # client2 keeps it alive; client1 has it no more (its copy stays, untouched).
    os.utime(client2.path(*INFO.split("/")), (now - 5, now - 5))
    wait_for(lambda: _mtime(master, INFO) == now - 5, WAIT, 0.1, what="client2's keepalive")
    seen1, seen2 = len(rounds(client1, "master")), len(rounds(master, "client1"))
    wait_rounds(client1, "master", seen1, lambda c: c is not None, "ran")
    wait_rounds(master, "client1", seen2, lambda c: c is not None, "ran")
    assert _mtime(master, INFO) == now - 5
    assert '"node_name":client2' in read_text(master, INFO)
    # Quiet again: both directions' rounds with client1 compare nothing.
    seen1, seen2 = len(rounds(client1, "master")), len(rounds(master, "client1"))
    wait_rounds(client1, "master", seen1, nothing_to_compare, "compared nothing")
    wait_rounds(master, "client1", seen2, nothing_to_compare, "compared nothing")
    assert _mtime(master, INFO) == now - 5
    assert reporting_node(master, "db01-10.0.0.5") == "client2"
    # It comes back to client1: its copy is its report again, newest wins.
    put(client1, INFO, agent_info("client1"), mtime=now)
    wait_for(lambda: _mtime(master, INFO) == now and
             reporting_node(master, "db01-10.0.0.5") == "client1", WAIT, 0.1,
             what="client1's new report and node on the master")
    assert '"node_name":client1' in read_text(master, INFO)
    seen1 = len(rounds(client1, "master"))
    wait_rounds(client1, "master", seen1, nothing_to_compare, "compared nothing")


# ------------------------------------------------------------------ client.keys deltas


def _same_keys(master, client):
    with open(master.path("etc", "client.keys"), "rb") as a, \
            open(client.path("etc", "client.keys"), "rb") as b:
        return a.read() == b.read()


def test_every_kind_of_client_keys_change_ends_in_the_masters_exact_bytes(cluster):
    """A key rewritten in the middle (same size), a truncation (agents removed: their
    files backed up), a file shrunk and grown back to its size with other bytes, and
    three versions the client missed while stopped: after each, both clients hold the
    master's bytes exactly, by delta or by the whole file."""
    master, client1, old1 = cluster
    put(client1, "queue/agent-info/agent01999-any", agent_info("client1"))
    lines = KEYS.splitlines(True)
    steps = []
    middle = list(lines)
    middle[1000] = u"%05d agent%05d any %064x\n" % (1001, 1001, 0xabc)  # same size
    steps.append(u"".join(middle))
    steps.append(u"".join(middle[:1990]))                               # truncated
    shrunk = middle[:1990]
    del shrunk[500]
    steps.append(u"".join(shrunk))
    grown = list(shrunk)
    grown.insert(1500, u"%05d agent%05d any %064x\n" % (7777, 7777, 7))  # back to its size
    assert len(u"".join(grown)) == len(steps[1])
    steps.append(u"".join(grown))
    for text in steps:
        replace(master, "etc/client.keys", text)
        converge(cluster, parts=KEYS_ONLY)
        assert _same_keys(master, client1) and _same_keys(master, old1)
    assert len(applied(client1)) >= 3
    # agent01999 left with the truncation: its agent-info backed up, then removed
    wait_for(lambda: not os.path.exists(client1.path("queue", "agent-info",
                                                     "agent01999-any")),
             WAIT, 0.1, what="agent01999's agent-info removed on client1")
    assert any(os.path.basename(folder) == "01999-agent01999-any" and "agent-info" in names
               for folder, _, names in os.walk(client1.path("backup", "agents")))
    # Versions missed while client1 was stopped: on its return, the master's bytes.
    stop(client1)
    text = steps[-1]
    for i in range(8000, 8003):
        text += line(i)
        replace(master, "etc/client.keys", text)
        converge([master, old1], parts=KEYS_ONLY)
    client1.start()
    converge(cluster, parts=KEYS_ONLY)
    assert _same_keys(master, client1)
    # and the next change after the restart still ends there
    seen = len(applied(client1))
    replace(master, "etc/client.keys", text + line(8003))
    converge(cluster, parts=KEYS_ONLY)
    assert _same_keys(master, client1) and _same_keys(master, old1)
    wait_for(lambda: len(applied(client1)) > seen, WAIT, 0.1,
             what="the change after the restart applied as a delta")


def test_a_master_that_lost_its_agent_rows_relearns_them_from_the_rounds(make_node):
    """The master's agents table is a cache (held rows die with a killed internal daemon,
    a database is lost): an agent that no longer keeps alive (disconnected) is learned
    again from the client's round, and the rounds go quiet, instead of the client's copy
    going whole in every round."""
    master, client1 = started_cluster(make_node, ("master", "client1"), "3s")
    now = int(time.time())
    put(client1, INFO, agent_info("client1"), mtime=now - 3600)
    wait_for(lambda: _mtime(master, INFO) == now - 3600 and
             reporting_node(master, "db01-10.0.0.5") == "client1", WAIT, 0.1,
             what="client1's report on the master")
    stop(master)
    os.unlink(master.path("var", "db", "cluster.db"))
    seen = len(rounds(client1, "master"))
    master.start()
    wait_for(lambda: reporting_node(master, "db01-10.0.0.5") == "client1", WAIT, 0.1,
             what="the agent's node learned again")
    wait_rounds(client1, "master", seen, nothing_to_compare, "compared nothing")
    assert _mtime(master, INFO) == now - 3600


# ------------------------------------------------------------------ a hostile peer


def test_a_rogue_asking_one_name_many_times_gets_one_entry(hostile):
    """sync_manifest with "names": each name at most once in the answer. A name repeated
    30 000 times (1 MB of request) made an answer of one entry per repeat (5.4 MB), held
    whole by both master daemons."""
    master, client, dialer = hostile
    name = "queue/agent-info/rogue-any"
    put(master, name, agent_info("rogue"))

    def ask(names):
        return len(dialer.session.call("sync_manifest", {
            "source": "client", "names": names, "manifest_in_data": True}, timeout=60)[1])
    one = wait_for(lambda: ask([name]) > 2 and ask([name]), WAIT, 0.2,
                   what="the master's record of the file")
    assert ask([name] * 30000) == one
    still_serves_real_client(master, client)


def test_an_agent_info_edited_in_place_with_its_size_and_mtime_kept_reaches_the_master(
        make_node):
    """SPEC section 8: an in-place edit anywhere is seen within one full pass. On a client,
    an agent-info rewritten in place to the same size, its mtime then set back to what it
    was (a tool that keeps times): the master must hold the new content."""
    master, client1 = started_cluster(make_node, ("master", "client1"), "3s")
    now = int(time.time())
    put(client1, INFO, agent_info("client1"), mtime=now - 60)
    wait_for(lambda: _mtime(master, INFO) == now - 60, WAIT, 0.1, what="client1's report")
    path = client1.path(*INFO.split("/"))
    with open(path, "r+b") as handle:
        handle.write(b"Windows")
    os.utime(path, (now - 60, now - 60))
    wait_for(lambda: read_text(master, INFO) == read_text(client1, INFO), WAIT, 0.1,
             what="the edit on the master")
    seen = len(rounds(client1, "master"))
    wait_rounds(client1, "master", seen, nothing_to_compare, "compared nothing")


def test_a_held_back_removal_then_a_new_version_ends_in_the_masters_bytes(cluster):
    """A client.keys delta held back by the removal guard leaves the client on its old
    version: the master must not take the held version as the client's base, and the next
    change (all agents back, one more) ends in the master's exact bytes."""
    master, client1, old1 = cluster
    replace(master, "etc/client.keys", u"".join(line(i) for i in range(1, 781)))
    wait_for(lambda: "held back" in client1.log(), WAIT, 0.1, what="the guard's warning")
    with open(client1.path("etc", "client.keys")) as handle:
        assert handle.read() == KEYS
    replace(master, "etc/client.keys", KEYS + line(5000))
    converge(cluster, parts=KEYS_ONLY)
    assert _same_keys(master, client1) and _same_keys(master, old1)
