"""install.sh: fresh install, ossec.conf handling, upgrade in place, uninstall (SPEC 7)."""
from __future__ import absolute_import, division, print_function

import io
import os
import re
import stat
import subprocess
import sys

import pytest

from harness import (  # noqa: F401  (fixtures are found by pytest through these imports)
    INSTALL_SH, Node, find_executable, free_port, install, new_address, new_key, proc_exe, python,
    read_log, run, tmp_prefix_dir, uninstall, wait_for, workspace, write_cluster_conf, write_file,
    _need_ossec_user)


def read(path):
    with io.open(path, encoding="utf-8") as handle:
        return handle.read()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def owner(path):
    import grp
    import pwd
    st = os.stat(path)
    return "%s:%s" % (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)


def cluster_value(conf, element):
    match = re.search(r"<cluster>.*?<%s>([^<]*)</%s>" % (element, element), conf, re.S)
    return match.group(1) if match else None


def host_addresses():
    out = subprocess.Popen(["hostname", "--all-ip-addresses"], stdout=subprocess.PIPE,
                           stderr=open(os.devnull, "wb")).communicate()[0]
    return out.decode("ascii", "replace").split()


def needs_environment(python):
    """True when the interpreter cannot import cryptography in a bare environment."""
    return run(["env", "-i", python, "-c", "import cryptography"]).rc != 0


WAZUH_CONF = u"""<!-- Wazuh manager configuration -->
<ossec_config>
  <global>
    <jsonout_output>yes</jsonout_output>
    <email_notification>no</email_notification>
  </global>
</ossec_config>
"""

CLUSTER_CONF = WAZUH_CONF + u"""
<ossec_config>
  <cluster>
    <name>prod</name>
    <node_name>manager02</node_name>
    <node_type>client</node_type>
    <key>abcdefghijklmnopqrstuvwxyz012345</key>
    <interval>5m</interval>
    <port>1516</port>
    <bind_addr>0.0.0.0</bind_addr>
    <nodes>
      <node>10.0.0.1</node>
      <node>10.0.0.2</node>
    </nodes>
    <hidden>yes</hidden>
    <disabled>no</disabled>
  </cluster>
</ossec_config>
"""


def test_fresh_install_lays_out_the_prefix_with_wazuh_permissions(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, python)
    for name in ("wazuh-clusterd", "wazuh-clusterd-internal", "cluster_control",
                 "ossec-control"):
        assert os.access(os.path.join(prefix, "bin", name), os.X_OK), name
    assert os.path.isfile(os.path.join(prefix, "lib", "wazuh_cluster", "clusterd.py"))
    assert os.path.isfile(os.path.join(prefix, "etc", "cluster.json"))
    expected = {"etc/shared": 0o770, "queue/agent-info": 0o770, "queue/agent-groups": 0o770,
                "backup/agents": 0o750, "logs/cluster.log": 0o660}
    for rel, want in expected.items():
        assert mode(os.path.join(prefix, rel)) == want, rel
    for rel in ("var/run", "var/db", "queue/ossec"):
        assert os.path.isdir(os.path.join(prefix, rel)), rel
    if os.geteuid() == 0:
        assert owner(os.path.join(prefix, "etc/shared")) == "root:ossec"
        assert owner(os.path.join(prefix, "logs/cluster.log")) == "ossec:ossec"
        assert owner(os.path.join(prefix, "backup/agents")) == "ossec:ossec"


def test_entry_scripts_run_the_chosen_interpreter(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, python)
    script = read(os.path.join(prefix, "bin", "wazuh-clusterd"))
    if needs_environment(python):
        # sh wrapper: sets the environment, execs the interpreter on the real script.
        assert script.startswith("#!/bin/sh\n")
        assert "exec '%s' '%s/lib/wazuh-cluster-bin/wazuh-clusterd'" % (python, prefix) in script
        real = read(os.path.join(prefix, "lib", "wazuh-cluster-bin", "wazuh-clusterd"))
        assert real.splitlines()[0] == "#!" + python
    else:
        assert script.splitlines()[0] == "#!" + python
    result = run([os.path.join(prefix, "bin", "wazuh-clusterd"), "-V"])
    assert result.rc == 0, result
    # -V names the interpreter's version: the script really runs under it.
    version = run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]).out
    assert version.strip() in result.out + result.err


def test_prefix_without_ossec_conf_gets_a_working_enabled_single_master(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, python)
    conf_path = os.path.join(prefix, "etc", "ossec.conf")
    conf = read(conf_path)
    assert re.match(r"^[A-Za-z0-9]{32}$", cluster_value(conf, "key"))
    assert cluster_value(conf, "node_type") == "master"
    assert cluster_value(conf, "disabled") == "no"
    node = re.search(r"<node>([^<]+)</node>", conf).group(1)
    assert node in host_addresses() or (node == "127.0.0.1"
                                        and cluster_value(conf, "bind_addr") == "127.0.0.1")
    assert mode(conf_path) == 0o640
    # A second install elsewhere draws another key.
    other = os.path.join(tmp_prefix_dir, "other")
    install(other, python)
    assert cluster_value(read(os.path.join(other, "etc", "ossec.conf")), "key") \
        != cluster_value(conf, "key")
    # Valid as generated...
    result = run([os.path.join(prefix, "bin", "wazuh-clusterd"), "-t"])
    assert result.rc == 0, result
    # ...and it starts (on a free port, so that parallel runs do not collide on 1516).
    port = free_port(cluster_value(conf, "bind_addr"))
    write_file(conf_path, conf.replace("<port>1516</port>", "<port>%d</port>" % port))
    node = Node(prefix)
    try:
        node.start()
        assert node.control("status").rc == 0
    finally:
        node.control("stop")
        node.cleanup()


def test_existing_conf_without_cluster_gets_the_disabled_template(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    os.makedirs(os.path.join(prefix, "etc"))
    conf_path = os.path.join(prefix, "etc", "ossec.conf")
    write_file(conf_path, WAZUH_CONF)
    install(prefix, python)
    conf = read(conf_path)
    assert conf.startswith(WAZUH_CONF), "the operator's configuration must stay as it was"
    assert conf.count("<cluster>") == 1
    assert cluster_value(conf, "disabled") == "yes"
    assert cluster_value(conf, "node_type") == "master"
    assert cluster_value(conf, "port") == "1516"
    # The appended block sits in its own <ossec_config> block.
    tail = conf[len(WAZUH_CONF):]
    assert tail.index("<ossec_config>") < tail.index("<cluster>")
    assert tail.rstrip().endswith("-->") and "</ossec_config>" in tail
    # A disabled cluster: the daemon says so and exits 0 with no PID file.
    result = run([os.path.join(prefix, "bin", "wazuh-clusterd")])
    assert result.rc == 0, (result, read_log(prefix))
    assert "Cluster disabled" in read_log(prefix)
    assert not os.listdir(os.path.join(prefix, "var", "run"))
    # Uninstall strips the block again: the file is the operator's original.
    uninstall(prefix)
    assert read(conf_path) == WAZUH_CONF


def test_existing_cluster_block_is_left_untouched(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    os.makedirs(os.path.join(prefix, "etc"))
    conf_path = os.path.join(prefix, "etc", "ossec.conf")
    write_file(conf_path, CLUSTER_CONF)
    os.chmod(conf_path, 0o640)
    before = os.stat(conf_path)
    install(prefix, python)
    install(prefix, python)
    assert read(conf_path) == CLUSTER_CONF
    after = os.stat(conf_path)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid,
                                                           before.st_gid)


def test_reinstall_keeps_config_key_and_database(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, python)
    conf_path = os.path.join(prefix, "etc", "ossec.conf")
    conf = read(conf_path)
    db = os.path.join(prefix, "var", "db", "cluster.db")
    write_file(db, u"database content")
    cluster_json = os.path.join(prefix, "etc", "cluster.json")
    shipped = read(cluster_json)
    # A module that no longer ships must not linger after an upgrade.
    stale = os.path.join(prefix, "lib", "wazuh_cluster", "stale_module.py")
    write_file(stale, u"")
    install(prefix, python)
    assert read(conf_path) == conf
    assert read(db) == u"database content"
    assert read(cluster_json) == shipped
    assert not os.path.exists(stale)
    # An operator's edit of the items table survives too; the shipped one lands next to it.
    write_file(cluster_json, shipped.replace("client.keys", "client.keys", 1) + u"\n")
    edited = read(cluster_json)
    install(prefix, python)
    assert read(cluster_json) == edited
    assert read(cluster_json + ".new") == shipped


def test_uninstall_removes_everything_from_a_fresh_prefix(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, python)
    install(prefix, python)
    uninstall(prefix)
    assert not os.path.exists(prefix), sorted(
        os.path.join(d, f) for d, _, fs in os.walk(prefix) for f in fs)


def test_uninstall_restores_replaced_files_and_keeps_the_wazuh_ones(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    for rel in ("bin", "etc", "logs", "var/run"):
        os.makedirs(os.path.join(prefix, rel))
    old_daemon = os.path.join(prefix, "bin", "wazuh-clusterd")
    write_file(old_daemon, u"#!/usr/bin/env python\n# Wazuh 3.0 wazuh-clusterd\n")
    os.chmod(old_daemon, 0o750)
    control = os.path.join(prefix, "bin", "ossec-control")
    wazuh_control = u"#!/bin/sh\n# Wazuh ossec-control\nDAEMONS=\"ossec-analysisd wazuh-clusterd\"\n"
    write_file(control, wazuh_control)
    os.chmod(control, 0o750)
    write_file(os.path.join(prefix, "etc", "ossec.conf"), CLUSTER_CONF)
    write_file(os.path.join(prefix, "etc", "client.keys"), u"001 web01 any KEY\n")
    write_file(os.path.join(prefix, "etc", "internal_options.conf"), u"analysisd.debug=0\n")
    install(prefix, python)
    assert "Wazuh 3.0" not in read(old_daemon)
    assert read(control) == wazuh_control, "a Wazuh ossec-control managing wazuh-clusterd stays"
    install(prefix, python)
    uninstall(prefix)
    assert read(old_daemon) == u"#!/usr/bin/env python\n# Wazuh 3.0 wazuh-clusterd\n"
    assert mode(old_daemon) == 0o750
    assert read(control) == wazuh_control
    assert read(os.path.join(prefix, "etc", "ossec.conf")) == CLUSTER_CONF
    assert read(os.path.join(prefix, "etc", "client.keys")) == u"001 web01 any KEY\n"
    assert read(os.path.join(prefix, "etc", "internal_options.conf")) == u"analysisd.debug=0\n"
    for rel in ("lib/wazuh_cluster", "bin/wazuh-clusterd-internal", "bin/cluster_control",
                "etc/cluster.json", "etc/ossec.conf.template", "var/wazuh-cluster-install"):
        assert not os.path.exists(os.path.join(prefix, rel)), rel


def test_foreign_ossec_control_is_kept_and_ours_installed_beside_it(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    os.makedirs(os.path.join(prefix, "bin"))
    control = os.path.join(prefix, "bin", "ossec-control")
    write_file(control, u"#!/bin/sh\n# OSSEC 2.9 ossec-control\n")
    result = install(prefix, python)
    assert read(control) == u"#!/bin/sh\n# OSSEC 2.9 ossec-control\n"
    assert os.access(os.path.join(prefix, "bin", "wazuh-cluster-control"), os.X_OK)
    assert "wazuh-cluster-control" in result.err


def test_install_errors_are_one_clear_line(tmp_prefix_dir):
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    result = install(prefix, "/nonexistent/python", check=False)
    assert result.rc != 0
    assert result.err.strip().count("\n") == 0 and "/nonexistent/python" in result.err
    result = run(["bash", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "install.sh"), "--bogus"])
    assert result.rc != 0 and "--bogus" in result.err
    result = uninstall(os.path.join(tmp_prefix_dir, "never-installed"), check=False)
    assert result.rc != 0 and "nothing to uninstall" in result.err


def test_install_without_no_start_restarts_and_uninstall_stops(tmp_prefix_dir, python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    os.makedirs(os.path.join(prefix, "etc"))
    address = new_address()
    port = free_port(address)
    conf = CLUSTER_CONF.replace("<node_type>client</node_type>", "<node_type>master</node_type>")
    conf = conf.replace("<bind_addr>0.0.0.0</bind_addr>", "<bind_addr>%s</bind_addr>" % address)
    conf = conf.replace("<port>1516</port>", "<port>%d</port>" % port)
    conf = conf.replace("<node>10.0.0.1</node>", "<node>%s</node>" % address)
    conf_path = os.path.join(prefix, "etc", "ossec.conf")
    write_file(conf_path, conf)
    node = Node(prefix)
    try:
        result = run(["bash", INSTALL_SH, "--prefix", prefix, "--python", python], timeout=300)
        assert result.rc == 0, node.explain("install.sh", result)
        node.wait_running()
        pids = node.all_pids()
        # Re-running upgrades and restarts: new daemons, same configuration.
        result = run(["bash", INSTALL_SH, "--prefix", prefix, "--python", python], timeout=300)
        assert result.rc == 0, node.explain("install.sh again", result)
        node.wait_running()
        assert not set(node.all_pids()) & set(pids)
        pids = node.all_pids()
        uninstall(prefix)
        node.wait_stopped(pids)
        assert not os.path.exists(os.path.join(prefix, "lib", "wazuh_cluster"))
        assert read(conf_path) == conf
    finally:
        node.cleanup()


def _venv_with_cryptography(workspace, python):
    """A venv of `python` that imports cryptography with no environment at all (3.x only)."""
    import cryptography
    venv = os.path.join(workspace, "venv-%d" % os.getpid())
    if not os.path.exists(venv):
        run([python, "-m", "venv", "--without-pip", venv], check=True)
        site = run([os.path.join(venv, "bin", "python"), "-c",
                    "import site; print(site.getsitepackages()[0])"], check=True).out.strip()
        deps = os.path.dirname(os.path.dirname(os.path.abspath(cryptography.__file__)))
        write_file(os.path.join(site, "wazuh-cluster-test-deps.pth"), u"%s\n" % deps)
    return os.path.join(venv, "bin", "python")


def test_interpreter_that_needs_no_environment_is_written_into_the_scripts(
        tmp_prefix_dir, workspace, python):
    _need_ossec_user()
    if sys.version_info[0] == 2:
        pytest.skip("needs the venv module (Python 3); the 2.7 run covers the sh wrappers")
    venv_python = _venv_with_cryptography(workspace, python)
    assert run(["env", "-i", venv_python, "-c", "import cryptography"]).rc == 0
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, venv_python)
    for name in ("wazuh-clusterd", "wazuh-clusterd-internal", "cluster_control"):
        first = read(os.path.join(prefix, "bin", name)).splitlines()[0]
        assert first == "#!" + venv_python, name
    assert not os.path.exists(os.path.join(prefix, "lib", "wazuh-cluster-bin"))
    address = new_address()
    write_cluster_conf(prefix, "wazuh", "node01", "master", new_key(), address,
                       free_port(address), [address])
    node = Node(prefix)
    try:
        node.start()  # a bare environment: the first line alone finds the interpreter
        assert proc_exe(node.internal_pid()) == os.path.realpath(venv_python)
    finally:
        node.stop()
        node.cleanup()


def test_install_and_run_as_an_unprivileged_user(tmp_prefix_dir, python):
    """Not root: install.sh creates the folders as that user and the daemons run as it."""
    if os.geteuid() != 0 or not find_executable("setpriv"):
        pytest.skip("needs root and setpriv to switch to an unprivileged user")
    uid = gid = 65534
    base = os.path.join(tmp_prefix_dir, "user")
    os.mkdir(base)
    os.chown(base, uid, gid)
    prefix = os.path.join(base, "ossec")
    as_user = ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups"]
    env = dict(os.environ, HOME=base)
    result = run(as_user + ["bash", INSTALL_SH, "--no-start", "--prefix", prefix,
                            "--python", python], env=env, timeout=300)
    assert result.rc == 0, result
    st = os.stat(os.path.join(prefix, "etc", "ossec.conf"))
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert mode(os.path.join(prefix, "etc", "shared")) == 0o770
    address = new_address()
    conf = write_cluster_conf(prefix, "wazuh", "node01", "master", new_key(), address,
                              free_port(address), [address])
    os.chown(conf, uid, gid)
    node = Node(prefix)
    try:
        result = node.control("start", argv_prefix=as_user)
        assert result.rc == 0, node.explain("start as an unprivileged user", result)
        node.wait_running()
        for pid in (node.running_pid(), node.internal_pid()):
            assert os.stat("/proc/%d" % pid).st_uid == uid
        result = node.control("stop", argv_prefix=as_user)
        assert result.rc == 0
    finally:
        node.cleanup()


# -- the interpreter is checked as the daemons will run it (issue 12) -------------------------

def _private_folder(parent):
    """A 0700 folder of root's: user ossec cannot enter it."""
    path = os.path.join(parent, "private")
    os.mkdir(path)
    os.chmod(path, 0o700)
    return path


def _one_line(result):
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.rc != 0 and len(lines) == 1, result
    return lines[0]


def test_interpreter_that_user_ossec_cannot_reach_is_refused_in_one_line(tmp_prefix_dir, python):
    if os.geteuid() != 0:
        pytest.skip("only root installs for another user")
    _need_ossec_user()
    # Root runs it (setpriv would even exec it, resolving the path while still privileged);
    # the privilege-dropped daemon would get "Permission denied".
    link = os.path.join(_private_folder(tmp_prefix_dir), "python")
    os.symlink(python, link)
    assert run([link, "-c", "import sys"]).rc == 0
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    line = _one_line(install(prefix, link, check=False))
    assert line.startswith("install.sh: error: user ossec cannot run %s " % link), line
    assert "--python PATH" in line and "system-wide" in line
    assert not os.path.exists(prefix), "nothing is installed"


def test_cryptography_that_user_ossec_cannot_import_is_refused_in_one_line(tmp_prefix_dir,
                                                                          python):
    if os.geteuid() != 0:
        pytest.skip("only root installs for another user")
    _need_ossec_user()
    if not needs_environment(python):
        pytest.skip("this interpreter imports cryptography from its own site-packages")
    import cryptography
    deps = os.path.dirname(os.path.dirname(os.path.abspath(cryptography.__file__)))
    hidden = os.path.join(_private_folder(tmp_prefix_dir), "deps")
    os.symlink(deps, hidden)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": hidden}
    assert run([python, "-c", "import cryptography"], env=env).rc == 0  # root imports it
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    line = _one_line(install(prefix, python, env=env, check=False))
    assert line.startswith("install.sh: error: user ossec can run %s but cannot import "
                           "cryptography" % python), line
    assert "--python PATH" in line
