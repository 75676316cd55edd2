"""admission: slots per source address, the listed-address exception, rate-limited refusals."""
from __future__ import absolute_import, division, print_function

import logging

from wazuh_cluster import admission


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Lines(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


def refusal_log(**kwargs):
    logger = logging.getLogger("test_admission.%d" % id(kwargs))
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    clock = Clock()
    return admission.RefusalLog(logger, clock=clock, **kwargs), handler.lines, clock


def test_one_address_cannot_take_the_slots_of_the_others():
    a = admission.Admission(max_connections=64, max_pending=16, max_connections_per_address=8,
                            max_pending_per_address=4)
    for n in range(4):
        assert a.admit(("flood", n), "10.0.0.9", True) is None
    assert "from this address" in a.admit(("flood", 4), "10.0.0.9", True)
    assert a.admit("legit", "10.0.0.2", True) is None
    assert a.counts() == (5, 5) and a.counts_of("10.0.0.9") == (4, 4)


def test_idle_sessions_bound_connections_per_address():
    a = admission.Admission(64, 16, max_connections_per_address=2, max_pending_per_address=4)
    for n in range(2):
        assert a.admit(n, "10.0.0.9", True) is None
        a.handshake_done(n)
    assert "too many connections from this address (2)" == a.admit(2, "10.0.0.9", True)
    a.release(0)
    assert a.admit(3, "10.0.0.9", True) is None


def test_a_listed_address_without_a_slot_passes_the_global_bound():
    a = admission.Admission(max_connections=3, max_pending=2, max_connections_per_address=8,
                            max_pending_per_address=4)
    assert a.admit("f1", "10.0.0.9", True) is None
    assert a.admit("f2", "10.0.0.9", True) is None
    assert a.admit("f3", "10.0.0.9", True) == "too many pending handshakes (2)"
    assert a.admit("u1", "192.0.2.1", False) == "too many pending handshakes (2)"
    assert a.admit("legit", "10.0.0.2", True) is None        # listed, holds nothing yet
    assert a.admit("legit2", "10.0.0.2", True) == "too many pending handshakes (3)"
    a.handshake_done("f1")
    a.handshake_done("f2")
    a.handshake_done("legit")
    assert a.admit("x", "10.0.0.3", True) is None            # over max_connections, listed
    assert a.admit("y", "10.0.0.9", True) == "too many connections (4)"


def test_release_is_idempotent_and_frees_both_slots():
    a = admission.Admission(4, 4, 4, 4)
    assert a.admit("r", "h", True) is None
    a.release("r")
    a.release("r")
    a.handshake_done("r")
    assert a.counts() == (0, 0) and a.counts_of("h") == (0, 0)


def test_a_flood_of_refusals_writes_one_line_then_one_summary_per_minute():
    refusals, lines, clock = refusal_log()
    for n in range(1000):
        refusals.refused("10.0.0.9", logging.WARNING, "10.0.0.9:%d" % n, "reason %d" % n)
        clock.now += 0.01
    assert lines == [(logging.WARNING, "refused peer 10.0.0.9:0: reason 0")]
    clock.now += 60
    refusals.refused("10.0.0.9", logging.WARNING, "10.0.0.9:1000", "again")
    assert lines[1] == (logging.WARNING, "refused peer 10.0.0.9: 999 more refusal(s) in 60 s "
                                         "not logged one by one (last: reason 999)")
    assert lines[2] == (logging.WARNING, "refused peer 10.0.0.9:1000: again")
    assert len(lines) == 3


def test_each_address_has_its_own_window_and_the_summary_keeps_the_worst_level():
    refusals, lines, clock = refusal_log()
    refusals.refused("a", logging.WARNING, "a:1", "one")
    refusals.refused("b", logging.WARNING, "b:1", "one")
    refusals.refused("a", logging.ERROR, "a:2", "second master")
    assert len(lines) == 2
    clock.now += 61
    refusals.refused("c", logging.WARNING, "c:1", "one")      # expires a and b on the way
    assert (logging.ERROR, "refused peer a: 1 more refusal(s) in 60 s not logged one by one "
            "(last: second master)") in lines
    assert not [m for _l, m in lines if m.startswith("refused peer b: ")]  # none suppressed
    refusals.flush()
    assert len(lines) == 4


def test_tracked_addresses_are_bounded():
    refusals, lines, clock = refusal_log(max_tracked=10)
    for n in range(50):
        for _ in range(3):
            refusals.refused("h%d" % n, logging.WARNING, "h%d:1" % n, "r")
    assert len(refusals._windows) == 10
    assert len([m for _l, m in lines if "more refusal" in m]) == 40
