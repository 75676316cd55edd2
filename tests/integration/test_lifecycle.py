"""Daemon lifecycle as ossec-control and Wazuh 3.0 drive it (SPEC 2, 3).

Every node is a copy of the session's installation (harness.base_install) with its own
loopback address, port and ossec.conf.
"""
from __future__ import absolute_import, division, print_function

import glob
import io
import json
import os
import signal
import socket
import stat
import subprocess
import tempfile

import pytest

from harness import (  # noqa: F401  (fixtures are found by pytest through these imports)
    DAEMON, INTERNAL, alive, base_install, kill, make_node, proc_exe, python, run,
    tmp_prefix_dir, wait_for, workspace, write_file)


def connectable(address, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect((address, port))
        return True
    except socket.error:
        return False
    finally:
        sock.close()


def test_ossec_control_start_status_restart_stop(make_node):
    node = make_node("node01", "master")
    result = node.start()
    assert "Started wazuh-clusterd..." in result.out
    # start returned 0 only once bind_addr:port is bound.
    assert connectable(node.address, node.port)
    first = (node.running_pid(), node.internal_pid())

    status = node.control("status")
    assert status.rc == 0, node.explain("status", status)
    assert "wazuh-clusterd is running..." in status.out
    as_json = json.loads(node.control("-j", "status").out)
    assert as_json == {"error": 0, "data": [{"daemon": DAEMON, "status": "running"}]}

    # A second start finds it running and starts nothing.
    again = node.control("start")
    assert again.rc == 0 and "wazuh-clusterd already running..." in again.out
    assert node.pids(DAEMON) == [first[0]]

    restarted = node.control("restart")
    assert restarted.rc == 0, node.explain("restart", restarted)
    node.wait_running()
    second = (node.running_pid(), node.internal_pid())
    assert first[0] != second[0] and first[1] != second[1]
    assert not alive(first[0]) and not alive(first[1])

    stopped = node.control("stop")
    assert stopped.rc == 0
    assert not glob.glob(node.path("var", "run", "wazuh-clusterd*.pid"))
    # stop returns once both daemons are gone (a start right after it finds the port free).
    assert not alive(second[0]) and not alive(second[1])
    status = node.control("status")
    assert status.rc == 1 and "wazuh-clusterd not running..." in status.out
    as_json = json.loads(node.control("-j", "status").out)
    assert as_json["data"] == [{"daemon": DAEMON, "status": "stopped"}]


def test_disabled_cluster_exits_zero_logs_and_leaves_no_pid_file(make_node):
    node = make_node("node01", "master", disabled=True)
    result = node.daemon()
    assert result.rc == 0, node.explain("disabled start", result)
    assert "Cluster disabled" in node.log()
    assert not glob.glob(node.path("var", "run", "*.pid"))
    # ossec-control reports a clean start and then nothing running.
    result = node.control("start")
    assert result.rc == 0, node.explain("ossec-control start", result)
    assert node.control("status").rc == 1
    assert not glob.glob(node.path("var", "run", "*.pid"))


def test_bad_key_is_refused_at_start_with_a_one_line_reason(make_node):
    node = make_node("node01", "master")
    node.key = "short"
    node.configure("master")
    result = node.daemon()
    assert result.rc != 0
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "key" in lines[0], result
    assert not glob.glob(node.path("var", "run", "*.pid"))
    result = node.control("start")
    assert result.rc == 1
    assert "wazuh-clusterd did not start correctly." in result.out
    assert node.control("status").rc == 1
    # -t names the problem too, one line per problem, exit 1.
    tested = node.daemon("-t")
    assert tested.rc == 1 and "key" in (tested.out + tested.err)


def test_config_test_flag_accepts_a_valid_config(make_node):
    node = make_node("node01", "master")
    result = node.daemon("-t")
    assert result.rc == 0, node.explain("-t", result)
    assert not glob.glob(node.path("var", "run", "*.pid"))


def test_own_address_missing_from_nodes_is_refused(make_node):
    node = make_node("node01", "master", nodes_list=["127.250.250.250"])
    result = node.daemon()
    assert result.rc != 0
    assert len([line for line in result.err.splitlines() if line.strip()]) == 1, result


def test_port_in_use_is_refused_with_a_one_line_reason(make_node):
    node = make_node("node01", "master")
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind((node.address, node.port))
        blocker.listen(1)
        result = node.daemon()
        assert result.rc != 0, node.explain("start on a busy port", result)
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert len(lines) == 1, result
    finally:
        blocker.close()
    assert not [pid for pid in node.all_pids() if alive(pid)]


# slow: test_internal's SIGKILL test checks the same restart, and that the new daemon answers.
@pytest.mark.slow
def test_internal_daemon_killed_is_restarted(make_node):
    node = make_node("node01", "master")
    node.start()
    main_pid, old = node.running_pid(), node.internal_pid()
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: [pid for pid in node.internal_pids() if pid != old], 15,
                   what="a new %s PID file" % INTERNAL)[0]
    assert alive(new) and not alive(old)
    assert node.running_pid() == main_pid
    assert node.control("status").rc == 0


def test_internal_daemon_that_cannot_start_makes_the_start_fail_with_its_cause(make_node):
    node = make_node("node01", "master")
    # The real script (behind the sh wrapper when the interpreter needs its environment).
    real = node.path("lib", "wazuh-cluster-bin", INTERNAL)
    script = real if os.path.exists(real) else node.path("bin", INTERNAL)
    with io.open(script, encoding="utf-8") as handle:
        text = handle.read()
    assert u"from wazuh_cluster.internal import main" in text
    write_file(script, text.replace(u"wazuh_cluster.internal import", u"wazuh_cluster.gone import"))
    result = node.control("start")
    assert result.rc == 1, node.explain("start with a broken internal daemon", result)
    assert "wazuh-clusterd did not start correctly." in result.out
    assert "Completed." not in result.out
    cause = [line for line in result.err.splitlines() if line.strip()]
    assert len(cause) == 1, result
    assert cause[0].startswith("wazuh-clusterd: ERROR: wazuh-clusterd-internal (pid ")
    assert "exited during its start with status 1" in cause[0] and "gone" in cause[0], cause
    assert "exited during its start" in node.log() and "gone" in node.log()
    wait_for(lambda: not [pid for pid in node.all_pids() if alive(pid)], 10.0,
             what="no daemon left running")
    assert not glob.glob(node.path("var", "run", "*.pid"))
    assert node.control("status").rc == 1
    # Run by hand in the foreground it exits non-zero with the same line.
    result = node.daemon("-f")
    assert result.rc == 1 and "exited during its start" in result.err, result


def test_daemons_run_under_the_installed_interpreter(make_node, python):
    # Under 2.7 (a software collection in production) the internal daemon must run 2.7 too.
    node = make_node("node01", "master")
    node.start()
    assert proc_exe(node.running_pid()) == python
    assert proc_exe(node.internal_pid()) == python


def test_wazuh30_style_start_and_kill(make_node):
    """Started as PREFIX/bin/wazuh-clusterd, stopped as Wazuh's ossec-control stops it."""
    node = make_node("node01", "master")
    result = node.daemon()
    assert result.rc == 0, node.explain("wazuh-clusterd", result)
    # Within 2 s: var/run/wazuh-clusterd-PID.pid holding "PID\n", mode 0640.
    path, pid = wait_for(lambda: list(node_pid_files(node, DAEMON)), 2.0,
                         what="wazuh-clusterd PID file")[0]
    with open(path) as handle:
        assert handle.read() == "%d\n" % pid
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert alive(pid)
    internal = wait_for(node.internal_pid, 5.0, what="wazuh-clusterd-internal PID file")
    internal_file = node.path("var", "run", "%s-%d.pid" % (INTERNAL, internal))
    with open(internal_file) as handle:
        assert handle.read() == "%d\n" % internal
    assert stat.S_IMODE(os.stat(internal_file).st_mode) == 0o640
    # ossec-control's stop: SIGTERM every PID of the glob, remove the files, do not wait.
    # Every file is read first: a daemon that got SIGTERM may remove its own file, or its
    # internal daemon's, before the loop reaches it (hence rm -f's tolerance too).
    files = glob.glob(node.path("var", "run", "wazuh-clusterd*.pid"))
    pids = []
    for pid_file in files:
        with open(pid_file) as handle:
            pids.append(int(handle.read()))
    for pid_file, pid in zip(files, pids):
        kill(pid, signal.SIGTERM)
        try:
            os.unlink(pid_file)
        except OSError:
            pass
    assert len(pids) == 2
    node.wait_stopped(pids, timeout=10.0)
    # Nothing half-done: no PID file re-created, the port is free again.
    assert not glob.glob(node.path("var", "run", "*.pid"))
    assert not connectable(node.address, node.port)


def node_pid_files(node, daemon):
    from harness import pid_files
    return sorted(pid_files(node.prefix, daemon).items())


def test_status_removes_stale_pid_files(make_node):
    node = make_node("node01", "master")
    pid = dead_pid()
    stale = node.path("var", "run", "wazuh-clusterd-%d.pid" % pid)
    write_file(stale, u"%d\n" % pid)
    result = node.control("status")
    assert result.rc == 1 and "wazuh-clusterd not running..." in result.out
    assert not os.path.exists(stale)
    # A stale PID file does not stop a start either.
    write_file(stale, u"%d\n" % dead_pid())
    node.start()


def _a_thread_id(stop):
    """A thread of this process, started for the test, and its id (a TID, not a process)."""
    import threading
    thread = threading.Thread(target=stop.wait)
    thread.daemon = True
    thread.start()
    tids = [int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
    assert tids
    return thread, tids[-1]


def test_a_pid_file_naming_another_process_or_a_thread_is_stale(make_node):
    # After a crash or a power loss a PID file may name a PID given since to another process
    # or to a thread: not a running daemon, not a process for stop to signal.
    import threading
    node = make_node("node01", "master")
    other = subprocess.Popen(["sleep", "600"])
    stop = threading.Event()
    thread, tid = _a_thread_id(stop)
    try:
        for pid in (other.pid, tid, 0):
            stale = node.path("var", "run", "wazuh-clusterd-%d.pid" % pid)
            write_file(stale, u"%d\n" % pid)
            result = node.control("status")
            assert result.rc == 1 and "wazuh-clusterd not running..." in result.out, \
                node.explain("status with a PID file naming %d" % pid, result)
            assert not os.path.exists(stale)
        stale = node.path("var", "run", "wazuh-clusterd-%d.pid" % other.pid)
        write_file(stale, u"%d\n" % other.pid)
        result = node.start()
        assert "Started wazuh-clusterd..." in result.out
        assert node.running_pid() != other.pid
        write_file(stale, u"%d\n" % other.pid)
        node.stop()
        assert other.poll() is None  # not signalled
        assert node.running_pid() is None
    finally:
        other.kill()
        other.wait()
        stop.set()
        thread.join()


def test_stale_lock_folder_does_not_block_ossec_control(make_node):
    node = make_node("node01", "master")
    lock = node.path("var", "start-script-lock")
    os.mkdir(lock)
    write_file(os.path.join(lock, "pid"), u"%d\n" % dead_pid())
    node.start()
    assert not os.path.exists(lock)
    node.stop()


def test_concurrent_starts_start_one_daemon(make_node):
    node = make_node("node01", "master")
    ctl = node.path("bin", "ossec-control")
    # Output to files, not pipes: the daemon must not hold the test's pipe open.
    outs = [tempfile.TemporaryFile() for _ in range(3)]
    procs = [subprocess.Popen([ctl, "start"], stdout=out, stderr=subprocess.STDOUT)
             for out in outs]
    wait_for(lambda: all(proc.poll() is not None for proc in procs), 60,
             what="three ossec-control start")
    for out in outs:
        out.seek(0)
    outs = [out.read() for out in outs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outs
    node.wait_running()
    live = [pid for pid in node.pids(DAEMON) if alive(pid)]
    assert len(live) == 1, (live, outs)
    assert not os.path.exists(node.path("var", "start-script-lock"))


def dead_pid():
    """A PID that names no live process right now."""
    pid = 999999
    while alive(pid):
        pid -= 1
    return pid


def test_sigterm_to_wazuh_clusterd_alone_stops_both_and_removes_pid_files(make_node):
    node = make_node("node01", "master")
    node.start()
    pids = [node.running_pid(), node.internal_pid()]
    os.kill(pids[0], signal.SIGTERM)
    node.wait_stopped(pids, timeout=10.0)
    wait_for(lambda: not glob.glob(node.path("var", "run", "*.pid")), 5.0,
             what="both PID files removed by the daemons themselves")
    assert node.control("status").rc == 1


def test_json_output_of_start_and_stop(make_node):
    node = make_node("node01", "master")
    started = node.control("-j", "start")
    assert started.rc == 0
    assert json.loads(started.out) == {"error": 0, "data": "Completed."}
    node.wait_running()
    stopped = node.control("-j", "stop")
    assert json.loads(stopped.out)["error"] == 0
    bad = make_node("node02", "master")
    bad.key = "short"
    bad.configure("master")
    failed = bad.control("-j", "start")
    assert failed.rc == 1
    answer = json.loads(failed.out)
    assert answer["error"] == 1 and "did not start correctly" in answer["message"]
