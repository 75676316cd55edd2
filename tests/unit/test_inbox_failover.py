"""inbox.Inbox with cluster.failover=1: the client.keys removal guard follows the election at
the moment it decides, not the inbox's role (which failover_roles.py switches a moment after
the election changed). A real Inbox, Receiver and LocalEdits on a temporary installation;
the election's answers are given by the test (Election is tested in test_election*.py)."""
from __future__ import absolute_import, division, print_function

import hashlib
import json
import logging
import os
import shutil
import tempfile

import pytest

from wazuh_cluster import config, inbox, paths
from wazuh_cluster.errors import RequestError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITEMS, EXCLUDE = config.load_items(os.path.join(ROOT, "etc", "cluster.json"))
OPTIONS = config.Options(**dict((name, convert(default)) for name, convert, default
                                in config.OPTIONS))._replace(failover=True)
KEYS = b"".join(b"%03d agent%d any %064x\n" % (i, i, i) for i in range(1, 5))


class Cfg(object):
    node_name = "alpha"
    node_type = "client"
    is_master = False
    items, exclude, options = ITEMS, EXCLUDE, OPTIONS
    nodes = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class Link(object):
    """The internal daemon's answers an Inbox needs for a client.keys batch."""

    def __init__(self):
        self.meta = {}

    def urgent(self):
        return self

    def call(self, cmd, args):
        if cmd == "meta_get":
            return {"value": self.meta.get(args["key"])}
        if cmd == "meta_set":
            self.meta[args["key"]] = args["value"]
            return {"stored": True}
        assert cmd in ("received", "set_states"), cmd
        return {}


class Election(object):
    """What failover.Failover answers, as the test sets it."""

    def __init__(self, leader, acting=False):
        self.leader, self.acting = leader, acting

    def is_acting(self):
        return self.acting

    def leader_name(self):
        return self.leader

    def follows(self, session):
        return session.peer_name == self.leader and not self.acting

    def check_transfer(self, session, header):
        pass          # the batch began when `session`'s node led: it passed

    def voter_of(self, session):
        return session.peer_name

    def fence(self, voter, term):
        def run(change):   # the renames pass too: the guard is what is tested here
            change()
            return True
        return run


class Session(object):
    peer_role = "master"

    def __init__(self, name):
        self.peer_name = name


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-inbox-fo-")
    for folder in ("etc/shared/default", "var/db", "queue/cluster-staging",
                   "queue/agent-info"):
        os.makedirs(os.path.join(path, folder))
    with open(os.path.join(path, "etc", "client.keys"), "wb") as handle:
        handle.write(KEYS)
    yield path
    shutil.rmtree(path)


def make_inbox(home, election, cls=inbox.Inbox):
    box = cls(Cfg(), paths.Paths(home), Link())
    box.log = logging.getLogger("test-inbox-failover")
    box.failover = election
    box.start()
    return box


def keys_batch(data):
    header = {"files": [{"name": "etc/client.keys", "sha256": hashlib.sha256(data).hexdigest(),
                         "mtime_ns": 10 ** 18, "size": len(data)}],
              "term": 3}
    return json.loads(json.dumps(header)), data


def keys(home):
    with open(os.path.join(home, "etc", "client.keys"), "rb") as handle:
        return handle.read()


class SwitchedMidBatch(inbox.Inbox):
    """The role switch (failover_roles: inbox.set_role) lands while the batch is handled:
    at its first look at the current client.keys."""

    def read_keys(self):
        self.set_role("client")
        return inbox.Inbox.read_keys(self)


def test_a_node_deposed_a_moment_ago_guards_the_leaders_mass_removal(home):
    # alpha acted as master; beta leads now; alpha's inbox still receives as a master
    box = make_inbox(home, Election("beta"), SwitchedMidBatch)
    box.set_role("master")
    answer, _ = box.sync_files(Session("beta"), *keys_batch(b""))
    assert answer["states"]["etc/client.keys"] == "pending"
    assert keys(home) == KEYS
    assert "removes all 4 agents" in box.held()["message"]


def test_a_removal_from_a_node_that_no_longer_leads_is_refused(home):
    # beta's batch passed fencing; gamma was elected before the guard decided
    box = make_inbox(home, Election("gamma"))
    box.set_role("client")
    with pytest.raises(RequestError) as info:
        box.sync_files(Session("beta"), *keys_batch(KEYS.split(b"\n", 1)[1]))  # 1 of 4 gone
    assert info.value.code == "stale_term"
    assert keys(home) == KEYS


def test_a_removal_from_the_leader_passes_the_guard_as_on_any_client(home):
    box = make_inbox(home, Election("beta"))
    box.set_role("client")
    answer, _ = box.sync_files(Session("beta"), *keys_batch(KEYS.split(b"\n", 1)[1]))
    assert answer["states"]["etc/client.keys"] == "synchronized"
    assert keys(home) == KEYS.split(b"\n", 1)[1]
    answer, _ = box.sync_files(Session("beta"), *keys_batch(b""))
    assert answer["states"]["etc/client.keys"] == "pending"
