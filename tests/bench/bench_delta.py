"""Deltas of a big client.keys (issue 11 item 1): run by hand, never by pytest.

    python tests/bench/bench_delta.py [--clients 3] [--agents 100000] [--appends 10]
        [--disk shared|own] [--keep]

One master and --clients clients on loopback addresses; the master's client.keys holds
--agents agents (~94 bytes a line). Two runs of the same nodes, same machine, same minute:
"whole" (cluster.delta_min_bytes=0 on every node: whole files, as before deltas) and "delta"
(the defaults). In each, after the clients converged, one agent is appended --appends times,
each time waiting until every client holds the master's file. Printed per run: the bytes the
master's sessions sent per append (TCP bytes_sent of its accepted sockets, from `ss -ti`),
the latency append -> identical on every client (p50, max), with the load average and the
interpreter. Every wait is bounded; every daemon it started is stopped.
"""
from __future__ import absolute_import, division, print_function

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time

import benchlib  # noqa: I100 - sets sys.path for what follows
import lab_harness  # noqa: E402
from benchlib import (client_keys_line, free_port, load_average, median, now,  # noqa: E402
                      write_owned)
from lab_harness import LabNode, wait_for  # noqa: E402

NS_MARK = "WAZUH_CLUSTER_BENCH_DELTA_NS"
SYNC_TIMEOUT = 600.0
APPEND_TIMEOUT = 120.0
_SENT = re.compile(r"bytes_sent:(\d+)")


def sha_of(path):
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except (IOError, OSError):
        return None


class DeltaBench(benchlib.BenchNodes):
    def __init__(self, options, work):
        self.opt = options
        self.work = work
        self.nodes = []
        self.started = []
        self.disks = []
        self.next_agent = options.agents

    def setup(self):
        opt = self.opt
        base_net = 100 + os.getpid() % 100
        self.addresses = ["127.%d.7.%d" % (base_net, k + 2) for k in range(opt.clients + 1)]
        port = free_port(self.addresses[0])
        self.key = lab_harness.new_key()
        for k, address in enumerate(self.addresses):
            name = "master" if k == 0 else "client%02d" % k
            node = LabNode(os.path.join(self.node_disk(name), name), name,
                           "master" if k == 0 else "client", address, port)
            lab_harness.install_node(node.prefix, sys.executable,
                                     self.nodes[1].prefix if k > 1 else None)
            self.nodes.append(node)
        keys = "".join(client_keys_line(i) for i in range(opt.agents)).encode("ascii")
        write_owned(self.keys_path(self.nodes[0]), keys, 0o640)
        print("client.keys of %d agents (%.1f MB), %d clients."
              % (opt.agents, len(keys) / 1e6, opt.clients))

    def keys_path(self, node):
        return node.path("etc", "client.keys")

    def master_sent(self):
        """Bytes sent so far by the master's accepted sessions (TCP, all clients)."""
        master = self.nodes[0]
        out = subprocess.check_output(["ss", "-tinH", "state", "established", "(", "sport",
                                       "=", ":%d" % master.port, ")"])
        return sum(int(n) for n in _SENT.findall(out.decode("ascii", "replace")))

    def converged(self):
        want = sha_of(self.keys_path(self.nodes[0]))
        return all(sha_of(self.keys_path(c)) == want for c in self.nodes[1:])

    def one_run(self, label, options):
        for node in self.nodes:
            lab_harness.configure(node, self.key, self.addresses, "10m", options)
        self.start(self.nodes)
        try:
            wait_for(self.converged, SYNC_TIMEOUT, 0.2, what="clients converged (%s)" % label)
            time.sleep(2.0)  # the first rounds' answers and states settle
            latencies, sent = [], []
            for _ in range(self.opt.appends):
                before = self.master_sent()
                line = client_keys_line(self.next_agent).encode("ascii")
                self.next_agent += 1
                start = now()
                with open(self.keys_path(self.nodes[0]), "ab") as handle:
                    handle.write(line)
                wait_for(self.converged, APPEND_TIMEOUT, 0.01, what="append reached (%s)"
                         % label)
                latencies.append(now() - start)
                time.sleep(0.5)  # the answers' bytes are counted too
                sent.append(self.master_sent() - before)
                time.sleep(0.5)
        finally:
            for node in reversed(self.nodes):
                node.stop()
            self.started = []
        print("%-6s bytes sent by the master per append: median %9d (%d clients)  "
              "latency p50 %.3f s, max %.3f s  [load %s]"
              % (label, median(sent), self.opt.clients, median(latencies), max(latencies),
                 load_average()))
        return median(sent), median(latencies)

    def run(self):
        self.setup()
        whole = self.one_run("whole", {"cluster.delta_min_bytes": "0"})
        delta = self.one_run("delta", {})
        print("delta / whole: bytes %.5f, latency %.2f" % (delta[0] / float(max(1, whole[0])),
                                                           delta[1] / whole[1]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--agents", type=int, default=100000)
    parser.add_argument("--appends", type=int, default=10)
    parser.add_argument("--disk", choices=("shared", "own"), default="shared")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    return benchlib.bench_main(
        "bench_delta", __file__, argv, options, NS_MARK, DeltaBench,
        lambda bench: "bench_delta: Python %s, load average %s"
        % (sys.version.split()[0], load_average()))


if __name__ == "__main__":
    sys.exit(main())
