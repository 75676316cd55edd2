"""A client's relay of its master's agent listing (agentpages.fetch), against a session that
answers pages as the master does and records when each was asked for."""
from __future__ import absolute_import, division, print_function

import os
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib"))

from wazuh_cluster import agentpages, agentrows  # noqa: E402
from wazuh_cluster.errors import ProtocolError, RequestError  # noqa: E402

WAIT = 10.0
TOKEN = u"0123456789abcdef"


class PagingMaster(object):
    """session.call of a master listing `pages` (bytes each); a page that is an exception
    is raised instead of answered."""
    peer_name = u"master"

    def __init__(self, pages):
        self.pages = list(pages)
        self.asked = []
        self.lock = threading.Lock()

    def call(self, cmd, args, timeout):
        assert cmd == agentpages.REQUEST and timeout == WAIT
        with self.lock:
            index = len(self.asked)
            self.asked.append(args.get("listing"))
        page = self.pages[index]
        if isinstance(page, Exception):
            raise page
        return {"count": 3, "columns": list(agentrows.COLUMNS), "listing": TOKEN,
                "more": index + 1 < len(self.pages)}, page

    def wait_asked(self, count):
        deadline = time.time() + WAIT
        while time.time() < deadline:
            with self.lock:
                if len(self.asked) >= count:
                    return True
            time.sleep(0.01)
        return False


PAGES = [b'["1","a","any","Active",null,null]', b'["2","b","any","Active",null,null]',
         b'["3","c","any","Active",null,null]']


def test_the_next_page_is_asked_for_while_this_one_is_relayed():
    # Asking only once a page had left made every page wait for a round trip to the master.
    master = PagingMaster(PAGES)
    chunks = iter(agentpages.fetch(master, {"keepalives": False}, WAIT).chunks)
    for number, page in enumerate(PAGES):
        assert next(chunks) == page
        if number + 1 < len(PAGES):
            # page `number` not handed on yet, and page number + 1 asked for already
            assert master.wait_asked(number + 2)
    assert list(chunks) == []
    assert master.asked == [None, TOKEN, TOKEN]


@pytest.mark.parametrize("failure, error", [
    (RequestError("no open agent listing", "gone"), RequestError),
    (ProtocolError("session broken"), ProtocolError)])
def test_a_page_that_fails_ends_the_relay_with_its_error(failure, error):
    master = PagingMaster(PAGES[:2] + [failure])
    chunks = iter(agentpages.fetch(master, {}, WAIT).chunks)
    assert [next(chunks), next(chunks)] == PAGES[:2]
    with pytest.raises(error):
        next(chunks)


def test_a_bad_page_asked_ahead_names_the_master():
    master = PagingMaster(PAGES[:1] + [b"x" * (agentpages.PAGE_LIMIT + 1), PAGES[2]])
    chunks = iter(agentpages.fetch(master, {}, WAIT).chunks)
    assert next(chunks) == PAGES[0]
    with pytest.raises(ProtocolError) as caught:
        next(chunks)
    assert "master 'master' sent a bad page" in str(caught.value)
