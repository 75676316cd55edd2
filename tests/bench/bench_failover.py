#!/usr/bin/env python
"""Master failover: how long a cluster is without a master, and what the full mesh costs idle.

    tests/bench/bench_failover.py [--trials 20] [--default-trials N] [--stop-trials N] [--idle 60]
        [--only WHAT] [--python PATH --pythonpath DIR] [--keepalive S --failover-timeout S]

1. Failover time (SPEC section 10, issue 14), three nodes on loopback, cluster.failover=1: the
   acting master's two daemons are killed with -9; the clock runs from the kill until a
   client.keys line added on the newly acting node (as soon as its log says it acts) is
   identical on every live node. The killed node is then restarted and caught up before the
   next trial. --stop-trials N: as many trials with default options where the acting master
   is stopped cleanly instead (ossec-control stop: it hands its role over). p50 and max over the trials, for two settings:
     default   keepalive 10 s, failover_timeout 0 (= 3 x keepalive = 30 s), poll/scan/push
               at their defaults;
     fast      cluster.keepalive=3, cluster.failover_timeout=6 (the documented fast setting).
   Both with cluster.failback=0, so that the node killed next is always the one acting (with
   failback the restarted preferred master would take the role back between trials).
   Target: max <= failover_timeout + 5 s.
2. Idle cost of the full mesh: five nodes, default options, started and settled, then the CPU
   seconds (utime+stime) of all ten daemons over --idle seconds, failover off then on, in the
   same run. Target: failover on costs <= +0.2 % of one core per node.

Prints the interpreter, the load average and every option used. As root it re-executes itself
in a mount namespace providing user ossec (tests/lab_harness.py); every daemon is stopped and
the work folder removed at the end, even on SIGTERM.
"""
from __future__ import absolute_import, division, print_function

import argparse
import os
import platform
import re
import signal
import sys
import time

import benchlib
from benchlib import load_average, now, percentile, proc_cpu
from lab_harness import LabError, create_cluster, lab_addresses, stop_nodes, wait_for

TAG = "bench_failover"
NS_MARK = "WAZUH_BENCH_FAILOVER_NS"
# The product's defaults where tests/lab_harness.py's FAST_OPTIONS differ.
DEFAULTS = {"cluster.poll_interval": "1", "cluster.scan_interval": "10",
            "cluster.keepalive": "10", "cluster.reconnect_max": "30",
            "cluster.push_delay": "0.05"}
SETTINGS = (
    ("default", dict(DEFAULTS, **{"cluster.failover": "1", "cluster.failback": "0"})),
    ("fast", dict(DEFAULTS, **{"cluster.failover": "1", "cluster.failback": "0",
                               "cluster.keepalive": "3", "cluster.failover_timeout": "6"})),
)
ACTING = re.compile(r"Failover: acting master in term (\d+)")
# Where a failover's time goes: the first line of each kind on any live node after the kill.
PHASES = (("lost", re.compile(r"Failover: no heartbeat from")),
          ("elected", re.compile(r"Failover: elected master for term")),
          ("acting", ACTING),
          ("master", re.compile(r"Failover: this node now synchronises as a master")),
          ("followed", re.compile(r"Failover: this node now synchronises as a client")))
SPLIT = re.compile(r"Failover: election round for term \d+ got")


class Phases(object):
    """Seconds from `started` to the first new line of each PHASES kind on any of `nodes`
    (polled: a line is seen up to one poll after it was written; the logs' stamps are whole
    seconds), and the failed election rounds (split votes) among them."""

    def __init__(self, nodes, started):
        self.nodes = nodes
        self.started = started
        self.offsets = dict((n.name, len(n.log())) for n in nodes)
        self.seen = {}
        self.failed_rounds = 0

    def poll(self):
        for node in self.nodes:
            log = node.log()
            new, self.offsets[node.name] = log[self.offsets[node.name]:], len(log)
            for line in new.splitlines():
                self.failed_rounds += bool(SPLIT.search(line))
                for name, regex in PHASES:
                    if name not in self.seen and regex.search(line):
                        self.seen[name] = now() - self.started

    def mark(self, name):
        self.seen.setdefault(name, now() - self.started)

    def describe(self):
        return " ".join("%s %.2f" % (name, self.seen[name]) for name in sorted(
            self.seen, key=self.seen.get)) + (" failed-rounds %d" % self.failed_rounds
                                              if self.failed_rounds else "")


def keys_of(node):
    try:
        with open(node.path("etc", "client.keys"), "rb") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def put_keys(node, data):
    benchlib.write_owned(node.path("etc", "client.keys"), data, mode=0o640)


def kill9(node):
    pids = node.all_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wait_for(lambda: not node.all_pids(), 20, what="the daemons of %s gone" % node.name)


def acting_counts(nodes):
    return dict((n.name, len(ACTING.findall(n.log()))) for n in nodes)


def acting_node(nodes):
    """The node whose log holds the highest 'acting master in term N'."""
    best = None
    for node in nodes:
        terms = [int(t) for t in ACTING.findall(node.log())]
        if terms and (best is None or max(terms) > best[0]):
            best = (max(terms), node)
    return best[1] if best else None


class Bench(object):
    def __init__(self, options, work):
        self.opt = options
        self.work = work
        self.nodes = []
        self.started = []
        self.cluster = 0
        self.failed_rounds = 0
        if options.pythonpath:
            # the daemons and install.sh's check inherit it (this process imported already)
            os.environ["PYTHONPATH"] = os.path.expanduser(options.pythonpath)

    # -- clusters -------------------------------------------------------------------------
    def new_cluster(self, n, options):
        self.cluster += 1
        base = os.path.join(self.work, "c%d" % self.cluster)
        addresses = lab_addresses(n)
        nodes = create_cluster(base, n, port=benchlib.free_port(addresses[0]),
                               python=self.opt.python, addresses=addresses, interval="10s",
                               options=options)
        self.nodes = nodes
        for node in nodes:
            node.start(60)
            self.started.append(node)
        return nodes

    def stop_all(self):
        live = [n for n in self.started if n.all_pids()]
        stop_nodes(live)
        self.started = []

    def release_disks(self):
        pass

    # -- 1. failover time -----------------------------------------------------------------
    def trials(self, name, options, count, take_down=kill9):
        nodes = self.new_cluster(3, options)
        timeout = float(options.get("cluster.failover_timeout") or 0) or \
            3 * float(options["cluster.keepalive"])
        bound = 4 * timeout + 60
        wait_for(lambda: acting_node(nodes), bound, what="a first acting master")
        wait_for(lambda: len(set(keys_of(n) for n in nodes)) == 1, bound,
                 what="identical client.keys")
        times = []
        self.failed_rounds = 0
        for trial in range(count):
            leader = acting_node(nodes)
            live = [n for n in nodes if n is not leader]
            seen = acting_counts(live)
            phases = Phases(live, now())
            started = phases.started
            take_down(leader)
            phases.mark("down")

            def new_acting():
                phases.poll()
                return [n for n in live if len(ACTING.findall(n.log())) > seen[n.name]]
            new = wait_for(new_acting, bound, 0.05, what="a new acting master")[0]
            elected = now() - started
            data = keys_of(new) + (u"%03d bench%d any %s\n" % (
                500 + trial, trial, "b" * 64)).encode("ascii")
            put_keys(new, data)
            phases.mark("written")

            def spread():
                phases.poll()
                return all(keys_of(n) == data for n in live)
            wait_for(spread, bound, 0.05, what="trial %d: the change on every live node" % trial)
            times.append(now() - started)
            self.failed_rounds += phases.failed_rounds
            print("  %-8s trial %2d: %6.2f s (%s acting after %.2f s; load %s)\n      %s" % (
                name, trial + 1, times[-1], new.name, elected, load_average(),
                phases.describe()))
            leader.start(60)
            wait_for(lambda: keys_of(leader) == data, bound, 0.1,
                     what="trial %d: %s caught up" % (trial, leader.name))
        self.stop_all()
        times.sort()
        print("%-8s failover time over %d trials: p50 %.2f s, max %.2f s (failover_timeout "
              "%.1f s, target max <= %.1f s; %d failed election rounds; nodes' Python %s; "
              "load %s)" % (name, len(times), percentile(times, 0.5), times[-1], timeout,
                            timeout + 5, self.failed_rounds, self.opt.python or sys.executable,
                            load_average()))
        return times

    # -- 2. idle cost ---------------------------------------------------------------------
    def idle(self, failover):
        options = dict(DEFAULTS, **{"cluster.failover": "1" if failover else "0"})
        nodes = self.new_cluster(5, options)
        if failover:
            wait_for(lambda: acting_node(nodes), 120, what="an acting master")
        time.sleep(self.opt.settle)
        pids = [p for n in nodes for p in n.all_pids()]
        before = [proc_cpu(p) for p in pids]
        load_before = load_average()
        start = now()
        time.sleep(self.opt.idle)
        elapsed = now() - start
        used = sum(proc_cpu(p) for p in pids) - sum(before)
        self.stop_all()
        per_node = 100.0 * used / elapsed / len(nodes)
        print("idle, 5 nodes, failover %s: %.2f CPU s over %.1f s = %.3f %% of a core per "
              "node (load %s)" % ("on " if failover else "off", used, elapsed, per_node,
                                  load_before))
        return per_node

    def run(self):
        only = self.opt.only
        if only in ("all", "time"):
            for name, options in SETTINGS:
                if name == "fast":
                    options = dict(options)
                    options["cluster.keepalive"] = self.opt.keepalive or "3"
                    options["cluster.failover_timeout"] = self.opt.failover_timeout or "6"
                count = self.opt.default_trials if name == "default" else self.opt.trials
                if count:
                    print("%s: %s" % (name, " ".join("%s=%s" % kv
                                                     for kv in sorted(options.items()))))
                    self.trials(name, options, count)
            if self.opt.stop_trials:
                options = SETTINGS[0][1]
                print("stopped (ossec-control stop, a planned restart): %s" % " ".join(
                    "%s=%s" % kv for kv in sorted(options.items())))
                self.trials("stopped", options, self.opt.stop_trials, lambda node: node.stop())
        if only in ("all", "idle"):
            print("idle: %s, over %d s after %d s settling" % (
                " ".join("%s=%s" % kv for kv in sorted(DEFAULTS.items())), self.opt.idle,
                self.opt.settle))
            off = self.idle(False)
            on = self.idle(True)
            print("idle cost of failover (full mesh): %+.3f %% of a core per node "
                  "(target <= +0.2 %%)" % (on - off))
        print("load average at the end: %s" % load_average())


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of the fast setting")
    parser.add_argument("--default-trials", type=int, default=None,
                        help="trials with default options (default: --trials)")
    parser.add_argument("--stop-trials", type=int, default=0,
                        help="trials with default options where the acting master is stopped "
                        "cleanly (ossec-control stop) instead of killed")
    parser.add_argument("--idle", type=int, default=60, help="idle window, seconds")
    parser.add_argument("--settle", type=int, default=15, help="seconds before the window")
    parser.add_argument("--only", choices=("all", "time", "idle"), default="all")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--disk", default="shared")
    parser.add_argument("--python", default=None,
                        help="the nodes' interpreter (default: this one), e.g. "
                        "/root/.pyenv/versions/2.7.18/bin/python")
    parser.add_argument("--pythonpath", default=None,
                        help="PYTHONPATH giving --python its cryptography (e.g. "
                        "~/.cache/wazuh-cluster-tests/py2.7, tests/run's cache)")
    parser.add_argument("--keepalive", default=None,
                        help="the fast setting's cluster.keepalive (default 3)")
    parser.add_argument("--failover-timeout", default=None,
                        help="the fast setting's cluster.failover_timeout (default 6)")
    options = parser.parse_args(argv)
    if options.default_trials is None:
        options.default_trials = options.trials
    return options


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)

    def banner(bench):
        return "bench_failover: Python %s (%s), %d CPU(s), load %s" % (
            platform.python_version(), sys.executable, os.cpu_count() if hasattr(
                os, "cpu_count") else 0, load_average())
    try:
        return benchlib.bench_main(TAG, __file__, argv, options, NS_MARK, Bench, banner)
    except LabError as err:
        sys.stderr.write("%s: %s\n" % (TAG, err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
