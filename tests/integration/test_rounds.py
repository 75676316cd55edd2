"""Integrity rounds between real daemons: summaries first, spread over the interval.

A round compares bucket summaries (summary.py) and then only the buckets that differ; the
master's debug line "Full round with NODE: N buckets compared" says how many ("all" at a
session's first round). Drift nobody recorded is still repaired: a file edited or deleted
by hand on a client, an agent-info file edited on the master, a lost database. Every wait
polls a condition with a bound; offsets are compared with each other, not with a limit.
"""
from __future__ import absolute_import, division, print_function

import io
import os
import re
import time

import pytest

from harness import make_node, read_text, start_all, wait_for, write_internal_options  # noqa: F401
from harness import base_install, python, tmp_prefix_dir, workspace  # noqa: F401
from test_sync import (KEYS, agent_info, cluster, configure_cluster, converge, put,  # noqa: F401
                       stop)

from test_hostile import _rogue_files, _rogue_manifest, hostile  # noqa: F401
from test_hostile import still_serves_real_client

from wazuh_cluster import peers, summary
from wazuh_cluster.errors import RequestError
from wazuh_cluster.sync import round_phase

ROUND = re.compile(r"Full round with (\S+): (all|\d+) buckets compared")
WAIT = 40.0


def rounds(node, peer):
    """What each of `node`'s rounds with `peer` compared, oldest first: "all" or a count."""
    return [m.group(2) for m in ROUND.finditer(node.log()) if m.group(1) == peer]


def wait_rounds(node, peer, after, predicate, what):
    """Wait for a round of `node` with `peer`, later than the first `after`, for which
    `predicate(compared)` holds; returns what it compared."""
    def found():
        hits = [r for r in rounds(node, peer)[after:] if predicate(r)]
        return hits[0] if hits else None
    return wait_for(found, WAIT, 0.1, what="%s: a round with %s that %s" % (node.name, peer,
                                                                         what))


def nothing_to_compare(compared):
    return compared == "0"


def some_buckets(compared):
    return compared not in ("all", "0")


def started_cluster(make_node, names, interval, options=None):
    """A master and clients on one port, converged; `options` {node name: extra options}."""
    nodes = configure_cluster(make_node, names, interval, options)
    master = nodes[0]
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    put(nodes[1], "queue/agent-info/web01-any", agent_info(nodes[1].name))
    start_all(nodes)
    converge(nodes)
    return nodes


def test_hand_edits_on_a_client_are_repaired_by_a_summary_round(cluster):
    master, client1 = cluster[0], cluster[1]
    # Once converged, a round finds equal summaries: no manifest is compared at all.
    wait_rounds(master, "client1", 0, nothing_to_compare, "compared nothing")
    seen = len(rounds(master, "client1"))
    put(client1, "etc/shared/default/agent.conf", u"edited by hand\n")
    os.unlink(client1.path("etc", "shared", "web", "agent.conf"))
    compared = wait_rounds(master, "client1", seen, some_buckets, "compared some buckets")
    converge(cluster)
    # Only the buckets of the two files were compared, not the whole manifests.
    assert 1 <= int(compared) <= 2


def test_agent_info_edited_on_the_master_is_repaired_by_the_clients_summary_round(make_node):
    """The master looks at its copies of a client's agent-info in place only in its full
    pass over them (cluster.received_scan_interval, here 2 s; the client's rounds look at
    their folder): the client's next round after that pass repairs the edit."""
    master, client1 = started_cluster(make_node, ("master", "client1"), "3s", {
        "master": {"cluster.received_scan_interval": "2"}})
    rel = "queue/agent-info/web01-any"
    put(client1, rel, agent_info("client1"))
    wait_for(lambda: read_text(master, rel) == read_text(client1, rel), WAIT, 0.1,
             what="agent-info on the master")
    seen = len(rounds(client1, "master"))
    wait_rounds(client1, "master", seen, nothing_to_compare, "compared nothing")
    seen = len(rounds(client1, "master"))
    put(master, rel, u"damaged on the master\n", mtime=time.time() - 3600)
    compared = wait_rounds(client1, "master", seen, some_buckets, "compared some buckets")
    assert int(compared) == 1
    wait_for(lambda: read_text(master, rel) == read_text(client1, rel), WAIT, 0.1,
             what="agent-info repaired on the master")


def test_a_lost_client_database_is_rebuilt_and_later_rounds_stay_summary_first(cluster):
    master, client1 = cluster[0], cluster[1]
    put(client1, "queue/agent-info/web01-any", agent_info("client1"))
    stop(client1)
    os.unlink(client1.path("var", "db", "cluster.db"))
    put(client1, "etc/shared/default/agent.conf", u"edited while the database was lost\n")
    seen = len(rounds(master, "client1"))
    client1.start()
    converge(cluster)
    # The rebuilt catalogue summarises as the master does: both ways, nothing to compare.
    wait_rounds(master, "client1", seen, nothing_to_compare, "compared nothing")
    wait_rounds(client1, "master", 0, nothing_to_compare, "compared nothing")
    seen = len(rounds(master, "client1"))
    os.unlink(client1.path("etc", "shared", "default", "agent.conf"))
    assert wait_rounds(master, "client1", seen, some_buckets, "compared some buckets") == "1"
    converge(cluster)


class LogLines(object):
    """New lines of a log file as they appear, each with the time this test saw it."""

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.lines = []

    def poll(self):
        try:
            with io.open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except (IOError, OSError):
            return
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        now = time.time()
        self.lines.extend((now, line.decode("utf-8", "replace"))
                          for line in data[:cut].splitlines())


# slow: three 10 s rounds per client. The default run keeps the round slots' unit tests
# (test_peersync) and the summary rounds above.
@pytest.mark.slow
def test_rounds_with_clients_keep_their_own_offsets_after_a_mass_reconnect(make_node):
    interval = 10.0
    master = started_cluster(make_node, ("master", "client1", "client2"), "10s")[0]
    expected = (round_phase("master", "client2", interval) -
                round_phase("master", "client1", interval)) % interval
    assert 3.0 <= expected <= interval - 3.0  # far from 0: rounds at once would show

    # A master restart: both clients reconnect at once, and both first rounds run at once.
    stop(master)
    watch = LogLines(master.path("logs", "cluster.log"))
    master.start()
    seen = {"client1": [], "client2": []}

    def enough():
        watch.poll()
        for when, line in watch.lines:
            match = ROUND.search(line)
            if match and match.group(1) in seen and match.group(2) != "all":
                seen[match.group(1)].append(when)
        del watch.lines[:]
        return all(len(times) >= 3 for times in seen.values())
    wait_for(enough, 6 * interval, 0.05, what="three later rounds with each client")
    # Each later round with client2 falls `expected` seconds after one with client1
    # (modulo the interval), whatever the reconnection did.
    def distance(t1, t2):  # circular: 9.9 s is 0.1 s from 0 in a 10 s interval
        return abs((t2 - t1 - expected + interval / 2) % interval - interval / 2)
    offsets = sorted(min(distance(t1, t2) for t1 in seen["client1"]) for t2 in seen["client2"])
    assert offsets[len(offsets) // 2] < 2.0, (offsets, expected, seen)


def test_a_peer_without_summaries_gets_whole_manifests_and_is_still_repaired(make_node):
    """cluster.round_summaries=0 answers sync_summary "unknown_command", as a version
    without summaries does: the rounds with it compare whole manifests, both ways."""
    nodes = started_cluster(make_node, ("master", "client1"), "3s",
                            {"client1": {"cluster.round_summaries": "0"}})
    master, client1 = nodes
    master.wait_log(r"client1 knows no summaries", WAIT)
    seen = len(rounds(master, "client1"))
    put(client1, "etc/shared/default/agent.conf", u"edited by hand\n")
    converge(nodes)
    wait_rounds(master, "client1", seen, lambda compared: True, "ended")
    assert set(rounds(master, "client1")) == set(["all"])
    assert set(rounds(client1, "master")) == set(["all"])
    assert "malformed" not in master.log() + client1.log()


def test_a_rogue_gets_no_summary_of_the_masters_items_and_bad_buckets_are_refused(hostile):
    master, client, dialer = hostile
    with pytest.raises(RequestError) as info:
        dialer.session.call("sync_summary", {"source": "master"}, timeout=30)
    assert info.value.code == "forbidden"
    for bad in ([-1], [summary.BUCKETS], "all", [True], list(range(summary.BUCKETS + 1))):
        with pytest.raises(RequestError) as info:
            dialer.session.call("sync_manifest", {"source": "client", "buckets": bad,
                                                  "manifest_in_data": True}, timeout=30)
        assert info.value.code == "bad_request"
    # Its own summary covers only the agent-info files it reports: none.
    result, _ = dialer.session.call("sync_summary", {"source": "client"}, timeout=30)
    assert sum(count for count, _ in summary.parse(result["buckets"])) == 0
    still_serves_real_client(master, client)


def _rogue_summary(session, args, data):
    return {"buckets": [[-1, "not hex"]] * 3}, b""


def test_a_malformed_summary_ends_the_session_with_one_clear_line(hostile):
    master, client, dialer = hostile
    dialer.stop()
    rogue = peers.Dialer(dialer.settings, {"sync_manifest": _rogue_manifest,
                                           "sync_files": _rogue_files,
                                           "sync_summary": _rogue_summary}).start()
    try:
        master.wait_log(r"rogue01 sent a malformed summary: summary: a list of 256 buckets",
                        WAIT)
    finally:
        rogue.stop()
    still_serves_real_client(master, client)
