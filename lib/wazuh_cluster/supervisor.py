"""wazuh-clusterd's child: start wazuh-clusterd-internal, restart it when it dies, stop it.

The first start is checked (start_checked): a child that cannot be executed, or that exits
before it answers, is a ClusterError whose one line names the cause (the exec error, or the
exit status and the last line the child wrote to its log), so that wazuh-clusterd exits
non-zero and ossec-control reports "did not start correctly" instead of a cluster that can
never work. A later death is restarted with backoff (check).
"""
from __future__ import absolute_import, division, print_function

import errno
import os
import signal
import subprocess
import sys

from wazuh_cluster import compat, logs
from wazuh_cluster.errors import ClusterError

RESTART_MIN = 1.0
CAUSE_BYTES = 4096  # how much of the child's last output is read for the cause of its exit
CAUSE_MAX = 300  # characters of that cause in the one-line error


class InternalSupervisor(object):
    """Runs `wazuh-clusterd-internal -t<type>` under the interpreter we run under.

    sys.executable and the inherited environment (LD_LIBRARY_PATH included) are what make a
    software-collection Python work for the child too.
    """

    def __init__(self, script, home, node_type, log_file, debug=0, restart_max=30.0,
                 clock=compat.monotonic, spawn=subprocess.Popen):
        self.argv = [sys.executable, script, "-t" + node_type, "-f", "-D", home]
        self.argv += ["-d"] * debug
        self.log_file = log_file
        self.restart_max = restart_max
        self.clock = clock
        self.spawn = spawn
        self.log = logs.get("supervisor")
        self.process = None
        self.delay = RESTART_MIN
        self.next_start = 0.0
        self.started_at = 0.0
        self.log_offset = 0

    def set_node_type(self, node_type):
        """The role the next start (a restart after a crash) gives the child (failover)."""
        self.argv[2] = "-t" + node_type

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def start(self):
        # A crash before the child's own logging is up still reaches its log file.
        with open(os.devnull, "rb") as null_in, open(self.log_file, "ab") as errors:
            errors.seek(0, os.SEEK_END)
            self.log_offset = errors.tell()
            self.process = self.spawn(self.argv, stdin=null_in, stdout=errors, stderr=errors,
                                      close_fds=True, env=dict(os.environ))
        self.started_at = self.clock()
        self.log.info("Started wazuh-clusterd-internal (pid %d).", self.process.pid)

    def start_checked(self, answers, timeout, stopping, poll=0.05):
        """Start the child and wait until `answers()` is true: True, or False when `timeout`
        seconds pass with the child still running and silent (or `stopping` is set).

        ClusterError (one line naming the cause) when it cannot be executed or exits first.
        """
        try:
            self.start()
        except (OSError, IOError) as err:
            raise ClusterError("cannot start %s with %s: %s"
                               % (self.argv[1], self.argv[0], err.strerror or err))
        deadline = self.clock() + timeout
        while not stopping.is_set():
            code = self.process.poll()
            if code is not None:
                raise ClusterError(self.exit_cause(code))
            if answers():
                return True
            if self.clock() >= deadline:
                return False
            stopping.wait(poll)
        return False

    def exit_cause(self, code):
        """One line: the child exited during its start, with `code` and its last output."""
        pid, self.process = self.process.pid, None
        status = "signal %d" % -code if code < 0 else "status %d" % code
        line = self.last_output()
        return "wazuh-clusterd-internal (pid %d) exited during its start with %s%s" % (
            pid, status, ": " + line if line else " (nothing in %s)" % self.log_file)

    def last_output(self):
        """The last non-empty line the child wrote to its log since it was started."""
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(self.log_offset, handle.tell() - CAUSE_BYTES))
                data = handle.read(CAUSE_BYTES)
        except (OSError, IOError):
            return ""
        lines = [line.strip() for line in data.splitlines() if line.strip()]
        if not lines:
            return ""
        text = compat.to_text(lines[-1], errors="replace")
        text = u"".join(c if u" " <= c < u"\x7f" else u"?" for c in text)
        return text[:CAUSE_MAX]

    def check(self):
        """Reap a dead child and restart it with backoff; returns seconds until the next check."""
        now = self.clock()
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                if now - self.started_at > self.restart_max:
                    self.delay = RESTART_MIN
                return self.restart_max
            self.log.error("wazuh-clusterd-internal (pid %d) exited with status %s; restarting "
                           "in %.0f s.", self.process.pid, code, self.delay)
            self.process = None
            self.next_start = now + self.delay
            self.delay = min(self.delay * 2, self.restart_max)
        if now >= self.next_start:
            try:
                self.start()
            except (OSError, IOError) as err:
                # e.g. the interpreter is not executable by user ossec: say so, retry later.
                self.log.error("Cannot start %s: %s; retrying in %.0f s.", self.argv[1], err,
                               self.delay)
                self.next_start = now + self.delay
                self.delay = min(self.delay * 2, self.restart_max)
                return self.delay
            return self.restart_max
        return self.next_start - now

    def stop(self, timeout=5.0):
        """SIGTERM, wait a bounded time, then SIGKILL: the child must not outlive us."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            process.send_signal(signal.SIGTERM)
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise
        deadline = self.clock() + timeout
        while process.poll() is None and self.clock() < deadline:
            _sleep(0.02)
        if process.poll() is None:
            self.log.warning("wazuh-clusterd-internal (pid %d) ignored SIGTERM; killing it.",
                             process.pid)
            process.kill()
            process.wait()


def _sleep(seconds):
    import time
    time.sleep(seconds)
