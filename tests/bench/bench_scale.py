"""Scale benchmark (SPEC section 8, "Scale"; issue 11): run by hand, never by pytest.

    python tests/bench/bench_scale.py [--clients 10] [--agents 100000] [--shared 10000]
        [--groups 100] [--agent-info 10000] [--churn gentle|real] [--duration 120]
        [--interval 2m] [--master-python PATH] [--only sync,churn,idle,control] [--keep]
    (2.7 master: --master-python /root/.pyenv/versions/2.7.18/bin/python
     --master-pythonpath ~/.cache/wazuh-cluster-tests/py2.7, tests/run's cache)

The plan. One master and --clients clients on one host, each its own installation on its own
loopback address (127.N.9.K) and, with --disk own (the default, as root), its own fresh
journaled ext4 (benchlib.BenchNodes.node_disk says why); default internal options and
<interval> --interval, as an operator would run them. The master holds --shared files in
--groups group folders and a client.keys of --agents agents (~94 bytes a line); each client
holds the agent-info files of --agent-info agents of its own. The daemons run under the
interpreter running this script, the master's under --master-python (it may be 2.7 while the
clients are 3.x). Phases (--only picks some; "control" alone with --clients 0 is cheap: one
master whose agent-info files are written in place, as its clients would have sent them):

  sync     clients started at once -> every client holds the shared tree and client.keys,
           the master every agent-info file: time, master daemons' peak RSS (VmHWM); then,
           BASELINE_SETTLE s later, every daemon's RSS (the baseline of the memory bound);
  churn    --duration seconds of: every second, --churn of the agent-info files touched on
           every client (gentle: 1 %/s; real: every file every 10 s, as agents keep alive)
           and one agent appended to the master's client.keys. Figures: append -> identical
           on every client (p50/p99), a keepalive (touch on a client) -> the master's mtime
           (p50/p99, sampled), master CPU, peak RSS of every daemon (VmHWM reset at the start,
           as root); also the touches a second achieved (a starved toucher asks for less
           than the profile) and the CPU of each master daemon, of the clients and of this
           script, with the load average;
  idle     master CPU of both daemons averaged over a whole interval after the churn, then
           over --after seconds once every agent-info file of every client was touched at
           once (every agent keeping alive) and all reached the master;
  control  `cluster_control -a` on the master (--reps times): wall time and the internal
           daemon's RSS growth after it (RSS a few seconds later minus before); then on the
           first client: wall time, and the RSS growth of its clusterd and the master's.

Measurement only: --no-appends or --no-touches leaves that activity out of the churn, so that
the master's CPU of the other is the difference (README, Performance: the activity split).

Every figure is printed next to its target (issue 11's table), with the load average (the
machine is shared) and the interpreters. Every wait is bounded; the run stops by itself,
stops every daemon it started and removes its folder (unless --keep).
"""
from __future__ import absolute_import, division, print_function

import argparse
import os
import random
import subprocess
import sys
import time

import benchlib  # noqa: I100 - sets sys.path for what follows
import lab_harness  # noqa: E402
from benchlib import (DAEMON, INTERNAL, agent_info_data, agent_name,  # noqa: E402
                      client_keys_line, free_port, make_dir, now, percentile, proc_cpu,
                      proc_mem, reset_peak, write_owned)
from lab_harness import LabNode, wait_for  # noqa: E402
from wazuh_cluster import compat  # noqa: E402
from wazuh_cluster.pathrules import MTIME_SLACK_NS  # noqa: E402

NS_MARK = "WAZUH_CLUSTER_BENCH_SCALE_NS"
SYNC_TIMEOUT = 1800.0     # a first sync of the full size takes minutes; never forever
DRAIN_TIMEOUT = 120.0     # after the churn, how long pending observations may still arrive
BASELINE_SETTLE = 10      # seconds after the first sync before the daemons' idle RSS
POLL = 0.05               # the observer's cadence (it shares the CPUs with the daemons)
SAMPLES_PER_SECOND = 6    # keepalives followed to the master, per churn second
CHURN = {"gentle": 0.01, "real": 0.1}  # fraction of each client's agent-info touched a second
SHARED_BLOB = (b"<agent_config>\n  <localfile>\n    <location>/var/log/messages</location>\n"
               b"    <log_format>syslog</log_format>\n  </localfile>\n</agent_config>\n") * 12
PHASES = ("sync", "churn", "idle", "control")


def seconds(text):
    """<interval> text (e.g. "2m", "90s", "120") -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def interpreter_version(python):
    return subprocess.check_output([python, "-c", "import sys; print(sys.version.split()[0])"]
                                   ).decode("ascii").strip()


class Figures(object):
    """The issue's table: rows of (figure, value, unit, target); printed as they come."""

    def __init__(self):
        self.rows = []

    def add(self, what, value, unit, target, note=""):
        ok = value <= target
        self.rows.append((what, value, unit, target, ok))
        print("   %-58s %9.3f %-3s target <= %-7g %s%s" % (what, value, unit, target,
                                                          "ok" if ok else "MISSED", note))

    def summary(self, header):
        print("\n" + header)
        for what, value, unit, target, ok in self.rows:
            print("   %-58s %9.3f %-3s <= %-7g %s" % (what, value, unit, target,
                                                    "ok" if ok else "MISSED"))


class ScaleBench(benchlib.BenchNodes):
    """The nodes, the generated trees and the phases (see the module docstring)."""

    def __init__(self, options, work):
        self.opt = options
        self.work = work
        self.python = os.path.realpath(sys.executable)
        self.master_python = os.path.realpath(options.master_python or sys.executable)
        self.rng = random.Random(options.seed)
        self.nodes = []
        self.started = []
        self.disks = []
        self.figures = Figures()
        self.next_agent = options.agents   # the next agent appended to client.keys
        self.homes = {}                    # client name -> [agent numbers reporting there]
        self.interval = seconds(options.interval)

    # -- setup --------------------------------------------------------------------------------

    @property
    def master(self):
        return self.nodes[0]

    @property
    def clients(self):
        return self.nodes[1:]

    def setup(self):
        opt = self.opt
        count = opt.clients + 1
        base_net = 100 + os.getpid() % 100
        addresses = ["127.%d.9.%d" % (base_net, k + 2) for k in range(count)]
        port = free_port(addresses[0])
        key = lab_harness.new_key()
        inodes = max(benchlib.DISK_INODES, 2 * (opt.shared + opt.agents) + 20000)
        for k in range(count):
            name = "master" if k == 0 else "client%02d" % k
            node = LabNode(os.path.join(self.node_disk(name, inodes), name), name,
                           "master" if k == 0 else "client", addresses[k], port)
            # The master may run another interpreter: install.sh for it, then one for the
            # clients, copied for the others.
            template = self.nodes[1].prefix if k > 1 else None
            env = None
            if k == 0 and opt.master_pythonpath:
                env = dict(os.environ, PYTHONPATH=opt.master_pythonpath)
            lab_harness.install_node(node.prefix, self.master_python if k == 0 else self.python,
                                     template, env)
            internal = dict(opt.option)
            if opt.debug:
                internal["cluster.log_level"] = "1"
            lab_harness.configure(node, key, addresses, opt.interval, internal)
            self.nodes.append(node)
        self.write_master()
        for k, client in enumerate(self.clients):
            first = k * opt.agent_info
            self.homes[client.name] = list(range(first, min(opt.agents, first + opt.agent_info)))
            self.write_agent_info(client, self.homes[client.name], client.name)
        if not self.clients:
            # No clients: the master holds every agent-info file, as its clients sent them.
            self.write_agent_info(self.master, range(opt.agents), None)

    def write_master(self):
        opt = self.opt
        shared = self.master.path("etc", "shared")
        old = int(time.time()) - 3600
        per_group = max(1, -(-opt.shared // max(1, opt.groups)))
        for i in range(opt.shared):
            group = os.path.join(shared, "group%03d" % (i // per_group))
            if i % per_group == 0:
                make_dir(group)
            data = SHARED_BLOB[:1500 + i % 400] + ("<!-- %06d -->\n" % i).encode("ascii")
            write_owned(os.path.join(group, "file%05d.conf" % i), data, mtime=old)
        keys = "".join(client_keys_line(i) for i in range(opt.agents)).encode("ascii")
        write_owned(self.master.path("etc", "client.keys"), keys, 0o640, mtime=old)
        print("Master: %d shared files in %d groups; client.keys of %d agents (%.1f MB)."
              % (opt.shared, opt.groups, opt.agents, len(keys) / 1e6))

    def write_agent_info(self, node, numbers, reporter):
        """Agent-info files of agents `numbers` on `node`, written by manager `reporter`
        (None: spread over ten client names, as a master holding every client's files)."""
        folder = node.path("queue", "agent-info")
        stamp = int(time.time()) - 60
        for i in numbers:
            write_owned(os.path.join(folder, agent_name(i)),
                        agent_info_data(i, reporter or "client%02d" % (i % 10 + 1)),
                        owner="ossec", mtime=stamp)

    def record_reporters(self):
        """What wazuh-clusterd records when a client's agent-info arrives (agent_nodes), for a
        master whose files were written in place (--clients 0)."""
        rows = [[agent_name(i), "client%02d" % (i % 10 + 1)] for i in range(self.opt.agents)]
        for start in range(0, len(rows), 5000):
            self.internal(self.master, "agent_nodes", {"rows": rows[start:start + 5000]})

    def wait_scanned(self, node, files):
        def scanned():
            try:
                status = self.internal(node, "status")
            except Exception:  # noqa: BLE001 - the daemon may still be starting
                return False
            return status.get("files", 0) >= files and status.get("last_scan")
        wait_for(scanned, SYNC_TIMEOUT, 0.5, what="the first scan of %s" % node.name)

    def master_pids(self):
        return [self.pid(self.master, DAEMON), self.pid(self.master, INTERNAL)]

    def client_pids(self):
        return [self.pid(c, d) for c in self.clients for d in (DAEMON, INTERNAL)]

    # -- sync -----------------------------------------------------------------------------------

    def phase_sync(self):
        opt = self.opt
        pids = self.master_pids()
        for pid in pids:
            reset_peak(pid)
        start = now()
        self.start(self.clients, parallel=True)
        keys = self.master.path("etc", "client.keys")
        want_info = sum(len(v) for v in self.homes.values())

        def synced():
            size = os.path.getsize(keys)
            for client in self.clients:
                if not os.path.exists(client.path("etc", "client.keys")) or \
                        os.path.getsize(client.path("etc", "client.keys")) != size:
                    return False
                if count_files(client.path("etc", "shared")) < opt.shared:
                    return False
            return len(os.listdir(self.master.path("queue", "agent-info"))) >= want_info
        wait_for(synced, SYNC_TIMEOUT, 0.5, what="the first sync of %d clients" % opt.clients)
        elapsed = now() - start
        mem = [proc_mem(p) for p in pids]
        print("\nsync: %d clients started at once; shared tree and client.keys on every client, "
              "%d agent-info files on the master in %.1f s" % (opt.clients, want_info, elapsed))
        self.figures.add("master wazuh-clusterd peak RSS, first sync", mem[0][1], "MB", 100)
        self.figures.add("master internal peak RSS, first sync", mem[1][1], "MB", 100)
        self.print_baseline()

    def print_baseline(self):
        """Each daemon's RSS a while after the first sync: the baseline that the memory
        budget's worst case adds to (README, Performance: the bound)."""
        time.sleep(BASELINE_SETTLE)
        master = [proc_mem(p)[0] for p in self.master_pids()]
        clients = [proc_mem(p)[0] for p in self.client_pids()]
        print("   idle RSS %d s after the first sync: master clusterd %.1f MB, internal %.1f MB;"
              " clients' clusterd %.1f-%.1f MB, internal %.1f-%.1f MB; load average %s"
              % (BASELINE_SETTLE, master[0], master[1], min(clients[0::2]), max(clients[0::2]),
                 min(clients[1::2]), max(clients[1::2]), benchlib.load_average()))

    # -- churn ----------------------------------------------------------------------------------

    def phase_churn(self):
        opt = self.opt
        master_pids, client_pids = self.master_pids(), self.client_pids()
        for pid in master_pids + client_pids:
            reset_peak(pid)
        fraction = CHURN[opt.churn]
        keys = self.master.path("etc", "client.keys")
        appends = []     # [started, size after, line, {clients still waiting}, {client: s}]
        samples = []     # [started, master path, wanted mtime_ns]
        keys_lat, alive_lat = [], []
        timeline = []    # (started, {client: seconds to arrive}) of every append arrived
        cpu0 = [proc_cpu(p) for p in master_pids]
        clients_cpu0 = [proc_cpu(p) for p in client_pids]
        own0, load0 = sum(os.times()[:2]), benchlib.load_average()
        toucher = Toucher(self.clients, self.homes, fraction)
        start = now()
        end = start + opt.duration
        next_second = start
        print("\nchurn: %s (%g %% of every client's agent-info files a second), one agent "
              "appended to client.keys a second, %d s%s" % (
                  opt.churn, fraction * 100, opt.duration,
                  "".join(" (measurement: no %s)" % what for what, off in (
                      ("appends", opt.no_appends), ("touches", opt.no_touches)) if off)))
        while True:
            stamp = now()
            if stamp >= next_second and stamp < end:
                toucher.late(stamp - next_second)
                next_second += 1.0
                if not opt.no_appends:
                    appends.append(self.append_agent(keys))
                if not opt.no_touches:
                    samples.extend(self.keepalives(toucher))
            self.observe_appends(appends, keys_lat, timeline)
            self.observe_keepalives(samples, alive_lat)
            if stamp >= end and not appends and not samples:
                break
            if stamp >= end + DRAIN_TIMEOUT:
                break
            time.sleep(POLL)
        spent = [proc_cpu(p) - c for p, c in zip(master_pids, cpu0)]
        churn_cpu = sum(spent) / opt.duration
        if opt.timeline:
            self.print_timeline(start, timeline)
        missed_keys, missed_alive = len(appends), len(samples)
        print("   %d appends, %d touches (%d followed to the master); not arrived within %d s "
              "after the churn: %d appends, %d keepalives"
              % (int(opt.duration), toucher.touched, len(alive_lat) + missed_alive,
                 DRAIN_TIMEOUT, missed_keys, missed_alive))
        print("   " + toucher.report(start))
        clients_cpu = sum(proc_cpu(p) for p in client_pids) - sum(clients_cpu0)
        print("   CPU over the churn and its drain (%.0f s), %% of a core per churn second: "
              "master clusterd %.1f, master internal %.1f, all clients' daemons %.1f (%.1f "
              "per client), this benchmark %.1f; load average %s -> %s"
              % (now() - start, spent[0] / opt.duration * 100, spent[1] / opt.duration * 100,
                 clients_cpu / opt.duration * 100,
                 clients_cpu / opt.duration * 100 / max(1, len(self.clients)),
                 (sum(os.times()[:2]) - own0) / opt.duration * 100, load0,
                 benchlib.load_average()))
        for kind, values, missed, targets in (
                ("client.keys append -> all clients", keys_lat, missed_keys, (1.0, 2.0)),
                ("keepalive on a client -> master mtime", alive_lat, missed_alive,
                 (None, 15.0))):
            values = values + [float("inf")] * missed
            for label, fraction_, target in (("p50", 0.5, targets[0]), ("p99", 0.99,
                                                                         targets[1])):
                value = percentile(values, fraction_)
                if target is None:
                    print("   %-58s %9.3f s" % ("%s %s" % (kind, label), value))
                else:
                    self.figures.add("%s %s" % (kind, label), value, "s", target)
        self.figures.add("master both daemons CPU under churn", churn_cpu * 100, "%", 25)
        mem = [proc_mem(p) for p in master_pids]
        self.figures.add("master wazuh-clusterd peak RSS, churn", mem[0][1], "MB", 100)
        self.figures.add("master internal peak RSS, churn", mem[1][1], "MB", 100)
        if client_pids:
            peak = max(proc_mem(p)[1] for p in client_pids)
            self.figures.add("clients' peak RSS (highest daemon), churn", peak, "MB", 100)

    def append_agent(self, keys):
        line = client_keys_line(self.next_agent).encode("ascii")
        self.next_agent += 1
        with open(keys, "ab") as handle:
            handle.write(line)
        return [now(), os.path.getsize(keys), line, set(c.name for c in self.clients), {}]

    def keepalives(self, toucher):
        """Touch the next share of every client's agent-info files; a few samples."""
        toucher.touch()
        samples = []
        picks = self.rng.sample(self.clients, min(SAMPLES_PER_SECOND, len(self.clients)))
        for client in picks:
            path = toucher.last(client.name)  # the last one touched
            if path is None:
                continue
            st = os.stat(path)
            samples.append([now(), self.master.path("queue", "agent-info",
                                                    os.path.basename(path)),
                            compat.stat_mtime_ns(st)])
        return samples

    def observe_appends(self, appends, latencies, timeline):
        for entry in list(appends):
            started, size, line, waiting, arrived = entry
            for client in self.clients:
                if client.name in waiting and \
                        holds_line(client.path("etc", "client.keys"), size, line):
                    waiting.discard(client.name)
                    arrived[client.name] = now() - started
            if not waiting:
                latencies.append(now() - started)
                timeline.append((started, arrived))
                appends.remove(entry)

    @staticmethod
    def print_timeline(start, timeline):
        """Every append: when it was made (s into the churn), when the last client had it,
        and the clients later than half of that (a slow client, or a slow master)."""
        print("   append timeline (made at, last client after, the slow ones):")
        for started, arrived in sorted(timeline, key=lambda t: t[0]):
            worst = max(arrived.values())
            slow = sorted((s, c) for c, s in arrived.items() if s >= worst / 2.0)
            print("     %7.2f  %6.2f s  %s" % (started - start, worst, " ".join(
                "%s=%.2f" % (c, s) for s, c in slow) if worst >= 1.0 else ""))

    def observe_keepalives(self, samples, latencies):
        for entry in list(samples):
            started, path, wanted = entry
            try:
                mtime = compat.stat_mtime_ns(os.stat(path))
            except OSError:
                continue
            # Newer keepalives win: a later touch of the same file also counts as arrived.
            if mtime >= wanted - MTIME_SLACK_NS:
                latencies.append(now() - started)
                samples.remove(entry)

    # -- idle -----------------------------------------------------------------------------------

    def phase_idle(self):
        opt = self.opt
        pids = self.master_pids()
        time.sleep(opt.settle)
        window = opt.idle or self.interval
        others = self.client_pids()
        cpu0 = [proc_cpu(p) for p in pids]
        others0 = [proc_cpu(p) for p in others]
        load0 = benchlib.load_average()
        time.sleep(window)
        spent = [proc_cpu(p) - c for p, c in zip(pids, cpu0)]
        used = sum(spent) / window * 100
        limit = 2.0 if self.master_version.startswith("2.") else 1.0
        print("\nidle: master, after the churn and %d s of settling; CPU over the window: "
              "clusterd %.2f s, internal %.2f s; load average %s -> %s"
              % (opt.settle, spent[0], spent[1], load0, benchlib.load_average()))
        if others:
            # Per client, both daemons (client_pids lists them in pairs).
            per = [(proc_cpu(a) - a0 + proc_cpu(b) - b0) / window * 100 for a, a0, b, b0 in
                   zip(others[::2], others0[::2], others[1::2], others0[1::2])]
            print("   clients idle, both daemons: mean %.2f %%, highest %.2f %% of a core"
                  % (sum(per) / len(per), max(per)))
        self.figures.add("master idle CPU, both daemons, over %.0f s" % window, used, "%", limit)
        if not self.clients:
            return
        # Every agent keeps alive at once: each client's agent-info files touched.
        wanted = {}
        cpu0 = [proc_cpu(p) for p in pids]
        start = now()
        for client in self.clients:
            folder = client.path("queue", "agent-info")
            for i in self.homes[client.name]:
                path = os.path.join(folder, agent_name(i))
                os.utime(path, None)
                wanted[agent_name(i)] = compat.stat_mtime_ns(os.stat(path))
        folder = self.master.path("queue", "agent-info")

        def arrived():
            for name in list(wanted):
                try:
                    if compat.stat_mtime_ns(os.stat(os.path.join(folder, name))) >= \
                            wanted[name] - MTIME_SLACK_NS:
                        del wanted[name]
                except OSError:
                    pass
            return not wanted
        wait_for(arrived, SYNC_TIMEOUT, 0.5, what="every keepalive on the master")
        arrived_after = now() - start
        wave_cpu = sum(proc_cpu(p) - c for p, c in zip(pids, cpu0))
        cpu0 = [proc_cpu(p) for p in pids]
        print("   every agent-info file on the master: the next %.0f s measured" % opt.after)
        sys.stdout.flush()   # a profiler of that window may start on this line
        time.sleep(opt.after)
        spent = [proc_cpu(p) - c for p, c in zip(pids, cpu0)]
        used = sum(spent) / opt.after * 100
        print("   every agent-info file touched: all on the master after %.1f s (master CPU "
              "%.2f s); then over %.0f s: clusterd %.2f s, internal %.2f s"
              % (arrived_after, wave_cpu, opt.after, spent[0], spent[1]))
        self.figures.add("master CPU, both daemons, %.0f s after every keepalive" % opt.after,
                         used, "%", 1.0)

    # -- control --------------------------------------------------------------------------------

    def phase_control(self):
        """cluster_control -a, --reps times: wall time, and the CPU it took each process (the
        machine is shared: wall time alone says as much about the neighbours)."""
        opt = self.opt
        pids = self.master_pids()
        time.sleep(2)
        before = proc_mem(pids[1])[0]
        before_clusterd = proc_mem(pids[0])[0]
        times, cpu = [], [0.0, 0.0, 0.0]
        for _ in range(opt.reps):
            cpu0 = [proc_cpu(p) for p in pids] + [children_cpu()]
            start = now()
            result = self.master.cluster_control("-a")
            times.append(now() - start)
            if result.rc != 0:
                raise RuntimeError("cluster_control -a failed: %s" % result.err.strip())
            spent = [proc_cpu(p) for p in pids] + [children_cpu()]
            cpu = [c + b - a for c, a, b in zip(cpu, cpu0, spent)]
            rows = len(result.out.splitlines()) - 1
        time.sleep(3)
        after = proc_mem(pids[1])
        after_clusterd = proc_mem(pids[0])
        print("\ncontrol: cluster_control -a on the master, %d agents listed, %d times: %s s; "
              "CPU per run: cluster_control %.2f s, clusterd %.2f s, internal %.2f s"
              % (rows, opt.reps, " ".join("%.2f" % t for t in times), cpu[2] / opt.reps,
                 cpu[0] / opt.reps, cpu[1] / opt.reps))
        if rows < opt.agents:
            print("   warning: %d agents expected" % opt.agents)
        self.figures.add("cluster_control -a at %d agents (median)" % rows,
                         percentile(times, 0.5), "s", 1.0)
        self.figures.add("internal daemon RSS growth after it (peak %.0f MB)" % after[1],
                         after[0] - before, "MB", 5.0)
        self.figures.add("wazuh-clusterd RSS growth after it (peak %.0f MB)" % after_clusterd[1],
                         after_clusterd[0] - before_clusterd, "MB", 5.0)
        if self.clients:  # a client asks the master (in pages) and relays the rows
            client_clusterd = self.pid(self.clients[0], DAEMON)
            before = [proc_mem(client_clusterd)[0], proc_mem(pids[0])[0]]
            times, cpu = [], [0.0] * 4
            watched = [client_clusterd] + pids
            for _ in range(opt.reps):
                cpu0 = [proc_cpu(p) for p in watched] + [children_cpu()]
                start = now()
                result = self.clients[0].cluster_control("-a")
                times.append(now() - start)
                if result.rc != 0:
                    raise RuntimeError("cluster_control -a failed on %s: %s"
                                       % (self.clients[0].name, result.err.strip()))
                spent = [proc_cpu(p) for p in watched] + [children_cpu()]
                cpu = [c + b - a for c, a, b in zip(cpu, cpu0, spent)]
            print("   on %s: %d agents listed: %s s; CPU per run: cluster_control %.2f s, "
                  "its clusterd %.2f s, the master's clusterd %.2f s and internal %.2f s" % (
                      self.clients[0].name, len(result.out.splitlines()) - 1,
                      " ".join("%.2f" % t for t in times), cpu[3] / opt.reps, cpu[0] / opt.reps,
                      cpu[1] / opt.reps, cpu[2] / opt.reps))
            self.figures.add("cluster_control -a on a client (median)", percentile(times, 0.5),
                             "s", 1.0)
            time.sleep(3)
            after = [proc_mem(client_clusterd), proc_mem(pids[0])]
            self.figures.add("the client's wazuh-clusterd RSS growth after it (peak %.0f MB)"
                             % after[0][1], after[0][0] - before[0], "MB", 5.0)
            self.figures.add("master wazuh-clusterd RSS growth after it (peak %.0f MB)"
                             % after[1][1], after[1][0] - before[1], "MB", 5.0)

    # -- driver ---------------------------------------------------------------------------------

    def run(self):
        opt = self.opt
        phases = [p for p in PHASES if p in opt.only.split(",")]
        self.master_version = interpreter_version(self.master_python)
        start = now()
        self.setup()
        print("Set up %d nodes in %.0f s; load average %s" % (len(self.nodes), now() - start,
                                                               benchlib.load_average()))
        self.start([self.master])
        self.wait_scanned(self.master, opt.shared + 1 + (0 if self.clients else opt.agents))
        if not self.clients:
            self.record_reporters()
        if self.clients:
            self.phase_sync()  # the other phases need converged clients
        if "churn" in phases and self.clients:
            self.phase_churn()
        if "idle" in phases:
            self.phase_idle()
        if "control" in phases:
            self.phase_control()
        self.figures.summary(
            "summary: %d clients, %d agents, %d shared files, %d agent-info per client, churn "
            "%s, %d s; clients Python %s, master Python %s; load average now %s"
            % (opt.clients, opt.agents, opt.shared, opt.agent_info, opt.churn, opt.duration,
               compat.VERSION, self.master_version, benchlib.load_average()))


class Toucher(object):
    """The agents' keepalives: each second, the next `fraction` of every client's agent-info
    files touched (paths made once: at the real rate, 10 clients x 1 000 a second, the
    touching must not be what falls behind), with what it took, to print next to the
    figures: a late or slow toucher makes a lower rate than the one asked for."""

    def __init__(self, clients, homes, fraction):
        self.paths = {}
        self.count = {}
        for client in clients:
            folder = client.path("queue", "agent-info")
            self.paths[client.name] = [os.path.join(folder, agent_name(i))
                                       for i in homes[client.name]]
            self.count[client.name] = max(1, int(round(fraction * len(homes[client.name]))))
        self.offsets = dict((name, 0) for name in self.paths)
        self.touched = 0
        self.busy = 0.0       # seconds spent touching
        self.worst_late = 0.0  # the latest a second's touches started after their second
        self.stop = None

    def late(self, seconds):
        self.worst_late = max(self.worst_late, seconds)

    def touch(self):
        started = now()
        utime = os.utime
        for name, paths in self.paths.items():
            if not paths:
                continue
            offset, count = self.offsets[name], self.count[name]
            for k in range(offset, offset + count):
                utime(paths[k % len(paths)], None)
            self.offsets[name] = (offset + count) % len(paths)
            self.touched += count
        self.stop = now()
        self.busy += self.stop - started

    def last(self, name):
        paths = self.paths[name]
        return paths[(self.offsets[name] - 1) % len(paths)] if paths else None

    def report(self, start):
        asked = sum(self.count.values())
        took = (self.stop or start) + 1.0 - start  # through the end of the last second
        return ("toucher: %d touches in %.1f s = %.0f a second (asked: %d a second); touching "
                "took %.2f s in all, a second's touches started at worst %.2f s late"
                % (self.touched, took, self.touched / max(took, 1e-9), asked, self.busy,
                   self.worst_late))


def children_cpu():
    """User + system seconds of our finished child processes (cluster_control)."""
    times = os.times()
    return times[2] + times[3]


def count_files(root):
    total = 0
    for _folder, _dirs, files in os.walk(root):
        total += len(files)
    return total


def holds_line(path, size, line):
    """The file is at least `size` bytes and holds `line` ending at `size` (an append)."""
    try:
        if os.path.getsize(path) < size:
            return False
        with open(path, "rb") as handle:
            handle.seek(size - len(line))
            return handle.read(len(line)) == line
    except (IOError, OSError):
        return False


def internal_option(text):
    """NAME=VALUE of --option, as a (name, value) pair."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected NAME=VALUE, got %r" % text)
    return name.strip(), value.strip()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--agents", type=int, default=100000, help="agents in client.keys")
    parser.add_argument("--shared", type=int, default=10000, help="shared files")
    parser.add_argument("--groups", type=int, default=100, help="group folders")
    parser.add_argument("--agent-info", type=int,
                        help="agent-info files per client (default: the agents shared out, "
                             "at most 10000)")
    parser.add_argument("--churn", choices=sorted(CHURN), default="gentle",
                        help="gentle: 1 %% of the agent-info files touched a second; real: "
                             "every one every 10 s")
    parser.add_argument("--duration", type=float, default=120.0, help="churn seconds")
    parser.add_argument("--interval", default="2m", help="<interval> of ossec.conf")
    parser.add_argument("--idle", type=float, default=0,
                        help="idle window, seconds (default: one interval)")
    parser.add_argument("--after", type=float, default=30.0,
                        help="window after every agent kept alive, seconds")
    parser.add_argument("--settle", type=float, default=15.0, help="pause before idle, s")
    parser.add_argument("--reps", type=int, default=3, help="cluster_control -a runs")
    parser.add_argument("--only", default=",".join(PHASES),
                        help="phases, comma-separated: %s" % ",".join(PHASES))
    parser.add_argument("--master-python", help="the master's interpreter (default: this one)")
    parser.add_argument("--master-pythonpath",
                        help="PYTHONPATH giving --master-python its cryptography (e.g. tests/"
                             "run's cache, ~/.cache/wazuh-cluster-tests/py2.7); install.sh "
                             "writes it into the master's entry points")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="parent folder of the installations (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the installations")
    parser.add_argument("--disk", choices=("own", "shared"), default="own",
                        help="own: each node on a fresh journaled ext4 of its own (a loop "
                             "device, as root); shared: all in --workdir")
    parser.add_argument("--debug", action="store_true", help="cluster.log_level=1 everywhere")
    parser.add_argument("--option", action="append", type=internal_option, default=[],
                        metavar="NAME=VALUE",
                        help="an internal option on every node (local_internal_options.conf), "
                             "e.g. cluster.max_inflight_bytes=25165824; repeatable")
    parser.add_argument("--no-appends", action="store_true",
                        help="measurement only: no agent appended during the churn (what the "
                             "appends cost is the difference; the append figures are then nan)")
    parser.add_argument("--no-touches", action="store_true",
                        help="measurement only: no agent-info touched during the churn")
    parser.add_argument("--timeline", action="store_true",
                        help="print when every append reached each client")
    options = parser.parse_args(argv)
    if options.clients < 0 or options.clients > 60 or options.duration <= 0:
        parser.error("--clients must be 0..60 and --duration positive")
    if options.agent_info is None:
        options.agent_info = min(10000, options.agents // max(1, options.clients))
    return options


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)

    def banner(bench):
        return ("bench_scale: clients Python %s (%s), master %s; %d CPU(s); load average %s; "
                "disks: %s" % (compat.VERSION, bench.python, bench.master_python,
                               os.sysconf("SC_NPROCESSORS_ONLN"), benchlib.load_average(),
                               "one fresh journaled ext4 per node" if options.disk == "own"
                               else "all in " + bench.work))
    return benchlib.bench_main("bench_scale", __file__, argv, options, NS_MARK, ScaleBench,
                               banner)


if __name__ == "__main__":
    sys.exit(main())
