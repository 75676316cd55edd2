"""An operator's edit made after localedits.LocalEdits.before() hashed the local file and
before the batch's rename replaces it (review of issue 14): it must land in backup/cluster/
like one made earlier. The interleaving is exact: the edit is made from the batch's fence,
which receive.Receiver runs around each rename (as failover.Failover.fence does), on a real
temporary installation with the real Receiver (test_localedits.py)."""
from __future__ import absolute_import, division, print_function

import errno
import hashlib
import json
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


def restart(node):  # noqa: F811
    """wazuh-clusterd's start on this installation: Inbox.start (the record of held edits,
    then the cleanup of temporary files), with failover on."""
    from wazuh_cluster import inbox
    from test_failover_fencing import InboxCfg, Layout, Link

    class Cfg(InboxCfg):
        options = InboxCfg.options._replace(failover=True)
    inbox.Inbox(Cfg(), Layout(node.home), Link()).start()


def block_backups(node):  # noqa: F811
    """A file where backup/cluster should be: every backup fails until it is removed."""
    os.mkdir(os.path.join(node.home, "backup"))
    blocker = os.path.join(node.home, "backup", "cluster")
    with open(blocker, "wb") as handle:
        handle.write(b"in the way\n")
    return blocker


def test_an_edit_whose_backup_fails_survives_a_restart_and_is_backed_up_later(node, how):  # noqa: F811
    # The rename done, backup/cluster cannot be made (a file stands in its way: a real
    # failure, even for root): the replaced edit is its only copy and must outlive the
    # start-up cleanup of temporary files, then be backed up once the folder can be made.
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()
    blocker = block_backups(node)
    fence = edit_before_rename(node, KEYS, b"003 local any k\n")
    states = node.push(edits, [(KEYS, b"001 a any k\n002 b any k\n")], fence=fence)
    assert states == {KEYS: "synchronized"}
    errors = [text for level, text in node.handler.lines if level == "ERROR"]
    assert len(errors) == 1 and "cannot back up local edits replaced" in errors[0]

    restart(node)
    os.unlink(blocker)
    restart(node)
    [folder] = node.backups()                  # stamped with the real clock of that start
    assert folder.startswith("0-")
    assert node.read("backup/cluster/%s/%s" % (folder, KEYS)) == b"001 a any k\n003 local any k\n"
    assert os.listdir(os.path.join(node.home, "queue", "cluster-staging")) == []
    assert json.loads(node.read("var/db/cluster-held.json").decode("ascii")) == {}


def test_a_held_edit_is_backed_up_by_the_next_batch(node):  # noqa: F811
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()
    blocker = block_backups(node)
    node.push(edits, [(KEYS, b"002 b any k\n")],
              fence=edit_before_rename(node, KEYS, b"003 local any k\n"))
    os.unlink(blocker)
    node.push(edits, [(CONF, b"new\n")])
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/%s" % (folder, KEYS)) == b"001 a any k\n003 local any k\n"
    assert os.listdir(os.path.join(node.home, "queue", "cluster-staging")) == []


def test_without_a_link_an_edit_made_meanwhile_is_not_replaced(node, monkeypatch):  # noqa: F811
    # No exchange and no hard link possible (EPERM: the one failure not made for real
    # here): the rename would drop the edit unseen, so that file fails and travels again.
    monkeypatch.setattr(fsops, "RENAMEAT2", None)

    def no_link(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    node.write(KEYS, b"001 a any k\n")
    edits = node.edits()
    fence = edit_before_rename(node, KEYS, b"003 local any k\n")
    states = node.push(edits, [(KEYS, b"002 b any k\n")], fence=fence)
    assert states == {KEYS: "failed"}
    assert node.read(KEYS) == b"001 a any k\n003 local any k\n"
    node.push(edits, [(KEYS, b"002 b any k\n")])              # the next round's batch
    folder = "0-%s" % stamp()
    assert node.backups() == [folder] and node.read(KEYS) == b"002 b any k\n"
    assert node.read("backup/cluster/%s/%s" % (folder, KEYS)) == b"001 a any k\n003 local any k\n"
    node.push(edits, [(KEYS, b"004 c any k\n")])              # unchanged since read: applied
    assert node.read(KEYS) == b"004 c any k\n"


def test_an_edit_made_before_a_deletion_is_backed_up(node):  # noqa: F811
    # The leader deletes a shared file; an operator edits it after before() looked and
    # before the unlink: the edit must be backed up, not removed unseen.
    node.write(CONF, b"<agent_config/>\n")
    edits = node.edits()
    fence = edit_before_rename(node, CONF, b"<!-- local -->\n")
    states = node.push(edits, deletes=[CONF], fence=fence)
    assert states == {CONF: "synchronized"}
    assert not os.path.exists(os.path.join(node.home, *CONF.split("/")))
    folder = "0-%s" % stamp()
    assert node.backups() == [folder]
    assert node.read("backup/cluster/%s/%s" % (folder, CONF)) == \
        b"<agent_config/>\n<!-- local -->\n"
    assert os.listdir(os.path.join(node.home, "etc", "shared", "default")) == []
    node.write(CONF, b"<agent_config/>\n")                  # received: nothing to back up
    edits.received[CONF] = hashlib.sha256(b"<agent_config/>\n").hexdigest()
    node.push(edits, deletes=[CONF], fence=lambda change: change() or True)
    assert node.backups() == [folder]
