"""Manifests: written from scanner rows, read back compact (from our daemon or a peer), compared."""
from __future__ import absolute_import, division, print_function

import collections
import json

import pytest

from wazuh_cluster import manifest
from wazuh_cluster.errors import ProtocolError
from wazuh_cluster.manifest import Entry

Item = collections.namedtuple("Item", ("name", "path", "kind", "source", "recursive",
                                       "mtime_is_data"))
ITEMS = (
    Item("client.keys", "etc/client.keys", "file", "master", False, False),
    Item("shared", "etc/shared", "dir", "master", True, False),
    Item("agent-info", "queue/agent-info", "dir", "client", False, True),
)
SEC = 10 ** 9
BASE_NS = 1500000000 * SEC + 123456789
SHA = dict((c, c * 64) for c in "0123456789abcdef")
AI = u"queue/agent-info/web01-10.0.0.5"


def test_what_to_json_writes_decode_reads_back():
    rows = [("etc/shared/default/agent.conf", "shared", 12, BASE_NS, 7, BASE_NS, 0o660,
             SHA["a"]),
            (AI, "agent-info", 0, BASE_NS + 1, 8, BASE_NS, 0o640, SHA["b"])]
    count = [None]
    data = manifest.to_json(rows, count)
    assert count == [2]
    assert json.loads(data.decode("ascii"))[AI] == {
        "sha256": SHA["b"], "size": 0, "mtime_ns": BASE_NS + 1, "mode": 0o640,
        "item": "agent-info"}
    assert manifest.decode(data) == {
        u"etc/shared/default/agent.conf": Entry(SHA["a"], BASE_NS, u"shared"),
        AI: Entry(SHA["b"], BASE_NS + 1, u"agent-info")}
    assert manifest.decode(manifest.to_json([])) == {}


def test_fields_of_the_wrong_type_are_none_and_the_file_is_sent_again():
    data = json.dumps({u"etc/shared/a": {"sha256": "NOT-HEX", "mtime_ns": "1", "item": 3},
                       u"etc/shared/b": {"sha256": SHA["c"], "mtime_ns": True},
                       u"etc/shared/c": {"sha256": SHA["d"].upper(), "mtime_ns": 5}})
    theirs = manifest.decode(data.encode("ascii"))
    assert theirs[u"etc/shared/a"] == Entry(None, None, None)
    assert theirs[u"etc/shared/b"] == Entry(SHA["c"], None, None)
    assert theirs[u"etc/shared/c"].sha256 is None
    mine = {u"etc/shared/a": Entry(None, None, None), u"etc/shared/c": Entry(SHA["d"], 5, None)}
    # A None checksum never matches, not even another None.
    assert manifest.diff(mine, theirs, False, ITEMS)[0] == [u"etc/shared/a", u"etc/shared/c"]


@pytest.mark.parametrize("bad", [b"", b"[1]", b"{", b"\xff\xfe", b'"text"', b"{\"a\": 1}",
                                 b"{\"a\": {\"size\": 1}}", b"{\"a\": [1]}",
                                 b"{\"sha256\": \"x\"}"])
def test_data_that_is_no_manifest_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        manifest.decode(bad)


def test_compact_takes_a_manifest_answered_as_dicts():
    files = {AI: {"sha256": SHA["e"], "size": 1, "mtime_ns": BASE_NS, "mode": 0o640,
                  "item": "agent-info"}}
    assert manifest.compact(files) == {AI: Entry(SHA["e"], BASE_NS, u"agent-info")}
    assert manifest.compact({}) == {}
    for bad in (None, [], {AI: "x"}, {AI: {"size": 1}}):
        with pytest.raises(ProtocolError):
            manifest.compact(bad)


def entry(sha, mtime=BASE_NS):
    return Entry(SHA[sha], mtime, None)


def test_diff():
    sender = {u"etc/shared/default/a": entry("1"), u"etc/shared/default/b": entry("2"),
              u"etc/shared/default/c": entry("3", BASE_NS + SEC),
              AI: entry("4", BASE_NS + SEC), u"queue/agent-info/x-any": entry("5", BASE_NS + 1),
              u"etc/client.keys": entry("6")}
    local = {u"etc/shared/default/a": entry("1"), u"etc/shared/default/b": entry("f"),
             u"etc/shared/default/c": entry("3"), AI: entry("4"),
             u"queue/agent-info/x-any": entry("5"), u"etc/shared/default/gone": entry("7")}
    need_data, need_meta, delete = manifest.diff(sender, local, False, ITEMS)
    assert need_data == [u"etc/client.keys", u"etc/shared/default/b"]
    assert need_meta == [AI]  # c differs only in mtime, which is no data for shared files
    assert delete == []
    assert manifest.diff(sender, local, True, ITEMS)[2] == [u"etc/shared/default/gone"]


def test_the_item_that_makes_an_mtime_data_is_found_by_path_not_by_the_peers_word():
    sender = {u"etc/shared/default/c": Entry(SHA["3"], BASE_NS + SEC, u"agent-info")}
    local = {u"etc/shared/default/c": Entry(SHA["3"], BASE_NS, u"agent-info")}
    assert manifest.diff(sender, local, False, ITEMS) == ([], [], [])
