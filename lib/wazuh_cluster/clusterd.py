"""wazuh-clusterd: configuration, the cluster port, sessions, the internal daemon's supervisor."""
from __future__ import absolute_import, division, print_function

import argparse
import errno
import os
import select
import signal
import socket
import sys

from wazuh_cluster import (__version__, compat, config, daemon, failover, logs, metapack,
                           peers, protocol)
from wazuh_cluster import budget as budgets
from wazuh_cluster.commands import Commands
from wazuh_cluster.control_server import ControlServer
from wazuh_cluster.errors import ClusterError
from wazuh_cluster.failover_roles import RoleSwitch
from wazuh_cluster.inbox import Inbox
from wazuh_cluster.internal_link import InternalLink, Subscription
from wazuh_cluster.supervisor import InternalSupervisor
from wazuh_cluster.sync import SyncManager

DAEMON = "wazuh-clusterd"
INTERNAL_START_WAIT = 10.0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=DAEMON, description="Wazuh cluster daemon.")
    daemon.add_common_arguments(parser)
    parser.add_argument("-t", dest="test", action="store_true",
                        help="test the configuration and exit")
    return parser.parse_args(argv)


def internal_script(script):
    """wazuh-clusterd-internal sits next to the real wazuh-clusterd script."""
    return os.path.join(os.path.dirname(os.path.realpath(script)), "wazuh-clusterd-internal")


def main(argv=None, script=None):
    """Entry point of bin/wazuh-clusterd; returns the exit status."""
    daemon.limit_malloc_arenas()  # before any thread (see there)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    status, cfg, layout = daemon.begin(DAEMON, args, script)
    if status is None and args.test:
        for line in config.warnings(cfg):
            sys.stderr.write("%s: WARNING: %s\n" % (DAEMON, line))
    if status is not None or args.test:
        return status or 0
    created = daemon.ensure_dirs(layout.daemon_dirs())
    log = logs.setup(DAEMON, layout.cluster_log, max(args.debug, cfg.options.log_level),
                     args.foreground)
    if cfg.disabled:
        log.info("Cluster disabled. Exiting.")
        return 0
    try:
        daemon.drop_privileges(created + [layout.cluster_log])
        return run(cfg, layout, args, script or sys.argv[0], log)
    except ClusterError as err:
        return daemon.failed(DAEMON, log, err)


def run(cfg, layout, args, script, log):
    # Bound before the fork, so that a busy port is what the starting command reports.
    node = ClusterNode(cfg, layout, script, max(args.debug, cfg.options.log_level))
    ready = daemon.Readiness()
    if not args.foreground:
        ready.daemonize()
    try:
        pid_file = daemon.write_pid_file(layout.pid_file(DAEMON, os.getpid()))
    except (OSError, IOError) as err:
        return daemon.start_failed(DAEMON, log, ready,
                                   ClusterError("cannot write its PID file: %s" % err))
    try:
        log.info("Starting %s %s (Python %s) as %s node '%s' of cluster '%s' on %s:%d.",
                 DAEMON, __version__, compat.VERSION, cfg.node_type, cfg.node_name, cfg.name,
                 cfg.bind_addr, cfg.port)
        try:
            node.start()
        except ClusterError as err:
            # One line, known cause (the internal daemon cannot start). Logged before the
            # starting command hears of it, which returns at once and may read the log.
            return daemon.start_failed(DAEMON, log, ready, err)
        except Exception as err:
            # After the fork stderr is /dev/null: the log and the starting command must say why.
            log.exception("Cannot start: %s", err)
            ready.failed("%s: ERROR: cannot start: %s" % (DAEMON, err))
            raise
        ready.ready()
        daemon.settle_gc()
        node.loop()
    finally:
        node.stop()
        daemon.remove_file(pid_file)
        log.info("%s stopped.", DAEMON)
    return 0


def peer_settings(cfg):
    options = cfg.options
    return peers.make_settings(
        node_name=cfg.node_name, cluster_name=cfg.name, key=cfg.key, role=cfg.node_type,
        bind_addr=cfg.bind_addr, port=cfg.port, nodes=cfg.nodes,
        own_addresses=(cfg.own_address,), keepalive=options.keepalive,
        handshake_timeout=options.handshake_timeout, max_frame_bytes=options.max_frame_bytes,
        allow_unlisted_peers=options.allow_unlisted_peers,
        max_connections=options.max_connections,
        max_pending_handshakes=options.max_pending_handshakes,
        max_connections_per_address=options.max_connections_per_address,
        max_pending_per_address=options.max_pending_per_address,
        legacy_node_requests=options.legacy_node_requests, version=__version__,
        reconnect_max=options.reconnect_max,
        max_client_message_bytes=options.max_client_message_bytes,
        features=(("delta",) if options.delta_min_bytes else ()) + (metapack.FEATURE,))


class ClusterNode(object):
    """The running daemon: the cluster port, the master link (clients), the synchronisation,
    the control socket, and a loop that watches signals and the internal daemon."""

    def __init__(self, cfg, layout, script, debug):
        self.cfg = cfg
        self.layout = layout
        self.log = logs.get()
        self.stopping = compat.Event()
        self.link = InternalLink(layout.internal_socket, cfg.options.request_timeout)
        self.sync = SyncManager(cfg, layout, self.link)
        self.inbox = Inbox(cfg, layout, self.link)
        self.settings = peer_settings(cfg)
        dispatcher = {}  # filled below, before any session can start
        self.registry = peers.NodeRegistry()
        # one budget for everything every peer sends and we send (see budget.py), the
        # compression cache included
        self.budget = budgets.for_daemon(cfg.options.max_inflight_bytes)
        protocol.bound_compression_cache(self.budget.cache)
        # cluster.failover=1: the election (failover.py), a full mesh of sessions
        self.failover = failover.Failover(cfg, os.path.dirname(layout.db_file), peers.resolve) \
            if cfg.options.failover else None
        self.sync.failover = self.inbox.failover = self.failover
        if self.failover is not None:
            self.sync.pushed = self.inbox.edits.pushed
        try:
            self.server = peers.PeerServer(self.settings, dispatcher, self.registry,
                                           on_session=self.sync.session_started,
                                           on_close=self.sync.session_ended,
                                           budget=self.budget, failover=self.failover)
        except socket.error as err:
            raise ClusterError("cannot listen on %s:%d: %s"
                               % (cfg.bind_addr, cfg.port, err.args[-1]))
        self.dialer = None
        self.mesh = []
        if self.failover is not None:
            self.mesh = peers.mesh_dialers(self.settings, self.failover, self.registry,
                                           dispatcher=dispatcher,
                                           on_session=self.sync.session_started,
                                           on_close=self.sync.session_ended, budget=self.budget)
        elif not cfg.is_master:
            self.dialer = peers.Dialer(self.settings, dispatcher,
                                       on_session=self.sync.session_started,
                                       on_close=self.sync.session_ended, budget=self.budget)
        commands = Commands(self)
        dispatcher.update(self.inbox.handlers())
        dispatcher.update(commands.peer_handlers())
        self.control = ControlServer(layout.control_socket, commands)
        self.events = Subscription(layout.internal_socket, self.sync.on_event,
                                   self.on_internal_reconnect, self.stopping)
        self.signals = daemon.SelfPipe()
        # SIGCHLD only wakes the loop, which then reaps and restarts the internal daemon.
        self.signals.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD))
        self.internal = InternalSupervisor(internal_script(script), layout.home, cfg.node_type,
                                           layout.ossec_log, debug,
                                           cfg.options.internal_restart_max)
        self.roles = None
        if self.failover is not None:
            self.roles = RoleSwitch(self.failover, cfg.node_name, cfg.node_type, self.link,
                                    self.internal, self.inbox, self.sync)
        self.running = False

    def failover_status(self):
        """For cluster_control -n / -i / -j: {"failover": False} when failover is off, else
        the provider's status() (role, term, leader, preferred, lease_remaining, failovers,
        last) with "failover": True."""
        if self.failover is None:
            return {"failover": False}
        return dict(self.failover.status(), failover=True)

    def on_internal_reconnect(self):
        if self.roles is not None:
            self.roles.reapply()
        self.sync.on_reconnect()

    def start(self):
        self.running = True
        # Sessions need the catalog: do not accept peers before it answers. One that cannot
        # start at all is a ClusterError (we exit non-zero); one that is only slow is waited
        # for a while, then each request retries and the supervisor restarts it if it dies.
        if not self.internal.start_checked(lambda: self.link.wait_ready(0, self.stopping),
                                           INTERNAL_START_WAIT, self.stopping):
            self.log.warning("wazuh-clusterd-internal does not answer yet; starting anyway.")
        self.inbox.start()
        self.control.start()
        if self.failover is not None:
            self.roles.start()
            self.failover.start()
        self.server.start()
        self.events.start()
        if self.dialer is not None:
            self.dialer.start()
        for dialer in self.mesh:
            dialer.start()

    def loop(self):
        while self.running:
            timeout = self.internal.check()
            try:
                readable = select.select([self.signals], [], [], timeout)[0]
            except (select.error, OSError) as err:
                if err.args[0] == errno.EINTR:
                    continue
                raise
            if readable:
                self.handle_signals(self.signals.drain())

    def handle_signals(self, received):
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("Received signal %d; stopping.", signum)
                self.running = False
            elif signum == signal.SIGHUP:
                self.log.info("Received SIGHUP; restart the daemon to apply a new configuration.")

    def stop(self):
        """Stop promptly: ossec-control does not wait, and nothing may be left half-written."""
        self.running = False
        self.stopping.set()
        if self.failover is not None:
            self.failover.abdicate()   # while the sessions are up: a planned stop is quick
        self.events.stop()
        if self.dialer is not None:
            self.dialer.stop()
        for dialer in self.mesh:
            dialer.stop()
        if self.failover is not None:
            self.failover.stop()
            self.roles.stop()
        self.server.stop()
        self.sync.stop()
        self.control.stop()
        self.inbox.stop()
        self.internal.stop()
        self.link.close()
