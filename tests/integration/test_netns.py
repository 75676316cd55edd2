"""Three hosts in network namespaces: own-node detection through `hostname -I`, a cut link.

The test builds its own little network: a bridge in a fourth namespace and one veth pair per
node, addresses in 10.250.0.0/24 that exist only inside these namespaces (no uplink: nothing
leaves them). Each node's <nodes> lists the three addresses with bind_addr 0.0.0.0, so a
node finds itself the way Wazuh 3.0 did, by comparing with `hostname --all-ip-addresses`
run inside its namespace. The namespaces are removed at teardown.

Needs root and a working `ip netns`; otherwise skipped with the reason. Every wait polls a
condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import contextlib
import os

import pytest

from harness import (BARE_ENV, base_install, make_node, python, run,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_cluster_conf,
                     write_internal_options)
from test_crash import converge, tree  # race-free while daemons delete files
from test_sync import FAST, KEYS, agent_info, put

SUBNET = "10.250.0"
PORT = 1516
SYNC_WAIT = 30.0
NAMES = ("master", "client1", "client2")
TAG = "wzc%d" % (os.getpid() % 100000)   # namespace and link names of this test process


def ip(*args):
    """`ip ARGS`; raises AssertionError with its output when it fails."""
    return run(["ip"] + list(args), timeout=30, check=True)


def _netns_usable():
    """None when `ip netns` works here, else the reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = TAG + "-probe"
    try:
        result = run(["ip", "netns", "add", probe], timeout=30)
    except OSError as err:
        return "cannot run ip: %s" % err
    if result.rc != 0:
        return "`ip netns add` fails here: %s" % result.err.strip()
    run(["ip", "netns", "del", probe], timeout=30)
    return None


class Network(object):
    """A bridge namespace and one namespace per node, linked by veth pairs."""

    def __init__(self):
        self.bridge = TAG + "-br"
        self.spaces = []

    def create(self, count):
        self.spaces.append(self.bridge)
        ip("netns", "add", self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for n in range(1, count + 1):
            space = "%s-n%d" % (TAG, n)
            self.spaces.append(space)
            ip("netns", "add", space)
            # Both ends are created inside the namespaces: no interface ever appears in the
            # machine's own network namespace.
            ip("-n", self.bridge, "link", "add", self.port(n), "type", "veth",
               "peer", "name", "eth0", "netns", space)
            ip("-n", self.bridge, "link", "set", self.port(n), "master", "br0", "up")
            ip("-n", space, "link", "set", "lo", "up")
            ip("-n", space, "addr", "add", "%s.%d/24" % (SUBNET, n), "dev", "eth0")
            ip("-n", space, "link", "set", "eth0", "up")
        return self

    def port(self, n):
        return "v%d" % n

    def link(self, n, up):
        """Cut (up=False) or heal the cable of host n at the bridge."""
        ip("-n", self.bridge, "link", "set", self.port(n), "up" if up else "down")

    def destroy(self):
        for space in reversed(self.spaces):
            run(["ip", "netns", "del", space], timeout=30)
        self.spaces = []


@contextlib.contextmanager
def nodes_in_namespaces(make_node, names, options):
    """(network, nodes): `names` (the first the master), host n of the network each
    (node.space), configured with `options`, not started; everything removed afterwards."""
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    network = Network()
    nodes = []
    try:
        network.create(len(names))
        addresses = ["%s.%d" % (SUBNET, n) for n in range(1, len(names) + 1)]
        for n, name in enumerate(names, 1):
            node = make_node(name, "master" if n == 1 else "client", configure=False)
            node.address, node.port, node.space = addresses[n - 1], PORT, network.spaces[n]
            write_cluster_conf(node.prefix, "wazuh", name, "master" if n == 1 else "client",
                               node.key, "0.0.0.0", PORT, addresses, interval="3s")
            write_internal_options(node.prefix, options)
            nodes.append(node)
        yield network, nodes
    finally:
        for node in nodes:  # processes first: a namespace lives as long as they do
            node.cleanup()
        network.destroy()


def start_in(space, node):
    """ossec-control start inside the namespace, in an init-like environment."""
    result = run(["ip", "netns", "exec", space, node.path("bin", "ossec-control"), "start"],
                 timeout=60, env=dict(BARE_ENV))
    assert result.rc == 0, node.explain("ossec-control start failed in %s" % space, result)
    node.wait_running(15)


@pytest.fixture
def netns_cluster(make_node):
    with nodes_in_namespaces(make_node, NAMES, FAST) as (network, nodes):
        master = nodes[0]
        put(master, "etc/client.keys", KEYS)
        put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
        put(master, "queue/agent-groups/001", u"default")
        for node in nodes:
            start_in(node.space, node)
        yield network, nodes


def test_nodes_find_themselves_with_hostname_and_converge(netns_cluster):
    network, nodes = netns_cluster
    master = nodes[0]
    converge(nodes, SYNC_WAIT)
    for n, node in enumerate(nodes[1:], 2):
        wait_for(lambda: "%s.%d" % (SUBNET, n) in master.log(), SYNC_WAIT,
                 what="the master's session with %s from its namespace address" % node.name)
        assert ": ERROR:" not in node.log(), node.dump_logs()


def sessions_ended(node, peer):
    """How many sessions with `peer` the node has seen end (its cluster.log says so)."""
    return len([line for line in node.log().splitlines()
                if "Session with" in line and " node %s " % peer in line and " ended" in line])


def wait_session_lost(node, peer, before):
    wait_for(lambda: sessions_ended(node, peer) > before, SYNC_WAIT,
             what="%s to notice that its session with %s is lost" % (node.name, peer))


def test_cut_link_while_the_master_changes_files_then_healed_converges(netns_cluster):
    network, nodes = netns_cluster
    master, client1, client2 = nodes
    converge(nodes, SYNC_WAIT)
    # client2's cable is cut: client1 keeps following the master, client2 cannot. The cut
    # lasts until both ends have given their session up (keepalives), so that healing means
    # reconnecting, not just TCP retransmitting.
    ended = sessions_ended(master, "client2"), sessions_ended(client2, "master")
    network.link(3, up=False)
    put(master, "etc/shared/default/during-cut.conf", u"written while client2 was cut off\n")
    put(master, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
    os.unlink(master.path("queue", "agent-groups", "001"))
    converge([master, client1], SYNC_WAIT)
    assert "etc/shared/default/during-cut.conf" not in tree(client2.prefix)
    put(client2, "queue/agent-info/db01-10.0.0.5", agent_info("client2"))
    wait_session_lost(master, "client2", ended[0])
    wait_session_lost(client2, "master", ended[1])
    assert "etc/shared/default/during-cut.conf" not in tree(client2.prefix)
    network.link(3, up=True)
    converge(nodes, SYNC_WAIT)
    wait_for(lambda: os.path.exists(master.path("queue", "agent-info", "db01-10.0.0.5")),
             SYNC_WAIT, what="client2's agent-info on the master after the link healed")
    # Now the master's own cable: nobody gets the next change until it is healed.
    ended = [sessions_ended(node, "master") for node in (client1, client2)]
    network.link(1, up=False)
    put(master, "etc/shared/default/master-cut.conf", u"master cut off\n")
    put(client1, "queue/agent-info/web01-any", agent_info("client1"))
    wait_session_lost(client1, "master", ended[0])
    wait_session_lost(client2, "master", ended[1])
    assert "etc/shared/default/master-cut.conf" not in tree(client1.prefix)
    network.link(1, up=True)
    converge(nodes, SYNC_WAIT)
    wait_for(lambda: os.path.exists(master.path("queue", "agent-info", "web01-any")),
             SYNC_WAIT, what="client1's agent-info on the master after the link healed")
    assert all(node.running_pid() for node in nodes)
