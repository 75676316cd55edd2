"""Peer text made safe (text.py) and the set_states rows built from a peer's names (staterows)."""
from __future__ import absolute_import, division, print_function

import json
import sys

import pytest

from wazuh_cluster import db, localsock, pathrules, staterows, text
from wazuh_cluster.errors import PathRefused

HOSTILE = [
    u"line\n2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged",
    u"cr\rreturn", u"esc\x1b[31mred\x1b]0;title\x07", u"nul\x00byte", u"del\x7f",
    u"c1\x85\x9b", u"bidi\u202etxt.exe", u"sep\u2028\u2029", u"non-ascii \u00e9\U0001f600",
    b"bytes\n\x1b\xff", u"tab\tand\x0bvt\x0cff",
]


def only_printable_ascii(value):
    return all(0x20 <= ord(char) < 0x7f for char in value)


@pytest.mark.parametrize("value", HOSTILE)
def test_printable_and_quote_leave_printable_ascii_only(value):
    for shown in (text.printable(value), text.quote(value), text.printable(value, None)):
        assert only_printable_ascii(shown), repr(shown)


def test_printable_escapes_as_xnn_and_keeps_printable_ascii_as_it_is():
    assert text.printable(u"etc/shared/default/agent.conf") == u"etc/shared/default/agent.conf"
    assert text.printable(u"a\nb\r\x1b\x00\x7f\u00e9") == u"a\\x0ab\\x0d\\x1b\\x00\\x7f\\xe9"
    assert text.printable(u"\u202e\U0001f600") == u"\\u202e\\U0001f600"
    assert text.printable(b"\xff\n") == u"\\xff\\x0a"
    # Backslashes stay: escaping an escaped text again changes nothing.
    once = text.printable(u"x\ny\\z")
    assert text.printable(once) == once


def test_quote_is_unambiguous():
    assert text.quote(u"it's a\\b\n") == u"'it\\'s a\\\\b\\x0a'"
    assert text.quote(u"a\\x0a") != text.quote(u"a\n")
    assert pathrules.escape(u"a\nb") == text.quote(u"a\nb")  # one rule everywhere


def test_long_values_are_cut_and_say_their_length():
    shown = text.printable(u"x" * (1 << 20), 100)
    assert shown == u"x" * 100 + u"...(1048576 characters)"
    quoted = text.quote(u"\n" * 1000, 10)
    assert quoted == u"'" + u"\\x0a" * 10 + u"'...(1000 characters)"
    assert text.printable(u"short", 100) == u"short"


def test_values_that_are_not_text_never_raise():
    assert text.printable(None) == u"<NoneType>"
    assert text.printable({"a": 1}) == u"<dict>"
    assert text.quote(5) == u"<int>"


@pytest.mark.parametrize("version", [u"3.0.0", u"3.0.0+py.1", u"v3.0.0-beta1", u"3.0~rc2",
                                     u"A" * 32])
def test_versions_in_the_alphabet_are_kept(version):
    assert text.peer_version(version) == version


@pytest.mark.parametrize("version", [u"3.0.0\n2031/01/01 00:00:00 x: ERROR: forged",
                                     u"3.0\x1b[2J", u"3.0 beta", u"", u"-3", u"A" * 33,
                                     u"3.0.\u00e9", u"x" * (1 << 20), 3, [u"3.0"],
                                     u"(invalid)", u"3.0.0\n"])
def test_versions_outside_the_alphabet_are_marked_invalid(version):
    assert text.peer_version(version) == text.INVALID_VERSION


def test_no_version_stays_none():
    assert text.peer_version(None) is None


# -- staterows ---------------------------------------------------------------------------------

def test_valid_names_are_stored_as_they_are_and_others_escaped_and_cut():
    assert staterows.stored_name(u"etc/shared/default/agent.conf") == \
        u"etc/shared/default/agent.conf"
    assert staterows.stored_name(u"queue/agent-info/../x") == u"queue/agent-info/../x"
    assert staterows.stored_name(u"a\nb") == u"a\\x0ab"
    huge = staterows.stored_name(u"y" * (1 << 20))
    assert huge.endswith(u"...(1048576 characters)") and len(huge) < 300
    # A backslash name is refused by the receiver; stored escaped, it cannot pass for a
    # name that went through unchanged.
    assert staterows.stored_name(u"a\\x0ab") == u"a\\x0ab"
    assert staterows.stored_name(u"a\\x0ab") != u"a\\x0ab".replace(u"\\", u"")
    for value in HOSTILE:
        assert only_printable_ascii(staterows.stored_name(value))


def test_invalid_rows_of_a_batch_are_bounded_and_unknown_states_left_out():
    states = dict((u"bad\n%d" % n, "invalid") for n in range(db.MAX_INVALID_PER_NODE + 500))
    states[u"etc/ok"] = "synchronized"
    states[u"etc/odd"] = "exploded"
    states[u"etc/dict"] = {"a": 1}
    rows = staterows.rows(u"node02", states)
    invalid = [r for r in rows if r[2] == "invalid"]
    assert len(invalid) == db.MAX_INVALID_PER_NODE
    assert [u"node02", u"etc/ok", "synchronized"] in rows
    assert not [r for r in rows if r[1] in (u"etc/odd", u"etc/dict")]


def test_requests_stay_far_below_the_internal_daemons_limit():
    states = dict((u"\x1b" * 300 + u"%d" % n, "invalid") for n in range(5000))
    states.update((u"etc/shared/" + u"\"" * 1000 + u"%d" % n, "synchronized")
                  for n in range(3000))
    states[u"z" * (1 << 20)] = "invalid"
    total = 0
    for request in staterows.requests(staterows.rows(u"node02", states)):
        size = len(json.dumps({"id": 1, "cmd": "set_states", "args": request},
                              separators=(",", ":")))
        assert size <= staterows.REQUEST_BYTES + 1024 < localsock.MAX_MESSAGE
        total += len(request["rows"])
    assert total == db.MAX_INVALID_PER_NODE + 3000


@pytest.mark.parametrize("name", [u"etc/shared/default/agent.conf\n",
                                  u"queue/agent-info/web01-any\n", u"etc/client.keys\r\n"])
def test_a_trailing_newline_does_not_pass_for_a_valid_name(name):
    with pytest.raises(PathRefused):
        pathrules.check_name(name)
    assert not staterows.is_plain(name)


def test_is_printable_is_printable_ascii_for_every_code_point():
    # One rule whichever way it is checked (3.7+ text asks str.isascii and isprintable).
    top = 0x110000 if sys.maxunicode > 0xFFFF else 0x10000
    for code in list(range(0x3000)) + list(range(0xD700, 0xE100)) + [0xFEFF, 0xFFFF, top - 1]:
        char = (u"\\U%08x" % code).encode("ascii").decode("unicode_escape")
        assert text.is_printable(char) == (0x20 <= code <= 0x7E), hex(code)
        assert text.is_printable(u"ok " + char + u" ok") == (0x20 <= code <= 0x7E), hex(code)
    assert text.is_printable(u"") and text.is_printable(b"a b") and not text.is_printable(b"\xff")
