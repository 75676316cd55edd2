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
from test_keepalive import reporting_node
from test_sync import agent_info, put
from test_rounds import WAIT, nothing_to_compare, rounds, started_cluster, wait_rounds

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
