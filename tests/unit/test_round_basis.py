"""An integrity round confirms files on what the peer's copy was when the round looked at it:
a change there made before the round must be seen by it, and one made while it runs must
not be recorded "synchronized" (SPEC section 4: nothing is lost; README "Integrity rounds").

A master's PeerSync and a client's real Inbox over a real session; each node's internal
daemon is a real Catalog on a real SQLite database, answering in a thread of its own with a
clock that does not move unless a test moves it (so the catalog's own passes never run
unasked: what a round sees is what the round itself makes the catalog look at).
"""
from __future__ import absolute_import, division, print_function

import logging
import os
import shutil
import tempfile
import threading
import time

import pytest

from wazuh_cluster import budget, catalog, compat, config, db, inbox, localsock, scanner
from wazuh_cluster import summary, sync
from wazuh_cluster.session import Session

from test_channel import channel_pair
from test_failover import Clock
from test_failover_fencing import Layout

ITEMS, EXCLUDE = config.load_items(os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "etc", "cluster.json"))
OPTIONS = config.Options(**dict((name, convert(default)) for name, convert, default
                                in config.OPTIONS))
KEYS_NAME = u"etc/client.keys"
KEYS = b"001 web01 any 1111\n002 db01 10.0.0.5 2222\n"
CONF_NAME = u"etc/shared/default/agent.conf"
CONF = b"<agent_config></agent_config>\n"
INFO_NAME = u"queue/agent-info/web01-any"
INFO = b"Linux web01 3.10.0 - Wazuh v3.0.0\n"
OTHER_INFO = (u"queue/agent-info/db01-10.0.0.5", b"Linux db01 3.10.0 - Wazuh v3.0.0\n")
FILES_OF = {"master": [(KEYS_NAME, KEYS), (CONF_NAME, CONF)],
            "client": [(INFO_NAME, INFO), OTHER_INFO]}
LOG = logging.getLogger("test-round-basis")


class Daemon(object):
    """A node's internal daemon: its Catalog answers one request at a time in one thread (the
    one that opened its database), as internal.py's loop does. Used as the link (InternalLink)
    by PeerSync and Inbox."""

    def __init__(self, home, role, name):
        self.home = home
        self.now = 0.0
        self.late = 0.0   # seconds added to the catalog's wall clock (racy records settle)
        self.jobs = compat.queue.Queue()
        self.catalog = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(role, name, started))
        self.thread.daemon = True
        self.thread.start()
        started.wait(30)

    def _serve(self, role, name, started):
        store = db.ClusterDB(os.path.join(self.home, "var", "db", "cluster.db"), LOG)
        self.catalog = catalog.Catalog(self.home, ITEMS, EXCLUDE, store, LOG, role=role,
                                       node_name=name, clock=lambda: self.now,
                                       wall=lambda: time.time() + self.late)
        started.set()
        while True:
            job = self.jobs.get()
            if job is None:
                store.close()
                return
            func, done, out = job
            try:
                out.append((True, func()))
            except Exception as err:  # raised again in the asking thread
                out.append((False, err))
            done.set()

    def run(self, func):
        done, out = threading.Event(), []
        self.jobs.put((func, done, out))
        assert done.wait(60), "the internal daemon did not answer"
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def call(self, cmd, args=None):
        result = self.run(lambda: self.catalog.handle(cmd, args or {}))
        return result.result if isinstance(result, localsock.WithData) else result

    def call_data(self, cmd, args=None):
        result = self.run(lambda: self.catalog.handle(cmd, args or {}))
        if isinstance(result, localsock.WithData):
            return result.result, result.data
        return result, None

    def urgent(self):
        return self

    def pass_now(self):
        """A full pass over every item, as the catalog's own passes make (its clock does
        not move: the next pass over what it receives is a scan_interval away)."""
        self.call("rescan")
        return self.run(lambda: self.catalog.tick(self.now))

    def stop(self):
        self.jobs.put(None)
        self.thread.join(30)


class ClientCfg(object):
    node_type = "client"
    node_name = "client01"
    is_master = False
    items = ITEMS
    exclude = EXCLUDE
    options = OPTIONS
    nodes = ("127.0.0.1", "127.0.0.2")


class MasterCfg(ClientCfg):
    node_type = "master"
    node_name = "master01"
    is_master = True


def install(root, name):
    home = os.path.join(root, name)
    for folder in ("etc/shared/default", "queue/agent-info", "queue/agent-groups", "var/db"):
        os.makedirs(os.path.join(home, *folder.split("/")))
    return home


def path(home, name):
    return os.path.join(home, *name.split("/"))


def write(home, name, data):
    with open(path(home, name), "wb") as handle:
        handle.write(data)


def read(home, name):
    try:
        with open(path(home, name), "rb") as handle:
            return handle.read()
    except IOError:
        return None


class Pair(object):
    """A master and a client in step after a first round of `sender` (the master sends
    client.keys and a shared file, the client its agent-info); the receiver's catalog has
    passed over its copy since, so its own next look at it is not due before a
    scan_interval."""

    def __init__(self, root, sender="master"):
        self.master_home, self.client_home = install(root, "master"), install(root, "client")
        for name, data in (FILES_OF[sender]):
            write(self.master_home if sender == "master" else self.client_home, name, data)
        self.master = Daemon(self.master_home, "master", "master01")
        self.client = Daemon(self.client_home, "client", "client01")
        self.master.pass_now()
        self.client.pass_now()
        self.master.call("peer_seen", {"name": "client01", "role": "client"})
        self.client.call("peer_seen", {"name": "master01", "role": "master"})
        if sender == "master":
            self.sender, self.receiver, self.receiver_home = self.master, self.client, \
                self.client_home
            cfg, peer = ClientCfg(), "client01"
        else:
            self.sender, self.receiver, self.receiver_home = self.client, self.master, \
                self.master_home
            cfg, peer = MasterCfg(), "master01"
        self.peer = peer
        self.box = inbox.Inbox(cfg, Layout(self.receiver_home), self.receiver)
        self.box.start()
        self.handlers = self.box.handlers()
        on_client, on_master = channel_pair()   # each end's peer: the other node
        client_end = Session(on_client, {}, 30.0, address=("127.0.0.1", 1),
                             budget=budget.Budget(64 << 20))
        master_end = Session(on_master, {}, 30.0, address=("127.0.0.2", 2),
                             budget=budget.Budget(64 << 20))
        self.sender_end, self.receiver_end = (master_end, client_end) if sender == "master" \
            else (client_end, master_end)
        self.receiver_end.dispatcher = self.handlers
        client_end.start()
        master_end.start()
        self.clock = Clock()
        self.sync = sync.PeerSync(self.sender_end, self.master_home if sender == "master"
                                  else self.client_home, sender, self.sender, ITEMS, 120.0,
                                  0.05, 30.0, clock=self.clock, phase=self.clock() % 120.0)
        self.sync.full_round()
        for name, data in FILES_OF[sender]:
            assert read(self.receiver_home, name) == data
            assert self.row(name) == "synchronized"
        self.receiver.pass_now()   # the receiver's catalog has seen what it received

    def row(self, name):
        rows = self.sender.call("states", {"node": self.peer, "files": [name]})["rows"]
        return rows[0][2] if rows else None

    def clear(self):
        """Wazuh 3.0's `clear` on the sender: every row pending, a round follows."""
        self.sender.run(lambda: self.sender.catalog.db.reset_states(None))

    def close(self):
        self.sender_end.close()
        self.receiver_end.close()
        self.master.stop()
        self.client.stop()


@pytest.fixture
def pair():
    root = tempfile.mkdtemp(prefix="wzc-round-")
    made = Pair(root)
    yield made
    made.close()
    shutil.rmtree(root)


@pytest.mark.parametrize("drift", ["removed", "edited"])
def test_a_round_sees_drift_made_on_the_peer_before_it_began(pair, drift):
    """The client's last pass over its copy of the master's files was a moment ago (within
    scan_interval): a round's summary used to be that pass's, so client.keys removed by hand
    since was counted as still there, its bucket was not compared, and the master recorded
    it "synchronized" without sending it (test_legacy's `clear` step)."""
    if drift == "removed":
        os.unlink(path(pair.client_home, KEYS_NAME))
    else:
        write(pair.client_home, KEYS_NAME, b"edited by hand on the client\n")
    pair.clear()
    assert pair.row(KEYS_NAME) == "pending"
    pair.sync.full_round()
    assert read(pair.client_home, KEYS_NAME) == KEYS
    assert pair.row(KEYS_NAME) == "synchronized"


def test_drift_during_a_round_is_not_confirmed_and_the_next_round_repairs_it(pair):
    """The round's summary of the client's copy is taken; then client.keys is removed there
    (by hand, in the middle of the round) and the client notices: the master must not
    record the file "synchronized" from the old summary, and must look again soon."""
    answered = []

    def summary_then_removal(session, args, data):
        answer = pair.handlers["sync_summary"](session, args, data)
        if not answered:
            os.unlink(path(pair.client_home, KEYS_NAME))  # right after the round's basis
        answered.append(args)
        return answer
    pair.receiver_end.dispatcher = dict(pair.handlers, sync_summary=summary_then_removal)
    write(pair.master_home, CONF_NAME, CONF + b"<!-- changed -->\n")  # a bucket to compare
    pair.master.pass_now()
    pair.clear()
    assert pair.row(KEYS_NAME) == "pending"
    pair.sync.full_round()
    assert read(pair.client_home, CONF_NAME) == CONF + b"<!-- changed -->\n"
    assert read(pair.client_home, KEYS_NAME) is None       # removed after the round's basis
    assert pair.row(KEYS_NAME) == "pending"                # so not confirmed by it
    assert pair.row(CONF_NAME) == "synchronized"
    assert pair.sync.last_round_ok is False
    assert pair.sync.next_round <= pair.clock() + sync.RETRY_DELAY   # not an interval away
    pair.clock.now = pair.sync.next_round
    job, _ = pair.sync.due(pair.clock())
    assert job == pair.sync.full_round
    job()
    assert read(pair.client_home, KEYS_NAME) == KEYS
    assert pair.row(KEYS_NAME) == "synchronized" and pair.sync.last_round_ok


def test_a_quiet_round_asks_for_no_second_summary(pair):
    """The check costs a summary only when the round confirms files it did not send."""
    asked = []

    def counting(session, args, data):
        asked.append(args)
        return pair.handlers["sync_summary"](session, args, data)
    pair.receiver_end.dispatcher = dict(pair.handlers, sync_summary=counting)
    pair.sync.full_round()
    assert len(asked) == 1 and pair.sync.last_round_ok
    assert pair.sync.next_round >= pair.clock() + 60.0


def test_buckets_the_round_wrote_to_are_not_checked_again(pair):
    """A file sent in the round moves its bucket's sum: the other files of that bucket are
    confirmed by the entries compared then, not dropped for it (no endless rounds)."""
    same_bucket = same_bucket_as(CONF_NAME, "f")
    write(pair.master_home, same_bucket, b"another file of the bucket\n")
    pair.master.pass_now()
    pair.sync.full_round()
    pair.client.pass_now()
    write(pair.master_home, CONF_NAME, CONF + b"<!-- changed -->\n")
    pair.master.pass_now()
    pair.clear()
    assert pair.row(KEYS_NAME) == "pending"
    pair.sync.full_round()
    assert read(pair.client_home, CONF_NAME) == CONF + b"<!-- changed -->\n"
    assert pair.row(same_bucket) == "synchronized" and pair.sync.last_round_ok


@pytest.fixture
def info_pair():
    root = tempfile.mkdtemp(prefix="wzc-round-")
    made = Pair(root, sender="client")
    yield made
    made.close()
    shutil.rmtree(root)


def test_agent_info_lost_on_the_master_during_a_clients_round_is_sent_again(info_pair):
    """The other direction: a client's round confirms its agent-info on the master's copy
    (the master's summary of the files that client reports); one removed there after that
    summary is not recorded "synchronized", and the next round sends it again."""
    pair = info_pair
    answered = []

    def summary_then_removal(session, args, data):
        answer = pair.handlers["sync_summary"](session, args, data)
        if not answered:
            os.unlink(path(pair.master_home, INFO_NAME))
        answered.append(args)
        return answer
    pair.receiver_end.dispatcher = dict(pair.handlers, sync_summary=summary_then_removal)
    write(pair.client_home, OTHER_INFO[0], OTHER_INFO[1] + b"#changed\n")
    pair.client.pass_now()
    pair.clear()
    assert pair.row(INFO_NAME) == "pending"
    pair.sync.full_round()
    assert read(pair.master_home, OTHER_INFO[0]) == OTHER_INFO[1] + b"#changed\n"
    assert read(pair.master_home, INFO_NAME) is None and pair.row(INFO_NAME) == "pending"
    assert pair.sync.next_round <= pair.clock() + sync.RETRY_DELAY
    pair.clock.now = pair.sync.next_round
    pair.sync.due(pair.clock())[0]()
    assert read(pair.master_home, INFO_NAME) == INFO and pair.row(INFO_NAME) == "synchronized"


def after_first(pair, command, change):
    """The receiver answers its first `command` of the round, then `change` runs there."""
    answered = []

    def answer_then_change(session, args, data):
        answer = pair.handlers[command](session, args, data)
        if not answered:
            change()
        answered.append(args)
        return answer
    pair.receiver_end.dispatcher = dict(pair.handlers, **{command: answer_then_change})


def same_bucket_as(name, stem):
    """A shared file name in the summary bucket of `name`."""
    return [n for n in (u"etc/shared/default/%s%d" % (stem, k) for k in range(5000))
            if summary.bucket_of(n) == summary.bucket_of(name)][0]


def test_a_file_compared_equal_in_a_bucket_the_round_wrote_to_and_lost_after_is_not_confirmed(
        pair):
    """A file compared equal in a bucket the round also sent to: the bucket's sum moves with
    the transfer, so the second summary cannot tell; removed on the client after the step's
    manifest, it must not be recorded "synchronized" from that manifest."""
    neighbour = same_bucket_as(CONF_NAME, "n")
    write(pair.master_home, neighbour, b"a neighbour in the bucket\n")
    pair.master.pass_now()
    pair.sync.full_round()
    pair.client.pass_now()
    # removed right after the step's manifest
    after_first(pair, "sync_manifest", lambda: os.unlink(path(pair.client_home, neighbour)))
    write(pair.master_home, CONF_NAME, CONF + b"<!-- changed -->\n")   # sent: bucket written
    pair.master.pass_now()
    pair.clear()
    pair.sync.full_round()
    assert read(pair.client_home, CONF_NAME) == CONF + b"<!-- changed -->\n"
    assert pair.row(CONF_NAME) == "synchronized"
    assert read(pair.client_home, neighbour) is None and pair.row(neighbour) == "pending"
    assert pair.sync.next_round <= pair.clock() + sync.RETRY_DELAY
    pair.clock.now = pair.sync.next_round
    pair.sync.due(pair.clock())[0]()
    assert read(pair.client_home, neighbour) == b"a neighbour in the bucket\n"
    assert pair.row(neighbour) == "synchronized" and pair.sync.last_round_ok


def test_a_round_that_removes_a_group_folder_still_checks_what_it_confirms(pair):
    """A round that removes a group folder on the client used to count every bucket as
    written and check nothing: client.keys, pending in a bucket whose sums matched and
    removed on the client after the round's summary, was confirmed "synchronized"."""
    extra = u"etc/shared/oldgroup/agent.conf"
    assert summary.bucket_of(extra) != summary.bucket_of(KEYS_NAME)
    os.makedirs(path(pair.client_home, u"etc/shared/oldgroup"))
    write(pair.client_home, extra, b"a group the master no longer has\n")
    pair.client.pass_now()
    after_first(pair, "sync_summary", lambda: os.unlink(path(pair.client_home, KEYS_NAME)))
    pair.clear()
    pair.sync.full_round()
    assert not os.path.exists(path(pair.client_home, u"etc/shared/oldgroup"))
    assert read(pair.client_home, KEYS_NAME) is None and pair.row(KEYS_NAME) == "pending"
    pair.clock.now = pair.sync.next_round
    pair.sync.due(pair.clock())[0]()
    assert read(pair.client_home, KEYS_NAME) == KEYS and pair.row(KEYS_NAME) == "synchronized"


def test_a_written_bucket_the_peer_holds_as_we_do_asks_for_no_manifest_again(pair):
    """The check of files compared equal in written buckets costs no manifest when the
    peer's sums there are ours after the transfers (the usual round)."""
    neighbour = same_bucket_as(CONF_NAME, "n")
    write(pair.master_home, neighbour, b"a neighbour in the bucket\n")
    pair.master.pass_now()
    pair.sync.full_round()
    pair.client.pass_now()
    asked = []

    def counting(session, args, data):
        asked.append(args)
        return pair.handlers["sync_manifest"](session, args, data)
    pair.receiver_end.dispatcher = dict(pair.handlers, sync_manifest=counting)
    write(pair.master_home, CONF_NAME, CONF + b"<!-- changed -->\n")
    pair.master.pass_now()
    pair.clear()
    pair.sync.full_round()
    assert pair.row(neighbour) == "synchronized" and pair.sync.last_round_ok
    assert [a for a in asked if "names" in a] == []


def test_an_append_queued_during_a_round_goes_before_the_rounds_next_step(pair):
    """A round with a client takes seconds under load (4-12 s at 10 clients); a client.keys
    append queued after it began waited for its end (issue 11: the append p99 was the
    client whose round was running). It goes between the round's steps now, and the round
    still ends clean (the push's bucket counts as written by the round)."""
    appended = KEYS + b"003 app01 any 3333\n"
    seen_at_step = []

    def summary_then_append(session, args, data):
        answer = pair.handlers["sync_summary"](session, args, data)
        if read(pair.master_home, KEYS_NAME) == KEYS:
            write(pair.master_home, KEYS_NAME, appended)     # manage_agents -a meanwhile
            pair.master.pass_now()
            pair.sync.notify({"changed": [KEYS_NAME]})
        return answer

    def manifest_at_step(session, args, data):
        seen_at_step.append(read(pair.client_home, KEYS_NAME))
        return pair.handlers["sync_manifest"](session, args, data)
    pair.receiver_end.dispatcher = dict(pair.handlers, sync_summary=summary_then_append,
                                        sync_manifest=manifest_at_step)
    write(pair.master_home, CONF_NAME, CONF + b"<!-- changed -->\n")  # a bucket to compare
    pair.master.pass_now()
    pair.sync.full_round()
    assert seen_at_step and seen_at_step[0] == appended   # pushed before the step
    assert read(pair.client_home, CONF_NAME) == CONF + b"<!-- changed -->\n"
    assert pair.row(KEYS_NAME) == "synchronized" and pair.row(CONF_NAME) == "synchronized"
    assert pair.sync.last_round_ok and not pair.sync.has_push()


def test_agent_info_edited_in_place_on_the_master_is_repaired_after_its_full_pass(info_pair):
    """A master wrote and checked the agent-info it holds; a client's round looks at their
    folder, not at each file (10 000 lstats per round were most of an idle master). A copy
    edited there in place by hand is found by the master's full pass over what it receives
    (foreign_scan_interval) and repaired by the client's next round after it."""
    pair = info_pair
    pair.master.late = 2 * scanner.RACY_NS / 1e9   # what it received is no longer racy:
    pair.master.pass_now()                          # its records and folder settle
    target = path(pair.master_home, INFO_NAME)
    mtime = compat.stat_mtime_ns(os.stat(target))
    with open(target, "r+b") as handle:   # in place: same inode, the folder unchanged
        handle.write(b"X")
    compat.set_mtime_ns(target, mtime - 3600 * 10 ** 9)   # older: a newer one would be kept
    pair.clear()
    pair.sync.full_round()
    assert read(pair.master_home, INFO_NAME) == b"X" + INFO[1:]   # no file was stat-ed
    assert pair.row(INFO_NAME) == "synchronized"
    pair.master.now += pair.master.catalog.foreign_scan_interval
    pair.master.run(lambda: pair.master.catalog.tick(pair.master.now))
    pair.clock.now = pair.sync.next_round
    pair.sync.due(pair.clock())[0]()
    assert read(pair.master_home, INFO_NAME) == INFO and pair.row(INFO_NAME) == "synchronized"


@pytest.mark.parametrize("peer", ["current", "older"])
def test_a_round_makes_our_summary_in_the_form_the_peer_answered_in(peer):
    """A client's round asks the master for summary form 2 (keepalives cost no SHA-256 there,
    summary.py) and makes its own in the form of the answer: an older master answers form 1
    without saying so, and a summary of ours in form 2 would differ in every bucket holding
    agent-info, each compared entry by entry at every round."""
    root = tempfile.mkdtemp(prefix="wzc-round-")
    made = Pair(root, sender="client")
    try:
        asked, manifests = [], []

        def summarise(session, args, data):
            asked.append(dict(args))
            if peer == "older":   # knows no "form": answers form 1, says nothing of it
                args = dict((k, v) for k, v in args.items() if k != "form")
                answer, rest = made.handlers["sync_summary"](session, args, data)
                return dict((k, v) for k, v in answer.items() if k != "form"), rest
            return made.handlers["sync_summary"](session, args, data)

        def manifest(session, args, data):
            manifests.append(args)
            return made.handlers["sync_manifest"](session, args, data)
        made.receiver_end.dispatcher = dict(made.handlers, sync_summary=summarise,
                                            sync_manifest=manifest)
        made.sync.full_round()
        assert [a.get("form") for a in asked] == [summary.FORM]
        assert made.sync.summary_form == (1 if peer == "older" else summary.FORM)
        assert manifests == [] and made.sync.last_round_ok   # the summaries matched
    finally:
        made.close()
        shutil.rmtree(root)
