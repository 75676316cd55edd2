"""legacy_db: Wazuh 3.0's text commands over a real (in-memory) cluster database, and the
text mode of localsock.Connection that carries them.

Replies are checked byte for byte as 3.0's clients read them: exactly 10000 bytes, NUL padded;
rows keyed by the peer's listed address, file names with a leading "/".
"""
from __future__ import absolute_import, division, print_function

import logging

import pytest

from wazuh_cluster import db as db_mod
from wazuh_cluster import legacy_db, localsock
from wazuh_cluster.errors import ProtocolError

A1, A2, UNSEEN = "10.0.0.2", "10.0.0.3", "10.0.0.9"


class FakeCatalog(object):
    def __init__(self):
        self.calls = []

    def handle(self, cmd, args):
        self.calls.append(cmd)
        return {}


class Ctx(object):
    pass


@pytest.fixture
def ctx():
    c = Ctx()
    c.log = logging.getLogger("test_legacy_db")
    c.db = db_mod.ClusterDB(":memory:", c.log)
    c.db.record_peer("client01", "client", A1, "x")
    c.db.record_peer("client02", "client", A2, "x")
    c.db.set_states([["client01", "etc/client.keys", "synchronized"],
                     ["client01", "etc/shared/default/agent.conf", "failed"],
                     ["client02", "etc/client.keys", "pending"]])
    c.catalog = FakeCatalog()
    resolved = {"manager02.example": ("10.0.0.3",)}
    c.addresses = legacy_db.NodeAddresses([A1, "manager02.example"], c.db,
                                          resolver=lambda h: resolved.get(h, ()))
    c.commands = legacy_db.LegacyCommands(c.db, c.addresses, c.catalog, c.log)
    yield c
    c.db.close()


def ask(c, command):
    reply, event = c.commands.answer(command)
    assert len(reply) == legacy_db.REPLY_BYTES
    return reply, event


def text(reply):
    """What 3.0's client keeps of a reply: the bytes that are not NUL."""
    return reply.replace(b"\0", b"")


def rows(c, node):
    return dict((f, s) for n, f, s in c.db.states(node))


def test_count_by_listed_address_padded_to_10000_bytes(ctx):
    reply, event = ask(ctx, b"count " + A1.encode())
    assert reply == b"2" + b"\0" * 9999 and event is None
    assert text(ask(ctx, b"count 10.0.0.3")[0]) == b"1"
    assert text(ask(ctx, b"count " + UNSEEN.encode())[0]) == b"0"


def test_listed_host_name_maps_through_its_addresses(ctx):
    assert text(ask(ctx, b"count manager02.example")[0]) == b"1"


def test_select_leading_space_then_file_star_status(ctx):
    reply, _ = ask(ctx, b"select 10.0.0.2 100 0")
    assert reply.startswith(b" /etc/client.keys*synchronized "
                            b"/etc/shared/default/agent.conf*failed \0")
    assert text(reply) == (b" /etc/client.keys*synchronized "
                           b"/etc/shared/default/agent.conf*failed ")
    assert text(ask(ctx, b"select 10.0.0.2 1 1")[0]) == b" /etc/shared/default/agent.conf*failed "
    assert text(ask(ctx, b"select 10.0.0.9 100 0")[0]) == b" "


def test_select_offsets_as_3_0_client_sends_them(ctx):
    # 3.0's get_file_status appends each offset to its query: "0", then "0100", ...
    ctx.db.set_states([["client01", "queue/agent-info/a%03d-any" % i, "synchronized"]
                       for i in range(150)])
    first = text(ask(ctx, b"select 10.0.0.2 100 0")[0]).split()
    second = text(ask(ctx, b"select 10.0.0.2 100 0100")[0]).split()
    assert len(first) == 100 and len(second) == 52
    assert not set(first) & set(second)


def test_select_page_that_does_not_fit_is_cut_at_a_whole_row(ctx, caplog):
    long_names = ["etc/shared/g/" + ("x%03d" % i) * 40 for i in range(100)]  # 173 bytes a row
    ctx.db.set_states([["client01", n, "synchronized"] for n in long_names])
    with caplog.at_level(logging.WARNING, logger="test_legacy_db"):
        reply, _ = ask(ctx, b"select 10.0.0.2 100 0")
    kept = text(reply)
    assert kept.startswith(b" ") and kept.endswith(b"*synchronized ")
    assert 0 < len(kept.split()) < 100
    assert all(r.startswith(b"/etc/") and r.count(b"*") == 1 for r in kept.split())
    assert len(kept) <= legacy_db.REPLY_BYTES
    assert "do not fit" in caplog.text


def test_insert_adds_missing_rows_pending_and_announces_them(ctx):
    reply, event = ask(ctx, b"insert 10.0.0.2 /etc/client.keys 10.0.0.2 /etc/shared/new.conf "
                            b"10.0.0.9 /etc/other")
    assert reply == b"Command OK" + b"\0" * 9990
    assert rows(ctx, "client01") == {"etc/client.keys": "synchronized",
                                     "etc/shared/default/agent.conf": "failed",
                                     "etc/shared/new.conf": "pending"}
    assert event["changed"] == ["etc/client.keys", "etc/shared/new.conf"]
    assert not [r for r in ctx.db.states() if r[1] == "etc/other"]


def test_update1_makes_the_file_pending_for_every_node(ctx):
    reply, event = ask(ctx, b"update1 /etc/client.keys")
    assert text(reply) == b"Command OK"
    assert rows(ctx, "client01")["etc/client.keys"] == "pending"
    assert rows(ctx, "client02")["etc/client.keys"] == "pending"
    assert event == {"event": "changes", "changed": ["etc/client.keys"], "touched": [],
                     "deleted": [], "deleted_dirs": []}


def test_update2_sets_existing_rows_only(ctx):
    reply, event = ask(ctx, b"update2 synchronized 10.0.0.3 /etc/client.keys "
                            b"failed 10.0.0.3 /etc/never-seen")
    assert text(reply) == b"Command OK" and event is None
    assert rows(ctx, "client02") == {"etc/client.keys": "synchronized"}
    _, event = ask(ctx, b"update2 pending 10.0.0.2 /etc/shared/default/agent.conf")
    assert rows(ctx, "client01")["etc/shared/default/agent.conf"] == "pending"
    assert event["changed"] == ["etc/shared/default/agent.conf"]


def test_delete1_forgets_rows_and_schedules_a_rescan(ctx):
    reply, _ = ask(ctx, b"delete1 /etc/client.keys")
    assert text(reply) == b"Command OK"
    assert [r for r in ctx.db.states() if r[1] == "etc/client.keys"] == []
    assert ctx.catalog.calls == ["rescan"]


def test_clear_with_trailing_space_asks_for_a_full_round(ctx):
    reply, event = ask(ctx, b"clear ")
    assert text(reply) == b"Command OK"
    assert set(s for _n, _f, s in ctx.db.states()) == {"pending"}
    assert event["overflow"] is True


def test_several_spaces_count_as_one_and_a_c_terminator_is_allowed(ctx):
    assert text(ask(ctx, b"count   10.0.0.2\0")[0]) == b"2"


@pytest.mark.parametrize("command", [
    b"", b"count", b"count 10.0.0.2 10.0.0.3", b"COUNT 10.0.0.2", b"drop table states",
    b"select 10.0.0.2 100", b"select 10.0.0.2 -1 0", b"select 10.0.0.2 10 x",
    b"select 10.0.0.2 1e3 0", b"count 10.0.0.2\n", b"count bad/host",
    b"insert 10.0.0.2", b"insert 10.0.0.2 etc/client.keys", b"insert 10.0.0.2 /../etc/passwd",
    b"insert 10.0.0.2 /etc//x", b"update1 /etc/client.keys\x1b[2J", b"update2 pending 10.0.0.2",
    b"update2 done 10.0.0.2 /etc/client.keys", b"delete1", b"clear now",
    b"count \xc3\xa9", b"count 10.0.0.2\0count 10.0.0.3",
])
def test_malformed_gets_10000_nuls_and_changes_nothing(ctx, command):
    before = ctx.db.states()
    reply, event = ask(ctx, command)
    assert reply == b"\0" * 10000 and event is None
    assert ctx.db.states() == before
    assert ctx.catalog.calls == []


def test_text_start_tells_3_0_commands_from_our_frames():
    assert legacy_db.is_text_start(b"c") and legacy_db.is_text_start(b"S")
    for first in (b"\x00", b" ", b"1", b"{", b"\xc3", b""):
        assert not legacy_db.is_text_start(first)


# -- the transport: localsock.Connection in text mode -------------------------------------------

def connection_pair(max_message=localsock.MAX_MESSAGE):
    import socket
    ours, theirs = socket.socketpair()
    return ours, localsock.Connection(theirs, max_message, text_start=legacy_db.is_text_start)


def test_a_burst_is_one_command_and_frames_stay_frames():
    ours, conn = connection_pair()
    try:
        ours.sendall(b"count 10.0.0.2")
        assert conn.read_messages() == [b"count 10.0.0.2"] and conn.text
        assert conn.read_messages() == []           # nothing more waiting: no command
        ours.sendall(b"select 10.0.0.2 100 0")
        assert conn.read_messages() == [b"select 10.0.0.2 100 0"]
        conn.send_raw(legacy_db.pad("1"))
        assert len(ours.recv(20000)) == 10000
    finally:
        ours.close()
        conn.close()
    ours, conn = connection_pair()
    try:
        ours.sendall(localsock.encode({"id": 1, "cmd": "status"}))
        messages = conn.read_messages()
        assert [localsock.decode(m) for m in messages] == [{"id": 1, "cmd": "status"}]
        assert not conn.text
    finally:
        ours.close()
        conn.close()


def test_a_command_longer_than_the_bound_is_refused():
    ours, conn = connection_pair(max_message=1000)
    try:
        ours.sendall(b"insert" + b" 10.0.0.2 /etc/x" * 100)
        with pytest.raises(ProtocolError):
            conn.read_messages()
    finally:
        ours.close()
        conn.close()


def test_a_client_that_sends_then_shuts_down_is_answered_then_closed():
    ours, conn = connection_pair()
    try:
        ours.sendall(b"clear ")
        ours.shutdown(1)
        assert conn.read_messages() == [b"clear "]
        assert conn.closing and not conn.closed
    finally:
        ours.close()
        conn.close()
