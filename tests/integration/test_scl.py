"""Software collections (SPEC section 7): an interpreter that only starts with the environment
it was found in, like CentOS 6's python27 outside `scl enable python27`.

The stand-in is a bash script that refuses to start unless LD_LIBRARY_PATH holds a marker
folder (what the collection's `enable` script sets), then runs the real interpreter under its
own name, so that sys.executable is the stand-in and every child started with sys.executable
needs the environment too.
"""
from __future__ import absolute_import, division, print_function

import io
import os
import stat
import sys

from harness import (Node, free_port, install, new_address, new_key, proc_cmdline,  # noqa: F401
                     python, run, tmp_prefix_dir, wait_for, workspace, write_cluster_conf,
                     _need_ossec_user)

STAND_IN = u"""#!/bin/bash
# A python that needs its collection's environment, like /opt/rh/python27/root/usr/bin/python.
case ":${LD_LIBRARY_PATH:-}:" in
    *":%(marker)s:"*) ;;
    *) echo "python: error while loading shared libraries: libpython2.7.so.1.0" >&2; exit 127 ;;
esac
exec -a "$0" %(real)s "$@"
"""


def make_stand_in(folder, real):
    marker = os.path.join(folder, "collection-lib")
    os.makedirs(marker)
    path = os.path.join(folder, "python")
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(STAND_IN % {"marker": marker, "real": real})
    os.chmod(path, 0o755)
    os.chmod(folder, 0o755)
    return path, marker


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as handle:
        return dict(part.decode("utf-8", "replace").split("=", 1)
                    for part in handle.read().split(b"\0") if b"=" in part)


def test_collection_interpreter_gets_wrappers_and_runs_from_a_bare_environment(
        tmp_prefix_dir, python):
    _need_ossec_user()
    folder = os.path.join(tmp_prefix_dir, "scl")
    os.mkdir(folder)
    stand_in, marker = make_stand_in(folder, python)
    assert run(["env", "-i", stand_in, "-c", "pass"]).rc == 127  # outside the collection

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = marker + (":" + env["LD_LIBRARY_PATH"]
                                       if env.get("LD_LIBRARY_PATH") else "")
    assert run([stand_in, "-c", "import sys; print(sys.executable)"], env=env).out.strip() \
        == stand_in
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    install(prefix, stand_in, env=env)

    wrapper = os.path.join(prefix, "bin", "wazuh-clusterd")
    with io.open(wrapper, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("#!/bin/sh\n") and marker in text
    assert os.stat(wrapper).st_mode & stat.S_IXUSR

    address = new_address()
    write_cluster_conf(prefix, "wazuh", "node01", "master", new_key(), address,
                       free_port(address), [address])
    node = Node(prefix)
    bare = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    try:
        result = run(bare + [os.path.join(prefix, "bin", "ossec-control"), "start"])
        assert result.rc == 0, node.explain("ossec-control start from env -i failed", result)
        node.wait_running(15)
        internal = node.internal_pid()
        # The internal daemon runs under the stand-in, with the collection's environment.
        assert proc_cmdline(internal)[0] == stand_in, proc_cmdline(internal)
        assert marker in environ_of(internal).get("LD_LIBRARY_PATH", "")
        status = run(bare + [os.path.join(prefix, "bin", "ossec-control"), "status"])
        assert status.rc == 0 and "wazuh-clusterd is running" in status.out, status
        wait_for(lambda: run(bare + [os.path.join(prefix, "bin", "cluster_control"),
                                     "-n"]).rc == 0, 15, what="cluster_control -n from env -i")
    finally:
        run(bare + [os.path.join(prefix, "bin", "ossec-control"), "stop"])
        node.cleanup()


def test_old_python_gets_a_clear_message_not_a_traceback(tmp_prefix_dir):
    # The entry scripts must parse under Python 2.6 up to their version check; the check itself
    # is exercised with an interpreter that reports an old version.
    fake = os.path.join(tmp_prefix_dir, "python26")
    with io.open(fake, "w", encoding="utf-8") as handle:
        handle.write(u"#!/bin/sh\nexec %s -c 'import sys\n"
                     u"sys.version_info = (2, 6, 6, \"final\", 0)\n"
                     u"sys.version = \"2.6.6 (r266:84292)\"\n"
                     u"sys.argv = sys.argv[1:]\n"
                     u"exec(compile(open(sys.argv[0]).read(), sys.argv[0], \"exec\"))' \"$@\"\n"
                     % sys.executable)
    os.chmod(fake, 0o755)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("wazuh-clusterd", "wazuh-clusterd-internal", "cluster_control"):
        result = run([fake, os.path.join(repo, "bin", name), "-V"])
        assert result.rc == 1, result
        assert result.err.strip() == "%s: Python 2.7 or 3.6+ required (found 2.6.6)" % name
