"""Catalog with roles that change (cluster.failover=1, set_role) or changed (a master made a
client): what a client sends of agent-info is what its own agents reported; what a node sends
is scanned at the cadence of its own items."""
from __future__ import absolute_import, division, print_function

import json

from test_catalog import NOW, home, make  # noqa: F401 (fixture)
from test_scanner import BASE_NS, write
from wazuh_cluster import compat, summary

INFO = "queue/agent-info/"


def sent_agents(cat):
    """The agent-info names of this node's manifest for its peer, both ways it is asked."""
    files = cat.handle("manifest", {"source": "client"})["files"]
    raw = cat.handle("manifest", {"source": "client", "as_data": True,   # a push's question
                                  "names": sorted(files) + [INFO + "web02-any"]})
    assert sorted(json.loads(compat.to_text(raw.data))) == sorted(files)
    return sorted(n[len(INFO):] for n in files if n.startswith(INFO))


def test_an_old_master_as_a_client_sends_only_what_its_own_agents_reported(home):
    for name in ("web01-any", "web02-any", "own01-any", "moved01-any"):
        write(home, INFO + name, "Linux %s" % name)
    master = make(home, role="master", node_name="alpha")
    master.tick(0.0)
    # as the master it took these from its clients (own01 reports to alpha itself)
    master.handle("agent_nodes", {"rows": [["web01-any", "beta", BASE_NS],
                                           ["web02-any", "gamma"],
                                           ["moved01-any", "beta", BASE_NS]]})
    master.handle("set_role", {"role": "client"})      # it follows another leader now
    # moved01 reports to alpha since: alpha's remoted rewrote its file
    write(home, INFO + "moved01-any", "Linux moved01 #alpha", BASE_NS + 5 * 10 ** 9)
    master.tick(20.0)
    assert sent_agents(master) == ["moved01-any", "own01-any"]
    # its summary agrees with that manifest (a round compares nothing more)
    rows = [master.scanner.row(INFO + name) for name in ("moved01-any", "own01-any")]
    assert master.handle("summary", {"source": "client"})["buckets"] == \
        summary.of_rows(rows, lambda item: item == "agent-info")


def test_a_client_that_never_was_master_sends_every_agent_info(home):
    for name in ("web01-any", "web02-any"):
        write(home, INFO + name, "Linux")
    cat = make(home, role="client", node_name="beta")
    cat.tick(0.0)
    assert sent_agents(cat) == ["web01-any", "web02-any"]


def test_a_client_elected_leader_notices_in_place_edits_of_shared_files_at_once(home):
    write(home, "etc/shared/default/agent.conf", "conf")
    cat = make(home, role="client", node_name="beta")
    cat.tick(0.0)
    cat.handle("set_role", {"role": "master"})
    cat.tick(1.0)
    write(home, "etc/shared/default/agent.conf", "CONF")  # in place, same size and mtime
    event = cat.tick(12.0)   # its own items' full pass (scan_interval), not the 10 min one
    assert event is not None and event["changed"] == ["etc/shared/default/agent.conf"]
