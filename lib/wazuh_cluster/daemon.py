"""Daemon plumbing shared by both daemons: arguments, fork with a readiness report, PID files,
privilege drop, and signals that only record (STYLE section 5, section 9)."""
from __future__ import absolute_import, division, print_function

import errno
import fcntl
import os
import signal
import sys

from wazuh_cluster import __version__, compat, config, paths
from wazuh_cluster.errors import ClusterError, ConfigError

PID_MODE = 0o640
USER = GROUP = "ossec"


class SelfPipe(object):
    """Signal handlers write one byte here; the select() loop reads it and acts."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            compat.set_cloexec(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.received = []

    def fileno(self):
        return self.read_fd

    def install(self, signums):
        for signum in signums:
            signal.signal(signum, self._handler)
            # Restart system calls in the other threads (2.7 would make their socket calls
            # fail with EINTR); the loop's select() is woken through the wakeup fd instead.
            signal.siginterrupt(signum, False)
        signal.set_wakeup_fd(self.write_fd)

    def _handler(self, signum, frame):
        self.received.append(signum)
        try:
            os.write(self.write_fd, b"x")
        except OSError:  # a full pipe already says "wake up"
            pass

    def wake(self):
        self._handler(0, None)

    def drain(self):
        """Empty the pipe; return the signals recorded since the last drain."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        received, self.received = self.received, []
        return received


def write_pid_file(path):
    """PID and a newline, mode 0640, written atomically (ossec-control reads it at any time)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PID_MODE)
    try:
        os.write(fd, ("%d\n" % os.getpid()).encode("ascii"))
    finally:
        os.close(fd)
    os.chmod(tmp, PID_MODE)
    os.rename(tmp, path)
    return path


def remove_file(path):
    try:
        os.unlink(path)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise


def ensure_dirs(folders, mode=0o770):
    """Create missing folders; return those created (they are handed to ossec when root)."""
    created = []
    for folder in folders:
        if not os.path.isdir(folder):
            os.makedirs(folder, mode)
            os.chmod(folder, mode)
            created.append(folder)
    return created


def ossec_ids():
    """(uid, gid) of user and group `ossec`; a clear error when they are missing."""
    import grp
    import pwd
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        raise ClusterError("user '%s' does not exist: run install.sh as root to create it" % USER)
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        raise ClusterError("group '%s' does not exist: run install.sh as root to create it"
                           % GROUP)
    return uid, gid


MMAP_THRESHOLD = 256 << 10


def limit_malloc_arenas(count=2):
    """Cap glibc's malloc arenas; call before the first thread starts. True when applied.

    glibc gives threads arenas of their own (up to 8 per core); memory freed in them mostly
    stays mapped, so a daemon whose request threads come and go keeps tens of megabytes
    (the effect of MALLOC_ARENA_MAX=2, set from inside). The mmap threshold is fixed too:
    glibc raises it each time a big block is freed, after which megabyte frames and messages
    come from the heap and stay there (12 flooding peers: 136 MB peak instead of 100 MB).
    Elsewhere this does nothing.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MMAP_THRESHOLD)                 # -3: M_MMAP_THRESHOLD
        return libc.mallopt(-8, count) == 1  # -8: M_ARENA_MAX
    except (ImportError, OSError, AttributeError):
        return False


# The collector's first threshold (CPython's default is 700).
GC_YOUNG = 7000


def settle_gc():
    """Once a daemon has started: what it built so far is left out of the cyclic garbage
    collector's passes (gc.freeze, 3.7+), which run ten times less often.

    The daemons make almost no cyclic garbage (a 3-client run under the real keepalive rate
    collected 50 objects in all), yet under that rate the collector's passes were about 3 %
    of wazuh-clusterd's CPU: at 700 new containers a pass, a keepalive batch's 2 000 rows
    start several, and every tenth of the tenth walks the whole heap. Frozen and at 7 000,
    1.3 %. Reference counting still frees everything else at once.

    Called once, when the daemon is ready (neither daemon reloads in place: SIGHUP is "restart
    to apply" or a rescan). Cyclic garbage frozen would never be collected: what starting
    left is collected first; what is frozen and later dropped (a session, a connection to
    the internal daemon) is freed by reference counting."""
    import gc
    if hasattr(gc, "freeze"):
        gc.collect()
        gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


def drop_privileges(chown_paths=()):
    """Started as root: hand `chown_paths` to ossec and become ossec (real and effective).

    Started as another user: nothing to do, the daemon runs as that user.
    """
    if os.geteuid() != 0:
        return False
    uid, gid = ossec_ids()
    for path in chown_paths:
        if os.path.exists(path):
            os.chown(path, uid, gid)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    return True


class Readiness(object):
    """Fork into the background; the parent returns only once the child says it is ready.

    The parent's exit status is what ossec-control sees: 0 = started, 1 = did not start (and
    the child's one-line reason is printed on stderr).
    """

    def __init__(self):
        self.read_fd = self.write_fd = None

    def daemonize(self):
        """Returns in the daemon (grandchild) only; the original process exits here."""
        self.read_fd, self.write_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(self.write_fd)
            os._exit(self._wait_report(pid))
        os.close(self.read_fd)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
        compat.set_cloexec(self.write_fd)

    def _wait_report(self, child):
        chunks = []
        while True:
            try:
                data = os.read(self.read_fd, 4096)
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            if not data:
                break
            chunks.append(data)
        os.waitpid(child, 0)
        report = b"".join(chunks).decode("utf-8", "replace")
        if report == "ok":
            return 0
        sys.stderr.write((report or "daemon exited before it was ready") + "\n")
        # The caller leaves through os._exit, and before 3.9 a non-interactive stderr is
        # block-buffered: unflushed, the reason would be lost.
        sys.stderr.flush()
        return 1

    def ready(self):
        self._report("ok")

    def failed(self, reason):
        self._report(reason)

    def _report(self, text):
        if self.write_fd is None:
            return
        try:
            os.write(self.write_fd, text.encode("utf-8"))
        finally:
            os.close(self.write_fd)
            self.write_fd = None


def add_common_arguments(parser):
    """OSSEC-style flags shared by both daemons."""
    parser.add_argument("-f", dest="foreground", action="store_true",
                        help="run in the foreground")
    parser.add_argument("-d", dest="debug", action="count", default=0,
                        help="debug output (repeat for more)")
    parser.add_argument("-D", dest="home", metavar="DIR",
                        help="installation directory (default: from /etc/ossec-init.conf)")
    parser.add_argument("-V", dest="version", action="store_true", help="print version and exit")


def begin(name, args, script):
    """The shared start of both daemons: -V, the installation directory, the configuration.

    Returns (exit status, None, None) when the command is over (version printed, or the
    configuration refused with one line per problem), else (None, config, layout).
    """
    if args.version:
        print("%s %s (Python %s)" % (name, __version__, compat.VERSION))
        return 0, None, None
    layout = paths.Paths(paths.find_home(args.home, script or sys.argv[0]))
    try:
        return None, config.load(layout), layout
    except ConfigError as err:
        for problem in err.problems:
            sys.stderr.write("%s: ERROR: %s\n" % (name, problem))
        return 1, None, None


def failed(name, log, err):
    """A daemon that cannot run says why in its log and on stderr; returns the exit status."""
    log.error("%s", err)
    sys.stderr.write("%s: ERROR: %s\n" % (name, err))
    return 1


def start_failed(name, log, ready, err):
    """failed(), then the same line to the starting command. In that order: the command
    returns as soon as it hears, and what runs next may read the log for the cause."""
    status = failed(name, log, err)
    ready.failed("%s: ERROR: %s" % (name, err))
    return status
