"""The durable election record (electionstore.py): a real file in a temporary folder."""
from __future__ import absolute_import, division, print_function

import os
import stat

import pytest

from wazuh_cluster import electionstore
from wazuh_cluster.electionstore import ElectionStoreError


def FileStore(path):
    """The store of a record at `path`, its marker in a sibling folder "etc" (as etc/ is to
    var/db in an installation)."""
    etc = os.path.join(os.path.dirname(path), "etc")
    if not os.path.isdir(etc):
        os.mkdir(etc)
    return electionstore.FileStore(path, os.path.join(etc, electionstore.MARKER_NAME))


def test_missing_record_is_a_first_start(tmpdir):
    store = FileStore(str(tmpdir.join("e.json")))
    assert store.load() == (0, None, (0, 0)) and not store.joined()


def test_a_record_lost_after_the_node_joined_stops_the_start_naming_both_files(tmpdir):
    """A wiped var/db must not start again from term 0 (it could vote twice in a term)."""
    path = str(tmpdir.join("e.json"))
    FileStore(path).save(4, "b", (3, 2))
    marker = tmpdir.join("etc", electionstore.MARKER_NAME)
    assert marker.check(file=True)
    os.unlink(path)
    with pytest.raises(ElectionStoreError) as info:
        FileStore(path).load()
    assert str(info.value).startswith("%s is missing but %s says this node kept one" % (
        path, marker))
    marker.remove()           # the operator's documented recovery
    assert FileStore(path).load() == (0, None, (0, 0))


def test_a_record_older_than_the_marker_gets_its_marker_at_start(tmpdir):
    path = tmpdir.join("e.json")
    path.write_binary(electionstore.encode(0, None, (0, 0)))
    store = FileStore(str(path))
    assert store.load() == (0, None, (0, 0)) and store.joined()   # a record: joined
    assert tmpdir.join("etc", electionstore.MARKER_NAME).check(file=True)


def test_saved_record_reads_back_after_a_new_start(tmpdir):
    path = electionstore.path_in(str(tmpdir))
    FileStore(path).save(7, "10.0.0.2", (6, 41))
    FileStore(path).save(8, None, (6, 41))
    assert FileStore(path).load() == (8, None, (6, 41))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(str(tmpdir))) == [electionstore.FILE_NAME, "etc"]   # no temp file
    assert os.listdir(str(tmpdir.join("etc"))) == [electionstore.MARKER_NAME]


@pytest.mark.parametrize("content", [
    b"", b"{", b"[]", b'{"term": -1, "voted_for": null, "last": [0, 0]}',
    b'{"term": 2, "voted_for": 3, "last": [0, 0]}',
    b'{"term": 2, "voted_for": null, "last": [3, 0]}',
    b'{"term": 2, "voted_for": null, "last": [1]}',
    b'{"term": true, "voted_for": null, "last": [0, 0]}',
])
def test_an_unusable_record_stops_the_start_naming_the_file(tmpdir, content):
    path = tmpdir.join("e.json")
    path.write_binary(content)
    with pytest.raises(ElectionStoreError) as info:
        FileStore(str(path)).load()
    assert str(path) in str(info.value)


def test_a_failed_save_keeps_the_old_record_and_leaves_no_temporary_file(tmpdir):
    path = str(tmpdir.join("e.json"))
    FileStore(path).save(3, "b", (2, 2))
    with pytest.raises(TypeError):
        FileStore(path).save(4, object(), (2, 2))
    assert FileStore(path).load() == (3, "b", (2, 2))
    assert sorted(os.listdir(str(tmpdir))) == ["e.json", "etc"]


def test_a_temporary_file_left_by_a_crash_is_removed_at_start(tmpdir):
    path = str(tmpdir.join("e.json"))
    FileStore(path).save(2, None, (1, 5))
    tmpdir.join("e.json.0a1b2c3d4e5f.tmp").write_binary(b'{"term": 9')
    tmpdir.join("other.tmp").write_binary(b"not ours")
    assert FileStore(path).load() == (2, None, (1, 5))
    assert sorted(os.listdir(str(tmpdir))) == ["e.json", "etc", "other.tmp"]
