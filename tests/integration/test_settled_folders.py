"""Full passes over settled folders: the scanner stats the files of a folder whose fingerprint
is unchanged by name, without listing it (scanner.py). What an operator does by hand in a
shared group folder must still reach every client: an edit in place (nothing at folder level
shows it), a new file, a removal, in a group folder and in a sub-folder of one.
"""
from __future__ import absolute_import, division, print_function

import io
import os

from harness import (base_install, make_node, python, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace)
from test_internal import call
from test_sync import SYNC_WAIT, cluster, converge, put  # noqa: F401, I100

RACY_SECONDS = 2.0  # scanner.RACY_NS: a folder listed this close to its change is listed again


def settled(node, *folders):
    """Wait for a full pass more than RACY_SECONDS after the last change of `folders`: from
    then on the full passes stat their files by name and list nothing."""
    def done():
        newest = max(max(os.lstat(f).st_mtime, os.lstat(f).st_ctime) for f in folders)
        last = call(node, "status").get("last_scan")
        return last is not None and last > newest + RACY_SECONDS + 0.5
    wait_for(done, SYNC_WAIT, 0.2, what="a full pass after %s settled" % (folders,))


def content(node, rel):
    with io.open(node.path(*rel.split("/")), "rb") as handle:
        return handle.read()


def test_hand_edits_in_settled_group_folders_reach_every_client(cluster):  # noqa: F811
    master = cluster[0]
    put(master, "etc/shared/web/rules/local.xml", u"<group name=\"local\"></group>\n")
    converge(cluster)
    web = master.path("etc", "shared", "web")
    settled(master, web, os.path.join(web, "rules"), master.path("etc", "shared", "default"))
    for rel, new in (("etc/shared/web/agent.conf", b"<AGENT_CONFIG>"),
                     ("etc/shared/web/rules/local.xml", b"<GROUP")):
        path = master.path(*rel.split("/"))
        before = os.stat(path)
        with io.open(path, "r+b") as handle:  # as an editor writing in place
            handle.write(new)
        # Same size, and even the mtime set back: only the ctime and the content tell.
        os.utime(path, (before.st_atime, before.st_mtime))
        assert os.path.getsize(path) == before.st_size
    converge(cluster)
    for client in cluster[1:]:
        assert content(client, "etc/shared/web/agent.conf").startswith(b"<AGENT_CONFIG>")
        assert content(client, "etc/shared/web/rules/local.xml").startswith(b"<GROUP")
    put(master, "etc/shared/default/new.conf", u"new\n")
    os.unlink(master.path("etc", "shared", "web", "rules", "local.xml"))
    converge(cluster)
    for client in cluster[1:]:
        assert content(client, "etc/shared/default/new.conf") == b"new\n"
        assert not os.path.exists(client.path("etc", "shared", "web", "rules", "local.xml"))
