"""A local N-node cluster on loopback addresses: used by tests/lab and the integration tests.

    nodes = start_cluster("/tmp/lab", 3)      # node01 master on 127.0.0.2, node02.. clients
    nodes[0].cluster_control("-n")            # Result(cmd, rc, out, err)
    stop_cluster("/tmp/lab")

Each node is its own installation in DIR/nodeK (install.sh --no-start once, copies for the
others), with an ossec.conf sharing one random key, bind_addr = its address, the same port, and
every address in <nodes>; fast cluster.* options in etc/local_internal_options.conf. The master
gets sample agents (etc/client.keys), groups (etc/shared/<group>/agent.conf,
queue/agent-groups) and the clients the agent-info files of the agents reporting to them
(SPEC section 2). DIR/lab.json records the nodes for `status` and `down`.

As root the daemons drop to user `ossec`, which must exist and be able to run the
interpreter: the caller provides that (tests/run's namespace, or tests/lab's own re-exec).
Standard library only, Python 2.7 and 3.x; no pytest.
"""
from __future__ import absolute_import, division, print_function

import collections
import glob
import io
import json
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
INSTALL_SH = os.path.join(REPO, "install.sh")
STATE_FILE = "lab.json"

try:
    _clock = time.monotonic
except AttributeError:  # Python 2.7: good enough for bounded waits
    _clock = time.time

# Fast but sane cadences for a lab (defaults in SPEC are for production).
FAST_OPTIONS = {
    "cluster.poll_interval": "0.5",
    "cluster.scan_interval": "2",
    "cluster.keepalive": "1",
    "cluster.reconnect_max": "2",
    "cluster.push_delay": "0.1",
    "cluster.request_timeout": "10",
    "cluster.internal_restart_max": "2",
}

# (id, name, ip, group, agent-info): "full" -> Active, "empty" -> Pending, None -> never connected
Agent = collections.namedtuple("Agent", "id name ip group info")
SAMPLE_AGENTS = (
    Agent("001", "web01", "10.0.0.1", "web", "full"),
    Agent("002", "web02", "10.0.0.2", "web", "full"),
    Agent("003", "db01", "any", "default", "full"),
    Agent("004", "mail01", "10.0.1.0/24", "default", "empty"),
    Agent("005", "new01", "10.0.0.5", "default", None),
)
GROUPS = {
    "default": u"<agent_config>\n  <syscheck>\n    <frequency>43200</frequency>\n"
               u"  </syscheck>\n</agent_config>\n",
    "web": u"<agent_config>\n  <localfile>\n    <log_format>apache</log_format>\n"
           u"    <location>/var/log/httpd/access_log</location>\n  </localfile>\n"
           u"</agent_config>\n",
}

CONF = u"""<!-- written by tests/lab_harness.py -->
<ossec_config>
  <cluster>
    <name>{cluster}</name>
    <node_name>{name}</node_name>
    <node_type>{node_type}</node_type>
    <key>{key}</key>
    <interval>{interval}</interval>
    <port>{port}</port>
    <bind_addr>{address}</bind_addr>
    <nodes>
{nodes}
    </nodes>
    <hidden>no</hidden>
    <disabled>no</disabled>
  </cluster>
</ossec_config>
"""


# ------------------------------------------------------------------ running as root
# As root the daemons drop to user ossec, which the machine may lack, and the interpreters may
# live under /root (0700). This is tests/run's recipe: a private mount namespace where
# /etc/passwd and /etc/group are copies holding an `ossec` user and /root is traversable, so
# nothing of the machine's /etc or /root changes.
NS_SCRIPT = r'''
t=$0
mount --make-rprivate / || exit 97
mount --bind "$t/passwd" /etc/passwd && mount --bind "$t/group" /etc/group || exit 97
for e in /root/* /root/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    n=${e##*/}
    if [ -d "$e" ] && [ ! -L "$e" ]; then mkdir -p "$t/root/$n"; else : > "$t/root/$n"; fi
    mount --rbind "$e" "$t/root/$n" || exit 97
done
mount --rbind "$t/root" /root || exit 97
exec "$@"
'''
NS_FAILED = 97


def _free_id():
    import grp
    import pwd
    ident = 9999
    while True:
        try:
            pwd.getpwuid(ident)
        except KeyError:
            try:
                grp.getgrgid(ident)
            except KeyError:
                return ident
        ident += 1


def run_in_ossec_namespace(ns, argv, mark, home="/var/ossec"):
    """Run argv (as root) in tests/run's namespace prepared in folder `ns`; return its status.

    `mark` is set in the child's environment so that a script re-running itself knows it is
    inside. Status NS_FAILED means the namespace could not be set up.
    """
    import grp
    import pwd
    with open("/etc/passwd") as src:
        passwd = src.read()
    with open("/etc/group") as src:
        group = src.read()
    try:
        pwd.getpwnam("ossec")
        grp.getgrnam("ossec")
    except KeyError:
        ident = _free_id()
        passwd = passwd.rstrip("\n") + "\nossec:x:%d:%d::%s:/sbin/nologin\n" % (ident, ident,
                                                                                 home)
        group = group.rstrip("\n") + "\nossec:x:%d:\n" % ident
    for name, text in (("passwd", passwd), ("group", group)):
        with open(os.path.join(ns, name), "w") as out:
            out.write(text)
        os.chmod(os.path.join(ns, name), 0o644)
    if not os.path.isdir(os.path.join(ns, "root")):
        os.mkdir(os.path.join(ns, "root"))
    os.chmod(os.path.join(ns, "root"), 0o711)
    env = dict(os.environ)
    env[mark] = "1"
    return subprocess.call(["unshare", "-m", "sh", "-c", NS_SCRIPT, ns] + list(argv), env=env)



def reexec_in_ossec_namespace(script, argv, mark, tag):
    """As root: run `script argv` again in a throwaway namespace folder; return its status."""
    import shutil
    ns = tempfile.mkdtemp(prefix="wazuh-%s-ns." % tag)
    try:
        rc = run_in_ossec_namespace(ns, [sys.executable, os.path.abspath(script)] + list(argv),
                                    mark)
        if rc == NS_FAILED:
            sys.stderr.write("%s: cannot set up the mount namespace for user ossec\n" % tag)
        return rc
    finally:
        shutil.rmtree(ns, ignore_errors=True)

class LabError(Exception):
    """The lab cannot be set up or driven; the message says why."""


# -- running and waiting -------------------------------------------------------------------------

def wait_for(predicate, timeout=10.0, interval=0.1, what="condition"):
    """Poll `predicate` until true (returned) or `timeout` s pass (LabError naming `what`)."""
    deadline = _clock() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if _clock() >= deadline:
            raise LabError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


Result = collections.namedtuple("Result", "cmd rc out err")


def run(cmd, timeout=120.0, env=None):
    """Run a command to completion; output through files, so a daemon that forks and keeps
    an inherited descriptor does not make us wait for it."""
    cmd = [str(part) for part in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen(cmd, stdin=devnull, stdout=out, stderr=err, env=env,
                                    close_fds=True)
            try:
                wait_for(lambda: proc.poll() is not None, timeout, 0.02,
                         what="%s to finish" % " ".join(cmd))
            except LabError:
                proc.kill()
                proc.wait()
                raise
        out.seek(0)
        err.seek(0)
        return Result(cmd, proc.returncode, out.read().decode("utf-8", "replace"),
                      err.read().decode("utf-8", "replace"))


def alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (IOError, OSError):
        return False


def new_key():
    rng = random.SystemRandom()
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))


# -- files with Wazuh's owners -----------------------------------------------------------------

def ossec_ids():
    """(uid, gid) of user/group ossec, or None when not root (files stay ours)."""
    if os.geteuid() != 0:
        return None
    import grp
    import pwd
    try:
        return pwd.getpwnam("ossec").pw_uid, grp.getgrnam("ossec").gr_gid
    except KeyError:
        raise LabError("running as root, the daemons drop to user 'ossec', which does not "
                       "exist here: run tests/lab (it provides one in a private namespace) "
                       "or install.sh first")


def put(path, text, mode=0o660, owner="ossec", mtime=None):
    """Write a file (in place when it exists, keeping its owner), then mode and owner."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder)
        chown(folder, "root", 0o770)
    fresh = not os.path.exists(path)
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    if fresh:
        chown(path, owner, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def chown(path, owner, mode):
    """Mode, and as root owner ('ossec' -> ossec:ossec, 'root' -> root:ossec)."""
    os.chmod(path, mode)
    ids = ossec_ids()
    if ids is not None:
        os.chown(path, ids[0] if owner == "ossec" else 0, ids[1])


# -- nodes --------------------------------------------------------------------------------------

class LabNode(object):
    """One installation and the daemons started from it."""

    def __init__(self, prefix, name, node_type, address, port):
        self.prefix = prefix
        self.name = name
        self.node_type = node_type
        self.address = address
        self.port = port

    def to_json(self):
        return {"prefix": self.prefix, "name": self.name, "node_type": self.node_type,
                "address": self.address, "port": self.port}

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)

    def ossec_control(self, *args):
        return run([self.path("bin", "ossec-control")] + list(args), timeout=60)

    def cluster_control(self, *args):
        """PREFIX/bin/cluster_control -D PREFIX ARGS -> Result."""
        return run([self.path("bin", "cluster_control"), "-D", self.prefix] + list(args),
                   timeout=60)

    def control_json(self, *args):
        """cluster_control -j ARGS parsed; LabError when it fails."""
        result = self.cluster_control(*(list(args) + ["-j"]))
        if result.rc != 0:
            raise LabError("%s: cluster_control %s failed: %s"
                           % (self.name, " ".join(args), result.err.strip()))
        return json.loads(result.out)

    def pids(self, daemon="wazuh-clusterd"):
        """Live PIDs named by var/run/DAEMON-PID.pid (exactly that daemon)."""
        found = []
        for path in glob.glob(self.path("var", "run", daemon + "-*.pid")):
            tail = os.path.basename(path)[len(daemon) + 1:-len(".pid")]
            if tail.isdigit() and alive(int(tail)):
                found.append(int(tail))
        return sorted(found)

    def all_pids(self):
        return self.pids("wazuh-clusterd") + self.pids("wazuh-clusterd-internal")

    def running(self):
        return bool(self.pids("wazuh-clusterd") and self.pids("wazuh-clusterd-internal"))

    def start(self, timeout=20.0):
        result = self.ossec_control("start")
        if result.rc != 0:
            raise LabError("%s: ossec-control start failed (exit %d): %s\n%s"
                           % (self.name, result.rc, (result.out + result.err).strip(),
                              self.dump_logs()))
        wait_for(self.running, timeout, what="both daemons of %s" % self.name)

    def stop(self, timeout=20.0):
        """ossec-control stop, then wait (bounded) until the daemons are gone; kill leftovers."""
        pids = self.all_pids()
        result = self.ossec_control("stop")
        try:
            wait_for(lambda: not [p for p in pids if alive(p)], timeout,
                     what="the daemons of %s to exit" % self.name)
        except LabError:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return result

    def log(self, name="cluster.log"):
        try:
            with io.open(self.path("logs", name), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except (IOError, OSError):
            return u""

    def dump_logs(self, lines=40):
        return "\n".join("---- %s %s (last %d lines)\n%s" % (
            self.name, name, lines, "\n".join(self.log(name).splitlines()[-lines:]))
            for name in ("cluster.log", "ossec.log"))


# -- building a cluster ---------------------------------------------------------------------------

def check_python(python):
    """The nodes' interpreter must run and import cryptography (install.sh would pip it)."""
    result = run([python, "-c", "import cryptography"], timeout=60, env=os.environ.copy())
    if result.rc != 0:
        raise LabError("%s cannot import cryptography; pass --python with an interpreter "
                       "that can" % python)


def install_node(prefix, python, template=None, env=None):
    """A fresh installation: install.sh the first time, a copy (cp -a) of `template` after.

    `env`: install.sh's environment (default ours); a PYTHONPATH there that the interpreter
    needs for cryptography is written into the entry points' sh wrappers.
    """
    if template is None:
        result = run(["bash", INSTALL_SH, "--no-start", "--prefix", prefix, "--python", python],
                     timeout=600, env=env)
        if result.rc != 0:
            raise LabError("install.sh --prefix %s failed:\n%s%s"
                           % (prefix, result.out, result.err))
        return
    result = run(["cp", "-a", template, prefix])
    if result.rc != 0:
        raise LabError("cannot copy %s: %s" % (template, result.err.strip()))
    # sh wrappers (interpreters that need their environment) name the real script by path.
    for path in glob.glob(os.path.join(prefix, "bin", "*")):
        with io.open(path, "rb") as handle:
            data = handle.read()
        old = ("'%s/" % template).encode()
        if data.startswith(b"#!/bin/sh") and old in data:
            with io.open(path, "wb") as handle:
                handle.write(data.replace(old, ("'%s/" % prefix).encode()))


def configure(node, key, addresses, interval, options, cluster="wazuh"):
    nodes = "\n".join("      <node>%s</node>" % a for a in addresses)
    put(node.path("etc", "ossec.conf"),
        CONF.format(cluster=cluster, name=node.name, node_type=node.node_type, key=key,
                    interval=interval, port=node.port, address=node.address, nodes=nodes),
        0o640, "root")
    put(node.path("etc", "local_internal_options.conf"),
        u"".join(u"%s=%s\n" % item for item in sorted(options.items())), 0o640, "root")


def agent_info(agent, node_name):
    """An agent-info file as a Wazuh 3.0 manager writes it (SPEC section 2)."""
    if agent.info == "empty":
        return u""
    return (u"Linux %s 3.10.0-693.el7.x86_64 #1 SMP x86_64 [CentOS Linux|centos: 7 (Core)] - "
            u"Wazuh v3.0.0 / 6f42d2b2e1b3a0b7c5d4e3f2a1b0c9d8\n\"env\":lab\n"
            u"7976a83d1aebcca09bc14459b5518ed5 merged.mg\n\n"
            u"#\"manager_hostname\":%s\n#\"node_name\":%s\n" % (agent.name, node_name, node_name))


def agent_homes(nodes, agents=SAMPLE_AGENTS):
    """{agent id: node} for the agents that have reported: round robin over the clients."""
    reporters = [n for n in nodes if n.node_type == "client"] or nodes[:1]
    connected = [a for a in agents if a.info is not None]
    return dict((a.id, reporters[i % len(reporters)]) for i, a in enumerate(connected))


def write_agents(nodes, agents=SAMPLE_AGENTS):
    """client.keys, groups and agent-groups on the master; agent-info where each reports."""
    master = nodes[0]
    rng = random.SystemRandom()
    keys = u"".join(u"%s %s %s %s\n" % (a.id, a.name, a.ip, "".join(
        rng.choice("0123456789abcdef") for _ in range(64))) for a in agents)
    put(master.path("etc", "client.keys"), keys, 0o640, "root")
    for group, text in sorted(GROUPS.items()):
        put(master.path("etc", "shared", group, "agent.conf"), text, 0o660, "root")
    for agent in agents:
        put(master.path("queue", "agent-groups", agent.id), compat_text(agent.group),
            0o660, "ossec")
    homes = agent_homes(nodes, agents)
    now = time.time()
    for agent in agents:
        node = homes.get(agent.id)
        if node is not None:
            put(node.path("queue", "agent-info", "%s-%s" % (agent.name, agent.ip.split("/")[0])),
                agent_info(agent, node.name), 0o660, "ossec", mtime=now)


def compat_text(value):
    return value if isinstance(value, type(u"")) else value.decode("utf-8")


def lab_addresses(n):
    return ["127.0.0.%d" % (k + 1) for k in range(1, n + 1)]


def create_cluster(base, n, port=1516, python=None, addresses=None, key=None, interval="10s",
                   options=None, agents=SAMPLE_AGENTS):
    """Install and configure N nodes under `base` (not started); returns the LabNodes."""
    if n < 1 or n > 250:
        raise LabError("the number of nodes must be 1..250")
    python = os.path.realpath(python or sys.executable)
    addresses = list(addresses or lab_addresses(n))
    ossec_ids()  # as root, fail before creating anything when user ossec is missing
    check_python(python)
    if os.path.exists(os.path.join(base, STATE_FILE)):
        raise LabError("%s already holds a lab: run 'tests/lab down %s' and remove it, or "
                       "use another folder" % (base, base))
    if not os.path.isdir(base):
        os.makedirs(base)
    os.chmod(base, 0o755)  # user ossec must reach the installations
    merged = dict(FAST_OPTIONS)
    merged.update(options or {})
    key = key or new_key()
    nodes = []
    for k in range(1, n + 1):
        node = LabNode(os.path.join(base, "node%02d" % k), "node%02d" % k,
                       "master" if k == 1 else "client", addresses[k - 1], port)
        install_node(node.prefix, python, nodes[0].prefix if nodes else None)
        configure(node, key, addresses, interval, merged)
        nodes.append(node)
    if agents:
        write_agents(nodes, agents)
    save_nodes(base, nodes)
    return nodes


def save_nodes(base, nodes):
    with io.open(os.path.join(base, STATE_FILE), "w", encoding="utf-8") as handle:
        handle.write(compat_text(json.dumps({"nodes": [n.to_json() for n in nodes]},
                                            indent=2)))


def load_nodes(base):
    """The LabNodes recorded in base/lab.json."""
    try:
        with io.open(os.path.join(base, STATE_FILE), encoding="utf-8") as handle:
            data = json.load(handle)
    except (IOError, OSError, ValueError):
        raise LabError("%s holds no lab (no readable %s)" % (base, STATE_FILE))
    return [LabNode(d["prefix"], d["name"], d["node_type"], d["address"], d["port"])
            for d in data["nodes"]]


def wait_connected(nodes, timeout=30.0):
    """Until the master lists every node as connected (-n -j on the master)."""
    names = set(n.name for n in nodes)

    def connected():
        try:
            listed = nodes[0].control_json("-n")["nodes"]
        except LabError:
            return False
        return names <= set(r["name"] for r in listed if r["status"] == "connected")
    wait_for(connected, timeout, 0.2, what="every node connected to the master")


def start_cluster(base, n, port=1516, python=None, addresses=None, key=None, interval="10s",
                  options=None, agents=SAMPLE_AGENTS, wait=True, timeout=60.0):
    """create_cluster, start every node (master first), and wait until all are connected."""
    nodes = create_cluster(base, n, port, python, addresses, key, interval, options, agents)
    try:
        for node in nodes:
            node.start()
        if wait:
            wait_connected(nodes, timeout)
    except LabError:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes):
    """Stop clients first, then the master; returns {name: Result}."""
    return dict((node.name, node.stop()) for node in reversed(nodes))


def stop_cluster(base):
    return stop_nodes(load_nodes(base))
