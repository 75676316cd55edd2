"""A cluster mixing interpreters: a Python 2.7 master with a 3.x client, and the reverse.

The node of the interpreter running the tests comes from the session installation; the other
one from an installation made here with install.sh for the other interpreter (2.7 when the
tests run on 3.x, the newest 3.x that can import cryptography when they run on 2.7). That
interpreter needs cryptography: importable as it is, or from the test dependency folder tests/run
keeps (WAZUH_CLUSTER_TEST_CACHE, ~/.cache/wazuh-cluster-tests/pyX.Y) or /tmp/t27 for 2.7;
install.sh then writes sh wrappers that carry that PYTHONPATH. Without such an interpreter the
tests are skipped with the reason. Every wait polls a condition with a bound.
"""
from __future__ import absolute_import, division, print_function

import glob
import os
import re
import subprocess
import time

import pytest

from harness import (Node, base_install, clone_install, free_port, install,  # noqa: F401
                     new_address, new_key, python, run, start_all, tmp_prefix_dir, wait_for,
                     workspace, write_internal_options)
from test_crash import converge, tree  # race-free while daemons delete files
from test_sync import FAST, KEYS, agent_info, put

from wazuh_cluster import compat

SYNC_WAIT = 30.0


# ------------------------------------------------------------------ finding the interpreters

def _pyenv_root():
    if os.environ.get("PYENV_ROOT"):
        return os.environ["PYENV_ROOT"]
    try:
        out = subprocess.check_output(["pyenv", "root"], stderr=open(os.devnull, "wb"))
        return out.decode("utf-8", "replace").strip()
    except (OSError, subprocess.CalledProcessError):
        return os.path.expanduser("~/.pyenv")


def _versions():
    """[(major, minor, micro), path] of the pyenv interpreters, newest first (as tests/run)."""
    found = []
    for path in glob.glob(os.path.join(_pyenv_root(), "versions", "*", "bin", "python")):
        match = re.match(r"^(\d+)\.(\d+)\.(\d+)$", os.path.basename(os.path.dirname(
            os.path.dirname(path))))
        if match and os.access(path, os.X_OK):
            found.append((tuple(int(x) for x in match.groups()), path))
    return sorted(found, reverse=True)


def _imports_cryptography(py, pythonpath):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return run([py, "-c", "import cryptography"], timeout=60, env=env).rc == 0


def _deps_folder(py, version):
    """'' when `py` imports cryptography as it is, a folder for PYTHONPATH, or None."""
    if _imports_cryptography(py, None):
        return ""
    cache = os.environ.get("WAZUH_CLUSTER_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "wazuh-cluster-tests")
    candidates = [os.path.join(cache, "py%d.%d" % version[:2])]
    if version[:2] == (2, 7):
        candidates.append("/tmp/t27")
    for folder in candidates:
        if os.path.isdir(folder) and _imports_cryptography(py, folder):
            return folder
    return None


def other_interpreter():
    """(label, path, PYTHONPATH) of the other interpreter, or pytest.skip with the reason."""
    versions = _versions()
    if compat.PY2:
        wanted = [(v, p) for v, p in versions if v[0] == 3 and v[1] >= 6]
        label = "Python 3.6+"
    else:
        wanted = [(v, p) for v, p in versions if v[:2] == (2, 7)]
        label = "Python 2.7"
    if not wanted:
        pytest.skip("%s is not installed under %s/versions" % (label, _pyenv_root()))
    for version, path in wanted:
        deps = _deps_folder(path, version)
        if deps is not None:
            return "%d.%d" % version[:2], path, deps
    pytest.skip("no %s here can import cryptography (neither as installed nor from the test "
                "dependency cache of tests/run): run tests/run once to fill the cache" % label)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def other_install(workspace, base_install):
    """install.sh for the other interpreter, once per module; returns (prefix, label)."""
    label, path, deps = other_interpreter()
    prefix = os.path.join(workspace, "mixed-install-%s" % label)
    if not os.path.isdir(prefix):
        env = dict((k, v) for k, v in os.environ.items() if k != "PYTHONPATH")
        if deps:
            env["PYTHONPATH"] = deps
        result = install(prefix, path, env=env, check=False)
        if result.rc != 0:
            pytest.fail("install.sh for Python %s (%s) failed:\n%s\n%s"
                        % (label, path, result.out, result.err))
    return prefix, label


@pytest.fixture
def mixed(base_install, other_install, tmp_prefix_dir, request):
    """Factory: mixed(master_is_other) -> (master, client), configured, not started."""
    nodes = []

    def factory(master_is_other):
        key = new_key()
        sources = [other_install[0], base_install]
        if not master_is_other:
            sources.reverse()
        made = []
        for name, source in zip(("master", "client"), sources):
            prefix = clone_install(source, os.path.join(tmp_prefix_dir, name))
            address = new_address()
            made.append(Node(prefix, name, address, None, key))
        port = free_port(made[0].address)
        addresses = [n.address for n in made]
        for node in made:
            node.port = port
            node.configure(node.name, addresses, interval="3s")
            write_internal_options(node.prefix, FAST)
        nodes.extend(made)
        return made

    yield factory
    for node in nodes:
        node.cleanup()
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        for node in nodes:
            print(node.dump_logs())


# ------------------------------------------------------------------ tests

def _python_of(node):
    match = re.search(r"Starting wazuh-clusterd \S+ \(Python (\d+\.\d+)", node.log())
    return match.group(1) if match else None


def _check_mixed_cluster(master, client, master_python, client_python):
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    put(master, "etc/shared/web/agent.conf", u"<agent_config><x/></agent_config>\n")
    put(master, "queue/agent-groups/001", u"web")
    start_all([master, client])
    assert _python_of(master) == master_python, master.dump_logs()
    assert _python_of(client) == client_python, client.dump_logs()
    # First synchronisation.
    converge([master, client], SYNC_WAIT)
    assert "etc/shared/web/agent.conf" in tree(client.prefix)
    # A change: an edit, a new file, a deletion.
    put(master, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
    put(master, "etc/shared/web/new.txt", u"new file\n", mtime=1500000000)
    os.unlink(master.path("etc", "shared", "default", "agent.conf"))
    converge([master, client], SYNC_WAIT)
    assert int(os.stat(client.path("etc", "shared", "web", "new.txt")).st_mtime) == 1500000000
    # agent-info to the master, with the client's mtime; then a keepalive touch.
    now = int(time.time())
    put(client, "queue/agent-info/web01-any", agent_info("client"), mtime=now - 100)
    target = master.path("queue", "agent-info", "web01-any")
    wait_for(lambda: os.path.exists(target) and int(os.stat(target).st_mtime) == now - 100,
             SYNC_WAIT, what="agent-info on the master with the client's mtime")
    os.utime(client.path("queue", "agent-info", "web01-any"), (now, now))
    wait_for(lambda: int(os.stat(target).st_mtime) == now, SYNC_WAIT,
             what="the keepalive touch on the master")
    with open(target) as handle:
        assert handle.read() == agent_info("client")


def _current():
    """MAJOR.MINOR of the interpreter running the tests (and the session installation)."""
    return ".".join(compat.VERSION.split(".")[:2])


# slow: its direction is still run by default, by the other interpreter's run of the test
# below (a 2.7 master with a 3.x client in the 2.7 run, the reverse in the 3.x runs).
@pytest.mark.slow
def test_other_interpreter_master_with_this_interpreter_client_converge(mixed, other_install):
    master, client = mixed(master_is_other=True)
    _check_mixed_cluster(master, client, other_install[1], _current())


def test_this_interpreter_master_with_other_interpreter_client_converge(mixed, other_install):
    master, client = mixed(master_is_other=False)
    _check_mixed_cluster(master, client, _current(), other_install[1])
