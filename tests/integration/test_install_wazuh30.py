"""install.sh into an existing Wazuh 3.0 manager (SPEC 11, issue 13): no owner, group or mode
of Wazuh's own folders and files changes, and our daemons still start and synchronise there.

The prefix is built with Wazuh 3.0's owners and modes (queue/agent-info and queue/rids belong
to ossecr, queue/agent-groups and backup to root, etc to ossec, all group ossec). When the
machine has no `ossecr` user, a free numeric UID stands for it: ownership is numeric.
"""
from __future__ import absolute_import, division, print_function

import grp
import io
import os
import pwd
import stat

import pytest

from harness import read_text as read
from harness import (  # noqa: F401  (fixtures are found by pytest through these imports)
    Node, base_install, install, make_node, new_address, python, tmp_prefix_dir, wait_for,
    workspace, write_internal_options, _need_ossec_user)

SYNC_WAIT = 20.0
FAST = {"cluster.poll_interval": "0.2", "cluster.scan_interval": "1",
        "cluster.keepalive": "1", "cluster.reconnect_max": "1"}
KEYS = u"001 web01 any 0123456789abcdef0123456789abcdef\n"
AGENT_CONF = u"<agent_config/>\n"
WAZUH_CONTROL = u"#!/bin/sh\n# Wazuh 3.0 ossec-control\nDAEMONS=\"ossec-remoted wazuh-clusterd\"\n"

# (path, owner, mode, content or None for a folder), in creation order; owner "user:group".
WAZUH30 = (
    ("", "root:ossec", 0o750, None),
    ("bin", "root:ossec", 0o750, None),
    ("bin/ossec-control", "root:ossec", 0o750, WAZUH_CONTROL),
    ("bin/wazuh-clusterd", "root:ossec", 0o750, u"#!/usr/bin/env python\n# Wazuh 3.0\n"),
    ("bin/wazuh-clusterd-internal", "root:ossec", 0o750, u"#!/usr/bin/env python\n# 3.0\n"),
    ("bin/cluster_control", "root:ossec", 0o750, u"#!/usr/bin/env python\n# Wazuh 3.0\n"),
    ("etc", "ossec:ossec", 0o770, None),
    ("etc/ossec.conf", "root:ossec", 0o640, u"<ossec_config></ossec_config>\n"),
    ("etc/internal_options.conf", "root:ossec", 0o640, u"analysisd.debug=0\n"),
    ("etc/local_internal_options.conf", "root:ossec", 0o640, u""),
    ("etc/client.keys", "root:ossec", 0o640, u""),
    ("etc/shared", "ossec:ossec", 0o770, None),
    ("etc/shared/default", "ossec:ossec", 0o770, None),
    ("etc/shared/default/agent.conf", "ossec:ossec", 0o660, AGENT_CONF),
    ("logs", "ossec:ossec", 0o750, None),
    ("logs/ossec.log", "ossec:ossec", 0o660, u""),
    ("logs/cluster.log", "ossec:ossec", 0o660, u""),
    ("queue", "root:ossec", 0o750, None),
    ("queue/agent-info", "ossecr:ossec", 0o770, None),
    ("queue/agent-groups", "root:ossec", 0o770, None),
    ("queue/rids", "ossecr:ossec", 0o770, None),
    ("queue/ossec", "ossec:ossec", 0o770, None),
    ("queue/syscheck", "ossec:ossec", 0o750, None),
    ("queue/rootcheck", "ossec:ossec", 0o750, None),
    ("backup", "root:ossec", 0o750, None),
    ("backup/agents", "ossec:ossec", 0o750, None),
    ("var", "root:ossec", 0o750, None),
    ("var/run", "root:ossec", 0o770, None),
    ("var/db", "root:ossec", 0o770, None),
)


def ossecr_uid():
    """The `ossecr` user's UID, or a free UID standing for it (no name needed to own files)."""
    try:
        return pwd.getpwnam("ossecr").pw_uid
    except KeyError:
        uid = 9990
        while True:
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid
            uid -= 1


def ids(owner):
    user, group = owner.split(":")
    uid = ossecr_uid() if user == "ossecr" else pwd.getpwnam(user).pw_uid
    return uid, grp.getgrnam(group).gr_gid


def build_wazuh30(prefix):
    for rel, owner, mode, content in WAZUH30:
        path = os.path.join(prefix, rel) if rel else prefix
        if content is None:
            if not os.path.isdir(path):
                os.mkdir(path)
        else:
            with io.open(path, "w", encoding="utf-8") as handle:
                handle.write(content)
        os.chown(path, *ids(owner))
        os.chmod(path, mode)


def snapshot(prefix):
    """{relative path: (uid, gid, mode)} of everything under the prefix."""
    found = {"": _ids(prefix)}
    for folder, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, prefix)] = _ids(path)
    return found


def _ids(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def put(node, rel, text, owner=None, mode=None):
    path = node.path(*rel.split("/"))
    with io.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    if owner:
        os.chown(path, *ids(owner))
    if mode is not None:
        os.chmod(path, mode)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="Wazuh's owners need root to be made")
def test_install_into_wazuh30_keeps_every_owner_and_mode_and_the_cluster_syncs(
        make_node, tmp_prefix_dir, python):
    _need_ossec_user()
    master = make_node("master", "master", configure=False)
    address = new_address()
    client = Node(os.path.join(tmp_prefix_dir, "wazuh30"), "client", address, master.port,
                  master.key)
    build_wazuh30(client.prefix)
    client.configure("client", [master.address, client.address], interval="3s")
    write_internal_options(client.prefix, FAST)
    master.configure("master", [master.address, client.address], interval="3s")
    write_internal_options(master.prefix, FAST)
    before = snapshot(client.prefix)
    assert len(before) == len(WAZUH30)

    result = install(client.prefix, python)
    assert "warning" not in result.err, result  # the daemons have what they need
    after = snapshot(client.prefix)
    changed = dict((rel, (before[rel], after.get(rel))) for rel in before
                   if after.get(rel) != before[rel])
    assert not changed, "install.sh changed Wazuh's owners or modes: %r" % changed
    assert read(client, "bin/ossec-control") == WAZUH_CONTROL, "Wazuh's ossec-control stays"
    # Only what we add is ours: the package, and the folders Wazuh 3.0 has not.
    assert os.path.isfile(client.path("lib", "wazuh_cluster", "clusterd.py"))
    install(client.prefix, python)  # an upgrade in place changes nothing either
    assert dict((rel, snapshot(client.prefix).get(rel)) for rel in before) == before

    # The daemons start (as Wazuh's ossec-control starts them) and synchronise both ways,
    # writing into Wazuh's folders with Wazuh's owners.
    put(master, "etc/client.keys", KEYS)
    os.makedirs(master.path("etc", "shared", "web"))
    os.makedirs(master.path("etc", "shared", "default"))
    put(master, "etc/shared/default/agent.conf", AGENT_CONF)
    put(master, "etc/shared/web/agent.conf", u"<agent_config><web/></agent_config>\n")
    put(master, "queue/agent-groups/001", u"web")
    put(client, "queue/agent-info/web01-any", u"Linux web01 - Wazuh v3.0.0\n",
        owner="ossecr:ossec", mode=0o660)
    try:
        master.start()
        started = client.daemon()
        assert started.rc == 0, client.explain("wazuh-clusterd in the Wazuh 3.0 prefix", started)
        client.wait_running()
        for rel, text in (("etc/client.keys", KEYS),
                          ("etc/shared/web/agent.conf", u"<agent_config><web/></agent_config>\n"),
                          ("queue/agent-groups/001", u"web")):
            wait_for(lambda: read(client, rel) == text, SYNC_WAIT,
                     what="%s from the master in the Wazuh 3.0 prefix" % rel)
        wait_for(lambda: read(master, "queue/agent-info/web01-any"), SYNC_WAIT,
                 what="the client's agent-info on the master")
        for pid in (client.running_pid(), client.internal_pid()):
            assert os.stat("/proc/%d" % pid).st_uid == pwd.getpwnam("ossec").pw_uid
        # Wazuh's folders are still as Wazuh made them while the cluster runs.
        now = snapshot(client.prefix)
        folders = [rel for rel, _owner, _mode, content in WAZUH30 if content is None]
        assert dict((rel, now[rel]) for rel in folders) == \
            dict((rel, before[rel]) for rel in folders)
    finally:
        client.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root installs for user ossec")
def test_an_existing_folder_the_daemons_cannot_write_is_named_not_changed(tmp_prefix_dir,
                                                                          python):
    _need_ossec_user()
    prefix = os.path.join(tmp_prefix_dir, "ossec")
    run_dir = os.path.join(prefix, "var", "run")
    os.makedirs(run_dir)
    os.chmod(run_dir, 0o755)  # root:root, as an operator's `mkdir -p` leaves it
    result = install(prefix, python)
    warnings = [line for line in result.err.splitlines() if "warning" in line]
    assert len(warnings) == 1, result
    assert "user ossec cannot write %s (root:root 755, left as it was)" % run_dir \
        in warnings[0] and "PID files" in warnings[0]
    assert _ids(run_dir) == (0, 0, 0o755)
