"""wazuh-clusterd's failover status entry point and the role/term columns of -n built from
it (clusterd.ClusterNode.failover_status, commands.Commands.with_roles). The status provider
is the election's (wired in clusterd by the failover wiring); here a stand-in returns the
documented status dict."""
from __future__ import absolute_import, division, print_function

import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib"))

from wazuh_cluster import clusterd  # noqa: E402
from wazuh_cluster.commands import Commands  # noqa: E402

Cfg = collections.namedtuple("Cfg", "node_name")
STATUS = {"role": "client", "term": 9, "leader": "node02", "preferred": "node01",
          "lease_remaining": None, "failovers": [], "last": [9, 2]}


class Provider(object):
    def status(self):
        return dict(STATUS)


class Node(object):
    """The attributes of ClusterNode that failover_status and Commands.with_roles use."""
    failover_status = clusterd.ClusterNode.__dict__["failover_status"]

    def __init__(self, provider, name="node03"):
        self.failover = provider
        self.cfg = Cfg(name)


def rows():
    return {"nodes": [{"name": n} for n in ("node01", "node02", "node03", "node04")]}


def test_failover_off_status_and_node_rows_are_unchanged():
    node = Node(None)
    assert node.failover_status() == {"failover": False}
    assert Commands(node).with_roles(rows()) == rows()


def test_failover_on_gives_the_providers_status_and_roles_as_this_node_sees_them():
    node = Node(Provider())
    assert node.failover_status() == dict(STATUS, failover=True)
    result = Commands(node).with_roles(rows())
    assert result["failover"] is True
    assert [(r["name"], r["role"], r["term"]) for r in result["nodes"]] == [
        ("node01", "client", None), ("node02", "acting master", 9), ("node03", "client", 9),
        ("node04", "client", None)]
    STATUS["leader"] = "node01"
    try:
        result = Commands(Node(Provider(), "node01")).with_roles(rows())
    finally:
        STATUS["leader"] = "node02"
    assert result["nodes"][0]["role"] == "master"
