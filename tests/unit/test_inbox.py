"""inbox.sync_manifest: the manifest a peer asks for, relayed from the internal daemon."""
from __future__ import absolute_import, division, print_function

import hashlib
import json
import os

import pytest
from test_receive import BASE_NS, home, log, master_rx, read  # noqa: F401 (fixtures)

from wazuh_cluster import deltarx, inbox, keepalive, keyids, localsock, protocol, receive
from wazuh_cluster.errors import RequestError


class FakeLink(object):
    """The internal daemon's "manifest" over a fixed mapping (as catalog answers it)."""

    def __init__(self, files):
        self.files = files
        self.queries = []

    def _select(self, args):
        names = args.get("names")
        return dict((n, e) for n, e in self.files.items() if names is None or n in names)

    def call(self, cmd, args):
        assert cmd == "manifest" and not args.get("as_data")
        self.queries.append(args)
        return {"files": self._select(args)}

    def call_data(self, cmd, args):
        assert cmd == "manifest" and args.get("as_data") is True
        self.queries.append(args)
        files = self._select(args)
        return {"count": len(files)}, json.dumps(files).encode("ascii")


class FakeSession(object):
    peer_role = "client"
    peer_name = "client1"


def make_inbox(files):
    box = inbox.Inbox.__new__(inbox.Inbox)  # only the link is used by sync_manifest
    box.link = FakeLink(files)
    return box


def entry(i):
    return {"sha256": "%064x" % i, "size": i, "mtime_ns": i * 10, "mode": 432,
            "item": "agent-info"}


FILES = dict(("queue/agent-info/agent%05d-any" % i, entry(i)) for i in range(300))


@pytest.mark.parametrize("in_data", [False, True])
@pytest.mark.parametrize("names", [None, [], sorted(FILES)[:7] + ["queue/agent-info/nope"],
                                   ["queue/agent-info/" + "x" * (1 << 20)] + sorted(FILES)[:2],
                                   # JSON writes these six times longer (\u0000)
                                   ["queue/agent-info/%d" % i + u"\x00" * 900
                                    for i in range(20)] + sorted(FILES)[:2],
                                   sorted(FILES) + ["queue/agent-info/nope"]])
def test_the_answer_is_the_asked_part_of_the_manifest_either_way(monkeypatch, names, in_data):
    monkeypatch.setattr(inbox, "NAMES_BYTES_PER_QUERY", 1000)  # several slices for 300 names
    box = make_inbox(FILES)
    args = {"source": "client", "names": names}
    if in_data:
        args["manifest_in_data"] = True
    answer = box.sync_manifest(FakeSession(), args, b"")
    expected = dict((n, e) for n, e in FILES.items() if names is None or n in names)
    if in_data:
        assert answer[0] == {"files_in_data": True}
        assert json.loads(b"".join(answer[1]).decode("ascii")) == expected  # pieces, unjoined
    else:
        assert answer == ({"files": expected}, b"")
    if names is not None and len(names) > 100:
        assert len(box.link.queries) > 1
    for query in box.link.queries:
        assert query["source"] == "client"
        assert len(json.dumps(query)) < 1000 + 100


def test_names_are_asked_in_slices_that_cover_them_once():
    names = ["n%04d" % i for i in range(1000)]
    queries = list(inbox.manifest_queries("client", names, True))
    assert [n for q in queries for n in q["names"]] == names
    assert all(q["as_data"] is True and q["source"] == "client" for q in queries)
    assert list(inbox.manifest_queries("client", [], False)) == [{"source": "client",
                                                                  "names": []}]
    assert list(inbox.manifest_queries("master", None, False)) == [{"source": "master"}]
    # A name longer than a slice still travels (alone).
    huge = ["x" * (inbox.NAMES_BYTES_PER_QUERY + 10), "y"]
    assert [q["names"] for q in inbox.manifest_queries("client", huge, False)] == \
        [[huge[0]], ["y"]]


def test_a_peer_may_only_ask_about_its_own_items():
    box = make_inbox(FILES)
    with pytest.raises(RequestError) as info:
        box.sync_manifest(FakeSession(), {"source": "master"}, b"")
    assert info.value.code == "forbidden"
    with pytest.raises(RequestError) as info:
        box.sync_manifest(FakeSession(), {"source": "client", "names": [1, 2]}, b"")
    assert info.value.code == "bad_request"


class RecordingLink(object):
    def __init__(self):
        self.calls = []

    def call(self, cmd, args):
        self.calls.append((cmd, args))
        return {"updated": len(args.get("agents", []))}


def test_agent_reports_of_a_large_batch_travel_in_bounded_requests():
    box = inbox.Inbox.__new__(inbox.Inbox)
    box.link = RecordingLink()
    box.info_dir = "queue/agent-info"
    names = ["queue/agent-info/%s-%05d" % ("a" * 200, i) for i in range(20000)]
    keepalive.tell(box.link, [], box.agent_rows("client1", dict((n, "synchronized")
                                                                for n in names), {}))
    assert len(box.link.calls) > 1
    sent = []
    for cmd, args in box.link.calls:
        assert cmd == "received"
        assert len(json.dumps({"id": 1, "cmd": cmd, "args": args})) < \
            keepalive.REQUEST_BYTES + 1024 < localsock.MAX_MESSAGE
        sent.extend(args["agents"])
    assert sorted(sent) == sorted([n.split("/")[-1], "client1"] for n in names)


# -- sync_files data inflated straight into the receiver (issue 12: bounded memory) --------------

def _compressed_batch(entries, trailing=b""):
    """An Inflater positioned at the data of a compressed sync_files body, and its header."""
    files = [{"name": name, "size": len(data), "mtime_ns": BASE_NS,
              "sha256": sha or hashlib.sha256(data).hexdigest()} for name, data, sha in entries]
    header = {"files": files, "meta": [], "delete": [], "delete_dirs": []}
    body = protocol.encode_body(header, b"".join(data for _, data, _ in entries) + trailing)
    source = protocol.Inflater([protocol.compress(body)], 8 << 20)
    return protocol.decode_header_stream(source)[0], source


def test_a_compressed_batch_is_inflated_into_the_receiver_a_chunk_at_a_time(home, log,
                                                                            monkeypatch):
    reads = []
    real_read = protocol.Inflater.read
    monkeypatch.setattr(protocol.Inflater, "read",
                        lambda self, n: reads.append(n) or real_read(self, n))
    big = os.urandom(700000)
    entries = [("queue/agent-info/big-any", big, None),
               ("etc/shared/default/agent.conf", b"a client may not write this", None),
               ("queue/agent-info/bad-any", b"corrupted on the way", "0" * 64),
               ("queue/agent-info/small-any", b"small", None)]
    header, source = _compressed_batch(entries)
    incoming, deletes, dirs = inbox.parse_batch(header, source)
    states, reasons = master_rx(home, log).apply_batch(incoming, deletes, dirs,
                                                       sender_role="client")
    inbox.stream_end(incoming)
    assert states == {"queue/agent-info/big-any": "synchronized",
                      "etc/shared/default/agent.conf": "invalid",
                      "queue/agent-info/bad-any": "failed",
                      "queue/agent-info/small-any": "synchronized"}
    assert "checksum" in reasons["queue/agent-info/bad-any"]
    assert read(home, "queue/agent-info/big-any") == big
    assert read(home, "queue/agent-info/small-any") == b"small"
    assert max(reads) <= protocol.INFLATE_CHUNK       # never a whole file in memory
    assert not os.path.exists(os.path.join(home, "queue/agent-info/bad-any"))


@pytest.mark.parametrize("case", ["sizes beyond the limit", "trailing data", "short data"])
def test_a_compressed_batch_whose_sizes_lie_is_a_bad_request(home, log, case):
    entries = [("queue/agent-info/a-any", b"a" * 1000, None)]
    header, source = _compressed_batch(entries, b"extra" if case == "trailing data" else b"")
    if case == "sizes beyond the limit":
        header["files"][0]["size"] = 9 << 20
    if case == "short data":
        header["files"][0]["size"] = 2000
    with pytest.raises(RequestError) as info:
        incoming, deletes, dirs = inbox.parse_batch(header, source)
        master_rx(home, log).apply_batch(incoming, deletes, dirs, sender_role="client")
        inbox.stream_end(incoming)
    assert info.value.code == "bad_request" and "sizes" in info.value.message


def test_a_client_takes_agents_appended_with_new_ids_without_the_guard(home):  # noqa: F811
    # An agent a second on a busy master: the guard and the agent cleanup read and decoded
    # both 9.4 MB files per append on every client. Appended new IDs remove no agent.
    box = inbox.Inbox.__new__(inbox.Inbox)
    box.home, box.keys_name = home, "etc/client.keys"
    box.link, box.known_ids = HeldLink(), keyids.KnownIds()
    box.urgent = box.link
    box.deltas = deltarx.Expander(home, [], [], "client", None)
    old = b"".join(b"%03d agent%03d any %064x\n" % (i, i, i) for i in range(1, 300))
    with open(os.path.join(home, "etc", "client.keys"), "wb") as handle:
        handle.write(old)

    def incoming(data):
        return [receive.Incoming("etc/client.keys", memoryview(data),
                                 hashlib.sha256(data).hexdigest(), BASE_NS)]
    appended = incoming(old + b"300 agent300 any %064x\n" % 300)
    assert box.only_appended(appended)
    assert box.guard_keys(appended, [], appended=True) == (appended, [], None)
    assert box.link.calls == [("meta_get", {"key": inbox.HELD_KEY})]  # nothing held: kept so
    for data in (old + b"299 other any k\n", old[:-10], b""):           # reused ID, cut, empty
        assert not box.only_appended(incoming(data))


def test_the_client_keys_we_wrote_are_not_read_again_for_the_next_change(home):  # noqa
    # Each append had every client read its 9.4 MB client.keys for the removal guard right
    # after reading it as the delta's base: the bytes written last serve both.
    box = inbox.Inbox.__new__(inbox.Inbox)
    box.home, box.keys_name = home, "etc/client.keys"
    box.deltas = deltarx.Expander(home, [], [], "client", None)
    path = os.path.join(home, "etc", "client.keys")
    data = b"".join(b"%03d agent%03d any %064x\n" % (i, i, i) for i in range(1, 300))
    with open(path, "wb") as handle:
        handle.write(data)
    kept = data[:1] + data[1:]
    written = [receive.Incoming("etc/client.keys", memoryview(kept),
                                hashlib.sha256(data).hexdigest(), BASE_NS)]
    box.deltas.note_written(box.written_keys(written), box.keys_data(written))
    fingerprint, old = box.read_keys_stable()
    assert old == data and fingerprint is not None
    if hasattr(memoryview(kept), "obj"):  # 3.x: the very bytes, not even a copy
        assert old is kept
    os.utime(path, None)  # another write (its ctime): read from the file
    assert box.read_keys_stable()[1] == data and box.read_keys_stable()[1] is not kept


class HeldLink(object):
    """The internal daemon's meta store of the held client.keys change (nothing held)."""

    def __init__(self):
        self.calls = []

    def call(self, cmd, args):
        self.calls.append((cmd, args))
        assert cmd == "meta_get"
        return {"value": None}


class MetaLink(object):
    """The internal daemon's meta store."""

    def __init__(self):
        self.meta, self.calls = {}, []

    def call(self, cmd, args):
        self.calls.append(cmd)
        if cmd == "meta_set":
            self.meta[args["key"]] = args["value"]
            return {"stored": True}
        assert cmd == "meta_get"
        return {"value": self.meta.get(args["key"])}


def test_the_held_change_is_read_once_then_known_here():
    """Only this process writes it: an append a second does not wait each time for an
    internal daemon busy storing a pass (issue 11: append latency)."""
    box = inbox.Inbox.__new__(inbox.Inbox)
    box.link = box.urgent = MetaLink()
    assert box.held() is None and box.held() is None
    box.store_held(None)                 # nothing held: nothing to write
    held = {"sha256": "a" * 64, "message": "m", "since": 1.5}
    box.store_held(held)
    assert box.held() == held and box.link.meta[inbox.HELD_KEY] == held
    box.store_held(None)
    assert box.held() is None and box.link.meta[inbox.HELD_KEY] is None
    assert box.link.calls == ["meta_get", "meta_set", "meta_set"]


class MasterPeer(object):
    peer_name = "master"
    peer_role = "master"


def test_a_metadata_only_client_keys_update_keeps_what_the_client_knows_of_it(home):  # noqa
    # The master sends client.keys as its mtime only when the client holds that version
    # already: every client then read and decoded it twice (guard and agent cleanup, for a
    # change that cannot remove an agent) and, its stat changed, parsed every agent ID again
    # at the next append. The content is proven the same: what it knew still holds.
    from test_failover_fencing import InboxCfg, Layout, Link
    for folder in ("etc/shared/default", "queue/agent-info", "queue/agent-groups"):
        if not os.path.isdir(os.path.join(home, folder)):
            os.makedirs(os.path.join(home, folder))
    box = inbox.Inbox(InboxCfg(), Layout(home), Link())
    keys = "etc/client.keys"
    data = b"".join(b"%03d agent%03d any %064x\n" % (i, i, i) for i in range(1, 300))
    for data in (data, data + b"300 agent300 any %064x\n" % 300):  # then an agent appended
        digest = hashlib.sha256(data).hexdigest()
        header = {"files": [{"name": keys, "sha256": digest, "mtime_ns": BASE_NS,
                             "size": len(data)}], "meta": [], "delete": [], "delete_dirs": []}
        answer, _ = box.sync_files(MasterPeer(), header, data)
        assert answer["states"] == {keys: "synchronized"}
    path = os.path.join(home, *keys.split("/"))
    kept = box.deltas.kept(keys, os.lstat(path))
    assert kept == data and box.known_ids.fingerprint == deltarx.fingerprint(os.lstat(path))
    header = {"files": [], "meta": [{"name": keys, "sha256": digest,
                                     "mtime_ns": BASE_NS + 10 ** 9}],
              "delete": [], "delete_dirs": []}
    answer, _ = box.sync_files(MasterPeer(), header, b"")
    st = os.lstat(path)
    assert answer["states"] == {keys: "synchronized"} and int(st.st_mtime) == BASE_NS // 10 ** 9 + 1
    assert box.deltas.kept(keys, st) is kept
    assert box.known_ids.fingerprint == deltarx.fingerprint(st)


def test_the_ids_of_a_whole_client_keys_are_found_when_it_is_written(home,  # noqa: F811
                                                                     monkeypatch):
    # The first append after a first sync parsed every agent ID of the file on every client
    # at once (0.15-0.2 s each for 100 000 agents; 20 clients on 2 cores: the p99).
    from test_failover_fencing import InboxCfg, Layout, Link
    for folder in ("etc/shared/default", "queue/agent-info", "queue/agent-groups"):
        if not os.path.isdir(os.path.join(home, folder)):
            os.makedirs(os.path.join(home, folder))
    parsed = []
    real = keyids.first_field_codes
    monkeypatch.setattr(keyids, "first_field_codes",
                        lambda data: parsed.append(len(data)) or real(data))
    box = inbox.Inbox(InboxCfg(), Layout(home), Link())
    keys = "etc/client.keys"
    data = b"".join(b"%03d agent%03d any %064x\n" % (i, i, i) for i in range(1, 300))
    sent = []
    for data in (data, data + b"300 agent300 any %064x\n" % 300,
                 data + b"300 agent300 any %064x\n" % 300 + b"301 agent301 any k\n"):
        header = {"files": [{"name": keys, "sha256": hashlib.sha256(data).hexdigest(),
                             "mtime_ns": BASE_NS, "size": len(data)}],
                  "meta": [], "delete": [], "delete_dirs": []}
        sent.append(box.sync_files(MasterPeer(), header, data)[0]["states"][keys])
        if len(sent) == 1:
            assert parsed == [len(data)]      # when the whole file was written
    assert sent == ["synchronized"] * 3 and len(parsed) == 1   # not again at the appends
    assert box.known_ids.fingerprint == deltarx.fingerprint(
        os.lstat(os.path.join(home, *keys.split("/"))))


def keys_inbox(home, box_class=inbox.Inbox):
    """A real client Inbox on `home` with a client.keys of 299 agents; (box, their lines)."""
    from test_failover_fencing import InboxCfg, Layout, Link
    for folder in ("etc/shared/default", "queue/agent-info", "queue/agent-groups"):
        if not os.path.isdir(os.path.join(home, folder)):
            os.makedirs(os.path.join(home, folder))
    agents = [b"%03d agent%03d any %064x\n" % (i, i, i) for i in range(1, 300)]
    with open(os.path.join(home, "etc", "client.keys"), "wb") as handle:
        handle.write(b"".join(agents))
    return box_class(InboxCfg(), Layout(home), Link()), agents


def send_keys(box, data):
    """client.keys alone in a batch from the master; its state."""
    header = {"files": [{"name": "etc/client.keys", "sha256": hashlib.sha256(data).hexdigest(),
                         "mtime_ns": BASE_NS, "size": len(data)}],
              "meta": [], "delete": [], "delete_dirs": []}
    return box.sync_files(MasterPeer(), header, data)[0]["states"]["etc/client.keys"]


def test_a_mass_removal_alone_in_its_batch_is_held(home):  # noqa: F811
    # Alone in its batch, client.keys reaches the guard as the batch's bytes object itself
    # (parse_batch), not as a memoryview.
    box, agents = keys_inbox(home)
    assert send_keys(box, b"".join(agents[:10])) == "pending" and box.held() is not None
    with open(os.path.join(home, "etc", "client.keys"), "rb") as handle:
        assert handle.read() == b"".join(agents)


class CountingInbox(inbox.Inbox):
    """An Inbox that counts its reads of client.keys."""
    reads = 0

    def read_keys_data(self):
        self.reads += 1
        return inbox.Inbox.read_keys_data(self)


def test_a_client_keys_change_reads_the_old_file_once_and_the_guard_still_holds(home):  # noqa
    # A change that is not an append had the client read its 9.4 MB client.keys for the
    # append check, again for the removal guard, and again for the agent cleanup's old text.
    box, agents = keys_inbox(home, CountingInbox)
    path = os.path.join(home, "etc", "client.keys")

    def send(data):
        box.reads = 0
        return send_keys(box, data)
    changed = agents[:]
    changed[5] = b"006 renamed any %064x\n" % 6          # a key changed: not an append
    assert send(b"".join(changed)) == "synchronized" and box.reads == 2   # before, after
    changed[6] = b"007 again any %064x\n" % 7
    assert send(b"".join(changed)) == "synchronized" and box.reads == 1   # the bytes we wrote
    kept = b"".join(changed)
    assert send(b"".join(changed[:10])) == "pending"     # 289 of 299 agents gone: held
    with open(path, "rb") as handle:
        assert handle.read() == kept
    assert box.held() is not None and box.reads == 0
    os.utime(path, None)                                  # touched by hand: read from the file
    assert send(b"".join(changed[:10])) == "pending" and box.reads == 1
    assert send(b"".join(changed[:-1])) == "synchronized"    # one agent gone: the guard lets it
