"""The internal daemon's supervisor: a first start that cannot work is one clear error; a
later death is restarted with backoff. Processes, the clock and waiting are stand-ins."""
from __future__ import absolute_import, division, print_function

import errno
import io
import os
import shutil
import tempfile

import pytest

from wazuh_cluster.errors import ClusterError
from wazuh_cluster.supervisor import InternalSupervisor


class FakeClock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeStopping(object):
    """compat.Event's interface; waiting advances the fake clock instead of sleeping."""

    def __init__(self, clock):
        self.clock = clock

    def is_set(self):
        return False

    def wait(self, seconds):
        self.clock.now += seconds


class FakeProcess(object):
    """Exits with `code` after `polls_alive` polls (never when code is None)."""

    def __init__(self, code=None, polls_alive=0, output=b"", log_file=None):
        self.pid = 4242
        self.code = code
        self.polls_alive = polls_alive
        if output and log_file:
            with io.open(log_file, "ab") as handle:
                handle.write(output)

    def poll(self):
        if self.code is None or self.polls_alive > 0:
            self.polls_alive -= 1
            return None
        return self.code


@pytest.fixture
def log_file():
    folder = tempfile.mkdtemp(prefix="wzc-supervisor-")
    path = os.path.join(folder, "ossec.log")
    with io.open(path, "wb") as handle:
        handle.write(b"2026/01/01 00:00:00 wazuh-clusterd-internal: ERROR: an older run\n")
    yield path
    shutil.rmtree(folder)


def supervisor(log_file, clock, spawn):
    return InternalSupervisor("/prefix/bin/wazuh-clusterd-internal", "/prefix", "master",
                              log_file, clock=clock, spawn=spawn)


def test_a_child_that_cannot_be_executed_is_one_clear_error(log_file):
    def spawn(argv, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")
    clock = FakeClock()
    sup = supervisor(log_file, clock, spawn)
    with pytest.raises(ClusterError) as err:
        sup.start_checked(lambda: False, 10.0, FakeStopping(clock))
    message = str(err.value)
    assert "cannot start /prefix/bin/wazuh-clusterd-internal" in message
    assert "Permission denied" in message and "\n" not in message


def test_a_child_that_exits_during_its_start_names_its_last_line(log_file):
    output = (b"Traceback (most recent call last):\n  File \"x\", line 1\n"
              b"ImportError: No module named no_such_module\x1b[31m\n\n")
    clock = FakeClock()
    sup = supervisor(log_file, clock, lambda argv, **kw: FakeProcess(1, 3, output, log_file))
    with pytest.raises(ClusterError) as err:
        sup.start_checked(lambda: False, 10.0, FakeStopping(clock))
    message = str(err.value)
    assert message == ("wazuh-clusterd-internal (pid 4242) exited during its start with status "
                       "1: ImportError: No module named no_such_module?[31m")
    assert sup.pid is None


def test_a_child_that_exits_silently_says_so_and_not_an_older_line(log_file):
    clock = FakeClock()
    sup = supervisor(log_file, clock, lambda argv, **kw: FakeProcess(-9))
    with pytest.raises(ClusterError) as err:
        sup.start_checked(lambda: False, 10.0, FakeStopping(clock))
    assert "with signal 9 (nothing in %s)" % log_file in str(err.value)
    assert "older run" not in str(err.value)


def test_a_child_that_answers_is_started(log_file):
    clock = FakeClock()
    answers = iter([False, False, True])
    sup = supervisor(log_file, clock, lambda argv, **kw: FakeProcess())
    assert sup.start_checked(lambda: next(answers), 10.0, FakeStopping(clock)) is True
    assert sup.pid == 4242


def test_a_slow_child_still_running_at_the_deadline_is_not_an_error(log_file):
    clock = FakeClock()
    sup = supervisor(log_file, clock, lambda argv, **kw: FakeProcess())
    assert sup.start_checked(lambda: False, 10.0, FakeStopping(clock)) is False
    assert clock.now >= 110.0 and sup.pid == 4242


def test_a_later_death_is_restarted_with_backoff(log_file):
    clock = FakeClock()
    spawned = []

    def spawn(argv, **kwargs):
        spawned.append(FakeProcess(1) if not spawned else FakeProcess())
        return spawned[-1]
    sup = supervisor(log_file, clock, spawn)
    sup.start()
    assert sup.check() == 1.0  # dead: restart in RESTART_MIN
    clock.now += 1.0
    sup.check()
    assert len(spawned) == 2 and sup.pid == 4242
