"""wazuh-clusterd's control socket (queue/ossec/cluster_control) for cluster_control.

Length-prefixed JSON as in localsock; commands come from a dispatcher object with
handle(cmd, args). Only root, our own user and members of our group may talk to it.
"""
from __future__ import absolute_import, division, print_function

import os
import socket
import struct
import threading

from wazuh_cluster import compat, localsock, logs, memtrim, quietserve
from wazuh_cluster.errors import ClusterError, ProtocolError, RequestError

UCRED = struct.Struct("3i")


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a UNIX socket (Linux SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", 17)
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, UCRED.size))


class _Handler(compat.socketserver.BaseRequestHandler):
    def handle(self):
        self.server.serve_client(self.request)


class ControlServer(compat.socketserver.ThreadingUnixStreamServer, quietserve.QuietServe):
    """Serves cluster_control, one thread per connection."""
    daemon_threads = True

    def __init__(self, path, commands):
        compat.socketserver.ThreadingUnixStreamServer.__init__(self, path, _Handler,
                                                               bind_and_activate=False)
        self.path = path
        self.commands = commands
        self.log = logs.get("control")
        self.thread = None

    def server_bind(self):
        self.socket.close()
        self.socket = localsock.bind_unix(self.path, 0o660, gid=os.getegid())

    def server_activate(self):
        pass  # bind_unix listens already

    def start(self):
        try:
            self.server_bind()
        except (ClusterError, socket.error, OSError) as err:
            self.log.error("Control socket %s unavailable: %s", self.path, err)
            return
        self.new_waker()
        self.thread = threading.Thread(target=self.serve_quietly, name="control")
        self.thread.daemon = True
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.stop_serving(self.thread, 5.0)
            self.server_close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def verify_request(self, request, client_address):
        _, uid, gid = peer_credentials(request)
        allowed = uid in (0, os.geteuid()) or gid == os.getegid()
        if not allowed:
            self.log.warning("Control socket: refused a client with uid %d.", uid)
        return allowed

    def handle_error(self, request, client_address):
        self.log.exception("Control socket client failed")

    def serve_client(self, sock):
        sock.settimeout(300)
        conn = localsock.Client(self.path)
        conn.sock = sock
        while True:
            try:
                request = conn.receive()
            except (socket.error, ProtocolError, ValueError):
                return
            reply = self.answer(request)
            result = reply.get("result")
            try:
                if isinstance(result, localsock.WithData):
                    # Raw bytes after the reply (localsock): relayed without being parsed.
                    reply["result"], reply["data"] = result.result, len(result.data)
                    sock.sendall(localsock.encode(reply))
                    sock.sendall(localsock.HEADER.pack(len(result.data)))
                    sock.sendall(result.data)
                    reply = result = None
                    # 8 MB of agent rows relayed: the C heap gives them back (no lasting growth).
                    memtrim.release_free_memory()
                elif isinstance(result, localsock.Chunked):
                    self.relay(sock, reply, result)
                else:
                    sock.sendall(localsock.encode(reply))
            except socket.error:
                return

    def relay(self, sock, reply, answer):
        """Send a streamed answer chunk by chunk as its source gives them (socket.error when
        cluster_control is gone). A source failing midway ends the stream with its error
        (localsock.error_frames), which cluster_control reports."""
        reply["result"], reply["chunks"] = answer.result, True
        try:
            sock.sendall(localsock.encode(reply))
            for chunk in answer.chunks:
                sock.sendall(localsock.chunk_frame(chunk))
        except (RequestError, ProtocolError) as err:
            self.log.warning("Control socket: a streamed answer was cut short: %s", err)
            sock.sendall(localsock.error_frames(err.code, err.message))
            return
        finally:
            close = getattr(answer.chunks, "close", None)
            if close is not None:
                close()  # the source's connection (internal_link.stream)
        sock.sendall(localsock.END_OF_CHUNKS)

    def answer(self, request):
        request_id = request.get("id")
        cmd, args = request.get("cmd"), request.get("args") or {}
        if not isinstance(cmd, compat.string_types) or not isinstance(args, dict):
            return localsock.error_reply(request_id, "protocol", "bad request")
        try:
            return {"id": request_id, "ok": True, "result": self.commands.handle(cmd, args)}
        except RequestError as err:
            return localsock.error_reply(request_id, err.code, err.message)
        except ClusterError as err:
            return localsock.error_reply(request_id, err.code, err.message)
