"""Agents of client.keys: parsing, removals, the mass-removal guard, files of removed agents.

client.keys holds one `ID NAME IP KEY` line per agent; Wazuh marks a removed agent by
prefixing its name with "!" (or "#"). When an agent leaves, a manager drops its files
(SPEC section 2) after backing them up under backup/agents/YYYY/Mon/DD/ID-NAME-IP/, the way
Wazuh 3.0's OS_BackupAgentInfo does: the same folder names, the same short file names inside
(agent-info, syscheck, syscheck.cpt, ..., agent-group) plus rids, which Wazuh drops without
a copy and we keep (nothing is lost).

Names from client.keys end up in file names, so a line whose ID, name or IP could reach
outside a folder ("/", "..", control characters) is not an agent but a garbage line.

The mass-removal guard (SPEC sections 4 and 11) tells two kinds of removal apart. A removal
mark (`manage_agents -r` rewrites `001 agent01 IP KEY` as `001 !agent01 IP KEY`) is a
deliberate act of Wazuh's own tool and always passes, even for the last agent. A line that
vanishes (an empty, truncated, rebuilt or older file) is what the guard holds back. A mark
counts only when it is the old line itself with the mark added (same ID, name, IP and key):
a marked line that differs, like a line that disappeared, says the old agent's line is gone.
"""
from __future__ import absolute_import, division, print_function

import collections
import errno
import os
import re
import shutil
import stat
import time

from wazuh_cluster import compat
from wazuh_cluster.errors import ClusterError

ACTIVE_SECONDS = 1830  # 3 * NOTIFY_TIME (600) + 30, as Wazuh 3.0's agent status
BACKUP_MODE = 0o750
MAX_BACKUP_SUFFIX = 99  # Wazuh gives up after -099 too
FEW_APPENDED = 4      # only_appended_new_ids: up to this many IDs, searched for in the text
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_ID_RE = re.compile(u"^[0-9]{1,8}$")
_NAME_RE = re.compile(u"^[A-Za-z0-9._-]{1,128}$")
_IP_RE = re.compile(u"^(any|[0-9A-Fa-f.:]{2,45}(/[0-9]{1,3})?)$")
_REMOVED_MARKS = u"!#"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

Agent = collections.namedtuple("Agent", ("id", "name", "ip", "key", "removed"))


class ClientKeys(collections.OrderedDict):
    """id -> Agent in file order; `skipped` counts the non-blank lines that are no agent;
    `marks` holds every marked line as (id, name, ip, key), duplicates and all."""

    def __init__(self, *args, **kwargs):
        collections.OrderedDict.__init__(self, *args, **kwargs)
        self.skipped = 0
        self.marks = set()

    def active(self):
        """The agents not marked removed."""
        return [agent for agent in self.values() if not agent.removed]


def parse_client_keys(text):
    """Parse client.keys text -> ClientKeys (an OrderedDict id -> Agent, plus .skipped).

    Agent(id, name, ip, key, removed): `name` without the "!"/"#" mark, `removed` True when
    it had one. Blank lines are ignored; lines that are not `ID NAME IP KEY` with a safe ID
    (digits), name ([A-Za-z0-9._-], not "." or "..") and IP ("any", an address, optionally
    /prefix) are skipped and counted. A repeated ID: the later line wins, except that a
    marked line never hides an active one (Wazuh skips marked lines when it looks an ID up,
    and reuses the ID of a removed agent for a new one).
    """
    keys = ClientKeys()
    for line in compat.to_text(text, errors="replace").splitlines():
        fields = line.split()
        if not fields:
            continue
        agent = _parse_line(fields)
        if agent is None:
            keys.skipped += 1
            continue
        if agent.removed:
            keys.marks.add(agent[:4])
            if agent.id in keys and not keys[agent.id].removed:
                continue
        keys[agent.id] = agent
    return keys


def _parse_line(fields):
    if len(fields) != 4:
        return None
    agent_id, name, ip, key = fields
    removed = name[:1] in _REMOVED_MARKS
    name = name.lstrip(_REMOVED_MARKS)
    if not (_ID_RE.match(agent_id) and _NAME_RE.match(name) and _IP_RE.match(ip)):
        return None
    if name in (u".", u".."):
        return None
    return Agent(agent_id, name, ip, key, removed)


def removed_agents(old_text, new_text):
    """Agents active in `old_text` and gone from `new_text` (line gone, or marked removed).

    An ID that comes back with another name or IP is the old agent gone too (its files carry
    the old NAME-IP); a new key alone is the same agent. In file order of the old text.
    """
    if only_appended_new_ids(old_text, new_text):
        return []
    return _removed(parse_client_keys(old_text), parse_client_keys(new_text))


def only_appended_new_ids(old_text, new_text):
    """True when `new_text` is `old_text` plus whole lines whose IDs no old line starts with:
    then no agent left (parse_client_keys decides an agent from the lines of its ID only).

    The common change (manage_agents -a appends an agent) then costs a scan of the text, not
    two parses of it: 100 000 lines took 0.6 s of CPU on 3.13 (1.2 s on 2.7) per parse, and
    a client parsed old and new twice for every agent added on the master.
    Bytes (both) are compared as bytes first (_only_appended_bytes).
    """
    if isinstance(old_text, compat.binary_type) and isinstance(new_text, compat.binary_type):
        fast = _only_appended_bytes(old_text, new_text)
        if fast is not None:
            return fast
    old_text = compat.to_text(old_text, errors="replace")
    new_text = compat.to_text(new_text, errors="replace")
    if not new_text.startswith(old_text) or (old_text and not old_text.endswith(u"\n")):
        return False
    added = _first_fields(new_text[len(old_text):])
    if len(added) <= FEW_APPENDED:
        # An ID that is nowhere in the old text is no old line's (a fast scan in C); only one
        # found somewhere (inside a key, say) needs the old lines split.
        added = set(agent_id for agent_id in added if agent_id in old_text)
    # The old lines split once, not searched once per appended line: a first sync appends
    # 100 000 lines to an empty file, a catch-up thousands to a big one (each search scanned
    # it all: minutes of CPU on every client). Lines as parse_client_keys splits them.
    return not added or added.isdisjoint(_first_fields(old_text))


def _only_appended_bytes(old, new):
    """only_appended_new_ids of two byte strings without decoding 9.4 MB of client.keys
    twice (a client checked each appended agent that way, with 10 clients on 2 cores): True
    or False when the bytes decide, None when the text must (non-ASCII or many new IDs).

    An ASCII ID is in the decoded text exactly where it is in the bytes (UTF-8 decoding with
    replacement keeps every ASCII byte and makes none), and a line break of the bytes is one
    of the text: a found ID is looked at in the lines around it only.
    """
    if not new.startswith(old) or (old and not old.endswith(b"\n")):
        return False
    added = _first_fields(compat.to_text(new[len(old):], errors="replace"))
    if len(added) > FEW_APPENDED:
        return None
    for agent_id in added:
        try:
            needle = agent_id.encode("ascii")
        except UnicodeError:
            return None
        at = old.find(needle)
        while at >= 0:
            start = old.rfind(b"\n", 0, at) + 1
            end = old.find(b"\n", at)
            lines = compat.to_text(old[start:len(old) if end < 0 else end], errors="replace")
            if agent_id in _first_fields(lines):
                return False
            at = -1 if end < 0 else old.find(needle, end)
    return True


def _first_fields(text):
    """The first field of every non-blank line of `text` (what parse_client_keys takes for
    the ID)."""
    return set(fields[0] for fields in (line.split(None, 1) for line in text.splitlines())
               if fields)


def _removed(old, new):
    gone = []
    for agent in old.active():
        now = new.get(agent.id)
        if now is None or now.removed or (now.name, now.ip) != (agent.name, agent.ip):
            gone.append(agent)
    return gone


def _split_removed(old, new):
    """(marked, vanished): the agents of _removed(old, new), by how they left."""
    marked, vanished = [], []
    for agent in _removed(old, new):
        (marked if agent[:4] in new.marks else vanished).append(agent)
    return marked, vanished


class RemovalGuard(object):
    """Holds back a client.keys change whose agent lines vanish en masse (SPEC 4 and 11).

    A master reinstalled or restored with an empty client.keys must not wipe every client's
    agents. Agents marked removed (`!`/`#`, Wazuh's manage_agents -r) always pass. Lines that
    vanished are held for an operator (cluster_control --confirm-removals) when the change
    leaves no active agent, or when they are more than `max_ratio` of the active agents.
    """

    def __init__(self, max_ratio):
        self.max_ratio = float(max_ratio)

    def check(self, old_text, new_text):
        """(ok, message): ok False means hold the change back; message is one line.

        The message is empty when nothing is removed.
        """
        if only_appended_new_ids(old_text, new_text):
            return True, ""
        old, new = parse_client_keys(old_text), parse_client_keys(new_text)
        before = len(old.active())
        marked, vanished = _split_removed(old, new)
        gone = len(marked) + len(vanished)
        if vanished and not new.active():
            return False, ("client.keys change held back: it removes all %d agents (%d line(s) "
                           "gone without a removal mark, 0 active left); run cluster_control "
                           "--confirm-removals to apply it" % (before, len(vanished)))
        if len(vanished) > self.max_ratio * before:
            return False, ("client.keys change held back: the lines of %d of %d agents are "
                           "gone without a removal mark (more than %g%%); run cluster_control "
                           "--confirm-removals to apply it"
                           % (len(vanished), before, self.max_ratio * 100))
        if gone:
            return True, ("client.keys change removes %d of %d agents (%d marked removed)"
                          % (gone, before, len(marked)))
        return True, ""


# -- names and status -------------------------------------------------------------------------

def plain_ip(ip):
    """An agent IP as it appears in file names: "any" stays, a CIDR suffix is dropped."""
    return ip.split(u"/", 1)[0]


def agent_info_name(agent):
    """The agent-info file name of an agent: NAME-IP ("web01-10.0.0.5", "web01-any")."""
    return u"%s-%s" % (agent.name, plain_ip(agent.ip))


def _agent_table(agent):
    """(name inside the backup folder, path relative to home) of each file Wazuh drops."""
    ip = plain_ip(agent.ip)
    location = u"(%s) %s" % (agent.name, ip)  # analysisd's "(NAME) IP" location
    return (
        (u"agent-info", u"queue/agent-info/" + agent_info_name(agent)),
        (u"syscheck", u"queue/syscheck/%s->syscheck" % location),
        (u"syscheck.cpt", u"queue/syscheck/.%s->syscheck.cpt" % location),
        (u"syscheck-registry", u"queue/syscheck/%s->syscheck-registry" % location),
        (u"syscheck-registry.cpt", u"queue/syscheck/.%s->syscheck-registry.cpt" % location),
        (u"rootcheck", u"queue/rootcheck/%s->rootcheck" % location),
        (u"agent-group", u"queue/agent-groups/" + agent.id),
        (u"rids", u"queue/rids/" + agent.id),
    )


def agent_files(home, agent):
    """Absolute paths of the files Wazuh 3.0 drops for a removed agent (they may not exist).

    queue/agent-info/NAME-IP, queue/syscheck/(NAME) IP->syscheck, its hidden checkpoint
    ".(NAME) IP->syscheck.cpt", "(NAME) IP->syscheck-registry" and
    ".(NAME) IP->syscheck-registry.cpt", queue/rootcheck/(NAME) IP->rootcheck,
    queue/agent-groups/ID, queue/rids/ID.
    """
    return [_abs(home, rel) for _, rel in _agent_table(agent)]


def _abs(home, rel):
    return os.path.join(compat.native_str(home), *[compat.native_str(p) for p in rel.split("/")])


def agent_status(st, now):
    """Status from the agent-info's os.stat result (None: no file) and epoch seconds `now`.

    "Never connected" without a file; a keepalive (mtime) at most 1830 s old is "Active",
    or "Pending" for an empty file (the agent only said it started); older "Disconnected".
    Pure; given a path instead of a stat result it is agent_status_at(path, now).
    """
    if isinstance(st, compat.string_types):
        return agent_status_at(st, now)
    if st is None:
        return "Never connected"
    if now - compat.stat_mtime_ns(st) / 1e9 > ACTIVE_SECONDS:
        return "Disconnected"
    if st.st_size == 0:
        return "Pending"
    return "Active"


def agent_status_at(path, now):
    """agent_status of the file at `path` (lstat; a non-regular file counts as none)."""
    try:
        st = os.lstat(path)
    except OSError:
        return agent_status(None, now)
    return agent_status(st if stat.S_ISREG(st.st_mode) else None, now)


# -- backup and removal -----------------------------------------------------------------------

def backup_folder_name(home, agent, now):
    """backup/agents/YYYY/Mon/DD/ID-NAME-IP (local time, English month) as an absolute path."""
    when = time.localtime(now)
    return os.path.join(compat.native_str(home), "backup", "agents", "%04d" % when.tm_year,
                        MONTHS[when.tm_mon - 1], "%02d" % when.tm_mday,
                        compat.native_str(u"%s-%s-%s" % (agent.id, agent.name,
                                                         plain_ip(agent.ip))))


def backup_and_remove(home, agent, now, log):
    """Back up the removed agent's files, durably, then remove them; return the backup folder.

    Returns None when the agent has none of its files (nothing to back up, no folder made).
    The folder gets a -002, -003... suffix when it exists already. If anything of the backup
    fails, nothing is removed: the partial backup is deleted, the error logged and a
    ClusterError(code="backup") raised. A file that cannot be removed after a good backup is
    logged and left.
    """
    present = []
    for backup_name, rel in _agent_table(agent):
        path = _abs(home, rel)
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise _backup_error(log, agent, "cannot stat %s: %s" % (rel, exc.strerror))
        if not stat.S_ISREG(st.st_mode):
            log.warning("agent %s: %s is not a regular file; left alone", agent.id, rel)
            continue
        present.append((backup_name, rel, path))
    if not present:
        return None
    folder = None
    try:
        folder = _make_backup_folder(home, agent, now)
        for backup_name, rel, path in present:
            _copy_durably(path, os.path.join(folder, compat.native_str(backup_name)))
        _fsync_folder(folder)
    except (OSError, IOError) as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise _backup_error(log, agent, "%s: %s" % (getattr(exc, "filename", None) or "backup",
                                                    exc.strerror or exc))
    touched = set()
    for backup_name, rel, path in present:
        try:
            os.unlink(path)
            touched.add(os.path.dirname(path))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.error("agent %s: cannot remove %s after its backup: %s", agent.id, rel,
                          exc.strerror)
    for path in sorted(touched):
        try:
            _fsync_folder(path)
        except OSError as exc:
            log.warning("cannot fsync %s: %s", path, exc.strerror)
    log.info("agent %s (%s) removed; its files were backed up in %s", agent.id,
             agent_info_name(agent), folder)
    return folder


def clean_removed_agents(home, old_text, new_text, now, log):
    """backup_and_remove every agent of removed_agents(old_text, new_text).

    For a client that just applied a client.keys from its master (after RemovalGuard.check
    let it through). Returns [(Agent, backup folder or None, ClusterError or None)]; one
    agent's failed backup does not stop the others (its files stay, ready for a retry).
    """
    results = []
    for agent in removed_agents(old_text, new_text):
        try:
            results.append((agent, backup_and_remove(home, agent, now, log), None))
        except ClusterError as err:
            results.append((agent, None, err))
    return results


def _backup_error(log, agent, detail):
    message = ("agent %s (%s): backup failed, its files are kept: %s"
               % (agent.id, agent_info_name(agent), detail))
    log.error("%s", message)
    return ClusterError(message, code="backup")


def _make_backup_folder(home, agent, now):
    base = backup_folder_name(home, agent, now)
    _makedirs(os.path.dirname(base))
    for count in range(1, MAX_BACKUP_SUFFIX + 1):
        candidate = base if count == 1 else "%s-%03d" % (base, count)
        try:
            os.mkdir(candidate, BACKUP_MODE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue
            raise
        os.chmod(candidate, BACKUP_MODE)
        _fsync_folder(os.path.dirname(candidate))
        return candidate
    raise OSError(errno.EEXIST, "every suffix up to -%03d is taken" % MAX_BACKUP_SUFFIX, base)


def _makedirs(path):
    """Create missing folders (0750), fsync'ing each new folder's parent."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path, BACKUP_MODE)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        return
    os.chmod(path, BACKUP_MODE)
    _fsync_folder(parent)


def _copy_durably(source, target):
    """Copy content, mode and times; fsync the copy. Symlinks are not followed."""
    src = os.open(source, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        st = os.fstat(src)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                      0o600)
        try:
            while True:
                chunk = os.read(src, 1 << 20)
                if not chunk:
                    break
                view = 0
                while view < len(chunk):
                    view += os.write(dst, chunk[view:])
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            compat.set_mtime_ns(target, compat.stat_mtime_ns(st))  # before the fsync
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _fsync_folder(path):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
