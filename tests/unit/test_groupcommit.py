"""groupcommit.GroupCommit: rows of several sync threads stored together, none before its call."""
from __future__ import absolute_import, division, print_function

import threading
import time

import pytest

from wazuh_cluster import groupcommit
from wazuh_cluster.errors import RequestError


def wait_until(check, timeout=30.0):
    end = time.time() + timeout
    while not check():
        assert time.time() < end, "timed out"
        time.sleep(0.005)


class SlowDaemon(object):
    """set_states of an internal daemon busy with other work: the first call waits for
    `release`; every request is kept."""

    def __init__(self, fail=False):
        self.requests = []
        self.release = threading.Event()
        self.fail = fail

    def call(self, command, args):
        assert command == "set_states"
        self.requests.append([row[0] for row in args["rows"]])
        if len(self.requests) == 1:
            assert self.release.wait(30)
        if self.fail:
            raise RequestError("internal daemon gone", "internal_unavailable")
        return {"updated": len(args["rows"])}


def writers(commit, peers, outcome):
    threads = []
    for peer in peers:
        def run(peer=peer):
            try:
                commit.write([[peer, "etc/client.keys", "synchronized"]])
                outcome[peer] = "written"
            except RequestError as err:
                outcome[peer] = err.code
        threads.append(threading.Thread(target=run))
        threads[-1].start()
    return threads


@pytest.mark.parametrize("fail", [False, True])
def test_rows_arriving_during_a_write_go_together_in_the_next(fail):
    # Ten clients' pushes recorded their states one call each; the internal daemon, busy,
    # answered each after the other (up to 6.8 s for a push's states under churn).
    daemon = SlowDaemon(fail)
    commit = groupcommit.GroupCommit(daemon.call)
    outcome = {}
    first = writers(commit, ["client01"], outcome)
    wait_until(lambda: len(daemon.requests) == 1)
    others = writers(commit, ["client%02d" % k for k in range(2, 11)], outcome)
    wait_until(lambda: len(commit.rows) == 9)
    assert outcome == {}  # nobody returns before its rows are stored
    daemon.release.set()
    for thread in first + others:
        thread.join(30)
    assert len(daemon.requests) == 2 and daemon.requests[0] == ["client01"]
    assert sorted(daemon.requests[1]) == ["client%02d" % k for k in range(2, 11)]
    want = "internal_unavailable" if fail else "written"
    assert outcome == dict(("client%02d" % k, want) for k in range(1, 11))
