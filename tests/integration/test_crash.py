"""Crashes and a full disk during transfers: a file is always entirely one version or another.

A master holds a few MB of random etc/shared files and a client.keys; each round rewrites,
creates and deletes some of them, and the SHA-256 of every file before and after the round is
kept. wazuh-clusterd is killed with SIGKILL (no cleanup at all) at moments chosen while the
transfer runs: as soon as the receiver's temporary files appear, as soon as the first file has
been renamed into place, or after a random delay. After each kill every file on the client
must be entirely its version before or after the round (never a mixture, never anything
else), no temporary name may show in the folders Wazuh's daemons read (the temporary files
live in queue/cluster-staging); after the restart no temporary file may be left, in the
staging folder or anywhere else, and the cluster converges. The same
holds for the master killed while it sends, for the master killed while it applies agent-info
from its client, and for wazuh-clusterd-internal killed on either side (its supervisor
restarts it and the synchronisation goes on).

The full-disk case mounts a 1 MiB tmpfs over the client's etc/shared. That needs root and a
private mount namespace (tests/run provides one); otherwise it is skipped with the reason.
There etc/shared is not on the staging folder's file system: its temporary files carry Wazuh
3.0's in-place name, NAME.tmp.cluster, and must be gone just the same.
Every wait polls a condition with a bound; a failing test prints the nodes' logs.
"""
from __future__ import absolute_import, division, print_function

import binascii
import errno
import hashlib
import io
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from harness import (alive, base_install, make_node, python, start_all, tmp_prefix_dir,  # noqa: F401
                     wait_for, workspace, write_internal_options)
from test_sync import FAST, KEYS, put

GROUPS = ("default", "web", "db", "mail", "dmz")
N_FILES = 300
SIZES = (2048, 20480)           # random sizes: ~3.3 MB in all
CHANGED_PER_ROUND = 90
CLIENT_ROUNDS = 20
MASTER_ROUNDS = 6
INTERNAL_ROUNDS = 4
AGENT_INFO_FILES = 200
AGENT_INFO_ROUNDS = 4
SYNC_WAIT = 40.0
SHARED = ("etc/client.keys", "etc/shared")
KEYS_NAME = "etc/client.keys"
TRIGGERS = ("temporary files", "first rename", "random delay")


# ------------------------------------------------------------------ helpers

def _sha(data):
    return hashlib.sha256(data).hexdigest()


def tree(prefix, parts=("etc/client.keys", "etc/shared", "queue/agent-groups")):
    """{relative name: sha256} of the regular files under these items, excluded names out.

    Like test_sync.tree, but a file that a running daemon removes or replaces while it is
    being walked is simply left out (the caller polls again), instead of raising.
    """
    found = {}
    for part in parts:
        path = os.path.join(prefix, *part.split("/"))
        if not os.path.isdir(path):
            files = [(os.path.dirname(path), os.path.basename(path))]
        else:
            files = []
            for folder, _dirs, names in os.walk(path):
                files.extend((folder, name) for name in names
                             if name not in ("merged.mg", "ar.conf", "ossec.conf")
                             and not name.startswith("."))
        for folder, name in files:
            full = os.path.join(folder, name)
            try:
                with io.open(full, "rb") as handle:
                    found[os.path.relpath(full, prefix).replace(os.sep, "/")] = \
                        _sha(handle.read())
            except (IOError, OSError) as err:
                if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
    return found


def converge(nodes, timeout=40.0, parts=("etc/client.keys", "etc/shared", "queue/agent-groups")):
    """Wait until every node's files are the first node's (the master's)."""
    master = nodes[0]
    wait_for(lambda: all(tree(n.prefix, parts) == tree(master.prefix, parts)
                         for n in nodes[1:]),
             timeout, 0.1, what="nodes identical to %s (%s)" % (master.name, (parts,)))


class Versions(object):
    """The master's files and their versions around one round of changes.

    `before` is the master's etc/shared when the round began (the client had converged to
    it), `after` what it is once the round's changes are written. A client file may only be
    one of these two versions: never a mixture, never a third thing.
    """

    def __init__(self, master, rng):
        self.master = master
        self.rng = rng
        self.names = sorted(n for n in tree(master.prefix, SHARED) if n != KEYS_NAME)
        self.keys = KEYS
        self.serial = 0
        self.begin_round()

    def begin_round(self):
        self.before = tree(self.master.prefix, SHARED)
        self.after = self.before

    def write(self, rel, data=None):
        """Replace master file `rel` by rename (what an editor or Wazuh's own tools do)."""
        if data is None:
            data = os.urandom(self.rng.randint(*SIZES))
        path = self.master.path(*rel.split("/"))
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            os.makedirs(folder)
        temp = os.path.join(folder, ".%s.new" % os.path.basename(path))
        with io.open(temp, "wb") as handle:
            handle.write(data)
        os.rename(temp, path)
        if rel not in self.names:
            self.names.append(rel)
        return rel

    def change(self, count, creates=4, deletes=4):
        """Rewrite `count` files, create and delete a few, add an agent to client.keys;
        returns every name touched."""
        self.begin_round()
        picked = self.rng.sample(self.names, count + deletes)
        changed, gone = picked[:count], picked[count:]
        for rel in changed:
            self.write(rel)
        for rel in gone:
            os.unlink(self.master.path(*rel.split("/")))
            self.names.remove(rel)
        for _ in range(creates):
            self.serial += 1
            rel = "etc/shared/%s/new%04d.bin" % (self.rng.choice(GROUPS), self.serial)
            changed.append(self.write(rel))
        self.keys += u"%03d agent%d any %032x\n" % (100 + self.serial, self.serial,
                                                   self.rng.getrandbits(128))
        self.write(KEYS_NAME, self.keys.encode("utf-8"))
        self.names.remove(KEYS_NAME)
        self.after = tree(self.master.prefix, SHARED)
        return changed + gone + [KEYS_NAME]

    def check_whole(self, node):
        """Every file under the node's etc/shared is the version before or after the round."""
        bad = []
        for rel, sha in sorted(tree(node.prefix, SHARED).items()):
            if sha not in (self.before.get(rel), self.after.get(rel)):
                bad.append(rel)
        assert not bad, "%d file(s) on %s are neither the version before nor the one after " \
            "the master's changes, e.g. %s\n%s" % (len(bad), node.name, bad[:5],
                                                   node.dump_logs())


def no_leftovers(node, parts=("etc/shared", "etc", "queue/agent-groups"), what=""):
    """Wait (bounded) until no temporary file is left under these folders.

    A batch may legitimately be in flight when the trees first match (e.g. a push of files a
    full round already sent): its temporary files are renamed or removed within seconds. A
    leftover of a killed transfer never goes, and fails this wait.
    """
    try:
        wait_for(lambda: not temp_files(node, parts), 15, 0.1,
                 what="no temporary files left on %s %s" % (node.name, what))
    except AssertionError as err:
        raise AssertionError(node.explain("%s: %s" % (err, temp_files(node, parts)[:5])))


STAGING = ("queue", "cluster-staging")


def temporary_name(name):
    """A name the receiver gives temporary files where no staging folder serves (3.0's
    NAME.tmp.cluster), or gave them before it had one (.NAME.RANDOM.tmp)."""
    return name.endswith(".tmp.cluster") or (name.startswith(".") and name.endswith(".tmp"))


def temp_files(node, parts=("etc/shared", "etc", "queue/agent-groups")):
    """The receiver's temporary files: in its staging folder, or under these folders."""
    found = staged_files(node)
    for part in parts:
        top = node.path(*part.split("/"))
        recursive = part == "etc/shared"
        for folder, dirs, files in os.walk(top):
            found.extend(os.path.join(folder, f) for f in files if temporary_name(f))
            if not recursive:
                del dirs[:]
    return found


def staged_files(node):
    try:
        return [node.path(*(STAGING + (name,))) for name in os.listdir(node.path(*STAGING))]
    except OSError:
        return []


def quick_temp_seen(node):
    """Cheap poll: does a temporary file of a transfer exist right now?"""
    return bool(staged_files(node))


def misread_names(node):
    """Temporary names in the folders Wazuh's daemons read (SPEC section 11): must be none."""
    found = []
    for folder in [("etc", "shared", g) for g in GROUPS] + [("queue", "agent-info"),
                                                             ("queue", "agent-groups")]:
        try:
            found.extend(n for n in os.listdir(node.path(*folder)) if temporary_name(n))
        except OSError:
            continue
    return found


def inodes(node, names):
    found = {}
    for rel in names:
        try:
            found[rel] = os.stat(node.path(*rel.split("/"))).st_ino
        except OSError:
            found[rel] = None
    return found


def renamed(node, before):
    return [rel for rel, ino in inodes(node, before).items() if ino != before[rel]]


def kill_hard(node):
    """SIGKILL wazuh-clusterd (no cleanup runs); wait until both daemons are gone.

    The internal daemon notices its parent is gone and stops by itself (checked here too).
    """
    pid = node.running_pid()
    assert pid, node.explain("wazuh-clusterd is not running on %s" % node.name)
    internal = node.internal_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 10, what="wazuh-clusterd of %s to die" % node.name)
    if internal:
        wait_for(lambda: not alive(internal), 15,
                 what="wazuh-clusterd-internal of %s to stop after its parent died" % node.name)


def kill_during_transfer(victim, receiver, changed_before, trigger, rng, start_delay=0.0,
                         action=None):
    """Kill `victim` (or run `action`) when `trigger` happens on `receiver` (or once the
    transfer is over).

    Returns what the receiver looked like at the kill: (temporary files seen, renamed count).
    """
    began = time.time()
    delay = start_delay + rng.uniform(0.0, 1.5)

    def due():
        if trigger == "temporary files" and quick_temp_seen(receiver):
            return True
        moved = renamed(receiver, changed_before)
        if trigger == "first rename" and moved:
            return True
        if trigger == "random delay" and time.time() - began >= delay:
            return True
        # The transfer ended before the trigger was seen: kill anyway (a kill when idle).
        return len(moved) == len(changed_before)
    wait_for(due, SYNC_WAIT, 0.002, what="the transfer to %s to begin" % receiver.name)
    seen_temp = quick_temp_seen(receiver)
    if action is not None:
        action()
    else:
        kill_hard(victim)
    misread = misread_names(receiver)
    assert not misread, receiver.explain("temporary names where Wazuh reads names: %s"
                                         % misread[:5])
    return seen_temp, len(renamed(receiver, changed_before))


# ------------------------------------------------------------------ fixture

def _pair(make_node, client_setup=None):
    master = make_node("master", "master", configure=False)
    client = make_node("client", "client", configure=False)
    client.port = master.port
    for node in (master, client):
        node.configure(node.name, [master.address, client.address], interval="3s")
        write_internal_options(node.prefix, FAST)
    put(master, "etc/client.keys", KEYS)
    if client_setup is not None:
        client_setup(client)
    return master, client


@pytest.fixture
def big_pair(make_node):
    rng = random.Random(os.urandom(8))
    master, client = _pair(make_node)
    versions = Versions(master, rng)
    for i in range(N_FILES):
        versions.write("etc/shared/%s/file%03d.bin" % (GROUPS[i % len(GROUPS)], i))
    versions.begin_round()
    start_all([master, client])
    converge([master, client], SYNC_WAIT, SHARED)
    return master, client, versions, rng


# ------------------------------------------------------------------ tests

# slow: one more crash during transfers; the default run keeps the master killed while
# sending and while receiving, the internal daemon killed, and the leftovers removed at start.
@pytest.mark.slow
def test_client_killed_during_transfers_keeps_whole_files_and_converges(big_pair):
    master, client, versions, rng = big_pair
    mid_transfer = 0
    for round_no in range(CLIENT_ROUNDS):
        trigger = TRIGGERS[round_no % len(TRIGGERS)]
        catch_up = round_no % 2 == 1
        if catch_up:
            # Changed while the client is down: killed again during its catch-up round.
            kill_hard(client)
            versions.check_whole(client)
            changed = versions.change(CHANGED_PER_ROUND)
            before = inodes(client, changed)
            client.start()
        else:
            snapshot = inodes(client, versions.names)
            changed = versions.change(CHANGED_PER_ROUND)
            before = dict((rel, snapshot.get(rel)) for rel in changed)
        seen_temp, moved = kill_during_transfer(client, client, before, trigger, rng)
        if seen_temp or 0 < moved < len(changed):
            mid_transfer += 1
        versions.check_whole(client)
        client.start()
        converge([master, client], SYNC_WAIT, SHARED)
        versions.begin_round()
        no_leftovers(client, what="after round %d and the restart" % round_no)
    print("client rounds interrupted mid-transfer: %d of %d" % (mid_transfer, CLIENT_ROUNDS))
    assert client.running_pid() and master.running_pid()


def test_master_killed_while_sending_leaves_clients_whole_and_converges(big_pair):
    master, client, versions, rng = big_pair
    mid_transfer = 0
    for round_no in range(MASTER_ROUNDS):
        trigger = TRIGGERS[round_no % len(TRIGGERS)]
        snapshot = inodes(client, versions.names)
        changed = versions.change(CHANGED_PER_ROUND)
        before = dict((rel, snapshot.get(rel)) for rel in changed)
        seen_temp, moved = kill_during_transfer(master, client, before, trigger, rng)
        if seen_temp or 0 < moved < len(changed):
            mid_transfer += 1
        versions.check_whole(client)
        # The client was not killed: whatever batch it was applying ends, and its temporary
        # files go, without any restart.
        no_leftovers(client, what="after round %d (its master killed)" % round_no)
        assert client.running_pid(), client.explain("the client died with its master")
        versions.check_whole(client)
        master.start()
        converge([master, client], SYNC_WAIT, SHARED)
        versions.begin_round()
    print("master rounds killed mid-transfer: %d of %d" % (mid_transfer, MASTER_ROUNDS))
    no_leftovers(client)
    no_leftovers(master)


def test_leftovers_of_a_crash_are_removed_at_start_and_nothing_else(make_node):
    """What a SIGKILL leaves (files in the staging folder, in-place NAME.tmp.cluster files,
    .NAME.RANDOM.tmp files of older versions) goes when wazuh-clusterd starts."""
    master, client = _pair(make_node)
    put(master, "queue/agent-groups/001", u"web")
    put(master, "etc/shared/default/agent.conf", u"<agent_config/>\n")
    start_all([master, client])
    converge([master, client])
    kill_hard(client)
    leftovers = ["queue/cluster-staging/001.0123456789ab.tmp",
                 "queue/cluster-staging/agent.conf.abcdefabcdef.tmp",
                 "queue/agent-groups/002.tmp.cluster",
                 "etc/shared/default/agent.conf.tmp.cluster",
                 "etc/client.keys.tmp.cluster",
                 "etc/shared/default/.agent.conf.0123456789ab.tmp"]
    kept = ["queue/agent-groups/001", "queue/rids/001.tmp.cluster"]
    for rel in leftovers + kept[1:]:
        put(client, rel, u"half written")
    client.start()
    wait_for(lambda: not [rel for rel in leftovers
                          if os.path.lexists(client.path(*rel.split("/")))], 15,
             what="the crash's leftovers removed on %s" % client.name)
    assert all(os.path.exists(client.path(*rel.split("/"))) for rel in kept)
    client.wait_log(r"Removed %d temporary file" % len(leftovers))
    converge([master, client])


def test_internal_daemon_killed_during_transfers_is_restarted_and_sync_goes_on(big_pair):
    """SIGKILL of wazuh-clusterd-internal (the catalog) on either side mid-transfer: the
    supervisor restarts it, the transfer is redone, nothing is restarted by hand."""
    master, client, versions, rng = big_pair
    for round_no in range(INTERNAL_ROUNDS):
        victim = (client, master)[round_no % 2]
        trigger = TRIGGERS[round_no % len(TRIGGERS)]
        snapshot = inodes(client, versions.names)
        changed = versions.change(CHANGED_PER_ROUND // 2)
        before = dict((rel, snapshot.get(rel)) for rel in changed)
        internal = victim.internal_pid()
        assert internal, victim.explain("no internal daemon on %s" % victim.name)

        def hit():
            os.kill(internal, signal.SIGKILL)
        kill_during_transfer(None, client, before, trigger, rng, action=hit)
        versions.check_whole(client)
        wait_for(lambda: victim.internal_pid() not in (None, internal), SYNC_WAIT,
                 what="round %d: a new wazuh-clusterd-internal on %s" % (round_no, victim.name))
        converge([master, client], SYNC_WAIT, SHARED)
        versions.begin_round()
        no_leftovers(client, what="after round %d" % round_no)
    assert client.running_pid() and master.running_pid()


def test_master_killed_while_receiving_agent_info_keeps_whole_files_and_converges(big_pair):
    """The other direction: the master applies agent-info from its client when killed."""
    master, client, versions, rng = big_pair
    info = ("queue/agent-info",)
    names = ["queue/agent-info/agent%d-any" % n for n in range(AGENT_INFO_FILES)]

    def rewrite(rels):
        # By rename, so that the client never sends a half-written file: what is tested is
        # the master's side.
        for rel in rels:
            noise = binascii.hexlify(os.urandom(rng.randint(512, 3072))).decode("ascii")
            text = u"Linux agent %s\n%s\n#\"node_name\":client\n" % (rel, noise)
            folder, base = rel.rsplit("/", 1)
            temp = put(client, "%s/.%s.new" % (folder, base), text)  # excluded: a dot name
            os.rename(temp, client.path(*rel.split("/")))
    rewrite(names)
    converge([master, client], SYNC_WAIT, info)
    mid_transfer = 0
    for round_no in range(AGENT_INFO_ROUNDS):
        trigger = TRIGGERS[round_no % len(TRIGGERS)]
        before_tree = tree(client.prefix, info)
        snapshot = inodes(master, names)
        changed = rng.sample(names, AGENT_INFO_FILES // 2)
        rewrite(changed)
        after_tree = tree(client.prefix, info)
        before = dict((rel, snapshot.get(rel)) for rel in changed)
        seen_temp, moved = kill_during_transfer(master, master, before, trigger, rng)
        if seen_temp or 0 < moved < len(changed):
            mid_transfer += 1
        bad = [rel for rel, sha in tree(master.prefix, info).items()
               if sha not in (before_tree.get(rel), after_tree.get(rel))]
        assert not bad, master.explain("round %d: agent-info on the master neither before "
                                       "nor after: %s" % (round_no, bad[:5]))
        master.start()
        converge([master, client], SYNC_WAIT, info)
        no_leftovers(master, ("queue/agent-info",), what="after round %d" % round_no)
    print("master rounds killed while applying agent-info: %d of %d"
          % (mid_transfer, AGENT_INFO_ROUNDS))
    assert client.running_pid()


# ------------------------------------------------------------------ full disk

def _private_mount_namespace():
    """True when an ancestor process lives in another mount namespace than ours.

    tests/run (and the dev wrapper) run pytest under `unshare -m`; a mount made here then
    vanishes with the namespace and never reaches the machine's mounts.
    """
    def ns(pid):
        try:
            return os.readlink("/proc/%s/ns/mnt" % pid)
        except OSError:
            return None
    ours = ns("self")
    pid = os.getppid()
    while ours and pid > 1:
        theirs = ns(pid)
        if theirs is not None and theirs != ours:
            return True
        try:
            with open("/proc/%d/stat" % pid) as handle:
                pid = int(handle.read().rsplit(")", 1)[-1].split()[1])
        except (IOError, OSError, ValueError, IndexError):
            return False
    return False


def _states(node, peer):
    try:
        conn = sqlite3.connect(node.path("var", "db", "cluster.db"), timeout=10)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT file, state FROM states WHERE node = ?", (peer,)))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _fill(folder):
    """Write an excluded filler file (`filler~`) until the file system is full."""
    path = os.path.join(folder, "filler~")
    chunk = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return path


@pytest.fixture
def small_disk_pair(make_node):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs over the client's etc/shared needs root")
    if not _private_mount_namespace():
        pytest.skip("needs a private mount namespace so that the test's tmpfs cannot leak "
                    "into the machine's mounts: run the suite through tests/run")
    import grp
    gid = grp.getgrnam("ossec").gr_gid
    mounted, nodes = [], []

    def small_shared(client):
        target = client.path("etc", "shared")
        subprocess.check_call(["mount", "-t", "tmpfs", "-o",
                               "size=1m,mode=0770,uid=0,gid=%d" % gid, "tmpfs", target])
        mounted.append(target)

    try:
        master, client = _pair(make_node, small_shared)
        nodes.extend((master, client))
        rng = random.Random(os.urandom(8))
        versions = Versions(master, rng)
        for rel in versions.names:
            os.unlink(master.path(*rel.split("/")))
        versions.names = []
        for i in range(8):
            versions.write("etc/shared/%s/small%d.bin" % (GROUPS[i % 2], i), os.urandom(8192))
        start_all([master, client])
        converge([master, client], SYNC_WAIT, SHARED)
        yield master, client, versions
    finally:
        for node in nodes:  # the daemons go first: a busy mount cannot be unmounted
            node.cleanup()
        for target in mounted:
            if subprocess.call(["umount", target]) != 0:
                subprocess.call(["umount", "-l", target])


def test_full_disk_on_a_client_keeps_old_files_records_failed_and_resumes(small_disk_pair):
    master, client, versions = small_disk_pair
    old = tree(client.prefix, SHARED)
    filler = _fill(client.path("etc", "shared"))
    changed = ["etc/shared/default/small0.bin", "etc/shared/web/small1.bin"]
    for rel in changed:
        versions.write(rel, os.urandom(200 * 1024))
    new_file = versions.write("etc/shared/default/big.bin", os.urandom(300 * 1024))
    wanted = changed + [new_file]
    wait_for(lambda: all(_states(master, client.name).get(rel) == "failed" for rel in wanted),
             SYNC_WAIT, what="state 'failed' recorded on the master for the files that do "
             "not fit: %s" % _states(master, client.name))
    now = tree(client.prefix, SHARED)
    for rel in changed:
        assert now.get(rel) == old[rel], "%s changed on a full disk" % rel
    assert new_file not in now
    assert "failed to apply" in client.log(), client.dump_logs()
    no_leftovers(client, ("etc/shared",), what="on the full disk")
    os.unlink(filler)
    converge([master, client], SYNC_WAIT, SHARED)
    wait_for(lambda: all(_states(master, client.name).get(rel) == "synchronized"
                         for rel in wanted),
             SYNC_WAIT, what="state 'synchronized' once there is room")
    versions.begin_round()
    versions.check_whole(client)
