"""Exception types shared by the package. A leaf: imports nothing from it."""
from __future__ import absolute_import, division, print_function


class ClusterError(Exception):
    """Base of our errors; `code` is a short stable word for the wire and for tests."""
    code = "error"

    def __init__(self, message, code=None):
        Exception.__init__(self, message)
        if code is not None:
            self.code = code

    @property
    def message(self):
        return self.args[0] if self.args else ""


class ConfigError(ClusterError):
    """The configuration is unusable; `problems` holds one line per problem."""
    code = "config"

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        ClusterError.__init__(self, "; ".join(self.problems))


class ProtocolError(ClusterError):
    """A peer broke the protocol: the session is closed and nothing is applied."""
    code = "protocol"


class HandshakeError(ProtocolError):
    """The handshake failed (wrong key, cluster name, role, node name, deadline)."""
    code = "handshake"


class PathRefused(ClusterError):
    """A file name from a peer failed the receiving rules (SPEC section 4)."""
    code = "invalid"


class TransferError(ClusterError):
    """A transfer could not be completed (disk full, checksum mismatch, I/O error)."""
    code = "failed"


class RequestError(ClusterError):
    """A request over a socket or session failed; `code` comes from the other side."""
    code = "request"
