"""Local edits on an ex-leader (localedits.LocalEdits.pushed, sync.PeerSync.call_files): what
a node pushed while it acted as leader is the cluster's state, not a local edit, when a later
leader replaces it; an edit made there after it stopped acting still is."""
from __future__ import absolute_import, division, print_function

import hashlib
import json

from test_localedits import ITEMS, node  # noqa: F401 (fixture)
from wazuh_cluster import sync

CONF = "etc/shared/default/agent.conf"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_files_this_node_pushed_while_leading_are_replaced_without_a_backup(node):
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits()                             # seeded: counts as received
    node.state["acting"] = True                      # elected; its operator edits the file
    node.write(CONF, b"<agent_config>led</agent_config>\n")
    node.write("etc/client.keys", b"001 a any k\n")
    edits.pushed("gamma", [(CONF, sha(b"<agent_config>led</agent_config>\n")),
                  ("etc/client.keys", sha(b"001 a any k\n"))],
                 {CONF: "synchronized", "etc/client.keys": "failed"})
    node.state["acting"] = False                     # deposed; another node leads
    node.push(edits, [(CONF, b"<agent_config>new leader</agent_config>\n"),
                      ("etc/client.keys", b"002 b any k\n")])
    # the agent.conf it pushed is no local edit; the client.keys no peer took is one
    assert len(node.backups()) == 1 and len(node.warnings()) == 1
    assert "etc/client.keys" in node.warnings()[0]
    # an edit made here after it stopped acting is backed up
    node.write(CONF, b"<agent_config>edited on the ex-leader</agent_config>\n")
    node.push(edits, [(CONF, b"<agent_config>3</agent_config>\n")])
    assert len(node.backups()) == 2
    assert node.read("backup/cluster/%s/%s" % (node.backups()[1], CONF)) == \
        b"<agent_config>edited on the ex-leader</agent_config>\n"


def test_a_pushed_deletion_leaves_a_file_made_again_later_a_local_edit(node):
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits()
    edits.pushed("gamma", [(CONF, None)], {CONF: "synchronized"})   # deleted while it led
    node.write(CONF, b"<agent_config/>\n")                  # made again by hand, later
    node.push(edits, [(CONF, b"<agent_config>2</agent_config>\n")])
    assert len(node.backups()) == 1


def test_a_change_fewer_than_a_majority_took_stays_a_local_edit(node):
    """Five listed nodes: a leader cut off with one peer still acts until its lease runs out
    and that peer applies its push; the next leader never saw the change, so its version
    must back it up here (the only copy), not drop it."""
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits(voters=5)
    node.state["acting"] = True
    node.write(CONF, b"<agent_config>minority</agent_config>\n")
    edits.pushed("beta", [(CONF, sha(b"<agent_config>minority</agent_config>\n"))],
                 {CONF: "synchronized"})
    node.state["acting"] = False
    node.push(edits, [(CONF, b"<agent_config>new leader</agent_config>\n")])
    assert len(node.backups()) == 1
    assert node.read("backup/cluster/%s/%s" % (node.backups()[0], CONF)) == \
        b"<agent_config>minority</agent_config>\n"
    # a change two peers took (three of five) is the cluster's: replaced without a backup
    node.state["acting"] = True
    node.write(CONF, b"<agent_config>majority</agent_config>\n")
    majority = [(CONF, sha(b"<agent_config>majority</agent_config>\n"))]
    edits.pushed("beta", majority, {CONF: "synchronized"})
    edits.pushed("beta", majority, {CONF: "synchronized"})      # the same peer twice
    edits.pushed("gamma", [(CONF, sha(b"older"))], {CONF: "synchronized"})  # another version
    edits.pushed("delta", majority, {CONF: "failed"})
    node.state["acting"] = False
    node.push(edits, [(CONF, b"<agent_config>3</agent_config>\n")])
    assert len(node.backups()) == 2
    node.state["acting"] = True
    node.write(CONF, b"<agent_config>majority</agent_config>\n")
    edits.pushed("beta", majority, {CONF: "synchronized"})
    edits.pushed("gamma", majority, {CONF: "synchronized"})
    node.state["acting"] = False
    node.push(edits, [(CONF, b"<agent_config>4</agent_config>\n")])
    assert len(node.backups()) == 2


def test_nothing_is_recorded_with_failover_off(node):
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits(failover=False)
    edits.pushed("gamma", [(CONF, sha(b"x"))], {CONF: "synchronized"})
    assert edits.received == {}


class Session(object):
    peer_name = "gamma"
    closed = False
    features = ()

    def __init__(self, states):
        self.states = states
        self.headers = []

    def call(self, cmd, header, data=b"", **kwargs):
        self.headers.append(json.loads(json.dumps(header)))
        return {"states": self.states}, b""


class Acting(object):
    def acting_term(self):
        return 4


def test_a_master_tells_what_its_peer_applied_of_each_stamped_batch():
    session = Session({CONF: "synchronized", "etc/client.keys": "failed",
                       "queue/agent-groups/001": "synchronized", "etc/shared/gone": "x"})
    told = []
    worker = sync.PeerSync(session, "/nonexistent", "master", None, ITEMS, 120.0, 0.05, 30.0)
    worker.failover = Acting()
    worker.pushed = lambda peer, sent, states: told.append((peer, sent, states))
    batch = sync.Batch()
    batch.add_file(CONF, b"c", sha(b"c"), 10)
    batch.add_file("etc/client.keys", b"k", sha(b"k"), 10)
    batch.meta.append({"name": "queue/agent-groups/001", "sha256": sha(b"g"), "mtime_ns": 10})
    batch.delete.append("etc/shared/gone")
    states = worker.call_files(batch)
    assert session.headers[0]["term"] == 4
    assert told == [("gamma", [(CONF, sha(b"c")), ("etc/client.keys", sha(b"k")),
                      ("queue/agent-groups/001", sha(b"g")), ("etc/shared/gone", None)],
                     states)]
    # a client's batches are not the cluster's master-owned state
    client = sync.PeerSync(Session({}), "/nonexistent", "client", None, ITEMS, 120.0, 0.05,
                           30.0)
    client.failover, client.pushed = Acting(), worker.pushed
    client.call_files(sync.Batch())
    assert len(told) == 1
