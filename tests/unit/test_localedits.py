"""Backups of local edits on a node that is not the leader (localedits.py, SPEC section 10),
on a real temporary installation with the shipped items table and the real Receiver."""
from __future__ import absolute_import, division, print_function

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from wazuh_cluster import config, electionstore, localedits  # noqa: E402
from wazuh_cluster.errors import RequestError  # noqa: E402
from wazuh_cluster.receive import Incoming, Receiver  # noqa: E402
from test_agents import ListHandler  # noqa: E402  (lines of (level, message))

ITEMS, EXCLUDE = config.load_items(os.path.join(ROOT, "etc", "cluster.json"))
CLOCK = 1796274000.0   # 2026-12-03, the folder stamp is local time of this


@pytest.fixture
def node():
    home = tempfile.mkdtemp(prefix="wzc-edits-")
    for folder in ("etc/shared/default", "var/db", "queue/cluster-staging"):
        os.makedirs(os.path.join(home, folder))
    log = logging.getLogger("test-localedits-%s" % os.path.basename(home))
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    state = {"acting": False}
    yield Node(home, log, handler, state)
    shutil.rmtree(home)


class Node(object):
    def __init__(self, home, log, handler, state):
        self.home, self.log, self.handler, self.state = home, log, handler, state
        self.receiver = Receiver(home, ITEMS, EXCLUDE, log, role="client")

    def edits(self, failover=True, voters=3):
        found = localedits.LocalEdits(self.home, os.path.join(self.home, "var", "db"), ITEMS,
                                      EXCLUDE, self.log, failover,
                                      lambda: self.state["acting"], clock=lambda: CLOCK,
                                      voters=voters)
        found.start()
        return found

    def write(self, name, data):
        with open(os.path.join(self.home, *name.split("/")), "wb") as handle:
            handle.write(data)

    def read(self, name):
        with open(os.path.join(self.home, *name.split("/")), "rb") as handle:
            return handle.read()

    def push(self, edits, files=(), deletes=(), dirs=(), fence=None):
        """A batch from the leader, as Inbox.sync_files applies it; `fence` as the
        failover's: run(change) around each rename."""
        incoming = [Incoming(n, d, hashlib.sha256(d).hexdigest(), 10 ** 18) for n, d in files]
        token = edits.before(incoming, list(deletes), list(dirs))
        try:
            states, _ = self.receiver.apply_batch(incoming, list(deletes), list(dirs),
                                                  sender_role="master", peer="leader",
                                                  fence=fence, replace=edits.replacer(token))
        except BaseException:
            edits.after(token, None)
            raise
        edits.after(token, states)
        return states

    def backups(self):
        root = os.path.join(self.home, "backup", "cluster")
        return sorted(os.listdir(root)) if os.path.isdir(root) else []

    def warnings(self):
        return [text for level, text in self.handler.lines if level == "WARNING"]


def stamp():
    import time
    return time.strftime("%Y%m%d%H%M%S", time.localtime(CLOCK))


def test_a_local_edit_is_backed_up_once_before_the_leaders_file_replaces_it(node):
    node.write("etc/client.keys", b"001 a any k\n")
    edits = node.edits()                       # seeded: this content counts as received
    node.push(edits, [("etc/client.keys", b"001 a any k\n002 b any k\n")])
    assert node.backups() == [] and node.warnings() == []
    node.write("etc/client.keys", b"001 a any k\n002 b any k\n003 local any k\n")
    node.push(edits, [("etc/client.keys", b"001 a any k\n002 b any k\n004 c any k\n")])
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/etc/client.keys" % folder).endswith(b"003 local any k\n")
    assert node.read("etc/client.keys").endswith(b"004 c any k\n")
    assert node.warnings() == [
        "local edit of 'etc/client.keys' replaced by the leader's version; the local version "
        "is backed up as 'backup/cluster/%s/etc/client.keys' (acknowledge with 'cluster_control "
        "--ack-backups')" % folder]
    node.push(edits, [("etc/client.keys", b"005 d any k\n")])   # what it received: no backup
    assert node.backups() == [folder] and len(node.warnings()) == 1


def test_a_batch_retried_after_a_failed_apply_backs_the_same_edit_up_once(node):
    node.write("etc/client.keys", b"001 a any k\n")
    edits = node.edits()
    node.write("etc/client.keys", b"001 a any k\n003 local any k\n")
    incoming = [Incoming("etc/client.keys", b"002 b any k\n",
                         hashlib.sha256(b"002 b any k\n").hexdigest(), 10 ** 18)]
    for _attempt in range(3):       # backed up, then the apply failed: the leader retries
        edits.before(incoming, [], [])
    assert node.backups() == ["0-%s" % stamp()] and len(node.warnings()) == 1
    node.write("etc/client.keys", b"001 a any k\n003 local any k\n004 again any k\n")
    edits.before(incoming, [], [])  # a new local version is a new backup
    assert node.backups() == ["0-%s" % stamp(), "0-%s-2" % stamp()]


def test_the_record_of_what_was_received_survives_a_restart(node):
    node.edits()
    node.push(node.edits(), [("etc/shared/default/agent.conf", b"<agent_config/>\n")])
    edits = node.edits()                        # a restart: the record is read back
    node.push(edits, [("etc/shared/default/agent.conf", b"<agent_config>2</agent_config>\n")])
    assert node.backups() == []


def test_deletions_and_removed_group_folders_back_up_edited_files_in_one_folder(node):
    os.makedirs(os.path.join(node.home, "etc", "shared", "g1"))
    node.write("etc/shared/g1/agent.conf", b"g1\n")
    node.write("etc/shared/default/extra.txt", b"x\n")
    edits = node.edits()
    node.write("etc/shared/g1/agent.conf", b"g1 edited\n")
    node.write("etc/shared/default/extra.txt", b"x edited\n")
    node.write("etc/shared/default/new.txt", b"new here\n")    # never received: an edit
    node.push(edits, [("etc/shared/default/new.txt", b"leader\n")],
              deletes=["etc/shared/default/extra.txt"], dirs=["etc/shared/g1"])
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    base = "backup/cluster/%s/etc/shared/" % folder
    assert node.read(base + "g1/agent.conf") == b"g1 edited\n"
    assert node.read(base + "default/extra.txt") == b"x edited\n"
    assert node.read(base + "default/new.txt") == b"new here\n"
    assert not os.path.exists(os.path.join(node.home, "etc", "shared", "g1"))
    assert len(node.warnings()) == 3


def test_same_content_as_the_leaders_needs_no_backup(node):
    edits = node.edits()
    node.write("etc/client.keys", b"same\n")
    node.push(edits, [("etc/client.keys", b"same\n")])
    assert node.backups() == []


@pytest.mark.parametrize("failover, acting", [(False, False), (True, True)])
def test_nothing_happens_with_failover_off_or_on_the_acting_leader(node, failover, acting):
    node.state["acting"] = acting
    edits = node.edits(failover)
    node.write("etc/client.keys", b"local\n")
    node.push(edits, [("etc/client.keys", b"leader\n")])
    assert node.backups() == [] and node.handler.lines == []
    assert os.listdir(os.path.join(node.home, "var", "db")) == ([] if not failover else
                                                                [localedits.RECORD_NAME])


def test_the_backup_folder_is_named_after_the_election_term(node):
    db = os.path.join(node.home, "var", "db")
    electionstore.FileStore(electionstore.path_in(db), electionstore.marker_in(db)).save(
        12, "node02", (11, 4))
    edits = node.edits()
    node.write("etc/client.keys", b"local\n")
    node.push(edits, [("etc/client.keys", b"leader\n")])
    node.write("etc/client.keys", b"local again\n")
    node.push(edits, [("etc/client.keys", b"leader 2\n")])     # same second: a suffix
    assert node.backups() == ["12-%s" % stamp(), "12-%s-2" % stamp()]


def test_a_failed_backup_refuses_the_batch_and_keeps_the_file(node):
    edits = node.edits()
    node.write("etc/client.keys", b"local\n")
    node.write("backup", b"a file where the backup folder should be\n")
    with pytest.raises(RequestError):
        edits.before([Incoming("etc/client.keys", b"x", hashlib.sha256(b"x").hexdigest(),
                               10 ** 18)], [], [])
    assert node.read("etc/client.keys") == b"local\n"
    assert any(level == "ERROR" and "cannot back up local edits" in text
               for level, text in node.handler.lines)


def test_a_partial_backup_left_by_a_crash_is_removed_at_start(node):
    partial = os.path.join(node.home, "backup", "cluster", localedits.TEMP_PREFIX + "0-x.ab")
    os.makedirs(os.path.join(partial, "etc"))
    node.edits()
    assert node.backups() == []


def test_a_hand_made_file_with_any_name_in_a_removed_folder_is_backed_up_escaped(node):
    os.makedirs(os.path.join(node.home, "etc", "shared", "g2"))
    edits = node.edits()
    node.write("etc/shared/g2/bad\n\x1b[2Jname", b"local\n")
    node.push(edits, dirs=["etc/shared/g2"])
    folder = "0-%s" % stamp()
    assert node.read("backup/cluster/%s/etc/shared/g2/bad\n\x1b[2Jname" % folder) == b"local\n"
    assert node.warnings() == [
        "local edit of 'etc/shared/g2/bad\\x0a\\x1b[2Jname' replaced by the leader's version; "
        "the local version is backed up as 'backup/cluster/%s/etc/shared/g2/bad\\x0a\\x1b[2Jname'"
        " (acknowledge with 'cluster_control --ack-backups')" % folder]
    assert [b["file"] for b in edits.listing()["backups"]] == [u"etc/shared/g2/bad\n\x1b[2Jname"]


def test_listing_and_acknowledging(node):
    edits = node.edits()
    for index in range(3):
        node.write("etc/client.keys", b"local %d\n" % index)
        node.push(edits, [("etc/client.keys", b"leader %d\n" % index)])
    folders = node.backups()
    paths = ["backup/cluster/%s/etc/client.keys" % f for f in folders]
    listed = edits.listing()
    assert [b["path"] for b in listed["backups"]] == paths and listed["backups_more"] == 0
    assert listed["backups"][0]["file"] == "etc/client.keys"
    assert listed["backups"][0]["term"] == 0 and abs(listed["backups"][0]["time"] - CLOCK) < 1
    assert edits.acknowledge([os.path.join(node.home, "backup", "cluster", folders[1])]) == \
        [paths[1]]
    assert [b["path"] for b in edits.listing()["backups"]] == [paths[0], paths[2]]
    with pytest.raises(RequestError) as info:
        edits.acknowledge(["backup/cluster/nothing"])
    assert info.value.code == "unknown_backup"
    assert edits.acknowledge(None) == sorted([paths[0], paths[2]])
    assert edits.listing()["backups"] == [] and node.backups() == folders  # files kept
    with open(os.path.join(node.home, "var", "db", localedits.ACKED_NAME)) as handle:
        assert json.load(handle) == sorted(paths)


def test_files_that_are_not_master_owned_are_neither_checked_nor_recorded(node):
    edits = node.edits()
    os.makedirs(os.path.join(node.home, "queue", "agent-info"))
    node.write("queue/agent-info/web01-any", b"local\n")
    data = b"from a client\n"
    token = edits.before([Incoming("queue/agent-info/web01-any", data,
                                   hashlib.sha256(data).hexdigest(), 10 ** 18)],
                         ["etc/../etc/client.keys"], [])
    assert token == [] and node.backups() == []
