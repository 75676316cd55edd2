"""The packed form of a batch's metadata-only updates (metapack.py, issue 11): what it carries,
what a hostile peer can send in it, and that only peers announcing it use it."""
from __future__ import absolute_import, division, print_function

import binascii
import hashlib
import json
import os

import pytest
from test_receive import BASE_NS, home  # noqa: F401 (fixture)

from wazuh_cluster import compat, inbox, metapack, peers, receive
from wazuh_cluster.errors import RequestError

NAMES = [u"queue/agent-info/agent%05d-10.0.0.%d" % (i, i % 250) for i in range(300)]


def meta(names=NAMES, mtime=BASE_NS):
    return [{"name": name, "sha256": hashlib.sha256(name.encode("utf-8")).hexdigest(),
             "mtime_ns": mtime + i} for i, name in enumerate(names)]


def header_of(entries):
    header = {"files": [], "delete": [], "delete_dirs": []}
    header.update(metapack.encode(entries))
    return header


def test_the_packed_form_carries_what_the_json_form_does():
    entries = meta() + [{"name": u"queue/agent-info/x", "sha256": "ab" * 32,
                         "mtime_ns": -1}, {"name": u"queue/agent-info/y", "sha256": "0" * 64,
                                           "mtime_ns": (1 << 63) - 1}]
    packed = header_of(entries)
    as_json = {"files": [], "meta": entries, "delete": [], "delete_dirs": []}
    assert "meta" not in packed
    assert inbox.parse_batch(packed, b"") == inbox.parse_batch(as_json, b"")
    assert [(f.name, f.sha256, f.mtime_ns) for f in inbox.parse_batch(packed, b"")[0]] == \
        [(e["name"], e["sha256"], e["mtime_ns"]) for e in entries]
    assert metapack.encode([]) == {} and metapack.decode({}) is None
    # what the packed form cannot carry goes as JSON (Batch.header): the receiver decides
    for odd in ({"name": u"a\nb"}, {"sha256": "xy" * 32}, {"sha256": "ab"},
                {"mtime_ns": 1 << 64}, {"mtime_ns": "5"}):
        entry = dict(entries[0], **odd)
        assert metapack.encode(entries[:3] + [entry]) == {}


@pytest.mark.parametrize("names, records", [
    (None, u""), (u"a", None), ([u"a"], u"AAAA"), (u"a", 5), (u"a", [u"AAAA"]),
    (u"a", u""),                                                    # no record for the name
    (u"a\nb", binascii.b2a_base64(b"\0" * metapack.RECORD.size).decode("ascii")),  # one short
    (u"a", binascii.b2a_base64(b"\0" * (metapack.RECORD.size + 1)).decode("ascii")),
    (u"a\n", binascii.b2a_base64(b"\0" * metapack.RECORD.size).decode("ascii")),  # "" named
    (u"a", u"A"),                                                   # bad padding
    (u"a", u"\u00e9\u00e9\u00e9\u00e9"),                            # not base64 at all
])
def test_a_malformed_packed_form_refuses_the_batch(names, records):
    header = {"files": [], "delete": [], "delete_dirs": []}
    for key, value in ((metapack.NAMES, names), (metapack.RECORDS, records)):
        if value is not None:
            header[key] = value
    with pytest.raises(RequestError) as raised:
        inbox.parse_batch(header, b"")
    assert raised.value.code == "bad_request"


def test_hostile_names_in_the_packed_form_are_refused_by_the_receiver_one_by_one(home):  # noqa
    # The packed form checks only its own framing: each name is then the receiver's, exactly
    # as a name of the JSON form (SPEC section 4).
    from test_receive import master_rx, log  # noqa: F401
    import logging
    bad = [u"../../etc/passwd", u"queue/agent-info/../../x", u"/etc/shadow",
           u"queue/agent-info/a\x01", u"etc/client.keys", u""]
    incoming, _, _ = inbox.parse_batch(header_of(meta(bad)), b"")
    rx = receive.Receiver(home, __import__("test_receive").ITEMS,
                          __import__("test_receive").EXCLUDE, logging.getLogger("t"),
                          role="master")
    states, reasons = rx.apply_batch(incoming)
    assert set(states.values()) == set(["invalid"]) and len(states) == len(bad)
    assert not os.path.exists(os.path.join(home, "x"))


def test_a_compact_answer_stands_for_the_packed_names_only():
    names = [u"a", u"b", u"c", u"d"]
    answer = {"states": {u"b": u"failed", u"zzz": u"synchronized"}, metapack.COMPACT: True}
    # the peer's answer adds no name; a packed name it left out is synchronized, another not
    assert metapack.full_states(answer, names, [u"a", u"b", u"c"]) == \
        {u"a": u"synchronized", u"b": u"failed", u"c": u"synchronized"}
    assert metapack.full_states(dict(answer, **{metapack.COMPACT: 1}), names, [u"a"]) == \
        {u"b": u"failed"}                                            # only true is true
    assert metapack.full_states({"states": [u"a"]}, names, names) is None
    states = {u"a": u"synchronized", u"b": u"failed", u"d": u"synchronized"}
    assert metapack.compact_states(states, [u"a", u"b"]) == \
        {u"b": u"failed", u"d": u"synchronized"}
    # a batch of packed names alone (a keepalive batch): its states are theirs
    assert metapack.compact_states(states) == {u"b": u"failed"}


def test_the_packed_form_is_announced_and_taken_only_when_known():
    assert peers._features({"features": ["meta_packed", "delta"]}) == \
        frozenset(["meta_packed", "delta"])
    assert peers._features({"features": ["delta"]}) == frozenset(["delta"])


class Peer(object):
    peer_role = "client"
    peer_name = "client1"


class NoDaemon(object):
    """An internal daemon that is down: touches are read and hashed (keepalive.records)."""

    def call(self, cmd, args):
        if cmd in ("received", "set_states"):
            return {}
        raise RequestError("down", "unavailable")

    call_data = call

    def urgent(self):
        return self


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "json"])
def test_a_master_answers_a_packed_batch_compactly_and_a_json_one_in_full(home, packed):  # noqa
    from test_failover_fencing import InboxCfg, Layout
    from test_receive import put
    for folder in ("etc/shared/default", "queue/agent-groups"):
        if not os.path.isdir(os.path.join(home, folder)):
            os.makedirs(os.path.join(home, folder))
    content = b"Linux a\n"
    names = [u"queue/agent-info/a%d-any" % i for i in range(3)]
    for name in names:
        put(home, name, content, BASE_NS)
    class MasterCfg(InboxCfg):
        node_type = "master"
        is_master = True
    box = inbox.Inbox(MasterCfg(), Layout(home), NoDaemon())
    entries = [{"name": name, "sha256": hashlib.sha256(content).hexdigest(),
                "mtime_ns": BASE_NS + 10 ** 9} for name in names]
    entries.append({"name": u"queue/agent-info/gone-any", "sha256": "ab" * 32,
                    "mtime_ns": BASE_NS})
    header = header_of(entries) if packed else \
        {"files": [], "meta": entries, "delete": [], "delete_dirs": []}
    answer, _ = box.sync_files(Peer(), header, b"")
    if packed:
        assert answer[metapack.COMPACT] is True and list(answer["states"]) == \
            [u"queue/agent-info/gone-any"]
    else:
        assert metapack.COMPACT not in answer and len(answer["states"]) == 4
    full = metapack.full_states(answer, [e["name"] for e in entries],
                                names + [u"queue/agent-info/gone-any"] if packed else ())
    assert full == dict([(name, u"synchronized") for name in names] +
                        [(u"queue/agent-info/gone-any", u"failed")])


@pytest.mark.parametrize("announced", [("meta_packed",), ()], ids=["announced", "older peer"])
def test_a_sender_packs_its_touches_only_for_a_peer_that_announced_it(tmpdir, announced):
    from test_channel import channel_pair
    from test_peersync import DELAY, INTERVAL, ITEMS
    from wazuh_cluster import manifest
    from wazuh_cluster.session import Session
    from wazuh_cluster.sync import PeerSync
    seen = []

    def sync_files(session, args, data):
        seen.append(sorted(args))
        incoming, _, _ = inbox.parse_batch(args, data)
        states = dict((f.name, u"synchronized") for f in incoming)
        if metapack.NAMES in args:
            return {"states": metapack.compact_states(states, states), metapack.COMPACT:
                    True}, b""
        return {"states": states}, b""
    folder = tmpdir.mkdir("queue").mkdir("agent-info")
    mine = {}
    for i in range(5):
        name = u"queue/agent-info/a%d-any" % i
        folder.join("a%d-any" % i).write_binary(b"Linux a\n")
        st = os.lstat(str(folder.join("a%d-any" % i)))
        mine[name] = manifest.Entry(hashlib.sha256(b"Linux a\n").hexdigest(),
                                    int(st.st_mtime * 1e9) - 10 ** 9, "agent-info")
    ours, theirs = channel_pair()
    peer = Session(theirs, {"sync_files": sync_files}, 5.0, address=("127.0.0.1", 1)).start()
    client = Session(ours, {}, 5.0, address=("127.0.0.1", 2))
    client.features = frozenset(announced)
    client.start()
    try:
        sync = PeerSync(client, str(tmpdir), "client", None, ITEMS, INTERVAL, DELAY, 30.0)
        states = sync.send(mine, [], sorted(mine), [], [])
    finally:
        client.close()
        peer.close()
    assert states == dict((name, u"synchronized") for name in mine)
    keys = [metapack.NAMES, metapack.RECORDS] if announced else ["meta"]
    assert seen == [sorted(["delete", "delete_dirs", "files"] + keys)]


def test_the_cost_granted_to_a_packed_batch_bounds_what_decoding_it_makes():
    # Its header is two strings (190 KB for 2 000 names) that parse_batch makes into 2 000
    # names, checksums and receive.Incoming: the budget grants what those take, as it grants
    # the dicts of the JSON form (protocol.json_cost, LINE_COST).
    from wazuh_cluster import protocol
    names = [u"queue/agent-info/agent%06d-10.0.%d.%d" % (i, i // 250, i % 250)
             for i in range(2000)]
    args = {"files": [], "delete": [], "delete_dirs": []}
    args.update(metapack.encode(meta(names)))
    body = protocol.encode_body({"cmd": "sync_files", "args": args})
    incoming, peak, granted = _decoded(body)
    assert len(incoming) == 2000 and peak <= granted


def _decoded(body):
    """(a sync_files body's incoming files, the peak of memory decoding and parsing it made,
    what the budget grants for it: its json_cost and its data)."""
    tracemalloc = pytest.importorskip("tracemalloc")
    from wazuh_cluster import protocol
    tracemalloc.start()
    try:
        header, data, cost = protocol.decode_costed(body)
        incoming = inbox.parse_batch(header["args"], data)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return incoming, peak, cost + len(data)


def _escaped_newlines(body, escape):
    """The body with every newline of its header's strings written as `escape`."""
    from wazuh_cluster import protocol
    size = protocol._U32.unpack(body[:4])[0]
    head = body[4:4 + size].replace(b"\\n", escape)
    return protocol._U32.pack(len(head)) + head + body[4 + size:]


@pytest.mark.parametrize("escape", [b"\\u000a", b"\\u000A"])
def test_a_newline_escaped_otherwise_is_counted_as_a_line_too(escape):
    # JSON writes a newline as \n or as \u000a (either case): a hostile peer's names
    # joined by the longer escape are as many lines to split, and must cost as much.
    from wazuh_cluster import protocol
    args = {"files": [], "delete": [], "delete_dirs": []}
    args.update(metapack.encode(meta([u"ab"] * 500)))
    body = protocol.encode_body({"cmd": "sync_files", "args": args})
    hostile = _escaped_newlines(body, escape)
    header, _, cost = protocol.decode_costed(hostile)
    assert header == protocol.decode_costed(body)[0]
    assert cost >= protocol.decode_costed(body)[2]


def test_short_names_joined_by_unicode_escapes_make_no_more_than_their_cost():
    from wazuh_cluster import protocol
    args = {"files": [], "delete": [], "delete_dirs": []}
    args.update(metapack.encode(meta([u"ab%d" % (i % 10) for i in range(4000)])))
    body = _escaped_newlines(protocol.encode_body({"cmd": "sync_files", "args": args}),
                             b"\\u000a")
    incoming, peak, granted = _decoded(body)
    assert len(incoming) == 4000 and peak <= granted, (peak, granted)


@pytest.mark.parametrize("names", [[u"a" * (1 << 20), u"b"],
                                   [u"queue/agent-info/" + u"a" * 1000] * 1000,
                                   [u"queue/agent-info/" + u"a" * 1000 + u"\u0100"] * 300,
                                   NAMES],
                         ids=["one-long-name", "long-names", "wide-names", "honest"])
def test_the_names_split_out_of_their_text_are_counted_too(names):
    # Split, the packed names are copied out of their joined text, which the header keeps
    # while the batch is applied: a hostile peer's long names (one newline is enough) held
    # twice what was granted. Counted once parsed (metapack.split_copy): before, a packed
    # name's text cannot be told from a JSON-form name of a million newlines, which must
    # still be answered "invalid" (test_hostile_text)
    from test_protocol import _decoded_bytes
    from wazuh_cluster import protocol
    body = protocol.encode_body({"cmd": "sync_files", "args": header_of(meta(names))})
    header, data, cost = protocol.decode_costed(body)
    incoming = inbox.parse_batch(header["args"], data)[0]
    assert [f.name for f in incoming] == names
    seen = set()
    held = _decoded_bytes(header, seen) + _decoded_bytes(incoming, seen)
    assert held <= cost + len(data), (held, cost)
    unsplit = dict(header["args"], **{metapack.NAMES: names[0]})
    assert metapack.split_copy({"args": unsplit}) == 0   # no newline: no copy


def test_a_batch_the_packed_form_cannot_carry_goes_as_json():
    from wazuh_cluster.sync import Batch
    batch = Batch()
    batch.meta.extend(meta(NAMES[:3]))
    assert sorted(batch.header(True)) == sorted(["files", "delete", "delete_dirs",
                                                 metapack.NAMES, metapack.RECORDS])
    assert "meta" in batch.header(False)
    batch.meta.append(dict(batch.meta[0], name=u"queue/agent-info/a\nb"))
    header = batch.header(True)
    assert header["meta"] == batch.meta and metapack.NAMES not in header


def test_more_names_than_max_names_are_refused_before_they_are_split():
    names = u"\n".join([u"a"] * (metapack.MAX_NAMES + 1))
    records = binascii.b2a_base64(b"\0" * metapack.RECORD.size * (metapack.MAX_NAMES + 1))
    with pytest.raises(RequestError) as info:
        metapack.decode({metapack.NAMES: names, metapack.RECORDS: records.decode("ascii")})
    assert "more than %d" % metapack.MAX_NAMES in info.value.message
    assert metapack.encode(meta([u"queue/agent-info/a%05d" % i
                                 for i in range(metapack.MAX_NAMES + 1)])) == {}


def test_a_string_of_newlines_costs_lines_only_as_far_as_the_packed_form_can_split_them():
    # A hostile peer's name of a million newlines (in any string: the cost is counted
    # before parsing) is refused name by name as before: its cost stays within a few times
    # its text, the lines at most MAX_NAMES, not LINE_COST a newline (240 times the text).
    from wazuh_cluster import protocol
    # What the newlines add to a text of the same length without them: the lines, and on
    # 3.6-3.8 and 2.7 a slot each in the list of pieces their string is built from (20
    # bytes at most) and what 2.7's unicode.join allocates (4 bytes a byte of text)
    for newlines, lines in ((1 << 20, metapack.MAX_NAMES), (8000, 16002 // 50)):
        raw = json.dumps({"meta": [{"name": u"\n" * newlines}]}).encode("ascii")
        plain = json.dumps({"meta": [{"name": u"ab" * newlines}]}).encode("ascii")
        assert len(raw) == len(plain)
        extra = protocol.json_cost(raw) - protocol.json_cost(plain)
        assert extra <= protocol.LINE_COST * lines + 24 * len(raw)


def test_every_line_a_split_makes_is_counted():
    # n newlines split into n + 1 names: the last one has a line's cost too
    from wazuh_cluster import protocol
    assert protocol._packed_lines(0, 10 ** 6) == 0
    assert protocol._packed_lines(1, 10 ** 6) == 2
    assert protocol._packed_lines(10 ** 6, 10 ** 9) == metapack.MAX_NAMES
    # (the lines come once the text is parsed: what parsing held is gone by then)
    raw = json.dumps({"names": u"a" * 100 + u"\n" + u"b" * 100}).encode("ascii")
    assert protocol.json_cost(raw) >= 2 * protocol.LINE_COST + len(raw)


def test_keepalive_batches_are_set_in_place_one_at_a_time(home):  # noqa: F811
    """Two packed keepalive batches set in place at once handed the GIL to each other at each
    of their system calls (a fifth of a master's CPU under the real keepalive rate): their
    receiver holds inbox._TOUCHING while it sets them (receive.apply_batch's serial, tested
    in test_keepalive_batch); other batches do not."""
    from test_failover_fencing import InboxCfg, Layout

    class MasterCfg(InboxCfg):
        node_type = "master"
        is_master = True
    box = inbox.Inbox(MasterCfg(), Layout(home), NoDaemon())
    serials = []
    real = box.receiver.apply_batch

    def apply_batch(*args, **kw):
        serials.append(kw.get("serial"))
        return real(*args, **kw)
    box.receiver.apply_batch = apply_batch
    box.sync_files(Peer(), header_of(meta(NAMES[:5])), b"")
    box.sync_files(Peer(), {"files": [], "meta": meta(NAMES[5:10]), "delete": [],
                            "delete_dirs": []}, b"")
    assert serials == [inbox._TOUCHING, None]


@pytest.mark.skipif(not hasattr(__import__("gc"), "callbacks"), reason="gc.callbacks: 3.3+")
def test_decoding_makes_no_object_per_record_for_the_garbage_collector():
    # A keepalive batch's records were a tuple each: thousands of them, live together, made
    # the cyclic garbage collector run several times a batch on a busy master.
    import gc
    names = [u"queue/agent-info/agent%05d-any" % i for i in range(metapack.MAX_NAMES)]
    header = metapack.encode(meta(names))
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info)
    gc.collect()
    gc.callbacks.append(count)
    try:
        decoded = metapack.decode(header)
    finally:
        gc.callbacks.remove(count)
    assert list(decoded[0]) == names and len(decoded[1]) == len(decoded[2]) == len(names)
    assert len(runs) <= 1
