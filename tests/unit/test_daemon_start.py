"""A daemon that cannot start logs the cause before the starting command hears of it.

ossec-control returns as soon as the daemon's report arrives, and whatever runs next (an
operator, a test) reads the log for the cause: the line must already be there.
"""
import errno
import fcntl
import logging
import os

from wazuh_cluster import daemon
from wazuh_cluster.errors import ClusterError


class PipeState(logging.Handler):
    """Notes, for every line logged, whether the starting command could already read."""

    def __init__(self, read_fd):
        logging.Handler.__init__(self)
        self.read_fd = read_fd
        self.seen = []

    def emit(self, record):
        try:
            heard = os.read(self.read_fd, 4096)
        except OSError as err:
            assert err.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
            heard = b""
        self.seen.append((record.getMessage(), heard))


def test_the_cause_is_logged_before_it_is_reported(capsys):
    ready = daemon.Readiness()
    ready.read_fd, ready.write_fd = os.pipe()
    flags = fcntl.fcntl(ready.read_fd, fcntl.F_GETFL)
    fcntl.fcntl(ready.read_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    log = logging.getLogger("test-daemon-start")
    log.propagate = False
    handler = PipeState(ready.read_fd)
    log.addHandler(handler)
    try:
        status = daemon.start_failed("wazuh-clusterd", log, ready,
                                     ClusterError("wazuh-clusterd-internal exited"))
        reported = os.read(ready.read_fd, 4096)
    finally:
        log.removeHandler(handler)
        os.close(ready.read_fd)
    assert status == 1
    assert handler.seen == [("wazuh-clusterd-internal exited", b"")]
    assert reported == b"wazuh-clusterd: ERROR: wazuh-clusterd-internal exited"
    assert ready.write_fd is None
    assert "wazuh-clusterd: ERROR: wazuh-clusterd-internal exited" in capsys.readouterr().err


def test_settle_gc_freezes_no_garbage():
    # frozen, cyclic garbage would never be collected: what starting left is collected first
    import gc
    import weakref
    if not hasattr(gc, "freeze"):
        return   # 3.7+: nothing is frozen before

    class Cycle(object):
        pass
    before = gc.get_threshold()
    enabled = gc.isenabled()
    gc.disable()   # the garbage stays until settle_gc
    try:
        cycle = Cycle()
        cycle.self = cycle
        dead = weakref.ref(cycle)
        del cycle
        daemon.settle_gc()
        gc.collect()
        assert dead() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        if enabled:
            gc.enable()


def test_settle_gc_leaves_what_was_built_out_and_collects_less_often():
    import gc
    before = gc.get_threshold()
    try:
        daemon.settle_gc()
        assert gc.get_threshold() == (daemon.GC_YOUNG,) + before[1:]
        if hasattr(gc, "freeze"):  # 3.7+
            assert gc.get_freeze_count() > 0
    finally:
        if hasattr(gc, "unfreeze"):
            gc.unfreeze()
        gc.set_threshold(*before)
