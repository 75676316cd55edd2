"""An operator's edit made after localedits.LocalEdits.before() hashed the local file and
before the batch's rename replaces it (review of issue 14): it must land in backup/cluster/
like one made earlier. The interleaving is exact: the edit is made from the batch's fence,
which receive.Receiver runs around each rename (as failover.Failover.fence does), on a real
temporary installation with the real Receiver (test_localedits.py)."""
from __future__ import absolute_import, division, print_function

import os

import pytest

from wazuh_cluster import fsops

from test_localedits import node, stamp  # noqa: F401 (fixture)

KEYS = u"etc/client.keys"
CONF = u"etc/shared/default/agent.conf"


def edit_before_rename(node, name, data, append=True):  # noqa: F811
    """A fence that edits `name` (appends to the file, or replaces it by a rename as an
    editor does) right before the batch's rename of it; then lets the rename run."""
    path = os.path.join(node.home, *name.split("/"))
    done = []

    def fence(change):
        if not done:
            done.append(True)
            if append:
                with open(path, "ab") as handle:
                    handle.write(data)
            else:
                with open(path + ".new", "wb") as handle:
                    handle.write(data)
                os.rename(path + ".new", path)
        change()
        return True
    return fence


@pytest.fixture(params=["exchange", "link"])
def how(request, monkeypatch):
    """renameat2's exchange, or (a kernel without it) the hard link taken before rename."""
    if request.param == "link":
        monkeypatch.setattr(fsops, "RENAMEAT2", None)
    elif fsops.RENAMEAT2 is None:
        pytest.skip("renameat2 cannot be called here")
    return request.param


def test_an_edit_made_while_the_batch_was_applied_is_backed_up(node, how):  # noqa: F811
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()                       # seeded: this content counts as received
    fence = edit_before_rename(node, KEYS, b"003 local any k\n")
    states = node.push(edits, [(KEYS, b"001 a any k\n002 b any k\n")], fence=fence)
    assert states == {KEYS: "synchronized"}
    assert node.read(KEYS) == b"001 a any k\n002 b any k\n"
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/%s" % (folder, KEYS)) == b"001 a any k\n003 local any k\n"
    assert len(node.warnings()) == 1 and "local edit of 'etc/client.keys'" in node.warnings()[0]
    staged = os.listdir(os.path.join(node.home, "queue", "cluster-staging"))
    assert staged == []                        # what the rename replaced is gone once checked


def test_a_file_renamed_into_place_meanwhile_is_backed_up_by_the_exchange(node):  # noqa: F811
    if fsops.RENAMEAT2 is None:
        pytest.skip("renameat2 cannot be called here")
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits()
    fence = edit_before_rename(node, CONF, b"<agent_config>local</agent_config>\n", append=False)
    node.push(edits, [(CONF, b"<agent_config>leader</agent_config>\n")], fence=fence)
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/%s" % (folder, CONF)) == \
        b"<agent_config>local</agent_config>\n"
    assert node.read(CONF) == b"<agent_config>leader</agent_config>\n"


def test_without_an_edit_meanwhile_nothing_more_is_backed_up(node, how):  # noqa: F811
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()
    node.write(KEYS, b"001 a any k\n003 local any k\n")      # before the batch: backed up once
    node.push(edits, [(KEYS, b"002 b any k\n")], fence=lambda change: change() or True)
    node.push(edits, [(KEYS, b"004 c any k\n")], fence=lambda change: change() or True)
    node.push(edits, [(CONF, b"new\n")])       # a new file: nothing was there
    assert node.backups() == ["0-%s" % stamp()] and len(node.warnings()) == 1
    assert node.read(KEYS) == b"004 c any k\n" and node.read(CONF) == b"new\n"
    assert os.listdir(os.path.join(node.home, "queue", "cluster-staging")) == []


def test_an_edit_swapped_out_by_a_batch_that_then_breaks_off_is_backed_up(node, how):  # noqa: F811
    # The rename done, the batch fails before after() looked at what it replaced: that file
    # must neither be removed with the batch's temporary files nor escape the check.
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()
    edit = edit_before_rename(node, KEYS, b"003 local any k\n")

    def fence(change):
        edit(change)
        raise RuntimeError("the batch breaks off after its rename")
    with pytest.raises(RuntimeError):
        node.push(edits, [(KEYS, b"001 a any k\n002 b any k\n")], fence=fence)
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/%s" % (folder, KEYS)) == b"001 a any k\n003 local any k\n"
    assert os.listdir(os.path.join(node.home, "queue", "cluster-staging")) == []
