"""Master failover across a network partition: real daemons, one network namespace per node
(test_netns.Network), a node's cable cut at the bridge. The one short scenario of the default
run is here; the 5-node split and the long ones are in test_failover_scenarios.py.

A recorder (failover_log.py) reads every node's election lines while the test runs and checks
the safety properties over the whole run: one leader per term, never two nodes acting at once.
Needs root and `ip netns`, otherwise skipped with the reason.
"""
from __future__ import absolute_import, division, print_function

import contextlib
import glob
import io
import os

import pytest

from failover_log import Change, Event, Recorder, check
from failover_log import parse as parse_line
from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     workspace)
from test_failover import FAILOVER, failover_lines, wait
from test_netns import nodes_in_namespaces, start_in
from test_sync import KEYS, MASTER_ITEMS, put, tree

# The old master's own edit during the split (etc/ is the daemons' to write; a folder the test
# made as root would not be).
EDIT = KEYS + u"099 oldside any 9999\n"


@contextlib.contextmanager
def partitioned_cluster(make_node, names, options=FAILOVER):
    """(network, nodes, recorder): `names` (the first the preferred master) each in its own
    namespace with `options`, started, the first acting and every node identical to it."""
    with nodes_in_namespaces(make_node, names, options) as (network, nodes):
        put(nodes[0], "etc/client.keys", KEYS)
        with Recorder(nodes) as recorder:
            for node in nodes:
                start_in(node.space, node)
            wait(nodes, lambda: recorder.of("acting", nodes[0]), "the master acting")
            wait(nodes, lambda: same(nodes), "every node identical to the master")
            yield network, nodes, recorder


def same(nodes, parts=MASTER_ITEMS):
    first = tree(nodes[0].prefix, parts)
    return all(tree(n.prefix, parts) == first for n in nodes[1:])


def read(node, rel):
    with io.open(node.path(*rel.split("/")), encoding="utf-8") as handle:
        return handle.read()


def new_leader(recorder, nodes, after):
    """The node of `nodes` recorded acting after time `after` (None yet)."""
    found = [e for e in recorder.of("acting") if e.time > after
             and e.node in [n.name for n in nodes]]
    return [n for n in nodes if n.name == found[0].node][0] if found else None


def isolate_the_leader(network, nodes, recorder, cut, edit_at_cut=False):
    """Cut the cables of the hosts `cut` (1-based numbers, the acting master's among them):
    the old master must record its stop before any node of the majority records an election;
    an edit of client.keys made on the old master (once it stopped, or at the cut while it
    may still act and push it) stays on its side. Returns the majority's new acting master."""
    old = nodes[0]
    rest = [n for i, n in enumerate(nodes, 1) if i not in cut]
    before = len(recorder.of("stopped", old))
    for n in cut:
        network.link(n, up=False)
    if edit_at_cut:
        recorder.change(old, "etc/client.keys", EDIT)
    wait(nodes, lambda: len(recorder.of("stopped", old)) > before, "the old master stopping")
    stopped = recorder.of("stopped", old)[-1].time
    if not edit_at_cut:
        recorder.change(old, "etc/client.keys", EDIT)
    leader = wait(nodes, lambda: new_leader(recorder, rest, stopped),
                  "an acting master on the majority side")
    elected = [e for e in recorder.of("elected", leader) if e.time > stopped]
    assert elected, recorder.dump()
    # the order the lease guarantees: the old master gave up before the new one was elected
    # (and nobody on the majority side was elected before the old master's stop either)
    early = [e for e in recorder.of("elected") if e.node != old.name and
             e.time <= stopped and e.term > recorder.of("acting", old)[-1].term]
    assert not early, "elected before the old master stopped: %s\n%s" % (early,
                                                                         recorder.dump())
    return leader, rest


def heal_and_converge(network, nodes, recorder, cut):
    for n in cut:
        network.link(n, up=True)
    wait(nodes, lambda: same(nodes), "every node identical after the heal")


def assert_edit_backed_up_not_spread(old, nodes):
    """The old master's split edit: in one backup folder on the old master, nowhere live."""
    copies = glob.glob(old.path("backup", "cluster", "*", "etc", "client.keys"))
    assert [p for p in copies if read_path(p) == EDIT], (
        "the old master's edit was not backed up: %s\n%s" % (copies, failover_lines(old)))
    for node in nodes:
        assert "oldside" not in read(node, "etc/client.keys"), node.name


def read_path(path):
    with io.open(path, encoding="utf-8") as handle:
        return handle.read()


def test_master_isolated_stops_before_the_majority_elects_then_follows_after_heal(make_node):
    with partitioned_cluster(make_node, ("master", "client1", "client2")) as (
            network, nodes, recorder):
        master = nodes[0]
        leader, rest = isolate_the_leader(network, nodes, recorder, [1])
        other = [n for n in rest if n is not leader][0]
        recorder.change(leader, "etc/client.keys", KEYS + u"004 split01 any 4444\n")
        wait(nodes, lambda: same([leader, other]), "the new leader's change on %s" % other.name)
        assert "split01" not in read(master, "etc/client.keys")
        heal_and_converge(network, nodes, recorder, [1])
        assert "split01" in read(master, "etc/client.keys")
        assert_edit_backed_up_not_spread(master, nodes)
        check(recorder)
        # told apart by the lease: the new leader's change must survive, the old master's
        # edit after its stop not (it is backed up)
        assert [c.node for c in recorder.leaders_changes] == [leader.name], recorder.dump()


def test_the_log_checker_catches_two_leaders_of_a_term_and_two_nodes_acting_at_once():
    """The checks above pass only because the daemons behave: fed the lines of a broken run,
    they fail."""
    def recorded(*timelines):
        recorder = Recorder([])
        for node, when, line in sorted(timelines, key=lambda t: t[1]):
            found = parse_line(line)
            recorder.events.append(Event(when, node, found[0], found[1], line))
        return recorder
    elected = "Failover: elected master for term %d with 2 of 3 votes."
    acting = "Failover: acting master in term %d: a majority acknowledged the lease."
    stopped = "Failover: stopped acting as master in term %d: no majority acknowledged"
    good = recorded(("a", 1.0, elected % 1), ("a", 1.1, acting % 1), ("a", 3.0, stopped % 1),
                    ("b", 4.0, elected % 2), ("b", 4.1, acting % 2))
    assert len(check(good)) == 2
    two_leaders = recorded(("a", 1.0, elected % 1), ("b", 1.5, elected % 1))
    with pytest.raises(AssertionError, match="term 1 has 2 leaders"):
        check(two_leaders)
    overlap = recorded(("a", 1.0, elected % 1), ("a", 1.1, acting % 1),
                       ("b", 2.0, elected % 2), ("b", 2.1, acting % 2), ("a", 3.0, stopped % 1))
    with pytest.raises(AssertionError, match="acted at once"):
        check(overlap)


class FilesOnly(object):
    """A node of a recorded run reduced to its files (the checker reads nothing else)."""

    def __init__(self, root, name):
        self.name, self.prefix = name, str(root.join(name))

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)


def test_the_log_checker_catches_a_lost_leaders_change_and_not_a_lost_ex_leaders(tmpdir):
    """Fed a run whose leader's change is missing on a live node, the change check fails; a
    change made when the lease had run out, or at a cut before it could spread, need not
    survive but must be backed up on its node."""
    elected = "Failover: elected master for term %d with 2 of 3 votes."
    acting = "Failover: acting master in term %d: a majority acknowledged the lease."
    stopped = "Failover: stopped acting as master in term %d: no majority acknowledged"
    leading = {"role": "master", "term": 1, "lease_remaining": 0.9}
    following = {"role": "client", "term": 1, "lease_remaining": None}
    base = u"001 a any 1\n"

    def run(leaders_line_on, written_after_the_lease=None, at_the_cut=None, backed_up=False):
        nodes = [FilesOnly(tmpdir.join(str(len(tmpdir.listdir()))), n) for n in "abc"]
        recorder = Recorder(nodes)
        for node, when, line in (("a", 1.0, elected % 1), ("a", 1.1, acting % 1),
                                 ("a", 3.0, stopped % 1), ("b", 4.0, elected % 2),
                                 ("b", 4.1, acting % 2)):
            found = parse_line(line)
            recorder.events.append(Event(when, node, found[0], found[1], line))
        ours = Change(2.0, "a", "etc/client.keys", [u"002 lead any 2"], set(), leading, leading)
        ours.spread = 2.5
        recorder.changes.append(ours)
        for when, before in ((written_after_the_lease, following), (at_the_cut, leading)):
            if when is not None:
                recorder.changes.append(Change(when, "a", "etc/client.keys", [u"099 old any 9"],
                                               set(), before, before))
        for node in nodes:
            put(node, "etc/client.keys", base + (u"002 lead any 2\n" if node.name in
                                                 leaders_line_on else u""))
        if backed_up:
            put(nodes[0], "backup/cluster/1-20261203120000/etc/client.keys",
                base + u"099 old any 9\n")
        return recorder, nodes

    recorder, nodes = run("abc")
    assert len(check(recorder, nodes, timeout=0)) == 2
    recorder, nodes = run("ab")     # rolled back on c (or only in a's backup there)
    with pytest.raises(AssertionError, match="a leader's change is not on every live node"):
        check(recorder, nodes, timeout=0)
    recorder, nodes = run("ab")     # ... unless c is not live
    check(recorder, nodes[:2], timeout=0)
    for when in ("written_after_the_lease", "at_the_cut"):
        recorder, nodes = run("abc", backed_up=True, **{when: 3.5 if "after" in when else 2.9})
        check(recorder, nodes, timeout=0)
        recorder, nodes = run("abc", **{when: 3.5 if "after" in when else 2.9})
        with pytest.raises(AssertionError, match="neither on every live node nor backed up"):
            check(recorder, nodes, timeout=0)
