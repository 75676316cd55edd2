"""Removal marks between real daemons (SPEC 11): `manage_agents -r` marks an agent's line with
"!" instead of deleting it; such a deliberate removal passes the mass-removal guard on the
clients, even for the only agent, and the agent's files are backed up and cleaned as usual.
"""
from __future__ import absolute_import, division, print_function

import io
import json
import os

import pytest

from harness import put_text as put, read_text as read
from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)

FAST = {"cluster.poll_interval": "0.2", "cluster.scan_interval": "1",
        "cluster.keepalive": "1", "cluster.reconnect_max": "1"}
ONLY = u"001 agent01 10.0.0.20 0123456789abcdef0123456789abcdef\n"
SYNC_WAIT = 20.0


@pytest.fixture
def pair(make_node):
    """A started master and client whose client.keys holds one agent, with that agent's
    agent-info and rids files on the client."""
    master = make_node("master", "master", configure=False)
    client = make_node("client", "client", configure=False)
    client.port = master.port
    for node, role in ((master, "master"), (client, "client")):
        node.configure(role, [master.address, client.address], interval="3s")
        write_internal_options(node.prefix, FAST)
    put(master, "etc/client.keys", ONLY)
    put(client, "queue/agent-info/agent01-10.0.0.20", u"Linux agent01 - Wazuh v3.0.0\n")
    put(client, "queue/rids/001", u"1:2\n")
    master.start()
    client.start()
    wait_for(lambda: read(client, "etc/client.keys") == ONLY, SYNC_WAIT,
             what="the only agent's client.keys on the client")
    return master, client


def backed_up(node):
    found = {}
    for folder, _dirs, files in os.walk(node.path("backup", "agents")):
        for name in files:
            with io.open(os.path.join(folder, name), encoding="utf-8") as handle:
                found[(os.path.basename(folder), name)] = handle.read()
    return found


def test_the_only_agent_marked_removed_on_the_master_is_applied_without_confirmation(pair):
    master, client = pair
    marked = ONLY.replace(u"001 agent01", u"001 !agent01")
    put(master, "etc/client.keys", marked)
    wait_for(lambda: read(client, "etc/client.keys") == marked, SYNC_WAIT,
             what="the marked client.keys applied on the client")
    wait_for(lambda: read(client, "queue/agent-info/agent01-10.0.0.20") is None, SYNC_WAIT,
             what="agent01's agent-info cleaned on the client")
    assert read(client, "queue/rids/001") is None
    assert backed_up(client) == {("001-agent01-10.0.0.20", "agent-info"):
                                 u"Linux agent01 - Wazuh v3.0.0\n",
                                 ("001-agent01-10.0.0.20", "rids"): u"1:2\n"}
    assert "held back" not in client.log(), client.dump_logs()
    health = client.cluster_control("-j", "-i")
    assert health.rc == 0 and not json.loads(health.out)["held"], health


def test_the_only_agent_line_vanishing_is_still_held_back(pair):
    master, client = pair
    put(master, "etc/client.keys", u"")
    wait_for(lambda: "held back" in client.log(), SYNC_WAIT, what="the guard's warning")
    assert read(client, "etc/client.keys") == ONLY
    assert read(client, "queue/agent-info/agent01-10.0.0.20") is not None
    assert not backed_up(client)
