"""Deltas of a big client.keys between real daemons: a master, a client that takes deltas and
one that does not announce them (as a node older than deltas: cluster.delta_min_bytes=0).

Every wait polls a condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import os
import re

import pytest

from harness import (base_install, make_node, python, start_all, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)
from test_sync import SYNC_WAIT, agent_info, configure_cluster, converge, put

# 172 KB: over the default delta threshold (64 KiB), and so are 780 of its lines
AGENTS = 2000
KEYS = u"".join(u"%05d agent%05d any %064x\n" % (i, i, i) for i in range(1, AGENTS + 1))
KEYS_ONLY = ("etc/client.keys",)
APPLIED = re.compile(r"Delta of 'etc/client.keys' applied: (\d+) bytes sent for a file of (\d+)")


def line(i):
    return u"%05d agent%05d any %064x\n" % (i, i, i)


@pytest.fixture
def cluster(make_node):
    """A master, client1 (deltas) and old1 (no deltas announced), converged."""
    # A long interval: only the session's first round and the pushes under test run.
    nodes = configure_cluster(make_node, ("master", "client1", "old1"), "10m",
                              {"old1": {"cluster.delta_min_bytes": "0"}})
    put(nodes[0], "etc/client.keys", KEYS)
    start_all(nodes)
    converge(nodes, parts=KEYS_ONLY)
    return nodes


def replace(node, rel, text):
    """The node's file REL replaced by `text` at once, as Wazuh replaces client.keys (a
    temporary file renamed over it, owner and mode kept). put() truncates then writes: a
    running daemon's scan in between reads an empty client.keys, whose push the client holds
    back as removing every agent; the change then goes whole, not as the delta under test."""
    path = node.path(*rel.split("/"))
    tmp = path + ".tmp-test"
    st = os.stat(path)
    with io.open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.rename(tmp, path)


def applied(node):
    return [(int(a), int(b)) for a, b in APPLIED.findall(node.log())]


def test_an_appended_agent_travels_as_a_delta_to_a_peer_that_takes_them(cluster):
    master, client1, old1 = cluster
    replace(master, "etc/client.keys", KEYS + line(5000))
    converge(cluster, parts=KEYS_ONLY)
    wait_for(lambda: applied(client1), SYNC_WAIT, what="the delta applied on client1")
    sent, size = applied(client1)[-1]
    assert sent == len(line(5000)) and size == len(KEYS) + len(line(5000))
    # The node without deltas got the whole file, as before deltas existed.
    assert applied(old1) == [] and "refused a delta" not in old1.log()


def test_a_hand_edited_client_refuses_the_delta_and_gets_the_whole_file(cluster):
    master, client1, _old1 = cluster
    replace(client1, "etc/client.keys", KEYS.replace(line(7), u""))
    replace(master, "etc/client.keys", KEYS + line(5000))
    converge(cluster, parts=KEYS_ONLY)
    log = client1.log()
    assert "refused a delta of 'etc/client.keys' from master: our copy has" in log
    assert applied(client1) == []
    # The whole file it then got is the base of the next change.
    replace(master, "etc/client.keys", KEYS + line(5000) + line(5001))
    converge(cluster, parts=KEYS_ONLY)
    wait_for(lambda: applied(client1), SYNC_WAIT, what="a delta applied on client1")


def test_a_mass_removal_arriving_as_a_delta_is_held_back(cluster):
    master, client1, _old1 = cluster
    put(client1, "queue/agent-info/agent00002-any", agent_info("client1"))
    kept = u"".join(line(i) for i in range(1, 781))
    replace(master, "etc/client.keys", kept)  # a delta of 0 bytes: the first 780 lines only
    wait_for(lambda: "held back" in client1.log(), SYNC_WAIT, what="the guard's warning")
    with open(client1.path("etc", "client.keys")) as handle:
        assert handle.read() == KEYS
    assert applied(client1) and applied(client1)[-1] == (0, len(kept))


def test_the_master_records_the_checksum_clusterd_took_of_an_append(cluster):
    """wazuh-clusterd hashed the appended client.keys it pushed: the master's internal daemon
    records that checksum instead of reading the file again (hashtell.py), and its record
    is the file's true checksum. A poll may come before the hint (then it hashes, as
    before; under CI's load, with three interpreters' suites on two cores, ten appends in a
    row once lost that race on 2.7): up to thirty appends, until one is taken."""
    from test_internal import call
    master = cluster[0]
    text = KEYS
    for i in range(5000, 5030):
        text += line(i)
        replace(master, "etc/client.keys", text)
        converge(cluster, parts=KEYS_ONLY)
        if call(master, "status")["hot_hinted"]:
            break
    assert call(master, "status")["hot_hinted"] >= 1
    want = hashlib.sha256(text.encode("ascii")).hexdigest()
    wait_for(lambda: call(master, "manifest", {"names": ["etc/client.keys"]})["files"]
             ["etc/client.keys"]["sha256"] == want, SYNC_WAIT, what="the master's record")
