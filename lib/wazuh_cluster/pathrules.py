"""Receiving rules for file names and times from a peer (SPEC section 4); pure: no system call.

`check_name` splits a name on "/" and checks each component before anything touches the disk;
`item_for` finds the item the name falls in and checks that the sender's role may write it;
`check_mtime` and `clamp_mtime` bound the modification times a peer may give a file.
"""
from __future__ import absolute_import, division, print_function

import fnmatch
import re

from wazuh_cluster import compat, text
from wazuh_cluster.errors import PathRefused

ROLES = ("master", "client")
MAX_COMPONENT = 255
MAX_PATH = 1024
# Python 2.7 sets and reads mtimes through floats (about a microsecond of precision): without
# a slack a full round would re-send the same touch forever.
MTIME_SLACK_NS = 2000
ESCAPE_MAX = 160
# A time no file system stores: beyond signed 64-bit nanoseconds (year 2262).
MAX_MTIME_NS = (1 << 63) - 1
# The receiver's temporary files where they cannot be staged away from the target's folder
# carry Wazuh 3.0's own cluster name (SPEC section 11); such names are never synchronised.
TEMP_SUFFIX = ".tmp.cluster"
TEMP_PATTERN = "*" + TEMP_SUFFIX

# \Z, not $: "$" also matches before a final newline ("x\n" would pass).
_GOOD_NAME = re.compile(u"\\A[\\x20-\\x5b\\x5d-\\x7e]+\\Z")


# -- names ------------------------------------------------------------------------------------

def check_name(name):
    """Split a peer's file name into its components, or raise PathRefused(reason).

    Pure: no system call. The name must be text (2.7 str is taken when it is ASCII), relative,
    printable ASCII without backslash, with no empty, "." or ".." component, each component
    at most 255 bytes and the whole at most 1024.
    """
    if isinstance(name, compat.binary_type) and not isinstance(name, compat.text_type):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise PathRefused("name is not ASCII")
    if not isinstance(name, compat.text_type):
        raise PathRefused("name is not text")
    if not name:
        raise PathRefused("empty name")
    if len(name) > MAX_PATH:
        raise PathRefused("name longer than %d bytes" % MAX_PATH)
    if not _GOOD_NAME.match(name):
        raise PathRefused(_bad_character(name))
    if name.startswith(u"/"):
        raise PathRefused("absolute name")
    parts = name.split(u"/")
    for part in parts:
        if not part:
            raise PathRefused("empty component")
        if part in (u".", u".."):
            raise PathRefused("'%s' component" % part)
        if len(part) > MAX_COMPONENT:
            raise PathRefused("component longer than %d bytes" % MAX_COMPONENT)
    return parts


def _bad_character(name):
    for char in name:
        code = ord(char)
        if code == 0:
            return "NUL character"
        if code < 0x20 or code == 0x7f:
            return "control character 0x%02x" % code
        if code > 0x7f:
            return "non-ASCII character"
        if char == u"\\":
            return "backslash"
    return "bad character"  # pragma: no cover - the regex and this loop agree


def escape(name, limit=ESCAPE_MAX):
    """A name as a quoted, printable-ASCII string of bounded length, safe for a log line.

    Takes anything a peer may have sent (text, bytes, other types); never raises. The rule is
    text.quote's, the one every module uses.
    """
    return text.quote(name, limit)


# -- times ------------------------------------------------------------------------------------

def check_mtime(mtime_ns):
    """Raise PathRefused unless `mtime_ns` is whole nanoseconds from 1970 to 2262.

    Before 1970, a bool, a float or a number beyond what a file system stores is not a time
    any honest peer read from a file.
    """
    if isinstance(mtime_ns, bool) or not isinstance(mtime_ns, compat.integer_types):
        raise PathRefused("bad mtime_ns field")
    if not 0 <= mtime_ns <= MAX_MTIME_NS:
        raise PathRefused("mtime_ns out of range (before 1970 or after 2262)")


def clamp_mtime(mtime_ns, now_ns, max_future_ns):
    """(mtime to apply, True when clamped): a time beyond now + max_future_ns becomes now.

    Wall-clock data compared with the wall clock: a peer's clock ahead of ours, or an insider
    claiming year 2100 so that "newest keepalive wins" keeps an agent on it forever, gets our
    present instead; the next honest report wins again.
    """
    if mtime_ns > now_ns + max_future_ns:
        return now_ns, True
    return mtime_ns, False


def in_future(mtime_ns, now_ns, max_future_ns):
    """True when a local file's mtime lies beyond now + max_future_ns (never trusted to win)."""
    return mtime_ns > now_ns + max_future_ns


# -- items ------------------------------------------------------------------------------------

def owner(parts, items):
    """(item, components below it) of the item holding `parts`, or (None, None).

    The owner is the item with the longest path that `parts` starts with, as for the scanner
    (nested items keep their own rules). A file item holds its exact path; a dir item holds
    the files right below it, or at any depth when recursive.
    """
    best, best_len = None, -1
    for item, root in _roots(items):
        if best_len < len(root) <= len(parts) and parts[:len(root)] == root:
            best, best_len = item, len(root)
    if best is None:
        return None, None
    rest = parts[best_len:]
    if best.kind == "file":
        return (best, rest) if not rest else (None, None)
    if not rest or (not best.recursive and len(rest) != 1):
        return None, None
    return best, rest


_ROOTS = {}


def _roots(items):
    """[(item, its path's components)]: split once per items table, not once per name."""
    found = _ROOTS.get(id(items))
    if found is None or found[0] is not items:
        found = (items, [(item, item.path.split("/")) for item in items])
        if len(_ROOTS) > 16:  # tables are few and long-lived; a test makes many
            _ROOTS.clear()
        _ROOTS[id(items)] = found
    return found[1]


def _check_roles(item, sender_role, receiver_role):
    if sender_role not in ROLES or receiver_role not in ROLES:
        raise ValueError("roles must be 'master' or 'client'")
    if receiver_role == "master" and sender_role == "client" and item.source == "master":
        raise PathRefused("master-owned file pushed by a client")
    if sender_role == receiver_role:
        raise PathRefused("a %s does not take files from another %s" % (receiver_role,
                                                                        sender_role))
    if item.source != sender_role:
        raise PathRefused("item '%s' is written by the %s, not by a %s"
                          % (item.name, item.source, sender_role))


def _check_excluded(rest, exclude):
    matches = _excluded_re(exclude)
    for part in rest:
        if matches is not None and matches(part):
            pattern = [p for p in exclude if fnmatch.fnmatchcase(part, p)][0]
            raise PathRefused("excluded name ('%s' matches '%s')" % (part, pattern))


_EXCLUDED_RE = {}


def _excluded_re(exclude):
    """One compiled match of all the patterns (fnmatchcase's rules): a keepalive batch
    checks thousands of names against them, one pattern at a time cost a tenth of the
    master's time for it. Few distinct pattern lists exist (the items table's)."""
    key = tuple(exclude)
    if key not in _EXCLUDED_RE:
        _EXCLUDED_RE[key] = re.compile(u"|".join(u"(?:%s)" % fnmatch.translate(p)
                                                 for p in key)).match if key else None
    return _EXCLUDED_RE[key]


def locate(name, items, sender_role, receiver_role, exclude):
    parts = check_name(name)
    item, rest = owner(parts, items)
    if item is None:
        raise PathRefused("not inside any item")
    _check_roles(item, sender_role, receiver_role)
    if item.kind == "dir":
        # Like the scanner: a pattern applies to folders below the item root too.
        _check_excluded(rest, exclude)
    return item, parts


class Locator(object):
    """locate() for the many names of a few folders (a keepalive batch: 2 000 agent-info
    files of one folder): what depends on the folder is checked once, each name's last
    component alone per name, by one regular expression match per name (folder()). Same
    answers as locate(); anything unusual goes to locate() itself, which gives the reason of
    a refusal. Pure: no system call.

    Why the split holds: the owner of folder/base is the item with the longest root that
    begins the name; a root as long as the whole name is an item's exact path (refused by
    the folder's expression), every shorter one begins the folder; the rest below the item
    is the folder's rest plus base, checked for exclusion separately. Kept per folder for
    the caller's lifetime (a batch): at most MAX_FOLDERS of a peer's folders.
    """
    MAX_FOLDERS = 64

    def __init__(self, items, sender_role, receiver_role, exclude):
        self.args = (items, sender_role, receiver_role, exclude)
        self.paths = frozenset(item.path for item in items)
        self.folders = {}

    def locate(self, name):
        """(item, parts) as locate() gives them, or PathRefused."""
        if isinstance(name, compat.text_type):
            item = self.split(name)
            if item:
                return item, name.split(u"/")
        return locate(name, *self.args)

    def split(self, name):
        """The item locate() gives a text `name` when the per-folder check proves it (its
        folder and last component then being name.rpartition(u"/")'s), else None: ask
        locate(), which decides and gives the reason."""
        folder, _, base = name.rpartition(u"/")
        found = self.folder(folder)
        return found[0] if found and found[1](base) else None

    def folder(self, folder):
        """(item, match) for the files right in `folder`: match(base), a compiled
        expression's, is true exactly when locate() gives folder/base that item; or False
        when locate() decides every name of that folder (not in an item the sender writes,
        or beyond MAX_FOLDERS). For a keepalive batch's loop (touches.py): one C call per
        name checks its last component (characters, length, ".", "..", the exclusion
        patterns, an item's exact path)."""
        found = self.folders.get(folder)
        if found is None:
            if len(self.folders) >= self.MAX_FOLDERS:
                return False
            item = self._folder(folder)
            found = self.folders[folder] = item and (item, self._base_re(folder))
        return found

    def _base_re(self, folder):
        """The match of a last component that locate() takes in `folder`."""
        exclude = self.args[3]
        taken = [path.rpartition(u"/")[2] for path in self.paths
                 if path.rpartition(u"/")[0] == folder]
        refused = [u"\\.\\.?\\Z"] + [re.escape(base) + u"\\Z" for base in taken] + \
            [u"(?:%s)" % fnmatch.translate(pattern) for pattern in exclude]
        longest = min(MAX_COMPONENT, MAX_PATH - len(folder) - 1)
        if longest < 1:
            return re.compile(u"(?!)").match  # no room left for a name
        return re.compile(u"(?!%s)[\\x20-\\x2e\\x30-\\x5b\\x5d-\\x7e]{1,%d}\\Z"
                          % (u"|".join(refused), longest)).match

    def _folder(self, folder):
        """The item whose files' folder is `folder`, or False (then locate() decides)."""
        items, sender_role, receiver_role, exclude = self.args
        try:
            parts = check_name(folder)
        except PathRefused:
            return False
        best, best_len = None, -1
        for item, root in _roots(items):
            if best_len < len(root) <= len(parts) and parts[:len(root)] == root:
                best, best_len = item, len(root)
        if best is None or best.kind != "dir" or \
                (not best.recursive and best_len != len(parts)):
            return False
        try:
            _check_roles(best, sender_role, receiver_role)
            _check_excluded(parts[best_len:], exclude)
        except PathRefused:
            return False
        return best


def item_for(name, items, sender_role, receiver_role, exclude=()):
    """The Item (config.Item) that a peer's file name falls in, or raise PathRefused.

    `sender_role`/`receiver_role` are "master" or "client". The item must be one the sender's
    role writes (item.source == sender_role); a client pushing a master-owned file to a master
    gets the reason "master-owned file pushed by a client" (record it `invalid`). `exclude`
    holds the fnmatch patterns of the items table; they apply to every component below a dir
    item's root (an explicit file item is never excluded).
    """
    return locate(name, items, sender_role, receiver_role, exclude)[0]
