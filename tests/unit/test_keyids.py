"""keyids.KnownIds: a client's record of its client.keys IDs decides appends as agents.py does."""
from __future__ import absolute_import, division, print_function

import pytest

from wazuh_cluster import agents, keyids


def lines(*ids):
    return b"".join(b"%s n%d any %064x\n" % (agent_id, k, k) for k, agent_id in enumerate(ids))


@pytest.mark.parametrize("old", [
    lines(b"001", b"002", b"0100"),
    lines(b"001", b"002") + b"  0100 x any k\n",                # spaces before an ID
    lines(b"001", b"002") + b"junk 0100 any k\n#comment\n\n",   # a non-ID first field
    lines(b"001") + b"002 a any k\x1c0100 b any k\n",          # \x1c breaks a line in text
    lines(b"001") + b"002 a any k\r0100 b any k\r\n",           # so does \r
    lines(b"001") + u"002 \u00e9t\u00e9 any k\n0100 b any k\n".encode("utf-8"),
    b"",
])
@pytest.mark.parametrize("added", [b"0100", b"100", b"0003", b"123456789", b"x1", b"0100 0101"])
def test_the_known_ids_decide_as_the_text_does(old, added):
    new = old + lines(*added.split())
    assert keyids.KnownIds().only_appended((1, 2, 3, 4), old, new) is \
        agents.only_appended_new_ids(old.decode("utf-8"), new.decode("utf-8"))


def test_appended_ids_are_known_after_the_write_and_a_new_file_is_read_again():
    known = keyids.KnownIds()
    old = lines(b"001", b"002")
    one = old + lines(b"003")
    assert known.only_appended("fp0", old, one)
    known.written("fp1")
    assert not known.only_appended("fp1", one, one + lines(b"003"))   # 003 is known now
    assert known.only_appended("fp1", one, one + lines(b"004"))
    # Another file (another fingerprint) than the one written: its IDs are read from it.
    other = lines(b"004")
    assert not known.only_appended("fp9", other, other + lines(b"004"))
    assert known.only_appended(None, other, other + lines(b"005"))       # unknown: the text


def test_a_first_sync_records_every_id_at_once():
    known = keyids.KnownIds()
    everything = lines(*[b"%05d" % i for i in range(5000, 0, -1)])
    assert known.only_appended("fp0", b"", everything)
    known.written("fp1")
    assert list(known.codes) == sorted(keyids.code(u"%05d" % i) for i in range(1, 5001))
