"""Times from peers: no mtime far in the future, none before 1970 or beyond what files store.

"Newest keepalive wins" on the master: one report dated 2100 from an insider would keep the
agent on that node until 2100. Such a time is applied as the receiver's present, said once per
peer (not per file, not per batch); the next honest keepalive wins again.
"""
from __future__ import absolute_import, division, print_function

import os

import pytest

from test_receive import (AI, SEC, client_rx, home, inc, log, master_rx, mtime_ns,  # noqa
                          put, read)
from wazuh_cluster import config, pathrules, peertimes, receive
from wazuh_cluster.errors import PathRefused

NOW = 1700000000                     # the receiver's clock in these tests (2023)
NOW_NS = NOW * SEC
YEAR_2100_NS = 4102444800 * SEC


def clock():
    return float(NOW)


def rx_at(home, log, role="master", **kwargs):
    maker = master_rx if role == "master" else client_rx
    return maker(home, log, clock=clock, **kwargs)


def info_path(home):
    return os.path.join(home, AI)


def clamp_lines(log):
    return [line for line in log.lines if "ahead of this node's clock" in line]


# -- pure rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, -10 ** 18, pathrules.MAX_MTIME_NS + 1, 10 ** 40, True,
                                   1.5e18, "1500000000000000000", None])
def test_absurd_mtimes_are_refused(value):
    with pytest.raises(PathRefused):
        pathrules.check_mtime(value)


def test_clamp_keeps_times_within_the_slack_and_replaces_later_ones_by_now():
    assert pathrules.clamp_mtime(NOW_NS + 60 * SEC, NOW_NS, 60 * SEC) == (NOW_NS + 60 * SEC,
                                                                           False)
    assert pathrules.clamp_mtime(NOW_NS + 60 * SEC + 1, NOW_NS, 60 * SEC) == (NOW_NS, True)
    assert pathrules.clamp_mtime(0, NOW_NS, 0) == (0, False)


def test_the_option_has_a_small_default_and_bounds():
    table = dict((name, (convert, default)) for name, convert, default in config.OPTIONS)
    convert, default = table["max_future_seconds"]
    assert convert(default) == 60
    with pytest.raises(ValueError):
        convert("86400")
    with pytest.raises(ValueError):
        convert("-1")


# -- the receiver -----------------------------------------------------------------------------

def test_an_agent_info_dated_2100_gets_the_receivers_present(home, log):
    states, reasons = rx_at(home, log).apply_batch([inc(AI, b"rogue\n", YEAR_2100_NS)],
                                                   peer="rogue01")
    assert states == {AI: "synchronized"} and reasons == {}
    assert abs(mtime_ns(info_path(home)) - NOW_NS) <= receive.MTIME_SLACK_NS
    assert len(clamp_lines(log)) == 1


def test_a_later_honest_keepalive_wins_over_a_clamped_one(home, log):
    rx = rx_at(home, log)
    rx.apply_batch([inc(AI, b"rogue\n", YEAR_2100_NS)], peer="rogue01")
    states, reasons = rx.apply_batch([inc(AI, b"honest\n", NOW_NS + SEC)], peer="client1")
    assert states == {AI: "synchronized"} and reasons == {}
    assert read(home, AI) == b"honest\n"


def test_a_local_file_dated_in_the_future_never_wins(home, log):
    """A file planted before this check (or a clock set back) must not pin the agent."""
    put(home, AI, b"planted\n", YEAR_2100_NS // SEC * SEC)
    states, reasons = rx_at(home, log).apply_batch([inc(AI, b"honest\n", NOW_NS - 10 * SEC)],
                                                   peer="client1")
    assert states == {AI: "synchronized"} and reasons == {}
    assert read(home, AI) == b"honest\n"
    assert abs(mtime_ns(info_path(home)) - (NOW_NS - 10 * SEC)) <= receive.MTIME_SLACK_NS


def test_times_within_the_slack_are_kept_as_sent(home, log):
    ahead = NOW_NS + 30 * SEC
    rx_at(home, log).apply_batch([inc(AI, b"x\n", ahead)], peer="client1")
    assert abs(mtime_ns(info_path(home)) - ahead) <= receive.MTIME_SLACK_NS
    assert clamp_lines(log) == []


def test_the_slack_is_an_option(home, log):
    rx_at(home, log, max_future_seconds=0).apply_batch([inc(AI, b"x\n", NOW_NS + SEC)],
                                                       peer="client1")
    assert abs(mtime_ns(info_path(home)) - NOW_NS) <= receive.MTIME_SLACK_NS


def test_one_line_per_peer_whatever_the_files_and_batches(home, log):
    rx = rx_at(home, log)
    for batch in range(5):
        rx.apply_batch([inc(u"queue/agent-info/a%d-%d" % (batch, n), b"x", YEAR_2100_NS)
                        for n in range(30)], peer="rogue01")
    rx.apply_batch([inc(u"queue/agent-info/b-any", b"x", YEAR_2100_NS)], peer="rogue\n02")
    lines = clamp_lines(log)
    assert len(lines) == 2
    assert "'rogue01'" in lines[0] and "30 file(s)" in lines[0] and "2100-01-01" in lines[0]
    assert "\n" not in lines[1] and "'rogue\\x0a02'" in lines[1]


def test_the_line_comes_back_after_an_hour_with_a_count(home, log, monkeypatch):
    ticks = [1000.0]
    monkeypatch.setattr(peertimes.compat, "monotonic", lambda: ticks[0])
    rx = rx_at(home, log)
    for _ in range(3):
        rx.apply_batch([inc(AI, b"x", YEAR_2100_NS)], peer="rogue01")
    ticks[0] += peertimes.CLAMP_LOG_EVERY + 1
    rx.apply_batch([inc(AI, b"x", YEAR_2100_NS)], peer="rogue01")
    lines = clamp_lines(log)
    assert len(lines) == 2 and "2 more since the last line" in lines[1]


def test_master_owned_files_are_bounded_on_a_client_too(home, log):
    rx_at(home, log, role="client").apply_batch(
        [inc(u"queue/agent-groups/001", b"web", YEAR_2100_NS)], peer="master")
    assert abs(mtime_ns(os.path.join(home, "queue/agent-groups/001")) - NOW_NS) <= receive.MTIME_SLACK_NS
    assert len(clamp_lines(log)) == 1


@pytest.mark.parametrize("value", [-1, pathrules.MAX_MTIME_NS + 1])
def test_absurd_times_are_invalid_and_write_nothing(home, log, value):
    states, reasons = rx_at(home, log).apply_batch([inc(AI, b"x", value)], peer="rogue01")
    assert states == {AI: "invalid"} and "mtime_ns" in reasons[AI]
    assert not os.path.exists(info_path(home))
