"""wazuh-clusterd: configuration, the cluster port, sessions, the internal daemon's supervisor."""
from __future__ import absolute_import, division, print_function

import argparse
import os
import select
import signal
import socket
import sys

from wazuh_cluster import __version__, compat, config, daemon, logs, paths
from wazuh_cluster.errors import ClusterError, ConfigError
from wazuh_cluster.supervisor import InternalSupervisor

DAEMON = "wazuh-clusterd"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=DAEMON, description="Wazuh cluster daemon.")
    daemon.add_common_arguments(parser)
    parser.add_argument("-t", dest="test", action="store_true",
                        help="test the configuration and exit")
    return parser.parse_args(argv)


def check_config(home, out=sys.stderr):
    """Load the configuration; on problems print one line each and return None."""
    try:
        return config.load(paths.Paths(home))
    except ConfigError as err:
        for problem in err.problems:
            out.write("%s: ERROR: %s\n" % (DAEMON, problem))
        return None


def bind_listener(cfg):
    """Bind bind_addr:port now, so that a busy port is reported by the starting command."""
    family = socket.AF_INET6 if ":" in cfg.bind_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    compat.set_cloexec(sock.fileno())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.bind_addr, cfg.port))
        sock.listen(128)
    except socket.error as err:
        sock.close()
        raise ClusterError("cannot listen on %s:%d: %s"
                           % (cfg.bind_addr, cfg.port, err.args[-1]))
    return sock


def internal_script(script):
    """wazuh-clusterd-internal sits next to the real wazuh-clusterd script."""
    return os.path.join(os.path.dirname(os.path.realpath(script)), "wazuh-clusterd-internal")


def main(argv=None, script=None):
    """Entry point of bin/wazuh-clusterd; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print("%s %s (Python %s)" % (DAEMON, __version__, compat.VERSION))
        return 0
    home = paths.find_home(args.home, script or sys.argv[0])
    layout = paths.Paths(home)
    cfg = check_config(home)
    if cfg is None:
        return 1
    if args.test:
        return 0
    created = daemon.ensure_dirs(layout.daemon_dirs())
    log = logs.setup(DAEMON, layout.cluster_log, args.debug, args.foreground)
    if cfg.disabled:
        log.info("Cluster disabled. Exiting.")
        return 0
    try:
        daemon.drop_privileges(created + [layout.cluster_log])
        return run(cfg, layout, args, script or sys.argv[0], log)
    except ClusterError as err:
        log.error("%s", err)
        sys.stderr.write("%s: ERROR: %s\n" % (DAEMON, err))
        return 1


def run(cfg, layout, args, script, log):
    listener = bind_listener(cfg)
    ready = daemon.Readiness()
    if not args.foreground:
        ready.daemonize()
    try:
        node = ClusterNode(cfg, layout, listener, script, args.debug)
        pid_file = daemon.write_pid_file(layout.pid_file(DAEMON, os.getpid()))
    except (ClusterError, OSError, IOError) as err:
        ready.failed("%s: ERROR: %s" % (DAEMON, err))
        raise
    try:
        log.info("Starting %s %s (Python %s) as %s node '%s' of cluster '%s' on %s:%d.",
                 DAEMON, __version__, compat.VERSION, cfg.node_type, cfg.node_name, cfg.name,
                 cfg.bind_addr, cfg.port)
        node.start()
        ready.ready()
        node.loop()
    finally:
        node.stop()
        daemon.remove_file(pid_file)
        log.info("%s stopped.", DAEMON)
    return 0


class ClusterNode(object):
    """The running daemon: its loop watches signals and the internal daemon."""

    def __init__(self, cfg, layout, listener, script, debug):
        self.cfg = cfg
        self.layout = layout
        self.listener = listener
        self.log = logs.get()
        self.signals = daemon.SelfPipe()
        self.signals.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self.internal = InternalSupervisor(internal_script(script), layout.home, cfg.node_type,
                                           layout.ossec_log, debug,
                                           cfg.options.internal_restart_max)
        self.running = False

    def start(self):
        self.running = True
        self.internal.start()

    def loop(self):
        while self.running:
            timeout = self.internal.check()
            try:
                readable = select.select([self.signals], [], [], timeout)[0]
            except select.error as err:
                if err.args[0] == 4:  # EINTR on 2.7; the self-pipe carries the signal
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
        self.running = False
        self.internal.stop()
        try:
            self.listener.close()
        except socket.error:
            pass
