"""What the internal daemon serves (placeholder until catalog lands)."""
from __future__ import absolute_import, division, print_function

from wazuh_cluster import compat
from wazuh_cluster.errors import RequestError


class StatusService(object):
    def __init__(self, cfg, node_type):
        self.cfg = cfg
        self.node_type = node_type
        self.started = compat.monotonic()
        self.tick_interval = cfg.options.poll_interval

    def handle(self, cmd, args):
        if cmd != "status":
            raise RequestError("unknown command %r" % cmd, "unknown")
        return {"node_type": self.node_type, "uptime": compat.monotonic() - self.started}

    def tick(self, now):
        return None

    def close(self):
        pass


def build_service(cfg, layout, node_type):
    return StatusService(cfg, node_type)
