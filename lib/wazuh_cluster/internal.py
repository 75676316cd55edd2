"""wazuh-clusterd-internal: one select() loop over its UNIX socket, a poll timer and a self-pipe.

It is the only writer of the cluster database; the commands themselves live in the service it
is handed (catalog.Catalog), so the loop only moves messages and time. The same socket answers
Wazuh 3.0's text commands (legacy_db.LegacyCommands, told apart by the first byte: see
localsock); a text client's next command is read only once its last reply has left, so a client
that does not read its replies costs one reply of memory and no more.
"""
from __future__ import absolute_import, division, print_function

import argparse
import errno
import os
import select
import signal
import socket
import sys

from wazuh_cluster import __version__, catalog, compat, daemon, db, legacy_db, localsock, logs
from wazuh_cluster import memtrim
from wazuh_cluster.errors import ClusterError, ProtocolError, RequestError

DAEMON = "wazuh-clusterd-internal"
# After an answer at least this large is sent, free C heap memory goes back to the system.
TRIM_AFTER_BYTES = 1 << 20


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=DAEMON, description="Wazuh cluster internal daemon.")
    daemon.add_common_arguments(parser)
    parser.add_argument("-t", dest="node_type", choices=("master", "client"),
                        help="node type (as Wazuh 3.0: -tmaster or -tclient)")
    return parser.parse_args(argv)


class InternalLoop(object):
    """accept, read requests, tick the service, push events, handle signals."""

    def __init__(self, listener, service, signals, clock=compat.monotonic, parent=None,
                 legacy=None):
        self.listener = listener
        self.service = service
        self.legacy = legacy
        self.signals = signals
        self.clock = clock
        self.parent = parent
        self.connections = []
        self.large = set()  # connections sending an answer of TRIM_AFTER_BYTES or more
        self.running = True
        self.log = logs.get("internal")
        if hasattr(service, "announce"):
            service.announce = self.broadcast   # look_hot in the middle of a pass

    def run(self):
        while self.running:
            self.tick(self.clock())
            self.wait(self.service.timeout(self.clock()))
            if self.parent is not None and os.getppid() != self.parent:
                self.log.info("wazuh-clusterd is gone; stopping.")
                self.running = False

    def wait(self, timeout):
        readers = [self.listener, self.signals] + [
            c for c in self.connections if not c.closing and not (c.text and c.outbuf)]
        writers = [c for c in self.connections if c.outbuf]
        try:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        except (select.error, OSError) as err:
            if err.args[0] == errno.EINTR:
                return
            raise
        for conn in writable:
            if len(conn.outbuf) >= TRIM_AFTER_BYTES:
                self.large.add(conn)
            conn.flush()
            if conn in self.large and not conn.outbuf:
                # A large answer went out (agent rows, a manifest): the C heap gives its
                # memory back now, not at the next large answer (no lasting growth).
                self.large.discard(conn)
                memtrim.release_free_memory()
        for obj in readable:
            if obj is self.listener:
                self.accept()
            elif obj is self.signals:
                self.handle_signals(self.signals.drain())
            else:
                self.read_requests(obj)
        self.reap()

    def accept(self):
        try:
            sock, _ = self.listener.accept()
        except socket.error as err:
            if err.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return
            self.log.warning("accept on the internal socket failed: %s", err)
            return
        text_start = legacy_db.is_text_start if self.legacy is not None else None
        self.connections.append(localsock.Connection(sock, text_start=text_start))

    def read_requests(self, conn):
        try:
            messages = conn.read_messages()
        except ProtocolError as err:
            if conn.text:
                conn.send_raw(legacy_db.EMPTY)
            else:
                conn.send(localsock.error_reply(None, "protocol", str(err)))
            conn.closing = True
            self.log.debug("internal socket client: %s", err)
            return
        if conn.text:
            for command in messages:
                reply, event = self.legacy.answer(command)
                conn.send_raw(reply)
                if event:
                    self.broadcast(event)
            return
        for body in messages:
            reply = self.answer(body, conn)
            result = reply.get("result")
            if isinstance(result, localsock.WithData):
                # The raw bytes follow the reply as a frame of their own (localsock).
                reply["result"] = result.result
                reply["data"] = len(result.data)
                conn.send(reply, result.data)
            elif isinstance(result, localsock.Chunked):
                self.stream(conn, reply, result)
            else:
                conn.send(reply)
            self.look_hot(self.clock())

    def stream(self, conn, reply, answer):
        """Send a streamed answer (localsock.Chunked): each chunk is made, queued and sent as
        far as the socket takes it before the next, so the reader works meanwhile and the
        output buffer holds what it has not read yet, not the whole answer."""
        reply["result"], reply["chunks"] = answer.result, True
        conn.send(reply)
        for chunk in answer.chunks:
            conn.send_chunk(chunk)
        conn.send_chunk(b"")
        if conn.outbuf:
            self.large.add(conn)  # the C heap gives memory back once it has left (wait)
        else:
            memtrim.release_free_memory()

    def answer(self, body, conn):
        """The reply to one request; its "result" may be a localsock.WithData."""
        try:
            request = localsock.decode(body, localsock.MAX_REQUEST_COST)
        except ProtocolError as err:
            return localsock.error_reply(None, "protocol", str(err))
        request_id = request.get("id")
        cmd = request.get("cmd")
        args = request.get("args") or {}
        if not isinstance(args, dict) or not isinstance(cmd, compat.string_types):
            return localsock.error_reply(request_id, "protocol", "'cmd' must be a string and "
                                         "'args' an object")
        if cmd == "subscribe":
            conn.subscribed = True
            return {"id": request_id, "ok": True, "result": {"subscribed": True}}
        try:
            result = self.service.handle(cmd, args)
        except RequestError as err:
            return localsock.error_reply(request_id, err.code, err.message)
        return {"id": request_id, "ok": True, "result": result}

    def tick(self, now):
        self.look_hot(now)
        event = self.service.tick(now)
        if event:
            self.broadcast(event)

    def look_hot(self, now):
        """Announce a changed client.keys now, between requests and before a tick's work
        (catalog.Catalog.look_hot): not after the requests queued and the tick's hash."""
        look = getattr(self.service, "look_hot", None)
        event = look(now) if look is not None else None
        if event:
            self.broadcast(event)

    def broadcast(self, event):
        """Push an event to every subscriber (wazuh-clusterd)."""
        for conn in self.connections:
            if conn.subscribed:
                conn.send(event)

    def reap(self):
        alive = []
        for conn in self.connections:
            if conn.closed or (conn.closing and not conn.outbuf):
                conn.close()
            elif len(conn.outbuf) > localsock.MAX_REPLY:
                # A subscriber that never reads must not grow our memory without bound.
                self.log.warning("dropping a local client that does not read its replies")
                conn.close()
            else:
                alive.append(conn)
        self.connections = alive
        self.large.intersection_update(alive)

    def handle_signals(self, received):
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("Received signal %d; stopping.", signum)
                self.running = False
            elif signum == signal.SIGHUP:
                self.service.handle("rescan", {})

    def close(self):
        for conn in self.connections:
            conn.close()
        self.connections = []


def main(argv=None, script=None):
    """Entry point of bin/wazuh-clusterd-internal; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    status, cfg, layout = daemon.begin(DAEMON, args, script)
    if status is not None:
        return status
    node_type = args.node_type or cfg.node_type
    log = logs.setup(DAEMON, layout.ossec_log, max(args.debug, cfg.options.log_level),
                     args.foreground and sys.stderr.isatty())
    try:
        created = daemon.ensure_dirs(layout.daemon_dirs())
        daemon.drop_privileges(created + [layout.ossec_log])
        return run(cfg, layout, node_type, args, log)
    except (ClusterError, OSError, IOError) as err:
        return daemon.failed(DAEMON, log, err)


def build_catalog(cfg, layout, node_type, database, log):
    """The scanner and the database behind the socket commands."""
    return catalog.Catalog(layout.home, cfg.items, cfg.exclude, database, log, role=node_type,
                           node_name=cfg.node_name, poll_interval=cfg.options.poll_interval,
                           scan_interval=cfg.options.scan_interval,
                           foreign_scan_interval=max(cfg.options.scan_interval,
                                                     cfg.options.received_scan_interval))


def run(cfg, layout, node_type, args, log):
    parent = os.getppid()
    ready = daemon.Readiness()
    if not args.foreground:
        ready.daemonize()
        parent = None
    pid_file = None
    listener = None
    service = database = None
    try:
        try:
            listener = localsock.bind_unix(layout.internal_socket)
            database = db.ClusterDB(layout.db_file, log)
            service = build_catalog(cfg, layout, node_type, database, log)
            pid_file = daemon.write_pid_file(layout.pid_file(DAEMON, os.getpid()))
        except (ClusterError, OSError, IOError) as err:
            return daemon.start_failed(DAEMON, log, ready, err)
        signals = daemon.SelfPipe()
        signals.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        log.info("Starting %s %s (Python %s) for a %s node.", DAEMON, __version__,
                 compat.VERSION, node_type)
        legacy = legacy_db.LegacyCommands(
            database, legacy_db.NodeAddresses(cfg.nodes, database), service, log)
        loop = InternalLoop(listener, service, signals, parent=parent, legacy=legacy)
        ready.ready()
        daemon.settle_gc()
        try:
            loop.run()
        finally:
            loop.close()
    finally:
        if listener is not None:
            listener.close()
            daemon.remove_file(layout.internal_socket)
        if database is not None:
            database.close()
        if pid_file:
            daemon.remove_file(pid_file)
    log.info("%s stopped.", DAEMON)
    return 0
