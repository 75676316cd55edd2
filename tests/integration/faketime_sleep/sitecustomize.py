"""Put on PYTHONPATH only for a test node run under libfaketime on Python 3.11+
(test_failover_scenarios.py, the wall clock jump).

Python 3.11+ sleeps with clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME). libfaketime 0.9.10
(Debian/Ubuntu's apt package) converts that absolute deadline as if it were a faked wall
clock time even when DONT_FAKE_MONOTONIC leaves the monotonic clock true, and every
time.sleep fails with EINVAL. Python 3.10 and older slept with select() and a relative
timeout, which libfaketime passes through: time.sleep does that again here. Nothing else
changes (thread waits use sem_clockwait, which 0.9.10 does not intercept), so the daemons
still read a jumped wall clock and a true monotonic one.
"""
import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        select.select([], [], [], left)


time.sleep = _sleep
