"""Failover fencing and versions over real sessions (review of issue 14): what a follower
records as `last`, renames refused once a higher term is known, the held client.keys, hostile
terms and bad messages, a lost election record. Real Failover objects (test_failover.py's
three nodes on loopback, manual clock), a real Inbox and Receiver writing in temporary
installations; the internal daemon is a small recording stand-in."""
from __future__ import absolute_import, division, print_function

import hashlib
import json
import logging
import os

import pytest

from wazuh_cluster import compat, electionstore, inbox, scanner, sync
from wazuh_cluster.errors import ClusterError, RequestError
from wazuh_cluster.session import Session as RealSession

from test_channel import channel_pair
from test_failover import OPTIONS, cluster, db_folder, node, peer, run_until  # noqa: F401
from test_receive import BASE_NS, ITEMS, EXCLUDE, client_rx, home, inc, log, read  # noqa: F401

SHARED = u"etc/shared/default/agent.conf"


class Link(object):
    """The internal daemon as Inbox and PeerSync use it here: states and meta recorded, a
    manifest of the files under `home`."""

    def __init__(self, home=None):
        self.home = home
        self.meta = {}
        self.calls = []

    def urgent(self):
        return self

    def call(self, cmd, args):
        self.calls.append(cmd)
        if cmd == "meta_get":
            return {"value": self.meta.get(args["key"])}
        if cmd == "meta_set":
            self.meta[args["key"]] = args["value"]
        if cmd == "pending":
            return {"files": []}
        return {}

    def call_data(self, cmd, args):
        if cmd == "fingerprints":  # no record vouches for a file: the receiver reads them
            return {"count": len(args["names"])}, \
                scanner.NO_FINGERPRINT * len(args["names"])
        assert cmd == "manifest"
        return {}, json.dumps(self.files(args.get("names"))).encode("ascii")

    def files(self, names=None):
        """The manifest of etc/shared (of `names` only)."""
        if names is None:
            top = os.path.join(self.home, "etc", "shared")
            names = ["/".join(os.path.relpath(os.path.join(folder, f), self.home).split(os.sep))
                     for folder, _, found in os.walk(top) for f in found]
        files = {}
        for name in names:
            path = os.path.join(self.home, *name.split("/"))
            if os.path.isfile(path):
                with open(path, "rb") as handle:
                    data = handle.read()
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                               "mtime_ns": compat.stat_mtime_ns(os.lstat(path)), "mode": 432,
                               "item": "shared"}
        return files


class Layout(object):
    def __init__(self, home):
        self.home = home
        self.staging_dir = os.path.join(home, "queue", "cluster-staging")
        self.db_file = os.path.join(home, "var", "db", "cluster.db")


class InboxCfg(object):
    node_type = "client"
    is_master = False
    items = ITEMS
    exclude = EXCLUDE
    options = OPTIONS
    nodes = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def follower_inbox(tmpdir, follower):
    """A real Inbox of `follower` (a Failover) in its own installation."""
    home = os.path.dirname(os.path.dirname(follower.election._store.path))
    for folder in ("etc/shared/default", "queue/agent-info", "queue/agent-groups"):
        if not os.path.isdir(os.path.join(home, folder)):
            os.makedirs(os.path.join(home, folder))
    box = inbox.Inbox(InboxCfg(), Layout(home), Link())
    box.failover = follower
    return box, home


def batch(files, **fields):
    """A sync_files header and its data for [(name, bytes)]."""
    header = {"files": [{"name": name, "sha256": hashlib.sha256(data).hexdigest(),
                         "mtime_ns": BASE_NS, "size": len(data)} for name, data in files],
              "meta": [], "delete": [], "delete_dirs": []}
    header.update(fields)
    return header, b"".join(data for _, data in files)


def elected(cluster):
    (alpha, beta, gamma), clock, _ = cluster
    run_until(cluster[0], clock, lambda: alpha.is_acting() and beta.leader_name() == "alpha"
              and gamma.leader_name() == "alpha")
    return alpha, beta, gamma


# -- 1: `last` is recorded only from a confirmation --------------------------------------------

def test_a_follower_records_a_version_only_from_the_leaders_confirmation(tmpdir, cluster):
    """A batch covers part of the leader's state: applying one, even whole, proves nothing
    about the rest (was: every fully applied batch set `last` to the version it carried)."""
    alpha, beta, _ = elected(cluster)
    box, home = follower_inbox(tmpdir, beta)
    header, data = batch([(SHARED, b"new conf\n")], term=1, version=[1, 7])
    with pytest.raises(RequestError) as info:        # files never come with a version
        box.sync_files(peer(beta, "alpha"), header, data)
    assert info.value.code == "bad_request" and beta.status()["last"] == [0, 0]
    header, data = batch([(SHARED, b"new conf\n")], term=1)
    answer, _ = box.sync_files(peer(beta, "alpha"), header, data)
    assert answer["states"] == {SHARED: "synchronized"} and read(home, SHARED) == b"new conf\n"
    assert beta.status()["last"] == [0, 0]           # applied, but nothing confirmed
    header, data = batch([], term=1, version=[1, 7])
    with pytest.raises(RequestError):                # gamma does not lead term 1
        box.sync_files(peer(beta, "gamma"), header, data)
    assert beta.status()["last"] == [0, 0]
    box.sync_files(peer(beta, "alpha"), header, data)
    assert beta.status()["last"] == [1, 7]


def leader_sync(alpha, alpha_home, follower_box, handlers=None):
    """alpha's PeerSync to a real session whose other end is the follower's Inbox."""
    ours, theirs = channel_pair()
    handlers = dict(handlers or {}, sync_files=follower_box.sync_files)
    peer = RealSession(theirs, handlers, 5.0, address=("127.0.0.1", 1))
    peer.peer_name = "alpha"
    master = RealSession(ours, {}, 5.0, address=("127.0.0.2", 2))
    master.on_election = lambda session, header: None   # the follower's answers: not tested
    master.start()
    # the follower takes it as its session with alpha, as peers.py does a new one: fencing
    # goes by the live session of the sender's <nodes> entry
    follower_box.failover.session_opened(peer, {"election": alpha.hello_fields()["election"]})
    peer.start()
    worker = sync.PeerSync(master, alpha_home, "master", Link(alpha_home), ITEMS, 120.0, 0.0,
                           30.0)
    worker.failover = alpha
    return worker, (master, peer)


def write(home, name, data):
    path = os.path.join(home, *name.split("/"))
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    with open(path, "wb") as handle:
        handle.write(data)


def test_a_push_is_confirmed_only_when_the_peer_held_everything_before_it(tmpdir, cluster):
    """Concurrent batches and pushes of part of the state must not let a follower claim a
    version it does not wholly hold: batches carry the term only, and a push confirms its
    version only when the peer was confirmed before and every push since was complete."""
    alpha, beta, _ = elected(cluster)
    box, _ = follower_inbox(tmpdir, beta)
    alpha_home = os.path.dirname(os.path.dirname(alpha.election._store.path))
    sent = []
    real = box.sync_files

    def recording(session, args, data):
        sent.append(dict((k, args[k]) for k in ("term", "version") if k in args))
        return real(session, args, data)
    recording.streams_data = True
    box.sync_files = recording
    worker, sessions = leader_sync(alpha, alpha_home, box)
    manager = sync.SyncManager.__new__(sync.SyncManager)
    manager.failover, manager.role, manager.master_items = alpha, "master", \
        [i for i in ITEMS if i.source == "master"]
    try:
        write(alpha_home, SHARED, b"one\n")
        manager.new_version({"changed": [SHARED]})   # alpha's state changed: (1, 1)
        version = alpha.current_version()
        assert version == [1, 1]
        worker.confirmed_push(version, ([SHARED], [], [], []))
        assert sent == [{"term": 1}]                 # no version on a batch, no confirmation
        assert beta.status()["last"] == [0, 0]       # beta was never confirmed in sync
        worker.confirm_version(version, True)        # as after a clean full round
        assert sent[-1] == {"term": 1, "version": [1, 1]} and beta.status()["last"] == [1, 1]
        write(alpha_home, SHARED, b"two\n")
        manager.new_version({"changed": [SHARED], "deleted": [u"queue/agent-info/x-any"]})
        manager.new_version({"changed": [u"queue/agent-info/x-any"]})   # not master-owned
        version = alpha.current_version()
        assert version == [1, 2]
        worker.confirmed_push(version, ([SHARED], [], [], []))
        assert sent[-2:] == [{"term": 1}, {"term": 1, "version": [1, 2]}]
        assert beta.status()["last"] == [1, 2]
        # a push that leaves a name out (changed, then gone before it was read) is no proof
        worker.confirmed_push([1, 2], ([SHARED, u"etc/shared/default/gone.conf"], [], [], []))
        assert not worker.in_sync and sent[-1] == {"term": 1}
        worker.confirmed_push([1, 2], ([SHARED], [], [], []))
        assert sent[-1] == {"term": 1}               # not in sync until a clean round
    finally:
        for session in sessions:
            session.close()


def test_a_round_confirms_nothing_while_a_difference_is_left_unrepaired(tmpdir, cluster):
    """'Nothing pending': the outcome of deleting a name only the peer listed is left out of
    the round's states (forget_unknown), but a failure there is a difference still there."""
    alpha, beta, _ = elected(cluster)
    box, beta_home = follower_inbox(tmpdir, beta)
    alpha_home = os.path.dirname(os.path.dirname(alpha.election._store.path))
    write(alpha_home, SHARED, b"conf\n")
    extra = os.path.join(beta_home, "etc", "shared", "default", "extra.conf")
    os.makedirs(extra)     # listed as a file below: its deletion is refused (a folder)
    listed = {u"etc/shared/default/extra.conf": {"sha256": "0" * 64, "size": 1,
                                                 "mtime_ns": BASE_NS, "item": "shared"}}

    def sync_manifest(session, args, data):
        files = Link(beta_home).files()
        files.update(listed)
        return {"files": files}, b""
    worker, sessions = leader_sync(alpha, alpha_home, box, {"sync_manifest": sync_manifest})
    worker.summaries = False
    try:
        worker.full_round()
        assert read(beta_home, SHARED) == b"conf\n" and worker.last_round_ok
        assert beta.status()["last"] == [0, 0] and worker.in_sync is None
        os.rmdir(extra)
        worker.full_round()
        assert beta.status()["last"] == [1, 0] and worker.in_sync == 1
    finally:
        for session in sessions:
            session.close()


# -- 2: fencing at each rename ---------------------------------------------------------------

class Streamed(object):
    """A file's data arriving in chunks; `midway` runs after the first one."""

    def __init__(self, data, midway):
        self.data, self.midway = data, midway

    def chunks(self):
        yield self.data[:4]
        self.midway()
        yield self.data[4:]


def test_a_batch_still_streaming_when_a_higher_term_became_known_renames_nothing(
        cluster, home, log):
    alpha, beta, gamma = elected(cluster)
    beta.check_transfer(peer(beta, "alpha"), {"term": 1})
    fence = beta.fence("127.0.0.1", 1)
    kept = os.path.join(home, "etc", "shared", "default", "kept.conf")
    with open(kept, "wb") as handle:
        handle.write(b"old\n")

    def gamma_claims_term_2():
        beta.check_transfer(peer(beta, "gamma"), {"term": 2})    # beta adopts term 2 from gamma
    files = [inc(SHARED, b"from a deposed leader\n"),
             inc(u"etc/shared/default/kept.conf", b"stale\n")]
    files[0] = files[0]._replace(data=Streamed(b"from a deposed leader\n", gamma_claims_term_2))
    states, reasons = client_rx(home, log).apply_batch(files, sender_role="master",
                                                       peer="alpha\x1b[31m", fence=fence)
    assert states == {SHARED: "invalid", u"etc/shared/default/kept.conf": "invalid"}
    assert not os.path.exists(os.path.join(home, SHARED)) and read(
        home, "etc/shared/default/kept.conf") == b"old\n"
    refused = [line for line in log.lines if "no longer leads" in line]
    assert len(refused) == 1 and "refused 2 change(s) from master 'alpha\\x1b[31m'" in refused[0]
    assert not [line for line in log.lines if "kept.conf" in line and line != refused[0]]
    states, _ = client_rx(home, log).apply_batch([], [u"etc/shared/default/kept.conf"],
                                                 sender_role="master", fence=fence)
    assert states == {u"etc/shared/default/kept.conf": "invalid"} and os.path.exists(kept)
    mtime = compat.stat_mtime_ns(os.lstat(kept))
    touch = inc(u"etc/shared/default/kept.conf", b"old\n", mtime_ns=BASE_NS, meta_only=True)
    states, _ = client_rx(home, log).apply_batch([touch], sender_role="master", fence=fence)
    assert states == {u"etc/shared/default/kept.conf": "invalid"}
    assert compat.stat_mtime_ns(os.lstat(kept)) == mtime       # no mtime set in place either
    assert not [name for name in os.listdir(os.path.join(home, "etc", "shared", "default"))
                if name.endswith(".tmp")]


# -- 4: the held client.keys --------------------------------------------------------------------

def test_a_held_client_keys_of_a_deposed_leader_is_not_applied_when_confirmed(tmpdir, cluster):
    alpha, beta, _ = elected(cluster)
    box, home = follower_inbox(tmpdir, beta)
    keys = "".join("%03d agent%d any %s\n" % (i, i, "k" * 64) for i in range(1, 21))
    write(home, "etc/client.keys", keys.encode("ascii"))
    header, data = batch([(u"etc/client.keys", b"001 agent1 any " + b"k" * 64 + b"\n")],
                         term=1)
    answer, _ = box.sync_files(peer(beta, "alpha"), header, data)
    assert answer["states"] == {u"etc/client.keys": "pending"}     # held by the guard
    beta.check_transfer(peer(beta, "gamma"), {"term": 2})                       # alpha is deposed
    with pytest.raises(RequestError) as info:
        box.confirm_removals()
    assert "no longer leads" in info.value.message
    assert read(home, "etc/client.keys") == keys.encode("ascii")


# -- 5, 6: hostile terms and bad messages --------------------------------------------------------

def test_hostile_terms_and_bad_messages_give_one_line_per_peer_a_minute(cluster, caplog):
    alpha, beta, gamma = elected(cluster)
    session = beta.sessions["127.0.0.3"]
    caplog.set_level(logging.INFO, logger="wazuh_cluster")
    for _ in range(50):
        beta._on_frame(session, {"type": "hb", "term": "x\x1b", "n": 1, "last": [1, 0]})
        beta._on_frame(session, {"type": "hb", "term": 2 ** 53 - 1, "n": 1, "last": [1, 0]})
    lines = [r.getMessage() for r in caplog.records if "refused peer" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("refused peer gamma: bad election message")
    assert beta.status()["term"] == 1 and beta.leader_name() == "alpha"
    clock = cluster[1]
    clock.now += 61.0
    beta._on_frame(session, {"type": "hb", "term": 2 ** 53 - 1, "n": 1, "last": [1, 0]})
    lines = [r.getMessage() for r in caplog.records if "refused peer" in r.getMessage()]
    assert "99 more refusal(s)" in lines[1] and "more than 2^20 above term 1" in lines[2]
    assert len(lines) == 3 and beta.status()["term"] == 1


def test_refused_batches_of_a_stale_leader_give_one_line_a_minute(tmpdir, cluster, caplog):
    alpha, beta, _ = elected(cluster)
    box, _ = follower_inbox(tmpdir, beta)
    beta.check_transfer(peer(beta, "gamma"), {"term": 2})
    caplog.set_level(logging.INFO, logger="wazuh_cluster")
    header, data = batch([(SHARED, b"stale\n")], term=1)
    for _ in range(30):
        with pytest.raises(RequestError) as info:
            box.sync_files(peer(beta, "alpha"), header, data)
        assert info.value.code == "stale_term"
    lines = [r.getMessage() for r in caplog.records if "alpha" in r.getMessage()]
    assert lines == ["refused peer alpha: master-owned files from alpha (127.0.0.1) in term 1, "
                     "older than term 2"]


# -- 3: a lost election record ---------------------------------------------------------------

def test_a_node_whose_record_was_lost_after_it_joined_refuses_to_start(tmpdir, cluster):
    """A wiped var/db must not come back at term 0 (it could vote twice in a term)."""
    elected(cluster)
    os.unlink(os.path.join(db_folder(tmpdir, "beta"), electionstore.FILE_NAME))
    with pytest.raises(ClusterError) as info:
        node(tmpdir, "127.0.0.2", cluster[1])
    assert "cluster-election.json is missing but" in str(info.value)
    assert os.path.join("beta", "etc", electionstore.MARKER_NAME) in str(info.value)
