"""What cluster_control can ask wazuh-clusterd, and what a client forwards to its master.

Commands run on the local daemon; the cluster-wide views (nodes, agents, health) are the
master's: a client asks its master through the session and adds what only it knows.
"""
from __future__ import absolute_import, division, print_function

import time

from wazuh_cluster import __version__, agentpages, agentrows, compat, localsock
from wazuh_cluster.errors import RequestError

FORWARDED = ("nodes", "agents", "health")


def _names(args, key):
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, compat.string_types) for v in value):
        raise RequestError("'%s' must be a list of names" % key, "bad_request")
    return value


def _listing_args(args):
    """The internal daemon's "agents" args for a listing asked with `args` (cluster_control's
    or a client's): only what agentrows.keepalives reads is passed on."""
    return {} if agentrows.keepalives(args) else {"keepalives": False}


class Commands(object):
    """Dispatch table of the control socket; `node` is the running ClusterNode."""

    def __init__(self, node):
        self.node = node
        self.cfg = node.cfg
        self.table = {
            "status": self.status,
            "nodes": self.nodes,
            "agents": self.agents,
            "files": self.files,
            "health": self.health,
            "push": self.push,
            "force": self.force,
            "scan": self.scan,
            "confirm_removals": self.confirm_removals,
            "ack_backups": self.ack_backups,
        }

    def handle(self, cmd, args):
        func = self.table.get(cmd)
        if func is None:
            raise RequestError("unknown command '%s'" % cmd, "unknown_command")
        return func(args)

    def peer_handlers(self):
        """What a client may ask the master on its session (cluster-wide views)."""
        def forwarded(func):
            def handler(session, args, data):
                self.check_acting()
                result = func(args if isinstance(args, dict) else {})
                if isinstance(result, localsock.WithData):
                    return result.result, result.data  # the agent rows, as bytes
                return result, b""
            return handler

        pages = agentpages.Listings(  # the listings the clients page through
            lambda args: self.node.link.stream("agents", _listing_args(args)),
            self.cfg.options.request_timeout)

        def agent_page(session, args, data):
            self.check_acting()
            return pages.page(session.peer_name, args if isinstance(args, dict) else {})

        return {"cluster_nodes": forwarded(self.master_nodes),
                "cluster_agents": forwarded(self.master_agents),
                agentpages.REQUEST: agent_page,
                "cluster_health": forwarded(self.master_health)}

    def check_acting(self):
        """RequestError unless this node answers for the cluster (a client asks it)."""
        if self.node.failover is not None and not self.answers_as_master():
            raise RequestError("node %s is not the acting master" % self.cfg.node_name,
                               "not_master")

    # -- helpers --------------------------------------------------------------------------------

    def master_session(self):
        dialer = self.node.dialer
        session = dialer.session if dialer is not None else None
        if self.node.failover is not None:   # the elected leader's session
            leader = self.node.failover.leader_name()
            session = self.node.registry.get(leader) if leader else None
        if session is None or session.closed:
            raise RequestError("the master is unreachable (no session with it)", "unreachable")
        return session

    def ask_master(self, cmd, args):
        """The master's answer, relayed as it is: cluster_control escapes what it prints (-j
        stays exact JSON); the session already escaped an error the master sent."""
        result, data = self.master_session().call("cluster_" + cmd, args,
                                                  timeout=self.cfg.options.request_timeout)
        if not isinstance(result, dict):
            raise RequestError("the master sent a malformed answer to '%s'" % cmd, "protocol")
        if data and result.get("rows_in_data"):
            return localsock.WithData(result, data)  # relayed to cluster_control as it is
        return result

    def cluster_wide(self, cmd, args, local):
        return local(args) if self.answers_as_master() else self.ask_master(cmd, args)

    def answers_as_master(self):
        """The configured master; with cluster.failover=1, the acting leader only."""
        failover = self.node.failover
        return self.cfg.is_master if failover is None else failover.is_acting()

    # -- commands -------------------------------------------------------------------------------

    def status(self, args):
        master = self.cfg.node_name if self.cfg.is_master else (
            self.node.dialer.master_name if self.node.dialer else None)
        if self.node.failover is not None:
            master = self.node.failover.leader_name()
        return {"cluster": self.cfg.name, "node": self.cfg.node_name,
                "type": self.cfg.node_type, "version": __version__,
                "python": compat.VERSION, "master": master,
                "peers": sorted(s.peer_name for s in self.sessions())}

    def sessions(self):
        if self.cfg.is_master or self.node.failover is not None:
            return self.node.registry.sessions()
        session = self.node.dialer.session if self.node.dialer else None
        return [session] if session is not None and not session.closed else []

    def nodes(self, args):
        return self.cluster_wide("nodes", args, self.master_nodes)

    def with_roles(self, result):
        """With failover on: each node row gains its role and term as this node sees them,
        and the answer says "failover": true. Unchanged with failover off."""
        status = self.node.failover_status()
        if not status.get("failover"):
            return result
        leader, term = status.get("leader"), status.get("term")
        for row in result["nodes"]:
            if row["name"] == leader:
                row["role"] = "master" if leader == status.get("preferred") else "acting master"
            elif row["name"] == self.cfg.node_name:
                row["role"] = status.get("role")
            else:
                row["role"] = "client"
            known = row["name"] in (leader, self.cfg.node_name)
            row["term"] = term if known else None
        return dict(result, failover=True)

    def master_nodes(self, args):
        wanted = _names(args, "names")
        rows = [{"name": self.cfg.node_name, "type": "master", "status": "connected",
                 "address": self.cfg.own_address, "version": __version__,
                 "last_keepalive": time.time(), "connected_since": None}]
        live = {}
        for info in self.node.registry.snapshot():
            live[info["name"]] = {"name": info["name"], "type": info["role"],
                                  "status": "connected", "address": info["address"],
                                  "version": info["version"],
                                  "last_keepalive": info["last_keepalive"],
                                  "connected_since": info["connected_since"]}
        for peer in self.node.link.call("peers")["peers"]:
            name = peer.get("node") or peer.get("name")
            if name and name not in live and name != self.cfg.node_name:
                live[name] = {"name": name, "type": peer.get("role"), "status": "disconnected",
                              "address": peer.get("address"), "version": peer.get("version"),
                              "last_keepalive": peer.get("last_seen"), "connected_since": None}
        rows.extend(live[name] for name in sorted(live))
        if wanted is not None:
            unknown = sorted(set(wanted) - set(r["name"] for r in rows))
            if unknown:
                raise RequestError("unknown node '%s'" % unknown[0], "unknown_node")
            rows = [r for r in rows if r["name"] in wanted]
        return self.with_roles({"nodes": rows})

    def agents(self, args):
        if self.answers_as_master():
            return self.streamed_agents(args)
        # The master's pages, relayed as they come (agentpages); an older master's one message.
        paged = agentpages.fetch(self.master_session(), _listing_args(args),
                                 self.cfg.options.request_timeout)
        return paged if paged is not None else self.ask_master("agents", args)

    def streamed_agents(self, args):
        """This node's listing for cluster_control: the internal daemon's chunks, relayed as
        they arrive (agentrows; the control server closes them)."""
        result, chunks = self.node.link.stream("agents", _listing_args(args))
        return localsock.Chunked(result, chunks)

    def master_agents(self, args):
        """The listing as one message (a client asks; -i counts): the chunks joined. The
        rows stay bytes here (agentrows): relayed, never parsed, by this daemon."""
        result, chunks = self.node.link.stream("agents", _listing_args(args))
        count = result.get("count") if isinstance(result, dict) else None
        return localsock.WithData(agentrows.result(count), agentrows.joined(chunks))

    def files(self, args):
        nodes = _names(args, "nodes")
        files = _names(args, "files")
        rows = self.node.link.call("states", {"node": None, "files": files})["rows"]
        if nodes is not None:
            known = set(r[0] for r in rows) | set(s.peer_name for s in self.sessions())
            unknown = sorted(set(nodes) - known)
            if unknown:
                raise RequestError("unknown node '%s'" % unknown[0], "unknown_node")
            rows = [r for r in rows if r[0] in nodes]
        return {"files": [{"node": r[0], "file": r[1], "status": r[2]} for r in rows]}

    def health(self, args):
        result = self.cluster_wide("health", args, self.master_health)
        held = self.node.inbox.held_summary()
        if held:
            if not isinstance(result.get("held"), list):
                result["held"] = []
            result["held"].append(dict(held, node=self.cfg.node_name))
        result.update(self.failover_views())
        return result

    def failover_views(self):
        """What -i adds about failover, from this node: its election status (failover on)
        and its unacknowledged backups of local edits (failover on, or any left)."""
        status = self.node.failover_status()
        backups = self.node.inbox.edits.listing()
        views = {"failover": status} if status.get("failover") else {}
        if self.cfg.options.failover or backups["backups"]:
            views.update(backups)
        return views

    def master_health(self, args):
        sync = self.node.sync.status()
        counts = {}
        for node, _name, state in self.node.link.call("states", {"node": None})["rows"]:
            entry = counts.setdefault(node, {"pending": 0, "failed": 0, "invalid": 0,
                                             "synchronized": 0})
            if state in entry:
                entry[state] += 1
        agents = {}
        listing = self.master_agents({"keepalives": False})  # counted, never shown
        for row in agentrows.decode(listing.result, listing.data):
            node = row[agentrows.COLUMNS.index("node_name")]
            agents[node] = agents.get(node, 0) + 1
        del listing
        rows = []
        for node in self.master_nodes({})["nodes"]:
            name = node["name"]
            entry = {"node": name, "type": node["type"], "connected": node["status"] ==
                     "connected", "agents": agents.get(name, 0)}
            entry.update(counts.get(name, {"pending": 0, "failed": 0, "invalid": 0,
                                           "synchronized": 0}))
            entry.update(sync.get(name, {"last_sync_ago": None, "last_sync_ok": None}))
            rows.append(entry)
        return {"nodes": rows, "held": []}

    def push(self, args):
        self.node.link.call("rescan")
        return {"scheduled": self.node.sync.push_now()}

    def force(self, args):
        names = _names(args, "nodes")
        if names is not None:
            known = set(s.peer_name for s in self.sessions())
            unknown = sorted(set(names) - known)
            if unknown:
                raise RequestError("node '%s' is not connected" % unknown[0], "unknown_node")
        return {"scheduled": self.node.sync.force(names)}

    def scan(self, args):
        return self.node.link.call("rescan")

    def confirm_removals(self, args):
        return self.node.inbox.confirm_removals()

    def ack_backups(self, args):
        return {"acknowledged": self.node.inbox.edits.acknowledge(_names(args, "paths"))}
