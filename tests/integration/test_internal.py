"""wazuh-clusterd-internal through its real socket (queue/ossec/cluster_db) on a started node.

Each test starts the real daemons of one node (ossec-control start) with a fast cadence
(cluster.poll_interval=0.2, cluster.scan_interval=2) and talks to the internal daemon as
wazuh-clusterd does: length-prefixed JSON requests, and a subscription that receives change
events. Creations, deletions, renames and removed group folders must be reported within two
poll periods, in-place edits and touches within one scan interval; every wait polls with a
bound (plus GRACE for a loaded test machine) and says what it saw when it fails.
"""
from __future__ import absolute_import, division, print_function

import errno
import glob
import hashlib
import io
import os
import shutil
import signal
import socket
import struct
import threading
import time

from harness import (INTERNAL, alive, base_install, make_node, python,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from wazuh_cluster import localsock
from wazuh_cluster.errors import ProtocolError, RequestError

POLL = 0.2
SCAN = 2.0
FAST = {"cluster.poll_interval": str(POLL), "cluster.scan_interval": str(SCAN)}
# Scheduling slack: the test and the daemon share a machine that may be running other suites.
GRACE = 1.0
WITHIN_POLLS = 2 * POLL + GRACE
WITHIN_SCAN = SCAN + GRACE
OLD = int(time.time()) - 1000  # mtime of the files made before start (not "racy")

_clock = getattr(time, "monotonic", time.time)


# ------------------------------------------------------------------ helpers

def sock_path(node):
    return node.path("queue", "ossec", "cluster_db")


def client(node, timeout=10.0):
    return localsock.Client(sock_path(node), timeout)


def call(node, cmd, args=None):
    """One request on a fresh connection; the result or a RequestError."""
    conn = client(node)
    try:
        return conn.call(cmd, args)
    finally:
        conn.close()


def answers(node):
    """The status result once the daemon answers, else None (for wait_for)."""
    try:
        return call(node, "status")
    except (RequestError, ProtocolError, socket.error):
        return None


def scanned(node, timeout=20.0):
    """Wait until the first full pass is done (status.last_scan set); returns status."""
    def done():
        status = answers(node)
        return status if status and status.get("last_scan") else None

    return wait_for(done, timeout, what="the first full pass of %s" % INTERNAL)


def put(node, rel, data, mtime=None):
    path = node.path(*rel.split("/"))
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    if not isinstance(data, bytes):
        data = data.encode("utf-8")
    with io.open(path, "wb") as handle:
        handle.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def sha256_of(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def started(make_node, node_type="master", files=None):
    """A node of `node_type` with FAST options and `files` ({rel: text}, old mtimes), started
    and past its first full pass."""
    if node_type == "master":
        node = make_node("node01", "master")
    else:
        # A client alone: its master (not started) is a second address of the nodes list.
        node = make_node("node02", "client", configure=False)
        node.configure("client", ["127.0.0.254", node.address])
    write_internal_options(node.prefix, FAST)
    for rel, text in sorted((files or {}).items()):
        put(node, rel, text, mtime=OLD)
    node.start()
    scanned(node)
    return node


class Subscriber(object):
    """A subscription on the internal socket that accumulates the pushed change events."""

    def __init__(self, node):
        self.node = node
        self.conn = client(node)
        self.events = []
        result = self.conn.call("subscribe")
        assert result == {"subscribed": True}, result

    def close(self):
        self.conn.close()

    def drain(self, timeout=0.0):
        """Read the events waiting now (or arriving within `timeout`)."""
        while self.conn.wait_readable(timeout):
            message = self.conn.receive()
            assert message.get("event") == "changes", message
            self.events.append(message)
            timeout = 0.0

    def names(self, key):
        found = set()
        for event in self.events:
            found.update(event.get(key) or ())
        return found

    def expect(self, within, what, **wanted):
        """Wait until the events hold every name of wanted[key] (key: changed, touched, deleted,
        deleted_dirs) for at most `within` seconds; returns the seconds it took."""
        start = _clock()
        deadline = start + within

        def missing():
            return dict((key, sorted(set(names) - self.names(key)))
                        for key, names in wanted.items() if set(names) - self.names(key))

        while missing():
            left = deadline - _clock()
            if left <= 0:
                raise AssertionError("%s: not reported within %.1f s; missing %s; events seen: "
                                     "%s" % (what, within, missing(), self.events))
            self.drain(min(left, 0.1))
        return _clock() - start

    def reset(self):
        self.drain()
        self.events = []


def raw_exchange(node, data, timeout=5.0):
    """Send raw bytes; return ("reply", message), ("closed", None) or ("silent", None)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(sock_path(node))
        try:
            sock.sendall(data)
        except socket.error as err:  # the daemon may close before reading everything
            if err.args[0] in (errno.EPIPE, errno.ECONNRESET):
                return "closed", None
            raise
        buf = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed", None
                buf += chunk
                if len(buf) >= 4:
                    (length,) = struct.unpack(">I", buf[:4])
                    if len(buf) >= 4 + length:
                        return "reply", localsock.decode(buf[4:4 + length])
        except socket.timeout:
            return "silent", None
        except socket.error as err:
            if err.args[0] == errno.ECONNRESET:
                return "closed", None
            raise
    finally:
        sock.close()


# ------------------------------------------------------------------ change events

MASTER_FILES = {
    "etc/client.keys": u"001 web01 any 1111111111111111\n",
    "etc/shared/default/agent.conf": u"<agent_config></agent_config>\n",
    "etc/shared/default/edit.conf": u"version 1 of this file\n",
    "etc/shared/default/gone.conf": u"to be deleted\n",
    "etc/shared/default/old-name.conf": u"to be renamed\n",
    "etc/shared/default/target.conf": u"to be replaced by a rename\n",
    "etc/shared/default/merged.mg": u"excluded: each manager builds its own\n",
    "etc/shared/web/agent.conf": u"<agent_config><web/></agent_config>\n",
    "etc/shared/web/sub/deep.txt": u"deep\n",
}


def test_master_events_for_create_modify_delete_rename_and_group_removal(make_node):
    node = started(make_node, "master", MASTER_FILES)
    sub = Subscriber(node)
    try:
        shared = "etc/shared/default/"
        put(node, shared + "new.conf", u"created\n")
        sub.expect(WITHIN_POLLS, "a created file", changed=[shared + "new.conf"])

        sub.reset()
        path = node.path("etc", "shared", "default", "edit.conf")
        with io.open(path, "r+b") as handle:  # in place, same size: only a full pass sees it
            handle.write(b"VERSION 2")
        assert os.path.getsize(path) == len(MASTER_FILES[shared + "edit.conf"])
        sub.expect(WITHIN_SCAN, "an in-place edit of the same size",
                   changed=[shared + "edit.conf"])

        sub.reset()
        os.unlink(node.path("etc", "shared", "default", "gone.conf"))
        sub.expect(WITHIN_POLLS, "a deleted file", deleted=[shared + "gone.conf"])

        sub.reset()
        os.rename(node.path("etc", "shared", "default", "old-name.conf"),
                  node.path("etc", "shared", "default", "new-name.conf"))
        sub.expect(WITHIN_POLLS, "a rename", deleted=[shared + "old-name.conf"],
                   changed=[shared + "new-name.conf"])

        sub.reset()
        tmp = put(node, shared + "target.conf.new", u"the new content, renamed over\n")
        os.rename(tmp, node.path("etc", "shared", "default", "target.conf"))
        sub.expect(WITHIN_POLLS, "a file renamed over another", changed=[shared + "target.conf"])

        sub.reset()
        with io.open(node.path("etc", "client.keys"), "r+b") as handle:  # hot: every poll
            handle.write(b"002")
        sub.expect(WITHIN_POLLS, "an in-place edit of client.keys", changed=["etc/client.keys"])

        sub.reset()
        shutil.rmtree(node.path("etc", "shared", "web"))
        sub.expect(WITHIN_POLLS, "a removed group folder", deleted_dirs=["etc/shared/web"],
                   deleted=["etc/shared/web/agent.conf", "etc/shared/web/sub/deep.txt"])
        sub.drain(0.0)
        assert "etc/shared/web/sub" not in sub.names("deleted_dirs"), sub.events

        # Excluded names never appear in an event.
        every = set()
        for key in ("changed", "touched", "deleted"):
            every |= sub.names(key)
        assert not [n for n in every if n.endswith("merged.mg")], sub.events
    finally:
        sub.close()


def test_client_reports_an_agent_info_touch_as_touched(make_node):
    # On a client, agent-info is its own item: a keepalive only touches the file and that
    # touch is data (SPEC section 2). (On a master agent-info is received, full-passed on the
    # slower integrity cadence.)
    name = "queue/agent-info/web01-10.0.0.5"
    node = started(make_node, "client", {name: u"Linux web01 - Wazuh v3.0.0\n"})
    sub = Subscriber(node)
    try:
        os.utime(node.path(*name.split("/")), (OLD + 500, OLD + 500))
        sub.expect(WITHIN_SCAN, "a touched agent-info file", touched=[name])
        assert name not in sub.names("changed"), sub.events
        record = call(node, "manifest", {"items": ["agent-info"]})["files"][name]
        assert record["mtime_ns"] == (OLD + 500) * 10 ** 9
        # A new agent-info file is a creation: every poll sees it.
        sub.reset()
        put(node, "queue/agent-info/db01-any", u"")
        sub.expect(WITHIN_POLLS, "a new agent-info file", changed=["queue/agent-info/db01-any"])
    finally:
        sub.close()


# ------------------------------------------------------------------ commands

def test_manifest_lists_the_files_with_their_sha256_and_status_answers(make_node):
    node = started(make_node, "master", MASTER_FILES)
    status = call(node, "status")
    tracked = [rel for rel in MASTER_FILES if not rel.endswith("merged.mg")]
    assert status["files"] == len(tracked), status
    assert status["last_scan"] and status["role"] == "master", status
    assert status["db"] == node.path("var", "db", "cluster.db"), status
    files = call(node, "manifest", {"source": None, "items": None})["files"]
    assert sorted(files) == sorted(tracked)
    for rel in tracked:
        path = node.path(*rel.split("/"))
        record = files[rel]
        assert record["sha256"] == sha256_of(path), rel
        assert record["size"] == os.path.getsize(path), rel
        assert record["mtime_ns"] == OLD * 10 ** 9, rel
        assert record["item"] == ("client.keys" if rel == "etc/client.keys" else "shared")
    only_keys = call(node, "manifest", {"items": ["client.keys"]})["files"]
    assert sorted(only_keys) == ["etc/client.keys"]
    assert call(node, "manifest", {"source": "client"})["files"] == {}

    # The manifest follows a change once it has been seen.
    sub = Subscriber(node)
    try:
        put(node, "etc/shared/default/agent.conf", u"<agent_config><x/></agent_config>\n")
        sub.expect(WITHIN_POLLS + SCAN, "a rewritten file",
                   changed=["etc/shared/default/agent.conf"])
    finally:
        sub.close()
    record = call(node, "manifest")["files"]["etc/shared/default/agent.conf"]
    assert record["sha256"] == sha256_of(node.path("etc", "shared", "default", "agent.conf"))

    try:
        call(node, "no_such_command")
    except RequestError as err:
        assert err.code == "unknown_command"
    else:
        raise AssertionError("an unknown command was accepted")


# ------------------------------------------------------------------ the database

def _stop(node):
    pids = [pid for pid in node.all_pids() if alive(pid)]
    result = node.stop()
    assert result.rc == 0, node.explain("ossec-control stop", result)
    node.wait_stopped(pids)


def test_database_deleted_while_stopped_is_rebuilt_at_start(make_node):
    node = started(make_node, "master", MASTER_FILES)
    before = call(node, "manifest")["files"]
    _stop(node)
    db_file = node.path("var", "db", "cluster.db")
    os.unlink(db_file)
    node.start()
    status = scanned(node)
    assert status["files"] == len(before) and not status["db_in_memory"], status
    assert os.path.isfile(db_file)
    after = call(node, "manifest")["files"]
    assert dict((k, v["sha256"]) for k, v in after.items()) == \
        dict((k, v["sha256"]) for k, v in before.items())


def test_database_overwritten_with_garbage_is_moved_aside_and_rebuilt(make_node):
    node = started(make_node, "master", MASTER_FILES)
    _stop(node)
    db_file = node.path("var", "db", "cluster.db")
    garbage = b"this is not an SQLite database \x00\xff" * 200
    with io.open(db_file, "wb") as handle:  # in place: the file stays ossec's
        handle.write(garbage)
    node.start()
    status = scanned(node)
    assert status["files"] == len(MASTER_FILES) - 1 and not status["db_in_memory"], status
    aside = glob.glob(db_file + ".corrupt-*")
    assert len(aside) == 1, os.listdir(os.path.dirname(db_file))
    with open(aside[0], "rb") as handle:
        assert handle.read() == garbage
    with open(db_file, "rb") as handle:
        assert handle.read(16) == b"SQLite format 3\x00"
    log = node.log("ossec.log")
    assert "moved aside to %s" % aside[0] in log, log


# ------------------------------------------------------------------ many and bad clients

def test_fifty_concurrent_clients_are_all_served(make_node):
    node = started(make_node, "master", MASTER_FILES)
    results = {}
    errors = []
    go = threading.Event()

    def worker(n):
        conn = client(node, timeout=30.0)
        try:
            conn.connect()
            go.wait(30)
            got = []
            for cmd, args in (("status", {}), ("manifest", {"items": ["shared"]}),
                              ("states", {"node": None}), ("status", {})):
                got.append(conn.call(cmd, args))
            results[n] = got
        except Exception as exc:  # noqa: BLE001 -- reported below with the thread number
            errors.append((n, repr(exc)))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    go.set()
    for thread in threads:
        thread.join(60)
    assert not [t for t in threads if t.is_alive()], "clients still waiting after 60 s"
    assert not errors, errors
    assert sorted(results) == list(range(50))
    for got in results.values():
        assert got[0]["files"] == len(MASTER_FILES) - 1
        assert len(got[1]["files"]) == len(MASTER_FILES) - 2


def test_malformed_requests_get_an_error_or_a_close_and_others_are_served(make_node):
    node = started(make_node, "master", MASTER_FILES)
    bystander = client(node)
    try:
        assert bystander.call("status")["files"]
        cases = [
            ("garbage bytes", b"\x00\x00\x00\x0bnot json!!!"),
            # (A first byte that is a letter is a Wazuh 3.0 text command: test_legacy_db.)
            ("garbage without framing", b"\x16\x03\x01\x00\xc8 a TLS hello"),
            ("a length above 1 MiB", struct.pack(">I", (1 << 20) + 1) + b"{}"),
            ("a length of 0xFFFFFFFF", b"\xff\xff\xff\xff" + b"x" * 100),
            ("a zero length", b"\x00\x00\x00\x00"),
            ("a JSON array", localsock.encode([1, 2, 3])),
            ("a request without cmd", localsock.encode({"id": 7, "args": {}})),
        ]
        for what, data in cases:
            outcome, reply = raw_exchange(node, data)
            assert outcome in ("reply", "closed"), "%s: the daemon neither answered nor " \
                                                   "closed (%s)" % (what, outcome)
            if outcome == "reply":
                assert reply.get("ok") is False and reply["error"]["code"], (what, reply)
            # The daemon goes on serving an established client and new ones.
            assert bystander.call("status")["files"], what
            assert call(node, "status")["files"], what
    finally:
        bystander.close()


def test_a_subscriber_that_never_reads_does_not_block_other_clients(make_node):
    node = started(make_node, "master", MASTER_FILES)
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(sock_path(node))
    lazy.sendall(localsock.encode({"id": 1, "cmd": "subscribe", "args": {}}))
    reader = Subscriber(node)
    try:
        # Long names make big events: several MiB pushed to a subscriber that reads nothing
        # fill its socket buffers many times over.
        folder = "etc/shared/bulk/"
        rounds, per_round = 8, 600
        for r in range(rounds):
            names = [folder + ("r%02d-%04d-" % (r, i)) + "x" * 230 for i in range(per_round)]
            for name in names:
                put(node, name, u"x")
            start = _clock()
            status = call(node, "status")
            assert _clock() - start < 5.0, "status took %.1f s" % (_clock() - start)
            assert status["files"] >= len(MASTER_FILES) - 1
            reader.expect(WITHIN_POLLS + 5.0, "round %d of bulk creations" % r,
                          changed=names)
        assert call(node, "status")["files"] == len(MASTER_FILES) - 1 + rounds * per_round
        assert alive(node.internal_pid())
        # The scenario holds only if the lazy subscriber was sent more than a UNIX socket
        # buffer holds (about 200 KiB by default): the daemon had to keep the rest queued.
        pushed = sum(len(localsock.encode(event)) for event in reader.events)
        assert pushed > 1 << 20, pushed
    finally:
        reader.close()
        lazy.close()


# ------------------------------------------------------------------ supervision

def test_internal_daemon_killed_with_sigkill_is_restarted_and_answers(make_node):
    node = started(make_node, "master", MASTER_FILES)
    main_pid, old = node.running_pid(), node.internal_pid()
    os.kill(old, signal.SIGKILL)
    # wazuh-clusterd notices and starts a new one after its first back-off (1 s).
    new = wait_for(lambda: [pid for pid in node.internal_pids() if pid != old], 10,
                   what="a new %s after SIGKILL" % INTERNAL)[0]
    assert not alive(old) and alive(new)
    assert node.running_pid() == main_pid
    status = scanned(node)
    assert status["files"] == len(MASTER_FILES) - 1, status
    sub = Subscriber(node)
    try:
        put(node, "etc/shared/default/after-restart.conf", u"seen by the new daemon\n")
        sub.expect(WITHIN_POLLS, "a creation after the restart",
                   changed=["etc/shared/default/after-restart.conf"])
    finally:
        sub.close()
