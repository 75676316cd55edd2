"""What the benchmarks share: files with Wazuh's owners, /proc figures, percentiles, the nodes'
own disks, starting and stopping daemons, and the main() around a run (root re-exec, signals,
cleanup). Standard library only, Python 2.7 and 3.x; never collected by pytest.

A benchmark class mixes in BenchNodes (it needs self.opt with .disk and .keep, self.work,
self.nodes, self.started and self.disks) and is run by bench_main().
"""
from __future__ import absolute_import, division, print_function

import glob
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "lib"))

import lab_harness  # noqa: E402
from lab_harness import wait_for  # noqa: E402
from wazuh_cluster import compat, localsock  # noqa: E402

DAEMON = "wazuh-clusterd"
INTERNAL = "wazuh-clusterd-internal"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DISK_BYTES = 2 << 30          # sparse: only what is written takes space
DISK_INODES = 131072          # 50 000 agent-info files and 10 000 shared ones fit


# ------------------------------------------------------------------ small helpers

def now():
    return compat.monotonic()


def load_average():
    return " ".join("%.2f" % v for v in os.getloadavg())


def write_owned(path, data, mode=0o660, owner="root", mtime=None):
    """Write `data` to `path` (created or truncated), then Wazuh's owner and mode when root."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        ids = lab_harness.ossec_ids()
        if ids is not None:
            os.fchown(fd, ids[0] if owner == "ossec" else 0, ids[1])
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def make_dir(path, mode=0o770, owner="root"):
    if not os.path.isdir(path):
        os.makedirs(path)
    lab_harness.chown(path, owner, mode)


def read_bytes(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def percentile(values, fraction):
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    values = sorted(values)
    if not values:
        return float("nan")
    return values[max(0, int(math.ceil(fraction * len(values))) - 1)]


def median(values):
    return percentile(values, 0.5)


def proc_cpu(pid):
    """utime + stime of a process in seconds (all its threads)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(CLK_TCK)


def proc_mem(pid):
    """(VmRSS, VmHWM) in MB."""
    found = {}
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(line.split()[1]) / 1024.0
    return found.get("VmRSS", float("nan")), found.get("VmHWM", float("nan"))


def reset_peak(pid):
    """Start a new VmHWM (peak RSS) window for `pid` (Linux >= 4.0, as root); False if not."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as handle:
            handle.write("5")
        return True
    except (IOError, OSError):
        return False


def free_port(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def agent_name(i):
    """NAME-IP of agent number i (its agent-info file name; IP 10.x.y.z from i)."""
    return "agent%06d-10.%d.%d.%d" % (i, (i >> 16) & 255, (i >> 8) & 255, i & 255)


def agent_info_data(i, node_name="node01"):
    """An agent-info file of agent i as a Wazuh 3.0 manager named node_name writes it."""
    return ("Linux agent%06d 3.10.0-693.el7.x86_64 #1 SMP x86_64 [CentOS Linux|centos: 7 "
            "(Core)] - Wazuh v3.0.0 / 6f42d2b2e1b3a0b7c5d4e3f2a1b0c9d8\n7976a83d1aebcca09bc1"
            "4459b5518ed5 merged.mg\n\n#\"manager_hostname\":%s\n#\"node_name\":%s\n"
            % (i, node_name, node_name)).encode("ascii")


def client_keys_line(i):
    """The client.keys line of agent i (~94 bytes, as the agent's name and IP above)."""
    name, ip = agent_name(i).split("-", 1)
    return "%05d %s %s %064x\n" % (i + 1, name, ip, i)


# ------------------------------------------------------------------ the nodes

class BenchNodes(object):
    """Disks, start, stop and leftovers of a benchmark's nodes (see the module docstring)."""

    def node_disk(self, name, inodes=DISK_INODES):
        """The folder holding node `name`'s installation: its own file system with --disk own.

        Each manager of a real cluster has its own disk, with a journal. This machine's root file
        system has none, and then ext4 skips every inode freed in the last minute when it
        allocates one (recently_deleted): emptying 20 000 files before each run made the next
        run's file creations cost 200-400 us each, more for whichever run came later. A fresh
        journaled ext4 per node (a loop device on a sparse image) measures what a manager sees.
        """
        if self.opt.disk == "shared":
            return self.work
        image = os.path.join(self.work, name + ".img")
        mount = os.path.join(self.work, name + "-disk")
        os.mkdir(mount)
        with open(image, "wb") as handle:
            handle.truncate(DISK_BYTES)
        for cmd in (["mkfs.ext4", "-q", "-F", "-N", str(inodes),
                     "-E", "lazy_itable_init=0,lazy_journal_init=0", image],
                    ["mount", "-o", "loop", image, mount]):
            result = lab_harness.run(cmd)
            if result.rc != 0:
                raise RuntimeError("%s failed: %s (--disk shared needs no loop device)"
                                   % (" ".join(cmd), result.err.strip()))
        self.disks.append(mount)
        os.chmod(mount, 0o755)
        return mount

    def release_disks(self):
        """Unmount the nodes' file systems; with --keep their logs are copied out first."""
        for mount in self.disks:
            if self.opt.keep:
                for logs in glob.glob(os.path.join(mount, "*", "logs")):
                    shutil.copytree(logs, os.path.join(
                        self.work, os.path.basename(os.path.dirname(logs)) + "-logs"))
            result = lab_harness.run(["umount", mount])
            if result.rc != 0:
                print("warning: umount %s: %s" % (mount, result.err.strip()))
        self.disks = []

    def start(self, nodes, parallel=False):
        if parallel:
            null = open(os.devnull, "wb")
            try:
                procs = [subprocess.Popen([n.path("bin", "ossec-control"), "start"],
                                          stdout=null, stderr=subprocess.STDOUT,
                                          close_fds=True) for n in nodes]
                for node, proc in zip(nodes, procs):
                    if proc.wait() != 0:
                        raise RuntimeError("ossec-control start failed for %s:\n%s"
                                           % (node.name, node.dump_logs()))
                    self.started.append(node)
            finally:
                null.close()
            for node in nodes:
                wait_for(node.running, 30, what="daemons of %s" % node.name)
            return
        for node in nodes:
            node.start(timeout=30)
            self.started.append(node)

    def stop_helpers(self):
        """Processes of the benchmark's own besides the nodes (e.g. an rsync daemon)."""

    def stop_all(self):
        try:
            for node in reversed(self.started):
                try:
                    node.stop()
                except Exception as err:  # noqa: BLE001 - cleanup must go on for the others
                    print("warning: stopping %s: %s" % (node.name, err))
            self.started = []
            self.stop_helpers()
        finally:
            self.kill_leftovers()

    def leftovers(self):
        """PIDs of processes still running from our installations (their command line names
        a path under self.work): only what this run started, whatever its PID files say."""
        mark = os.path.join(self.work, "")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    argv = handle.read().split(b"\0")
            except (IOError, OSError):
                continue
            if any(arg.decode("utf-8", "replace").startswith(mark) or
                   ("=" + mark) in arg.decode("utf-8", "replace") for arg in argv) \
                    and lab_harness.alive(int(entry)):
                found.append(int(entry))
        return found

    def kill_leftovers(self):
        """No daemon may outlive the benchmark (ossec-control stop removes the PID files and
        does not wait; a daemon missed there would keep running from a removed folder)."""
        pids = self.leftovers()
        if not pids:
            return
        print("warning: %d process(es) outlived the stop: %s; terminating them"
              % (len(pids), " ".join(map(str, pids))))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = now() + 10
            while now() < deadline and [p for p in pids if lab_harness.alive(p)]:
                time.sleep(0.1)
            pids = [p for p in pids if lab_harness.alive(p)]
            if not pids:
                return
        print("warning: still alive after SIGKILL: %s" % " ".join(map(str, pids)))

    def internal(self, node, cmd, args=None):
        client = localsock.Client(node.path("queue", "ossec", "cluster_db"), timeout=60)
        try:
            return client.call(cmd, args or {})
        finally:
            client.close()

    def pid(self, node, daemon):
        pids = node.pids(daemon)
        if not pids:
            raise RuntimeError("%s of %s is not running" % (daemon, node.name))
        return pids[0]


# ------------------------------------------------------------------ main

def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def bench_main(tag, script, argv, options, ns_mark, make_bench, banner):
    """Run a benchmark: as root inside an ossec namespace (re-exec), in a fresh work folder,
    with every daemon stopped and every disk released at the end, even on SIGTERM/SIGHUP.

    make_bench(options, work) -> an object with run(), nodes, started, stop_all() and
    release_disks(); banner(bench) -> the first line printed.
    """
    # Line-buffered even into a file or a pipe: a long run shows each figure when it is ready.
    sys.stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w", 1)
    if options.disk == "own" and os.geteuid() != 0:
        sys.stderr.write("%s: --disk own needs root (loop mounts); use --disk shared\n" % tag)
        return 2
    if os.geteuid() == 0 and not os.environ.get(ns_mark):
        return lab_harness.reexec_in_ossec_namespace(script, argv, ns_mark, tag)
    # A SIGTERM or SIGHUP (a timeout, a closed terminal) must still run the cleanup below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    work = tempfile.mkdtemp(prefix="wazuh-%s." % tag.replace("_", "-"), dir=options.workdir)
    os.chmod(work, 0o755)  # user ossec must reach the installations
    bench = make_bench(options, work)
    try:
        print(banner(bench))
        bench.run()
    except Exception:
        for node in bench.nodes:
            if node in bench.started:
                print(node.dump_logs(20))
        raise
    finally:
        bench.stop_all()
        bench.release_disks()
        if options.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
