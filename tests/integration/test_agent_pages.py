"""cluster_control -a on a client: the master's listing a page at a time (agentpages).

A real client daemon and cluster_control; the master is built from the library
(peers.PeerServer) so that it can answer with pages, with the one-message request only (an
older master) or with hostile pages, and a real 2-node cluster gives the same output on the
client as on the master over several pages. Every wait polls a condition with a bound.
"""
from __future__ import absolute_import, division, print_function

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402
import lab_harness  # noqa: E402
from harness import (base_install, make_node, new_address, python,  # noqa: E402,F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from test_sync import FAST  # noqa: E402

from wazuh_cluster import agentpages, agentrows, channel, errors, peers  # noqa: E402

WAIT = 20.0
ROWS_SHOWN = 9500  # three pages of agentpages.PAGE_CHUNKS chunks of 1000
EVIL = u"web\x1b[2J\n\u00e9\u202e"


def sample_rows(n):
    """Rows as a master lists them, some with text a terminal must not get raw."""
    rows = []
    for i in range(n):
        name = EVIL if i % 1000 == 7 else u"agent%05d" % i
        node = None if i % 3 else u"node%02d" % (i % 7)
        keepalive = None if i % 5 else 1700000000.5 + i
        rows.append([u"%05d" % (i + 1), name, u"10.0.%d.%d" % (i // 250, i % 250),
                     u"Active" if keepalive else u"Never connected", node, keepalive])
    return rows


def chunks_of(rows):
    return [u",".join(json.dumps(row) for row in rows[i:i + agentrows.ROWS_PER_CHUNK])
            .encode("utf-8") for i in range(0, len(rows), agentrows.ROWS_PER_CHUNK)]


class RogueMaster(object):
    """A master on `address` speaking to `client` whose answers the test chooses."""

    def __init__(self, client, address, handlers):
        settings = peers.make_settings(
            node_name="master", cluster_name="wazuh", key=client.key, role="master",
            bind_addr=address, port=client.port, nodes=[client.address],
            own_addresses=[address], keepalive=1.0, handshake_timeout=5.0)
        # A round that finds nothing to do keeps the session up.
        handlers.update({"sync_manifest": lambda session, args, data: ({"files": {}}, b""),
                         "sync_files": lambda session, args, data: ({"states": {}}, b"")})
        self.server = peers.PeerServer(settings, handlers,
                                       nonce_book=channel.NonceBook()).start()

    def stop(self):
        self.server.stop()


def client_of_rogue(make_node):  # noqa: F811
    client = make_node("client", "client", configure=False)
    address = new_address()
    client.configure("client", [address, client.address], interval="3s")
    write_internal_options(client.prefix, FAST)
    return client, address


def listed(client, *args):
    result = client.cluster_control("-a", *args)
    assert (result.rc, result.err) == (0, ""), client.explain("cluster_control -a", result)
    return result.out


def refused(client):
    result = client.cluster_control("-a")
    assert result.rc == 1 and result.out == "", result
    assert result.err.count("\n") == 1, result
    assert all(0x20 <= ord(c) < 0x7f for c in result.err.rstrip("\n")), result
    return result.err


def test_pages_and_the_one_message_fallback_give_the_same_output(make_node):  # noqa: F811
    """Paged from a master that has the request; one message from one without it."""
    client, address = client_of_rogue(make_node)
    rows = sample_rows(ROWS_SHOWN)
    pages = []

    def stream(args):
        assert args in ({}, {"keepalives": False})
        return agentrows.streamed(len(rows)), iter(chunks_of(rows))
    listings = agentpages.Listings(stream, 30.0)

    def page(session, args, data):
        pages.append(args)
        return listings.page(session.peer_name, args)

    def one_message(session, args, data):
        return agentrows.result(len(rows)), agentrows.joined(chunks_of(rows))

    handlers = {agentpages.REQUEST: page}
    rogue = RogueMaster(client, address, handlers)
    try:
        client.start()
        wait_for(lambda: rogue.server.registry.get(client.name), WAIT, what="the session")
        paged = listed(client), listed(client, "-j")
        assert len(pages) == 2 * 3 and not listings.open, pages
        del handlers[agentpages.REQUEST]  # an older master
        handlers["cluster_agents"] = one_message
        assert (listed(client), listed(client, "-j")) == paged
        assert len(pages) == 2 * 3
    finally:
        rogue.stop()
    text, exact = paged
    assert len(text.splitlines()) == 1 + ROWS_SHOWN
    assert u"web\\x1b[2J\\x0a\\xe9\\u202e" in text
    assert json.loads(exact)["agents"][7]["name"] == EVIL
    assert [a["last_keepalive"] for a in json.loads(exact)["agents"][:6]] == [
        1700000000.5, None, None, None, None, 1700000005.5]


def hostile_answers():
    """(what cluster_control must say, the pages: [(result, data)])."""
    good = u",".join(json.dumps(r) for r in sample_rows(3)).encode("utf-8")

    def first(count, data, more=True):
        return {"count": count, "columns": list(agentrows.COLUMNS), "listing": u"t1",
                "more": more}, data

    def nxt(data, more=False, **changes):
        result = {"listing": u"t1", "more": more}
        result.update(changes)
        return result, data
    return [
        ("more rows than the 2 announced", [first(2, good, False)]),
        ("3 rows, 10 announced", [first(10, good, False)]),
        ("3 rows, 10 announced", [first(10, good), nxt(b"")]),
        ("not JSON", [first(6, good), nxt(b'["4","a"')]),
        ("not JSON", [first(4, good), nxt(b'["4","\xff","ip","Active",null,null]')]),
        ("something else than rows", [first(4, good), nxt(b'["4","a"]')]),
        ("column 'last_keepalive'", [first(4, good),
                                     nxt(b'["4","a","ip","Active",null,[1,2]]')]),
        ("column 'name'", [first(3, b'["1",{"x":1},"ip","Active",null,null]')]),
        ("bytes (at most", [first(4, good), nxt(b" " * (agentpages.PAGE_LIMIT + 1))]),
        ("without rows is not the last", [first(4, good), nxt(b"", more=True)]),
        ("something else than rows", [first(4, good), nxt(b" ", more=True)]),
        ("another listing", [first(6, good), nxt(good, listing=u"t2")]),
        ("does not announce the columns", [({"count": 3, "listing": u"t1", "more": False},
                                            good)]),
        ("row count is not a number", [({"count": "3", "columns": list(agentrows.COLUMNS),
                                         "listing": u"t1", "more": False}, good)]),
    ]


def test_a_hostile_page_ends_the_listing_with_one_line_naming_the_master(make_node):  # noqa: F811
    client, address = client_of_rogue(make_node)
    script = []
    token = [None]

    def page(session, args, data):
        # The client asks for the next page while cluster_control decodes the last, so a
        # listing cluster_control gave up on may still ask once: such a late request names
        # an earlier case's listing and must not take the next case's answer.
        if args.get("listing") not in (None, token[0]):
            raise errors.RequestError("no such listing", code="bad_request")
        return script.pop(0)

    rogue = RogueMaster(client, address, {agentpages.REQUEST: page})
    try:
        client.start()
        wait_for(lambda: rogue.server.registry.get(client.name), WAIT, what="the session")
        for case, (why, answers) in enumerate(hostile_answers()):
            token[0] = u"t1-%d" % case
            script[:] = [(dict(result, listing=token[0]) if result.get("listing") == u"t1"
                          else result, page_data) for result, page_data in answers]
            err = refused(client)
            assert "master 'master' sent a bad page of the agent listing: " in err, err
            assert why in err, (why, err)
            assert not script, why  # no page asked after the bad one
        assert client.running_pid()
        # The listing works again once the master behaves.
        token[0] = u"t9"
        script[:] = [({"count": 3, "columns": list(agentrows.COLUMNS), "listing": u"t9",
                       "more": False}, b",".join(chunks_of(sample_rows(3))))]
        assert len(listed(client).splitlines()) == 4
    finally:
        rogue.stop()


def test_a_real_client_shows_what_its_master_shows_over_several_pages(workspace):  # noqa: F811
    harness._need_ossec_user()
    addresses = [harness.new_address() for _ in range(2)]
    nodes = lab_harness.start_cluster(os.path.join(workspace, "pages-lab"), 2,
                                      port=harness.free_port(addresses[0]),
                                      addresses=addresses, interval="5s")
    try:
        master, client = nodes
        keys = master.path("etc", "client.keys")
        with open(keys, "ab") as handle:
            handle.write(b"".join(b"%d extra%05d any %064x\n" % (5000 + i, i, i)
                                  for i in range(ROWS_SHOWN)))
        want = len(lab_harness.SAMPLE_AGENTS) + ROWS_SHOWN
        wait_for(lambda: len(listed(master).splitlines()) == 1 + want, WAIT,
                 what="the master's listing of every agent")
        for args in ((), ("-j",)):
            # A status may change between two listings (a keepalive): compare until equal.
            wait_for(lambda: listed(client, *args) == listed(master, *args), WAIT,
                     what="the same listing on the client as on the master")
    finally:
        lab_harness.stop_nodes(nodes)
