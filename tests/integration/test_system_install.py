"""The README's first command, `sudo ./install.sh`, on this machine as it is: default prefix
/var/ossec, /etc/ossec-init.conf, the ossec user, a started single-master cluster.

It runs in a private mount namespace where /etc and /var are overlays on the real ones, so
every write lands in a temporary folder and the machine's /etc and /var are never touched.
"""
from __future__ import absolute_import, division, print_function

import os
import shutil
import tempfile

import pytest

from harness import REPO, machine_lock, run

SCRIPT = r"""
set -e
mount --make-rprivate /
for d in etc var; do
    mkdir -p "$T/$d-up" "$T/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d-up,workdir=$T/$d-work" "/$d"
done
cd "$REPO"
rc=0
./install.sh > "$T/install.out" 2>&1 || rc=$?
echo "install rc=$rc"
[ "$rc" = 0 ] || { cat "$T/install.out"; exit 0; }
for i in $(seq 1 100); do
    /var/ossec/bin/ossec-control status > "$T/status.out" 2>&1 && break
    sleep 0.1
done
echo "status rc=$?"
cat "$T/status.out"
for i in $(seq 1 100); do
    grep -q "Started wazuh-clusterd-internal" /var/ossec/logs/cluster.log && break
    sleep 0.1
done
echo "---- cluster.log"
cat /var/ossec/logs/cluster.log
echo "---- init"
cat /etc/ossec-init.conf
echo "---- owner"
stat -c '%U:%G %a %n' /var/ossec/etc /var/ossec/etc/shared /var/ossec/logs/cluster.log
/var/ossec/bin/cluster_control -n || true
/var/ossec/bin/ossec-control stop
"""


def overlay_supported():
    try:
        with open("/proc/filesystems") as handle:
            return "overlay" in handle.read()
    except IOError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="a system install needs root")
@pytest.mark.skipif(not overlay_supported(), reason="no overlay file system to sandbox /etc, /var")
def test_sudo_install_sh_gives_a_running_single_master_under_var_ossec():
    before = [os.path.exists(p) for p in ("/etc/ossec-init.conf", "/var/ossec")]
    workdir = tempfile.mkdtemp(prefix="wazuh-cluster-sysinstall-")
    # The operator's environment: not the test run's PYTHONPATH (another interpreter's deps).
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("PYTHON"))
    env.update(T=workdir, REPO=REPO)
    try:
        # Port 1516 on every address is the machine's: one system install at a time.
        with machine_lock("system-install-port-1516"):
            result = run(["unshare", "-m", "sh", "-c", SCRIPT], env=env, timeout=600)
        out = result.out + result.err
        assert result.rc == 0, out
        assert "install rc=0" in out, out
        assert "wazuh-clusterd is running" in out, out
        assert "Starting wazuh-clusterd" in out and "as master node 'node01'" in out, out
        assert 'DIRECTORY="/var/ossec"' in out, out
        assert "root:ossec 770 /var/ossec/etc/shared" in out, out
        assert "connected" in out, out
        # Nothing reached the machine's own /etc or /var.
        assert [os.path.exists(p) for p in ("/etc/ossec-init.conf", "/var/ossec")] == before
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
