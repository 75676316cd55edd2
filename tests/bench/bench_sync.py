"""Benchmark of synchronisation between real daemons (SPEC section 8): run by hand, never by pytest.

    python tests/bench/bench_sync.py [--files 10000] [--groups 300] [--changes 100]
                                     [--agents 50000] [--reps 3] [--only abcd] [--keep]
                                     [--patch MODULE.NAME=VALUE ...]
    (2.7: PYTHONPATH=/tmp/t27 /root/.pyenv/versions/2.7.18/bin/python tests/bench/bench_sync.py)

One installation per node (install.sh once, copies after) on loopback addresses of their own,
each on a fresh journaled ext4 of its own (--disk own, the default: a loop device, as root; see
Bench.node_disk for why), the rsync destinations on the clients' disks,
default internal options (poll 1 s, full pass 10 s, push_delay: see config.OPTIONS), the daemons run by the
interpreter running this script. As root the daemons drop to user `ossec`: the script re-runs
itself in a private mount namespace holding such a user (as tests/run does), touching neither
/etc nor /root. Figures, each next to its same-run baseline or target:

a. change-to-visible latency on two clients, --changes per kind (client.keys edited in place; a
   shared file created, renamed over, deleted), from the change on the master to the file being
   identical on both clients (polled every 5 ms); p50/p99. A random pause before each change
   spreads the changes over the poll phase.
b. first sync of --files shared files (~1.7 KB, some larger, in --groups folders) to two clients
   started after the master's scan, next to `rsync -a` and `rsync -a --fsync` pulling from an
   rsync daemon on loopback into the same (emptied) folders, two at once.
c. 1 % of the files rewritten -> both clients identical, from the master's change event (a
   "rescan" on its internal socket stands in for the detection delay), next to the rsync daemon
   syncing the same change into two destinations holding the previous state.
d. --agents agent-info files over four clients, then keepalive touches of all of them: time,
   the master daemons' CPU (utime+stime) and RSS, then their idle CPU.
--patch sets a module constant in the installed copy only (e.g. protocol.MAX_HEADER_BYTES=
67108864), so that a proposed change is measured next to the code as it is; the run says so.
The machine is shared: the load average is printed at the start and at the end.
"""
from __future__ import absolute_import, division, print_function

import argparse
import hashlib
import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import benchlib  # noqa: I100 - sets sys.path for what follows
import lab_harness  # noqa: E402
from benchlib import (DAEMON, INTERNAL, agent_name, free_port, make_dir, median,  # noqa: E402
                      now, percentile, proc_cpu, proc_mem, read_bytes, write_owned)
from lab_harness import LabNode, wait_for  # noqa: E402
from wazuh_cluster import compat, config, localsock  # noqa: E402
from wazuh_cluster.pathrules import MTIME_SLACK_NS  # noqa: E402

NS_MARK = "WAZUH_CLUSTER_BENCH_NS"
# The shipped minimum gap between two pushes to a peer, from the configuration table (printed).
PUSH_DELAY = float(dict((n, d) for n, _c, d in config.OPTIONS)["push_delay"])
LATENCY_POLL = 0.005
TREE_POLL = 0.02
CHANGE_TIMEOUT = 30.0
SYNC_TIMEOUT = 300.0
WORDS = ("agent_config", "localfile", "location", "log_format", "syslog", "apache", "frequency",
         "syscheck", "directories", "check_all", "yes", "no", "rootcheck", "ignore", "/var/log",
         "/etc", "/usr/bin", "realtime", "command", "alias", "wodle", "interval", "12h",
         "rootkit_files", "system_audit", "disabled", "scan_on_start", "labels", "label")


# ------------------------------------------------------------------ small helpers

def empty_dir(path):
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def sync_disks():
    subprocess.call(["sync"])


def run_parallel(cmds):
    """Start every command at once; (wall seconds until all finished, [exit codes])."""
    null = open(os.devnull, "wb")
    try:
        start = now()
        procs = [subprocess.Popen(cmd, stdout=null, stderr=subprocess.STDOUT, close_fds=True)
                 for cmd in cmds]
        codes = [proc.wait() for proc in procs]
        return now() - start, codes
    finally:
        null.close()


def tree_hashes(root):
    """{relative name: sha256} of the regular, non-hidden files under root."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            with open(full, "rb") as handle:
                found[os.path.relpath(full, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


# ------------------------------------------------------------------ the cluster

class Bench(benchlib.BenchNodes):
    """The nodes, the generated tree and the measurements."""

    def __init__(self, options, work):
        self.opt = options
        self.work = work
        self.python = os.path.realpath(sys.executable)
        self.rng = random.Random(options.seed)
        self.nodes = []
        self.started = []
        self.rsyncd = None
        self.rsync_port = None
        self.disks = []         # mount points of the nodes' own file systems (--disk own)
        self.expected = {}      # group -> set of file names (the generated tree)
        self.text_pool = self.make_pool()
        self.results = []

    # -- setup --------------------------------------------------------------------------------

    def make_pool(self):
        """~256 KB of agent.conf-like text, sliced into files: compresses like the real thing."""
        rng = random.Random(self.opt.seed + 1)
        lines = []
        size = 0
        while size < 256 << 10:
            depth = rng.randint(1, 4)
            tag = rng.choice(WORDS)
            line = "%s<%s>%s %s %d</%s>\n" % ("  " * depth, tag, rng.choice(WORDS),
                                               rng.choice(WORDS), rng.randint(0, 99999), tag)
            lines.append(line)
            size += len(line)
        return "".join(lines).encode("ascii")

    def content(self, label, size):
        start = self.rng.randint(0, len(self.text_pool) - size - 1)
        head = ("<!-- %s %d -->\n" % (label, self.rng.randint(0, 1 << 30))).encode("ascii")
        return head + self.text_pool[start:start + max(0, size - len(head))]

    def file_size(self):
        # ~1 % larger files (2-20 KB), the rest 600-2600 bytes: ~1.7 KB on average.
        if self.rng.random() < 0.01:
            return self.rng.randint(2000, 20000)
        return self.rng.randint(600, 2600)

    def setup(self):
        opt = self.opt
        base_net = 100 + os.getpid() % 100
        count = 5 if "d" in opt.only else 3
        addresses = ["127.%d.7.%d" % (base_net, k + 2) for k in range(count)]
        port = free_port(addresses[0])
        key = lab_harness.new_key()
        print("Installing %d nodes for %s under %s ..." % (count, self.python, self.work))
        sys.stdout.flush()
        for k in range(count):
            name = "master" if k == 0 else "client%d" % k
            node = LabNode(os.path.join(self.node_disk(name), name), name,
                           "master" if k == 0 else "client", addresses[k], port)
            lab_harness.install_node(node.prefix, self.python,
                                     self.nodes[0].prefix if self.nodes else None)
            if k == 0:
                self.apply_patches(node.prefix)
            # Default internal options: the targets are about what a manager runs.
            lab_harness.configure(node, key, addresses, opt.interval,
                                  {"cluster.log_level": "1"} if opt.debug else {})
            self.nodes.append(node)
        self.write_tree()

    def apply_patches(self, prefix):
        """--patch module.NAME=VALUE: set a constant in the installed copy (never the repo).

        For measuring a proposed change next to the code as it is; the output says so.
        """
        for patch in self.opt.patch:
            target, value = patch.split("=", 1)
            module, name = target.rsplit(".", 1)
            path = os.path.join(prefix, "lib", "wazuh_cluster", module + ".py")
            with io.open(path, encoding="utf-8") as handle:
                text = handle.read()
            new, count = re.subn(r"(?m)^%s = .*$" % re.escape(name), u"%s = %s" % (name, value),
                                 text)
            if count != 1:
                raise RuntimeError("--patch %s: no single '%s = ' line in %s"
                                   % (patch, name, path))
            with io.open(path, "w", encoding="utf-8") as handle:
                handle.write(new)
            print("PATCHED installed copy: %s.%s = %s" % (module, name, value))

    def write_tree(self):
        master = self.master
        shared = master.path("etc", "shared")
        total = 0
        for g in range(self.opt.groups):
            group = "group%03d" % g
            make_dir(os.path.join(shared, group))
            self.expected[group] = set()
        groups = sorted(self.expected)
        for i in range(self.opt.files):
            group = groups[i % len(groups)]
            name = "file%05d.conf" % i
            data = self.content(name, self.file_size())
            write_owned(os.path.join(shared, group, name), data)
            self.expected[group].add(name)
            total += len(data)
        keys = self.client_keys(0)
        write_owned(master.path("etc", "client.keys"), keys, 0o640)
        self.tree_bytes = total
        print("Master tree: %d files, %.1f MB in %d group folders; client.keys %d agents."
              % (self.opt.files, total / 1e6, len(groups), self.opt.keys_agents))

    def client_keys(self, version):
        """client.keys of --keys-agents agents; `version` changes one key, same length."""
        lines = []
        for i in range(self.opt.keys_agents):
            secret = hashlib.sha256(("%d-%d" % (i, version if i == version % self.opt.keys_agents
                                                else 0)).encode()).hexdigest()
            lines.append("%03d agent%03d any %s\n" % (i + 1, i, secret))
        return "".join(lines).encode("ascii")

    @property
    def master(self):
        return self.nodes[0]

    def stop_helpers(self):
        if self.rsyncd is not None and self.rsyncd.poll() is None:
            self.rsyncd.terminate()
            self.rsyncd.wait()

    def wait_master_scanned(self):
        want = self.opt.files + 1

        def scanned():
            try:
                status = self.internal(self.master, "status")
            except Exception:  # noqa: BLE001 - the daemon may still be starting
                return False
            return status.get("files", 0) >= want and status.get("last_scan")
        wait_for(scanned, 300, 0.1, what="the master's first scan")

    # -- rsync --------------------------------------------------------------------------------

    def start_rsyncd(self):
        conf = os.path.join(self.work, "rsyncd.conf")
        with io.open(conf, "w", encoding="ascii") as handle:
            handle.write(u"use chroot = no\nmax connections = 16\nlog file = %s\n"
                         u"[shared]\n    path = %s\n    read only = yes\n    uid = 0\n"
                         u"    gid = 0\n    reverse lookup = no\n" % (os.path.join(self.work, "rsyncd.log"),
                                            self.master.path("etc", "shared")))
        self.rsync_port = free_port("127.0.0.1")
        self.rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", "--config=" + conf,
                                        "--address=127.0.0.1", "--port=%d" % self.rsync_port],
                                       close_fds=True)

        def listening():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.connect(("127.0.0.1", self.rsync_port))
                return True
            except socket.error:
                return False
            finally:
                sock.close()
        wait_for(listening, 10, 0.05, what="the rsync daemon")

    def rsync(self, dests, fsync):
        """Seconds for `rsync -a [--fsync]` from the daemon into every dest at once."""
        cmds = [["rsync", "-a"] + (["--fsync"] if fsync else []) +
                ["rsync://127.0.0.1:%d/shared/" % self.rsync_port, dest.rstrip("/") + "/"]
                for dest in dests]
        seconds, codes = run_parallel(cmds)
        if any(codes):
            raise RuntimeError("rsync failed: exit codes %s" % codes)
        return seconds

    # -- b. first sync ------------------------------------------------------------------------

    def bench_first_sync(self):
        """Rounds of: rsync -a, rsync -a --fsync, ours (clients stopped and emptied between)."""
        clients = self.nodes[1:3]
        dests = [c.path("etc", "shared") for c in clients]
        self.start_rsyncd()
        figures = {"plain": [], "fsync": [], "start": [], "session": [], "cpu_master": [],
                   "cpu_clients": [], "cpu_clients_internal": []}
        for rep in range(self.opt.reps):
            if rep:
                self.reset_clients(clients)
            for kind in ("plain", "fsync"):
                for dest in dests:
                    empty_dir(dest)
                sync_disks()
                figures[kind].append(self.rsync(dests, kind == "fsync"))
            for dest in dests:
                empty_dir(dest)
            sync_disks()
            self.first_sync_once(clients, figures)
        same = self.trees_identical(clients)
        rs_plain, rs_fsync = median(figures["plain"]), median(figures["fsync"])
        ours_start, ours_session = median(figures["start"]), median(figures["session"])

        def row(key):
            return " ".join("%.3f" % v for v in figures[key])
        print("\nb. first sync: %d files / %.1f MB -> 2 clients (two at once), median of %d"
              % (self.opt.files, self.tree_bytes / 1e6, self.opt.reps))
        print("   ours, from the clients' start        %7.3f s   [%s]" % (ours_start, row("start")))
        print("   ours, from the first session up      %7.3f s   [%s]"
              % (ours_session, row("session")))
        print("   ours, CPU: master daemons %s s; both clients' daemons %s s (of which "
              "internal %s s)" % (row("cpu_master"), row("cpu_clients"),
                                  row("cpu_clients_internal")))
        print("   rsync -a --fsync (daemon)            %7.3f s   [%s]" % (rs_fsync, row("fsync")))
        print("   rsync -a         (daemon)            %7.3f s   [%s]" % (rs_plain, row("plain")))
        print("   ratio ours(session)/rsync-fsync      %7.2f    (target <= 1.0; from start %.2f)%s"
              % (ours_session / rs_fsync, ours_start / rs_fsync,
                 "" if same else "   TREES DIFFER"))
        self.results.append(("b first sync ratio", ours_session / rs_fsync, 1.0))

    def reset_clients(self, clients):
        """Stopped, with an empty etc/shared and no database: the next start is a first sync."""
        for client in clients:
            client.stop()
            self.started.remove(client)
            empty_dir(client.path("etc", "shared"))
            for name in os.listdir(client.path("var", "db")):
                os.unlink(client.path("var", "db", name))

    def first_sync_once(self, clients, figures):
        dests = [c.path("etc", "shared") for c in clients]
        logs = [c.path("logs", "cluster.log") for c in clients]
        offsets = [os.path.getsize(p) if os.path.exists(p) else 0 for p in logs]
        remaining = [dict((g, set(n)) for g, n in self.expected.items()) for _ in clients]
        session = [None, None]
        done = [None, None]
        master_pids = [self.pid(self.master, DAEMON), self.pid(self.master, INTERNAL)]
        cpu0 = sum(proc_cpu(p) for p in master_pids)
        start = checked = now()
        self.start(clients, parallel=True)
        deadline = start + SYNC_TIMEOUT
        while None in done:
            stamp = now()
            for k in range(len(clients)):
                if session[k] is None and self.session_up(logs[k], offsets[k]):
                    session[k] = stamp
                if done[k] is None:
                    for group in list(remaining[k]):
                        try:
                            names = os.listdir(os.path.join(dests[k], group))
                        except OSError:
                            continue
                        if remaining[k][group].issubset(names):
                            del remaining[k][group]
                    if not remaining[k]:
                        done[k] = stamp
            if stamp > deadline:
                raise RuntimeError("first sync not finished after %d s" % SYNC_TIMEOUT)
            if stamp - checked > 1.0:
                checked = stamp
                for k, client in enumerate(clients):
                    failure = self.session_failure(logs[k], offsets[k])
                    if failure:
                        raise RuntimeError("first sync cannot finish, %s: %s"
                                           % (client.name, failure))
            time.sleep(TREE_POLL)
        end = max(done)
        session = [s if s is not None else start for s in session]
        figures["start"].append(end - start)
        figures["session"].append(end - min(session))
        figures["cpu_master"].append(sum(proc_cpu(p) for p in master_pids) - cpu0)
        figures["cpu_clients"].append(sum(proc_cpu(self.pid(c, d)) for c in clients
                                          for d in (DAEMON, INTERNAL)))
        figures["cpu_clients_internal"].append(sum(proc_cpu(self.pid(c, INTERNAL))
                                                   for c in clients))

    def session_failure(self, path, offset):
        """The first 'closed: protocol error' line logged since `offset`, or None."""
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                text = handle.read().decode("utf-8", "replace")
        except (IOError, OSError):
            return None
        for line in text.splitlines():
            if "closed: protocol error" in line:
                return line.strip()
        return None

    def session_up(self, path, offset):
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                return b"Session with master node" in handle.read()
        except (IOError, OSError):
            return False

    def trees_identical(self, clients, timeout=60.0):
        master = tree_hashes(self.master.path("etc", "shared"))
        try:
            wait_for(lambda: all(tree_hashes(c.path("etc", "shared")) == master
                                 for c in clients), timeout, 0.5,
                     what="client trees identical to the master's")
            return True
        except lab_harness.LabError as err:
            print("   warning: %s" % err)
            return False

    def start_clients_converged(self, clients):
        self.start(clients, parallel=True)
        if not self.trees_identical(clients, timeout=SYNC_TIMEOUT):
            raise RuntimeError("clients did not converge")

    # -- a. latency ---------------------------------------------------------------------------

    def bench_latency(self):
        clients = self.nodes[1:3]
        master = self.master
        groups = sorted(self.expected)
        keys_path = "etc/client.keys"
        target_group = groups[0]
        target_name = sorted(self.expected[target_group])[0]
        renamed = "etc/shared/%s/%s" % (target_group, target_name)
        lat = {"keys": [], "create": [], "rename": [], "delete": []}
        missed = dict((k, 0) for k in lat)
        for i in range(self.opt.changes):
            group = groups[(i * 7 + 1) % len(groups)]
            created = "etc/shared/%s/bench-new-%04d.conf" % (group, i)
            # client.keys edited in place: one key changes, same length, one write.
            data = self.client_keys(i + 1)
            self.pause()
            with open(master.path(*keys_path.split("/")), "r+b") as handle:
                handle.write(data)
            self.measure(lat, missed, "keys", clients, keys_path, data)
            self.pause()
            data = self.content("create %d" % i, self.file_size())
            write_owned(master.path(*created.split("/")), data)
            created_ok = self.measure(lat, missed, "create", clients, created, data)
            self.pause()
            data = self.content("rename %d" % i, self.file_size())
            tmp = master.path("etc", "shared", target_group, ".bench-rename.tmp")
            write_owned(tmp, data)
            os.rename(tmp, master.path(*renamed.split("/")))
            self.measure(lat, missed, "rename", clients, renamed, data)
            self.pause()
            os.unlink(master.path(*created.split("/")))
            if created_ok:
                self.measure(lat, missed, "delete", clients, created, None)
            else:
                missed["delete"] += 1  # never arrived: its deletion proves nothing
        print("\na. change -> identical on 2 clients, %d changes per kind (default options: poll "
              "1 s, push_delay %g s)" % (self.opt.changes, PUSH_DELAY))
        print("   %-8s %8s %8s %8s %8s   target p50 <= 1.0 s, p99 <= 2.0 s"
              % ("kind", "p50", "p99", "max", "missed"))
        for kind in ("keys", "create", "rename", "delete"):
            values = lat[kind]
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            print("   %-8s %7.3fs %7.3fs %7.3fs %8d   %s"
                  % (kind, p50, p99, max(values) if values else float("nan"), missed[kind],
                     "ok" if p50 <= 1.0 and p99 <= 2.0 and not missed[kind] else "MISSED"))
            self.results.append(("a latency p50 " + kind, p50, 1.0))
            self.results.append(("a latency p99 " + kind, p99, 2.0))

    def pause(self):
        # A change lands anywhere in the poll period, not just after the previous delivery.
        time.sleep(self.rng.uniform(0, 1.0))

    def measure(self, lat, missed, kind, clients, rel, data):
        """Poll both clients every 5 ms until `rel` holds `data` (absent when None)."""
        start = now()
        paths = [c.path(*rel.split("/")) for c in clients]
        pending = list(paths)
        while pending:
            if data is None:
                pending = [p for p in pending if os.path.lexists(p)]
            else:
                pending = [p for p in pending if read_bytes(p) != data]
            if not pending:
                break
            if now() - start > CHANGE_TIMEOUT:
                missed[kind] += 1
                return False
            time.sleep(LATENCY_POLL)
        lat[kind].append(now() - start)
        return True

    # -- c. incremental -----------------------------------------------------------------------

    def bench_incremental(self):
        clients = self.nodes[1:3]
        master = self.master
        if self.rsyncd is None:
            self.start_rsyncd()
        # rs0 and rs1 (--fsync), rs2 and rs3 (plain): one of each on each client's disk.
        rdest = [os.path.join(os.path.dirname(clients[k % 2].prefix), "rsync-dest", "rs%d" % k)
                 for k in range(4)]
        for dest in rdest:
            make_dir(dest)
        self.rsync(rdest, True)  # the previous state, untimed
        count = max(1, self.opt.files // 100)
        names = sorted("etc/shared/%s/%s" % (g, n) for g, files in self.expected.items()
                       for n in files)
        ours, ours_from_rescan, rs_fsync, rs_plain = [], [], [], []
        for rep in range(self.opt.reps):
            sync_disks()
            chosen = self.rng.sample(names, count)
            subscriber = localsock.Client(master.path("queue", "ossec", "cluster_db"), timeout=60)
            subscriber.call("subscribe")
            wanted, mtimes = {}, {}
            for rel in chosen:
                data = self.content("rewrite %d" % rep, self.file_size())
                wanted[rel] = data
                with open(master.path(*rel.split("/")), "wb") as handle:
                    handle.write(data)
                mtimes[rel] = compat.stat_mtime_ns(os.stat(master.path(*rel.split("/"))))
            asked = now()
            self.internal(master, "rescan")
            event_at, seen = None, set()
            while len(seen) < len(chosen):
                if not subscriber.wait_readable(30):
                    raise RuntimeError("no change event from the master after a rescan")
                message = subscriber.receive()
                if message.get("event") != "changes":
                    continue
                ours_names = [n for n in message.get("changed") or () if n in wanted]
                if event_at is None and (ours_names or message.get("overflow")):
                    event_at = now()
                seen.update(ours_names)
                if message.get("overflow"):
                    break
            subscriber.close()
            finished = self.wait_contents([(c.path(*rel.split("/")), data, mtimes[rel])
                                           for c in clients for rel, data in wanted.items()],
                                          event_at)
            ours.append(finished - event_at)
            ours_from_rescan.append(finished - asked)
            rs_fsync.append(self.rsync(rdest[:2], True))
            rs_plain.append(self.rsync(rdest[2:], False))
        ours_m, rs_m = median(ours), median(rs_fsync)
        print("\nc. %d of %d files rewritten -> 2 clients identical (median of %d)"
              % (count, self.opt.files, self.opt.reps))
        print("   ours, from the master's change event %7.3f s   [%s]"
              % (ours_m, " ".join("%.3f" % v for v in ours)))
        print("   ours, from the rescan request        %7.3f s   [%s]"
              % (median(ours_from_rescan), " ".join("%.3f" % v for v in ours_from_rescan)))
        print("   rsync -a --fsync (daemon)            %7.3f s   [%s]"
              % (rs_m, " ".join("%.3f" % v for v in rs_fsync)))
        print("   rsync -a         (daemon)            %7.3f s   [%s]"
              % (median(rs_plain), " ".join("%.3f" % v for v in rs_plain)))
        print("   ratio ours/rsync-fsync               %7.2f    (target <= 0.25)"
              % (ours_m / rs_m))
        self.results.append(("c incremental ratio", ours_m / rs_m, 0.25))

    def wait_contents(self, expected, since):
        """Time at which every (path, data, mtime_ns) of `expected` holds its data.

        The poll looks at mtimes (the receiver stamps the master's), which costs a stat per
        file instead of a read, so that polling every 5 ms does not take the CPU the daemons
        measured need; the contents are then compared, and polling goes on for any that differ.
        """
        pending = list(expected)
        while True:
            stamp = now()
            waiting = []
            for path, data, mtime_ns in pending:
                try:
                    # 2.7 stamps mtimes through a float: equal within the receiver's slack.
                    if abs(compat.stat_mtime_ns(os.stat(path)) - mtime_ns) <= MTIME_SLACK_NS:
                        continue
                except OSError:
                    pass
                waiting.append((path, data, mtime_ns))
            if not waiting:
                waiting = [entry for entry in pending if read_bytes(entry[0]) != entry[1]]
                if not waiting:
                    return stamp
            pending = waiting
            if stamp - since > SYNC_TIMEOUT:
                raise RuntimeError("%d file(s) never arrived, e.g. %s" % (len(pending),
                                                                          pending[0][0]))
            time.sleep(LATENCY_POLL)

    # -- d. agent-info ------------------------------------------------------------------------

    def bench_agents(self):
        master = self.master
        clients = self.nodes[1:5]
        extra = [c for c in clients if c not in self.started]
        if extra:
            self.start_clients_converged(extra)
        per = self.opt.agents // len(clients)
        total = per * len(clients)
        base = int(time.time()) - 1000
        files = []  # (client, name)
        for k, client in enumerate(clients):
            for i in range(per):
                n = k * per + i
                files.append((client, agent_name(n)))
        pids = [self.pid(master, DAEMON), self.pid(master, INTERNAL)]
        master_info = master.path("queue", "agent-info")
        print("\nd. %d agent-info files over %d clients; master daemons (clusterd, internal)"
              % (total, len(clients)))
        # Upload: the files appear on the clients (as remoted would write them).
        cpu0 = [proc_cpu(p) for p in pids]
        start = now()
        for client, name in files:
            n = int(name[5:11])
            write_owned(client.path("queue", "agent-info", name),
                        ("Linux %s 3.10.0 #1 SMP x86_64 - Wazuh v3.0.0 / 6f42d2b2\n"
                         "7976a83d1aebcca09bc14459b5518ed5 merged.mg\n\n"
                         "#\"manager_hostname\":%s\n#\"node_name\":%s\n"
                         % (name.split("-")[0], client.name, client.name)).encode("ascii")
                        if n % 10 else b"", owner="ossec", mtime=base)
        written = now() - start
        wanted = dict((name, base) for _, name in files)
        elapsed = self.wait_mtimes(master_info, wanted, start)
        self.report_agents("new files", pids, cpu0, elapsed, "(writing them took %.2f s)"
                           % written)
        # Keepalives: every file touched (its mtime is data), content unchanged.
        touched = base + 900
        cpu0 = [proc_cpu(p) for p in pids]
        start = now()
        for client, name in files:
            os.utime(client.path("queue", "agent-info", name), (touched, touched))
        written = now() - start
        wanted = dict((name, touched) for _, name in files)
        elapsed = self.wait_mtimes(master_info, wanted, start)
        self.report_agents("keepalive touch", pids, cpu0, elapsed,
                           "(touching took %.2f s; clients see touches at their full pass, "
                           "every 10 s)" % written)
        time.sleep(self.opt.settle)  # states recorded, sessions quiet
        # An integrity round everywhere now (cluster_control -f on every node): its cost,
        # and the next scheduled rounds are then <interval> away, out of the idle window.
        cpu0 = [proc_cpu(p) for p in pids]
        for node in [master] + clients:
            control = localsock.Client(node.path("queue", "ossec", "cluster_control"), 60)
            try:
                control.call("force", {})
            finally:
                control.close()
        time.sleep(self.opt.round_window)
        cpu = [proc_cpu(p) - c for p, c in zip(pids, cpu0)]
        print("   forced integrity round of all %d nodes: master CPU clusterd %.2f s + internal "
              "%.2f s within %d s; RSS clusterd peak %.1f MB, internal peak %.1f MB"
              % (len(clients) + 1, cpu[0], cpu[1], self.opt.round_window,
                 proc_mem(pids[0])[1], proc_mem(pids[1])[1]))
        cpu0 = [proc_cpu(p) for p in pids]
        client_pids = [self.pid(clients[0], DAEMON), self.pid(clients[0], INTERNAL)]
        ccpu0 = [proc_cpu(p) for p in client_pids]
        time.sleep(self.opt.idle)
        used = [(proc_cpu(p) - c) / self.opt.idle for p, c in zip(pids, cpu0)]
        idle = sum(used)
        cidle = sum(proc_cpu(p) - c for p, c in zip(client_pids, ccpu0)) / self.opt.idle
        limit = 1.0 if not compat.PY2 else 2.0
        print("   idle %d s (after %d s): master both daemons %.2f %% of a core (clusterd %.2f, "
              "internal %.2f), client1 %.2f %%   (target <= %.0f %%)"
              % (self.opt.idle, self.opt.settle, idle * 100, used[0] * 100, used[1] * 100,
                 cidle * 100, limit))
        rss = [proc_mem(p) for p in pids]
        print("   RSS now: clusterd %.1f MB (peak %.1f), internal %.1f MB (peak %.1f)   "
              "(target <= 100 MB each)" % (rss[0][0], rss[0][1], rss[1][0], rss[1][1]))
        crss = [proc_mem(p) for p in client_pids]
        print("   client1 RSS: clusterd %.1f MB (peak %.1f), internal %.1f MB (peak %.1f)"
              % (crss[0][0], crss[0][1], crss[1][0], crss[1][1]))
        self.results.append(("d idle CPU % master", idle * 100, limit))
        self.results.append(("d peak RSS MB clusterd", rss[0][1], 100))
        self.results.append(("d peak RSS MB internal", rss[1][1], 100))

    def wait_mtimes(self, folder, wanted, start):
        """Seconds from `start` until every name in `folder` has its wanted mtime (seconds)."""
        remaining = dict(wanted)
        deadline = now() + SYNC_TIMEOUT
        while remaining:
            stamp = now()
            for name in list(remaining):
                try:
                    if int(os.stat(os.path.join(folder, name)).st_mtime) == remaining[name]:
                        del remaining[name]
                except OSError:
                    pass
            if not remaining:
                return stamp - start
            if stamp > deadline:
                raise RuntimeError("%d agent-info files never reached the master"
                                   % len(remaining))
            time.sleep(0.25)
        return now() - start

    def report_agents(self, what, pids, cpu0, elapsed, note):
        cpu = [proc_cpu(p) - c for p, c in zip(pids, cpu0)]
        rss = [proc_mem(p) for p in pids]
        print("   %-16s on the master in %6.2f s %s" % (what, elapsed, note))
        print("   %-16s CPU clusterd %.2f s + internal %.2f s; RSS clusterd %.1f MB "
              "(peak %.1f), internal %.1f MB (peak %.1f)"
              % ("", cpu[0], cpu[1], rss[0][0], rss[0][1], rss[1][0], rss[1][1]))

    # -- driver -------------------------------------------------------------------------------

    def run(self):
        self.setup()
        self.start([self.master])
        self.wait_master_scanned()
        if "b" in self.opt.only:
            self.bench_first_sync()
        else:
            self.start_clients_converged(self.nodes[1:3])
        if "a" in self.opt.only:
            self.bench_latency()
        if "c" in self.opt.only:
            self.bench_incremental()
        if "d" in self.opt.only:
            self.bench_agents()
        print("\nsummary (Python %s, load average now %s): figure, target" % (
            sys.version.split()[0], " ".join("%.2f" % v for v in os.getloadavg())))
        for name, value, target in self.results:
            print("   %-28s %9.3f  <= %-6s %s" % (name, value, target,
                                                  "ok" if value <= target else "MISSED"))


# ------------------------------------------------------------------ namespace and main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000, help="shared files (b, c)")
    parser.add_argument("--groups", type=int, default=300, help="group folders")
    parser.add_argument("--changes", type=int, default=100, help="changes per kind (a)")
    parser.add_argument("--agents", type=int, default=50000, help="agent-info files (d)")
    parser.add_argument("--keys-agents", type=int, default=200, help="agents in client.keys")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of rsync and of c")
    parser.add_argument("--idle", type=float, default=30.0, help="idle CPU window (d), s")
    parser.add_argument("--round-window", type=float, default=30.0,
                        help="seconds given to a forced integrity round (d)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="pause before the idle window (d), s")
    parser.add_argument("--interval", default="2m", help="<interval> of ossec.conf")
    parser.add_argument("--only", default="abcd", help="which parts to run (letters)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="parent folder of the installations (default /tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the installations (with --disk own: the images, and the "
                             "logs copied out as NODE-logs)")
    parser.add_argument("--disk", choices=("own", "shared"), default="own",
                        help="own: each node on a fresh journaled ext4 of its own (a loop "
                             "device; needs root, mkfs.ext4, losetup); shared: all in --workdir")
    parser.add_argument("--debug", action="store_true",
                        help="cluster.log_level=1 on every node (timings in cluster.log; "
                             "with --keep to read them)")
    parser.add_argument("--patch", action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="set a constant in the installed copy to measure a proposed "
                             "change, e.g. sync.BATCH_FILES=1000 (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)

    def banner(bench):
        try:
            rsync = subprocess.check_output(["rsync", "--version"]).decode().splitlines()[0]
        except OSError:
            rsync = "no rsync (parts b and c need it)"
        return "bench_sync: Python %s (%s), %d CPU(s), %s; load average %s; disks: %s" % (
            sys.version.split()[0], bench.python, os.sysconf("SC_NPROCESSORS_ONLN"), rsync,
            benchlib.load_average(), "one fresh journaled ext4 per node"
            if options.disk == "own" else "all in " + bench.work)
    return benchlib.bench_main("bench_sync", __file__, argv, options, NS_MARK, Bench, banner)


if __name__ == "__main__":
    sys.exit(main())
