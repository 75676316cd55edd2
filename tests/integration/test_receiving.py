"""The receiving side among real daemons: what Wazuh's own daemons see, hard links, times.

- Watched folders (SPEC section 11): while a master pushes hundreds of agent-groups and shared
  files and a client pushes agent-info, threads list the folders that wazuh-modulesd and
  remoted read, over and over: no name but a final one may ever appear there.
- Hard links (issue 12): a link planted in a synchronised folder to a file the daemons' user
  owns (inside or outside the tree) keeps that file's content and mtime through a meta-only
  keepalive and a content push, on the master and on a client.
- Times (issue 12): an authenticated rogue dating an agent-info in 2100 does not pin the agent:
  the master's file gets the master's present, one line per peer says so, and the real
  client's next keepalive wins.
Every wait polls a condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import os
import stat
import threading
import time

from harness import (base_install, make_node, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace)
from test_hostile import ROGUE, hostile  # noqa: F401
from test_sync import KEYS, SYNC_WAIT, agent_info, cluster, converge, put  # noqa: F401

YEAR_2100 = 4102444800
GROUPS = (u"default", u"web", u"db")


# ------------------------------------------------------------------ helpers

class FolderWatcher(object):
    """A thread listing folders of some nodes as fast as it can; keeps every name seen."""

    def __init__(self, folders):
        self.folders = folders            # [(node, relative folder)]
        self.seen = dict((f, set()) for f in folders)
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the folder watcher did not stop"

    def _run(self):
        while not self._stop.is_set():
            for node, rel in self.folders:
                try:
                    self.seen[(node, rel)].update(os.listdir(node.path(*rel.split("/"))))
                except OSError:
                    continue
            self.passes += 1


def files_below(node, rel):
    """Regular files under a node's folder, as names relative to the folder."""
    top = node.path(*rel.split("/"))
    return set(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top)
               for f in fs)


def ossec_owned(path):
    import grp
    import pwd
    os.chown(path, pwd.getpwnam("ossec").pw_uid, grp.getgrnam("ossec").gr_gid)


def victim(folder, name, content, mtime):
    """A file the daemons' user owns (so that they could change it), with a known mtime."""
    path = os.path.join(folder, name)
    with io.open(path, "wb") as handle:
        handle.write(content)
    os.chmod(path, 0o660)
    ossec_owned(path)
    os.utime(path, (mtime, mtime))
    return path


def plant_link(node, rel, target):
    """Replace the node's file `rel` by another name of `target` (in one rename)."""
    path = node.path(*rel.split("/"))
    temp = os.path.join(os.path.dirname(path), ".planted")  # a dot name: never synchronised
    os.link(target, temp)
    os.rename(temp, path)
    return path


def assert_kept(path, content, mtime, node):
    with io.open(path, "rb") as handle:
        assert handle.read() == content, node.explain("%s changed through a link" % path)
    assert int(os.stat(path).st_mtime) == mtime, node.explain(
        "the mtime of %s changed through a link" % path)


def mtime_of(node, rel):
    try:
        return int(os.stat(node.path(*rel.split("/"))).st_mtime)
    except OSError:
        return None


def content_of(node, rel):
    try:
        with io.open(node.path(*rel.split("/")), "rb") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


# ------------------------------------------------------------------ watched folders

def test_wazuh_watched_folders_never_show_a_temporary_name_during_a_large_sync(cluster):
    master, client1, client2 = cluster
    client_folders = ["queue/agent-groups", "etc/shared"] + ["etc/shared/%s" % g for g in GROUPS]
    watched = [(c, f) for c in (client1, client2) for f in client_folders] + \
        [(master, "queue/agent-info"), (client1, "etc")]
    groups = dict(("queue/agent-groups/%03d" % n, GROUPS[n % 3]) for n in range(1, 601))
    shared = dict(("etc/shared/%s/file%03d.conf" % (GROUPS[n % 3], n), u"<agent_config>%d"
                   u"</agent_config>\n" % n) for n in range(300))
    infos = ["queue/agent-info/agent%03d-any" % n for n in range(300)]
    with FolderWatcher(watched) as watcher:
        for rel, text in sorted(groups.items()) + sorted(shared.items()):
            put(master, rel, text)
        put(master, "etc/client.keys", KEYS + u"004 new01 any 4444\n")
        for rel in infos:
            put(client1, rel, agent_info("client1"))
        converge(cluster, timeout=90)
        wait_for(lambda: all(os.path.exists(master.path(*rel.split("/"))) for rel in infos),
                 90, what="the client's agent-info on the master")
    assert watcher.passes > 10
    odd = {}
    for (node, rel), names in watcher.seen.items():
        final = set(os.listdir(node.path(*rel.split("/"))))
        if names - final:
            odd["%s:%s" % (node.name, rel)] = sorted(names - final)[:5]
    assert not odd, master.explain("names that are not final names were seen: %s" % odd)
    for node in cluster:
        staging = node.path("queue", "cluster-staging")
        assert stat.S_IMODE(os.lstat(staging).st_mode) == 0o700
        wait_for(lambda: not os.listdir(staging), 15,
                 what="the staging folder of %s emptied" % node.name)


# ------------------------------------------------------------------ hard links

def test_links_planted_on_the_master_keep_their_files_through_keepalives_and_content(cluster):
    master, client1 = cluster[0], cluster[1]
    text = agent_info("client1").encode("utf-8")
    now = int(time.time())
    old = now - 5000
    infos = ("queue/agent-info/web01-any", "queue/agent-info/db01-10.0.0.5")
    for rel in infos:
        put(client1, rel, text.decode("utf-8"), mtime=now - 100)
    wait_for(lambda: all(mtime_of(master, rel) == now - 100 for rel in infos), SYNC_WAIT,
             what="the client's agent-info on the master")
    outside_dir = os.path.dirname(master.prefix)
    outside = victim(outside_dir, "outside-victim", text, old)
    inside = victim(master.path("etc", "shared", "default"), "victim.conf", text, old)
    plant_link(master, infos[0], outside)
    plant_link(master, infos[1], inside)
    # Keepalives: same content, new mtime -> meta-only updates to the master.
    for rel in infos:
        os.utime(client1.path(*rel.split("/")), (now, now))
    wait_for(lambda: all(mtime_of(master, rel) == now for rel in infos), SYNC_WAIT,
             what="the keepalives on the master")
    assert_kept(outside, text, old, master)
    assert_kept(inside, text, old, master)
    for rel in infos:
        assert os.stat(master.path(*rel.split("/"))).st_nlink == 1
    # New content through the other name again.
    plant_link(master, infos[0], outside)
    new_text = agent_info("client1", uname="Linux web01 4.0 - Wazuh v3.0.0")
    put(client1, infos[0], new_text, mtime=now + 1)
    wait_for(lambda: content_of(master, infos[0]) == new_text.encode("utf-8"), SYNC_WAIT,
             what="the new agent-info content on the master")
    assert_kept(outside, text, old, master)


def test_a_link_planted_on_a_client_keeps_its_file_through_a_content_push(cluster):
    master, client1 = cluster[0], cluster[1]
    old = int(time.time()) - 5000
    outside = victim(os.path.dirname(client1.prefix), "client-victim", b"web", old)
    rel = "queue/agent-groups/001"
    plant_link(client1, rel, outside)
    put(master, rel, u"db")
    wait_for(lambda: content_of(client1, rel) == b"db", SYNC_WAIT,
             what="the master's new group on the client")
    assert_kept(outside, b"web", old, client1)
    assert os.stat(client1.path(*rel.split("/"))).st_nlink == 1


# ------------------------------------------------------------------ times

def rogue_reports(dialer, names, data, mtime_ns):
    files = [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": mtime_ns,
              "size": len(data)} for name in names]
    result, _ = dialer.session.call("sync_files", {"files": files, "meta": [], "delete": [],
                                                   "delete_dirs": []},
                                    data * len(names), timeout=30)
    return result["states"]


def test_an_agent_info_dated_2100_does_not_pin_the_agent_and_is_said_once(hostile):
    master, client, dialer = hostile
    rel = "queue/agent-info/web01-any"
    rogue_text = agent_info(ROGUE).encode("utf-8")
    for batch in range(3):
        names = [rel, "queue/agent-info/rogue%d-any" % batch]
        assert set(rogue_reports(dialer, names, rogue_text, YEAR_2100 * 10 ** 9).values()) == \
            set(["synchronized"])
    assert content_of(master, rel) == rogue_text
    assert mtime_of(master, rel) <= time.time() + 60, master.explain(
        "the master kept the rogue's date %s" % mtime_of(master, rel))
    lines = [line for line in master.log().splitlines()
             if "ahead of this node's clock" in line]
    assert len(lines) == 1 and "'%s'" % ROGUE in lines[0], master.explain(
        "one line for the rogue expected, got %s" % lines)
    # The real client's next keepalive for the same agent wins.
    honest = agent_info("client")
    put(client, rel, honest, mtime=int(time.time()) + 2)
    wait_for(lambda: content_of(master, rel) == honest.encode("utf-8"), SYNC_WAIT,
             what="the real client's report of web01 on the master")
    assert len([line for line in master.log().splitlines()
                if "ahead of this node's clock" in line]) == 1
