"""A rogue client holding the right key, against a real master daemon (SPEC section 4).

The rogue is built from the library (peers.Dialer) and connects from a listed address. The
key only proves "a member of the cluster": what it sends through sync_files must still pass
the receiver's rules. Master-owned files and hostile agent-info names are refused, recorded
`invalid` in the master's states table, logged once each, and nothing is written anywhere;
meanwhile the master keeps serving its real client. Every wait polls a condition with a bound.
"""
from __future__ import absolute_import, division, print_function

import hashlib
import io
import os
import sqlite3
import time

import pytest

from harness import (base_install, make_node, new_address, python, start_all,  # noqa: F401
                     tmp_prefix_dir, wait_for, workspace, write_internal_options)
from test_crash import converge  # race-free while daemons delete files
from test_sync import FAST, KEYS, agent_info, put

from wazuh_cluster import compat, peers, staterows
from wazuh_cluster.errors import RequestError

SYNC_WAIT = 20.0
ROGUE = "rogue01"
PAYLOAD = b"pwned by the rogue\n"
# Folders the daemons write by themselves: left out of the "nothing else changed" snapshot.
LIVE = ("logs", "var", "queue/ossec", "queue/agent-info")


def _rogue_manifest(session, args, data):
    return {"files": {}}, b""


def _rogue_files(session, args, data):
    names = [f.get("name") for f in args.get("files", []) + args.get("meta", [])]
    return {"states": dict((n, "synchronized") for n in names if n)}, b""


@pytest.fixture
def hostile(make_node):
    """A started master and client (converged) and a connected rogue client session."""
    master = make_node("master", "master", configure=False)
    client = make_node("client", "client", configure=False)
    rogue_address = new_address()
    client.port = master.port
    listed = [master.address, client.address, rogue_address]
    for node in (master, client):
        # Only the round that opens a session: a later round would record its own
        # "synchronized" over the rogue's "invalid" row of the same master-owned file.
        node.configure(node.name, listed, interval="2m")
        write_internal_options(node.prefix, FAST)
    put(master, "etc/client.keys", KEYS)
    put(master, "etc/shared/default/agent.conf", u"<agent_config></agent_config>\n")
    start_all([master, client])
    converge([master, client])
    settings = peers.make_settings(
        node_name=ROGUE, cluster_name="wazuh", key=master.key, role="client",
        bind_addr=rogue_address, port=master.port, nodes=[master.address],
        own_addresses=[rogue_address], keepalive=1.0, handshake_timeout=5.0,
        reconnect_min=0.05, reconnect_max=0.5)
    dialer = peers.Dialer(settings, {"sync_manifest": _rogue_manifest,
                                     "sync_files": _rogue_files}).start()
    try:
        assert dialer.wait_connected(15), master.explain("the rogue could not connect")
        wait_for(lambda: state_rows(master).get(u"etc/client.keys") == "synchronized",
                 SYNC_WAIT, what="the master's first round with the rogue recorded")
        yield master, client, dialer
    finally:
        dialer.stop()


def send(dialer, names, data=PAYLOAD):
    """sync_files with one file per name, all holding `data`; returns the states answered."""
    files = [{"name": name, "sha256": hashlib.sha256(data).hexdigest(),
              "mtime_ns": int(time.time()) * 10 ** 9, "size": len(data)} for name in names]
    result, _ = dialer.session.call("sync_files", {"files": files, "meta": [], "delete": [],
                                                   "delete_dirs": []},
                                    data * len(names), timeout=30)
    return result["states"]


def state_rows(master):
    """{file: state} of node ROGUE in the master's states table ({} while unreadable)."""
    try:
        conn = sqlite3.connect(master.path("var", "db", "cluster.db"), timeout=10)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT file, state FROM states WHERE node = ?", (ROGUE,)))
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def invalid_recorded(master, names):
    """The rows for node ROGUE in the master's states table are `invalid` for these names."""
    rows = state_rows(master)
    # A name outside the rules is stored escaped and cut (staterows).
    return all(rows.get(staterows.stored_name(compat.to_text(n))) == "invalid" for n in names)


def snapshot(prefix):
    """{relative path: sha256 or kind} of everything under `prefix` but the LIVE folders."""
    found = {}
    for folder, dirs, files in os.walk(prefix):
        rel = os.path.relpath(folder, prefix).replace(os.sep, "/")
        join = (lambda name: name) if rel == "." else (lambda name: rel + "/" + name)
        dirs[:] = [d for d in dirs if join(d) not in LIVE]
        for name in dirs:
            found[join(name)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                found[join(name)] = "special"
                continue
            with io.open(path, "rb") as handle:
                found[join(name)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def refusal_lines(master, fragment):
    return [line for line in master.log().splitlines()
            if "refused" in line and fragment in line]


def payload_anywhere(top):
    """Files under `top` (the whole test folder) that hold the rogue's payload."""
    hits = []
    for folder, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path) or \
                    os.path.getsize(path) != len(PAYLOAD):
                continue
            with io.open(path, "rb") as handle:
                if handle.read() == PAYLOAD:
                    hits.append(path)
    return hits


def still_serves_real_client(master, client):
    put(master, "etc/shared/default/after-rogue.conf", u"still serving\n")
    converge([master, client], SYNC_WAIT)
    put(client, "queue/agent-info/web01-any", agent_info("client"))
    target = master.path("queue", "agent-info", "web01-any")
    wait_for(lambda: os.path.exists(target), SYNC_WAIT,
             what="the real client's agent-info on the master")
    assert client.running_pid() and master.running_pid()


def test_master_owned_files_from_a_client_are_refused_recorded_invalid_and_logged_once(hostile):
    master, client, dialer = hostile
    before = snapshot(master.prefix)
    names = ["etc/client.keys", "etc/shared/x", "etc/shared/default/agent.conf",
             "queue/agent-groups/001"]
    states = send(dialer, names)
    assert states == dict((n, "invalid") for n in names), states
    wait_for(lambda: invalid_recorded(master, names), SYNC_WAIT,
             what="'invalid' rows for %s in the master's states table" % names)
    assert snapshot(master.prefix) == before
    assert not payload_anywhere(os.path.dirname(master.prefix))
    with io.open(master.path("etc", "client.keys"), encoding="utf-8") as handle:
        assert handle.read() == KEYS
    for name in names:
        lines = refusal_lines(master, name)
        assert len(lines) == 1, "expected one log line refusing %s, got %s" % (name, lines)
    still_serves_real_client(master, client)


HOSTILE_NAMES = [
    u"../etc/x",
    u"queue/agent-info/../../etc/client.keys",
    u"queue/agent-info/./web01-any",
    u"queue/agent-info//web01-any",
    u"queue/agent-info/web01\x00-any",
    u"queue/agent-info/..\\..\\etc\\client.keys",
    u"queue/agent-info/web01\n-any",
    u"queue/agent-info/web01-any\n",
    u"queue/agent-info/" + u"a" * 300,
    u"queue/agent-info/" + u"/".join([u"b" * 200] * 6),
    u"queue/agent-info/w\u00e9b01-any",
    u"queue/agent-info/\u202etxt.exe-any",
    u"queue/agent-info/sub/web01-any",
    u"queue/agent-info",
    u"queue/agent-info/",
    u"queue/rids/001",
    u"etc/ossec.conf",
]


def test_hostile_agent_info_names_are_refused_and_nothing_is_written(hostile):
    master, client, dialer = hostile
    names = HOSTILE_NAMES + [master.path("queue", "agent-info", "absolute-any"), u"/etc/x"]
    before = snapshot(master.prefix)
    before_info = sorted(os.listdir(master.path("queue", "agent-info")))
    states = send(dialer, names)
    accepted = dict((n, s) for n, s in states.items() if s != "invalid")
    assert not accepted, "hostile names not refused: %r" % (accepted,)
    assert set(states) == set(names), "states answered for %r" % (sorted(states),)
    wait_for(lambda: invalid_recorded(master, names), SYNC_WAIT,
             what="'invalid' rows for every hostile name in the master's states table")
    assert snapshot(master.prefix) == before
    assert sorted(os.listdir(master.path("queue", "agent-info"))) == before_info
    assert not payload_anywhere(os.path.dirname(master.prefix))
    assert not os.path.exists(os.path.join(os.path.dirname(master.prefix), "etc", "x"))
    assert not os.path.exists("/etc/x")
    # A legitimate agent-info from the same rogue still goes through the same checks and
    # lands where it belongs: only the names were the problem.
    assert send(dialer, [u"queue/agent-info/rogue-10.1.1.1"]) == \
        {u"queue/agent-info/rogue-10.1.1.1": "synchronized"}
    still_serves_real_client(master, client)


def test_malformed_batches_are_answered_with_errors_and_the_master_goes_on(hostile):
    master, client, dialer = hostile
    before = snapshot(master.prefix)
    bad_headers = [
        {"files": "etc/client.keys"},
        {"files": [{"name": "queue/agent-info/x-any", "sha256": "0" * 64, "mtime_ns": 1,
                    "size": 10 ** 9}]},
        {"files": [{"name": "queue/agent-info/x-any", "sha256": "0" * 64, "mtime_ns": 1,
                    "size": -5}]},
        {"files": [{"name": 5, "sha256": "0" * 64, "mtime_ns": 1, "size": 0}]},
        {"delete": [{"name": "etc/client.keys"}]},
    ]
    for header in bad_headers:
        with pytest.raises(RequestError):
            dialer.session.call("sync_files", header, b"0123456789", timeout=30)
    # A checksum that does not match the data: failed, nothing written.
    files = [{"name": "queue/agent-info/bad-sum-any", "sha256": "0" * 64, "mtime_ns": 1,
              "size": len(PAYLOAD)}]
    result, _ = dialer.session.call("sync_files", {"files": files}, PAYLOAD, timeout=30)
    assert result["states"]["queue/agent-info/bad-sum-any"] in ("failed", "invalid")
    # Deleting master-owned files or group folders from a client is refused as well.
    result, _ = dialer.session.call("sync_files", {"delete": ["etc/client.keys",
                                                              "etc/shared/default/agent.conf"],
                                                   "delete_dirs": ["etc/shared/default"]},
                                    b"", timeout=30)
    assert set(result["states"].values()) == set(["invalid"]), result
    assert snapshot(master.prefix) == before
    assert not dialer.session.closed
    still_serves_real_client(master, client)


def test_a_client_cannot_delete_agent_info_on_the_master(hostile):
    """A key holder must not erase what the other clients reported (no client deletes)."""
    master, client, dialer = hostile
    put(client, "queue/agent-info/web01-any", agent_info("client"))
    target = master.path("queue", "agent-info", "web01-any")
    wait_for(lambda: os.path.exists(target), SYNC_WAIT,
             what="the real client's agent-info on the master")
    names = ["queue/agent-info/web01-any", "queue/agent-info"]
    result, _ = dialer.session.call("sync_files", {"delete": names[:1],
                                                   "delete_dirs": names[1:]},
                                    b"", timeout=30)
    assert result["states"] == dict((n, "invalid") for n in names), result
    wait_for(lambda: invalid_recorded(master, names), SYNC_WAIT,
             what="'invalid' rows for the refused deletions")
    assert os.path.exists(target)
    assert len(refusal_lines(master, "queue/agent-info/web01-any")) == 1, master.dump_logs()
    still_serves_real_client(master, client)


def test_hostile_metadata_updates_and_planted_symlinks_are_refused(hostile):
    master, client, dialer = hostile
    info = master.path("queue", "agent-info")
    keys = master.path("etc", "client.keys")
    outside = os.path.join(os.path.dirname(master.prefix), "outside-target")
    with io.open(outside, "wb") as handle:
        handle.write(b"outside\n")
    # Planted by someone on the master's host: links out of queue/agent-info.
    os.symlink(keys, os.path.join(info, "link-keys-any"))
    os.symlink(outside, os.path.join(info, "link-out-any"))
    os.symlink(os.path.dirname(master.prefix), os.path.join(info, "link-dir"))
    before_keys = os.stat(keys)
    states = send(dialer, [u"queue/agent-info/link-keys-any", u"queue/agent-info/link-out-any",
                           u"queue/agent-info/link-dir/x-any"])
    assert set(states.values()) <= set(["invalid", "failed"]), states
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    meta = [{"name": name, "sha256": sha, "mtime_ns": 4102444800 * 10 ** 9}
            for name in HOSTILE_NAMES + [u"queue/agent-info/link-keys-any",
                                         u"queue/agent-info/link-out-any",
                                         u"queue/agent-info/never-sent-any"]]
    result, _ = dialer.session.call("sync_files", {"meta": meta}, b"", timeout=30)
    assert set(result["states"].values()) <= set(["invalid", "failed"]), result
    after_keys = os.stat(keys)
    assert (after_keys.st_mtime, after_keys.st_size) == (before_keys.st_mtime,
                                                         before_keys.st_size)
    with io.open(keys, encoding="utf-8") as handle:
        assert handle.read() == KEYS
    with io.open(outside, "rb") as handle:
        assert handle.read() == b"outside\n"
    assert int(os.stat(outside).st_mtime) != 4102444800
    assert os.path.islink(os.path.join(info, "link-keys-any"))
    assert not payload_anywhere(os.path.dirname(master.prefix))
    still_serves_real_client(master, client)


def test_rogue_asking_for_the_masters_manifest_or_reusing_a_clients_name_is_refused(hostile):
    master, client, dialer = hostile
    with pytest.raises(RequestError) as info:
        dialer.session.call("sync_manifest", {"source": "master"}, timeout=30)
    assert info.value.code == "forbidden"
    # A second session under the real client's name, from another listed address.
    settings = dialer.settings._replace(node_name=client.name)
    twin = peers.Dialer(settings, {"sync_manifest": _rogue_manifest,
                                   "sync_files": _rogue_files})
    dialer.stop()  # the listed address is the rogue's: free it for the twin
    twin.start()
    try:
        refusal = "node name %s already connected" % client.name
        wait_for(lambda: refusal in master.log() or twin.session is not None,
                 SYNC_WAIT, what="the master's answer to a second '%s'" % client.name)
        assert twin.session is None or twin.session.closed, "a duplicate name was accepted"
    finally:
        twin.stop()
    ended = [line for line in master.log().splitlines()
             if "Session with client node %s " % client.name in line and " ended" in line]
    assert not ended, "the real client's session suffered: %s" % ended
    still_serves_real_client(master, client)
