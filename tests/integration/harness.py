"""Shared helpers for the integration tests: real installations, real daemons, bounded waits.

Usage from a test module (fixtures are imported so that pytest finds them)::

    from harness import Node, wait_for, python, workspace, base_install, make_node  # noqa: F401

    def test_something(make_node):
        node = make_node("node01", "master")      # a cloned installation with its own conf
        node.start()                              # PREFIX/bin/ossec-control start, must succeed
        wait_for(lambda: node.internal_pids(), 5, what="internal daemon PID file")

Every installation comes from install.sh run once per session (`base_install`) and is copied
with `clone_install` (cp -a), which is much faster than running install.sh for each test.
Each node binds its own loopback address (127.X.Y.Z) and a free port. Nothing touches /etc or
/var/ossec. As root the daemons drop to user `ossec`: tests/run provides that user in a private
mount namespace; without it the fixtures skip with the reason.
"""
from __future__ import absolute_import, division, print_function

import collections
import glob
import io
import itertools
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
INSTALL_SH = os.path.join(REPO, "install.sh")
DAEMON = "wazuh-clusterd"
INTERNAL = "wazuh-clusterd-internal"

try:
    _clock = time.monotonic
except AttributeError:  # Python 2.7: good enough for bounded test waits
    _clock = time.time


# ------------------------------------------------------------------ waiting and running

def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a true value (returned) or `timeout` seconds pass.

    Raises AssertionError naming `what`, so a failed wait says what it was waiting for.
    """
    deadline = _clock() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if _clock() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


Result = collections.namedtuple("Result", "cmd rc out err")


def _text(data):
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def run(cmd, timeout=120.0, env=None, cwd=None, check=False, stdin_data=None, argv_prefix=()):
    """Run `cmd` (a list) to completion; returns Result(cmd, rc, out, err) with text output.

    Output goes to temporary files, not pipes: a daemon that forks and keeps an inherited
    descriptor must not make the caller wait for the daemon's exit. `argv_prefix` goes before
    the command (e.g. setpriv ... to run it as another user).
    """
    cmd = [str(part) for part in list(argv_prefix) + list(cmd)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = subprocess.PIPE if stdin_data is not None else open(os.devnull, "rb")
        try:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=err, env=env, cwd=cwd,
                                    close_fds=True)
            if stdin_data is not None:
                proc.stdin.write(stdin_data.encode("utf-8"))
                proc.stdin.close()
            try:
                wait_for(lambda: proc.poll() is not None, timeout, 0.01,
                         what="command %s to finish" % " ".join(cmd))
            except AssertionError:
                proc.kill()
                proc.wait()
                raise
        finally:
            if stdin_data is None:
                stdin.close()
        out.seek(0)
        err.seek(0)
        result = Result(cmd, proc.returncode, _text(out.read()), _text(err.read()))
    if check and result.rc != 0:
        raise AssertionError("%s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(cmd), result.rc, result.out, result.err))
    return result


# ------------------------------------------------------------------ processes

def find_executable(name):
    """Path of `name` on PATH, or None (shutil.which is 3.x only)."""
    for folder in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def alive(pid):
    """The process exists and is not a zombie (PID 1 of a container may never reap it)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            stat = handle.read()
    except (IOError, OSError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def proc_exe(pid):
    """Real path of the executable of process `pid` (what the kernel runs, not argv[0])."""
    return os.path.realpath(os.readlink("/proc/%d/exe" % pid))


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return [_text(part) for part in handle.read().split(b"\0") if part]
    except (IOError, OSError):
        return []


def processes_under(prefix):
    """PIDs of live processes whose command line mentions a path under `prefix`."""
    prefix = prefix.rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if any(prefix in part for part in proc_cmdline(int(entry))) and alive(int(entry)):
            found.append(int(entry))
    return found


def kill(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ addresses and keys

_ADDRESSES = itertools.count(1)
NET_LOCKS = "/tmp/wazuh-cluster-tests-nets"
_NET_HOLD = []


def _claim_net(first=20, count=200):
    """N of the 127.N.0.0/16 this test process owns: the first N from a PID-based start whose
    lock file (NET_LOCKS/N) it can flock, held until the process exits, so that runs at the same
    time (tests/run -j, other checkouts) never share an address. Without locks: the PID's N."""
    import fcntl
    start = os.getpid() % count
    try:
        if not os.path.isdir(NET_LOCKS):
            os.mkdir(NET_LOCKS)
            os.chmod(NET_LOCKS, 0o1777)
    except OSError:
        pass   # made by another process meanwhile, or not writable: the open below tells
    for i in range(count):
        net = first + (start + i) % count
        try:
            handle = open(os.path.join(NET_LOCKS, str(net)), "a")
        except (IOError, OSError):
            break
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            handle.close()
            continue
        # Not inherited: a daemon started by the test must not keep the range claimed.
        flags = fcntl.fcntl(handle.fileno(), fcntl.F_GETFD)
        fcntl.fcntl(handle.fileno(), fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        _NET_HOLD.append(handle)
        return net
    return first + start


# One 127.N.0.0/16 per test process, so that two runs never share an address.
_NET = _claim_net()


def new_address():
    """A loopback address of its own for one node (127.0.0.0/8 all routes to lo on Linux)."""
    n = next(_ADDRESSES)
    return "127.%d.%d.%d" % (_NET, n // 250, n % 250 + 2)


class machine_lock(object):
    """`with machine_lock(name):` the test holds NET_LOCKS/NAME.lock (flock, polled with a bound)
    against every other test process of the machine: for what the runs share, like port 1516
    of a system install."""

    def __init__(self, name, timeout=900.0):
        self.path = os.path.join(NET_LOCKS, name + ".lock")
        self.timeout = timeout
        self.handle = None

    def _try(self):
        import fcntl
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except (IOError, OSError):
            return False

    def __enter__(self):
        self.handle = open(self.path, "a")
        try:
            wait_for(self._try, self.timeout, 0.2, what="the machine-wide lock " + self.path)
        except AssertionError:
            self.handle.close()
            raise
        return self

    def __exit__(self, *exc):
        self.handle.close()   # releases the flock


def free_port(address="127.0.0.1"):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def new_key():
    """A fresh valid cluster key: 32 alphanumeric characters."""
    rng = random.SystemRandom()
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))


# ------------------------------------------------------------------ installations

def install(prefix, python=None, extra=(), env=None, check=True):
    """Run install.sh --no-start --prefix PREFIX --python PYTHON; returns the Result."""
    cmd = ["bash", INSTALL_SH, "--no-start", "--prefix", prefix,
           "--python", python or sys.executable] + list(extra)
    return run(cmd, timeout=300, env=env, check=check)


def uninstall(prefix, env=None, check=True):
    return run(["bash", INSTALL_SH, "--uninstall", "--prefix", prefix], env=env, check=check)


def clone_install(src, dest):
    """A copy of the installation `src` at `dest` (cp -a keeps modes and owners).

    sh wrappers (interpreters that need their environment) name the real scripts by absolute
    path, so they are pointed at the copy.
    """
    run(["cp", "-a", src, dest], check=True)
    for path in glob.glob(os.path.join(dest, "bin", "*")):
        with io.open(path, "rb") as handle:
            data = handle.read()
        if data.startswith(b"#!/bin/sh") and src.encode() in data:
            data = data.replace(("'%s/" % src).encode(), ("'%s/" % dest).encode())
            with io.open(path, "wb") as handle:
                handle.write(data)
    return dest


CONF_TEMPLATE = u"""<!-- written by the integration tests -->
<ossec_config>
  <global>
    <jsonout_output>yes</jsonout_output>
  </global>
</ossec_config>

<ossec_config>
  <cluster>
    <name>{name}</name>
    <node_name>{node_name}</node_name>
    <node_type>{node_type}</node_type>
    <key>{key}</key>
    <interval>{interval}</interval>
    <port>{port}</port>
    <bind_addr>{bind_addr}</bind_addr>
    <nodes>
{nodes}
    </nodes>
    <hidden>{hidden}</hidden>
    <disabled>{disabled}</disabled>
  </cluster>
</ossec_config>
"""


def write_file(path, text):
    """Write `text` in place: an existing file keeps its owner and mode (ossec must read it)."""
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def put_text(node, rel, text):
    """Write `text` to the node's file REL ("etc/shared/x"), its folders created; the path."""
    path = node.path(*rel.split("/"))
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    write_file(path, text)
    return path


def read_text(node, rel):
    """The node's file REL as text, or None when it cannot be read (absent, a folder)."""
    try:
        with io.open(node.path(*rel.split("/")), encoding="utf-8") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def write_cluster_conf(prefix, name, node_name, node_type, key, bind_addr, port, nodes,
                       disabled=False, interval="2m", hidden="no"):
    """Replace PREFIX/etc/ossec.conf with one holding this <cluster> block."""
    text = CONF_TEMPLATE.format(
        name=name, node_name=node_name, node_type=node_type, key=key, interval=interval,
        port=port, bind_addr=bind_addr, hidden=hidden, disabled="yes" if disabled else "no",
        nodes="\n".join("      <node>%s</node>" % node for node in nodes))
    path = os.path.join(prefix, "etc", "ossec.conf")
    write_file(path, text)
    return path


def write_internal_options(prefix, options):
    """etc/local_internal_options.conf with cluster.NAME=value lines (SPEC 2)."""
    path = os.path.join(prefix, "etc", "local_internal_options.conf")
    write_file(path, u"".join(u"%s=%s\n" % item for item in sorted(options.items())))
    return path


def read_log(prefix, name="cluster.log"):
    """Text of PREFIX/logs/NAME ('' when absent)."""
    try:
        with io.open(os.path.join(prefix, "logs", name), encoding="utf-8",
                     errors="replace") as handle:
            return handle.read()
    except (IOError, OSError):
        return u""


def pid_files(prefix, daemon=DAEMON):
    """{path: pid} of PREFIX/var/run/DAEMON-<pid>.pid (exactly that daemon, not the glob)."""
    found = {}
    for path in glob.glob(os.path.join(prefix, "var", "run", "%s-*.pid" % daemon)):
        tail = os.path.basename(path)[len(daemon) + 1:-len(".pid")]
        if tail.isdigit():
            found[path] = int(tail)
    return found


# What init gives ossec-control: no PYTHONPATH, no LD_LIBRARY_PATH, a short PATH.
BARE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


class Node(object):
    """One installation under `prefix` and the daemons started from it."""

    def __init__(self, prefix, name="node01", address=None, port=None, key=None):
        self.prefix = prefix
        self.name = name
        self.address = address
        self.port = port
        self.key = key

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)

    def configure(self, node_type="master", nodes=None, cluster="wazuh", disabled=False,
                  interval="2m", hidden="no"):
        return write_cluster_conf(self.prefix, cluster, self.name, node_type, self.key,
                                  self.address, self.port, nodes or [self.address],
                                  disabled=disabled, interval=interval, hidden=hidden)

    # -- driving: with the bare environment of an init script, as on a real manager (the
    # installed entry points must not depend on the test's PYTHONPATH or PATH).
    def control(self, *args, **kwargs):
        """PREFIX/bin/ossec-control ARGS in a bare environment; returns the Result."""
        kwargs.setdefault("env", dict(BARE_ENV))
        return run([self.path("bin", "ossec-control")] + list(args), **kwargs)

    def daemon(self, *args, **kwargs):
        """PREFIX/bin/wazuh-clusterd ARGS (Wazuh 3.0 style) in a bare environment."""
        kwargs.setdefault("env", dict(BARE_ENV))
        return run([self.path("bin", DAEMON)] + list(args), **kwargs)

    def cluster_control(self, *args, **kwargs):
        """PREFIX/bin/cluster_control ARGS in a bare environment; returns the Result."""
        kwargs.setdefault("env", dict(BARE_ENV))
        return run([self.path("bin", "cluster_control")] + list(args), **kwargs)

    def start(self, timeout=10.0):
        """ossec-control start; asserts success and waits for both daemons' PID files."""
        result = self.control("start")
        assert result.rc == 0, self.explain("ossec-control start failed", result)
        self.wait_running(timeout)
        return result

    def stop(self):
        return self.control("stop")

    def wait_running(self, timeout=10.0):
        wait_for(lambda: self.running_pid() and self.internal_pid(), timeout,
                 what="PID files of %s and %s in %s" % (DAEMON, INTERNAL, self.prefix))

    def wait_stopped(self, pids, timeout=10.0):
        wait_for(lambda: not [pid for pid in pids if alive(pid)], timeout,
                 what="processes %s to exit" % (pids,))

    # -- state
    def pids(self, daemon=DAEMON):
        """PIDs from var/run/DAEMON-PID.pid files (alive or not)."""
        return sorted(pid_files(self.prefix, daemon).values())

    def all_pids(self):
        """Every PID in var/run/wazuh-clusterd*.pid, the glob ossec-control uses."""
        pids = []
        for path in glob.glob(self.path("var", "run", DAEMON + "*.pid")):
            try:
                with open(path) as handle:
                    pids.append(int(handle.read().strip()))
            except (IOError, OSError, ValueError):
                continue
        return sorted(pids)

    def running_pid(self):
        live = [pid for pid in self.pids(DAEMON) if alive(pid)]
        return live[0] if live else None

    def internal_pid(self):
        live = [pid for pid in self.pids(INTERNAL) if alive(pid)]
        return live[0] if live else None

    def internal_pids(self):
        return [pid for pid in self.pids(INTERNAL) if alive(pid)]

    def log(self, name="cluster.log"):
        return read_log(self.prefix, name)

    def wait_log(self, pattern, timeout=10.0, name="cluster.log"):
        """Wait until a line of logs/NAME matches the regex `pattern`; returns the match."""
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log(name)), timeout,
                        what="/%s/ in %s of %s" % (pattern, name, self.name))

    def explain(self, message, result=None):
        """`message`, the command's output and the node's logs: what a failure needs."""
        parts = [message]
        if result is not None:
            parts.append("command: %s (exit %s)\nstdout:\n%s\nstderr:\n%s"
                         % (" ".join(result.cmd), result.rc, result.out, result.err))
        parts.append(self.dump_logs())
        return "\n".join(parts)

    def dump_logs(self, lines=60):
        out = []
        for name in ("cluster.log", "ossec.log"):
            text = self.log(name).splitlines()[-lines:]
            out.append("---- %s %s (last %d lines)\n%s"
                       % (self.name, name, lines, "\n".join(text)))
        return "\n".join(out)

    def cleanup(self):
        """Stop everything started from this prefix, whatever state it is in."""
        pids = set(self.all_pids()) | set(processes_under(self.prefix))
        for pid in pids:
            kill(pid, signal.SIGTERM)
        try:
            self.wait_stopped(list(pids), timeout=5.0)
        except AssertionError:
            for pid in pids:
                kill(pid, signal.SIGKILL)


def start_all(nodes, timeout=10.0):
    """node.start() of every node at once (one thread each): a cluster is up in the time of
    its slowest node's start, not of their sum. Raises the first node's failure."""
    import threading
    errors = []

    def start(node):
        try:
            node.start(timeout)
        except BaseException as err:   # re-raised below, in the test's thread
            errors.append((node, err))

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0][1]


# ------------------------------------------------------------------ fixtures

def _need_ossec_user():
    if os.geteuid() != 0:
        return
    import grp
    import pwd
    try:
        pwd.getpwnam("ossec")
        grp.getgrnam("ossec")
    except KeyError:
        pytest.skip("as root the daemons run as user ossec, which this machine lacks: run the "
                    "suite through tests/run (it provides one in a private mount namespace)")


@pytest.fixture(scope="session")
def python():
    """The interpreter under test: the one running pytest (real path)."""
    return os.path.realpath(sys.executable)


@pytest.fixture(scope="session")
def workspace():
    """A session folder readable by user ossec (pytest's tmp folders are 0700 root)."""
    path = tempfile.mkdtemp(prefix="wazuh-cluster-it-")
    os.chmod(path, 0o755)
    yield path
    # Whatever a test left running from here (a failed teardown) must not outlive the session.
    leftovers = processes_under(path)
    for pid in leftovers:
        kill(pid, signal.SIGKILL)
    try:
        wait_for(lambda: not [pid for pid in leftovers if alive(pid)], 5.0,
                 what="leftover daemons to exit")
    except AssertionError:
        pass
    shutil.rmtree(path, ignore_errors=True)


_COUNTER = itertools.count(1)


@pytest.fixture
def tmp_prefix_dir(workspace):
    """A fresh empty folder (0755) for this test's installations."""
    path = os.path.join(workspace, "t%03d" % next(_COUNTER))
    os.mkdir(path)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def base_install(workspace, python):
    """install.sh run once per session; tests use copies made by clone_install."""
    _need_ossec_user()
    prefix = os.path.join(workspace, "base-install")
    install(prefix, python)
    return prefix


@pytest.fixture
def make_node(base_install, tmp_prefix_dir, request):
    """Factory: make_node(name, node_type, nodes=None, configure=True) -> a configured Node.

    Every node gets its own copy of the session installation, loopback address, port and
    (shared per test) key. At teardown its daemons are stopped and, when the test failed,
    its logs are printed.
    """
    nodes = []
    key = new_key()

    def factory(name="node01", node_type="master", nodes_list=None, configure=True, **kwargs):
        prefix = clone_install(base_install, os.path.join(tmp_prefix_dir, name))
        address = new_address()
        node = Node(prefix, name, address, free_port(address), key)
        if configure:
            node.configure(node_type, nodes_list, **kwargs)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.cleanup()
    failed = getattr(request.node, "rep_call", None)
    if failed is None or failed.failed:
        for node in nodes:
            print(node.dump_logs())
