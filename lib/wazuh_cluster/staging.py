"""Where the receiver's temporary files live: never under a name that a Wazuh daemon reads.

The plan (SPEC sections 4 and 11). wazuh-modulesd reads every new name in queue/agent-groups
as an agent ID, remoted scans etc/shared and its group folders, the framework lists
queue/agent-info: a temporary file in any of them is misread. So a received file is written
in a staging folder of ours (PREFIX/queue/cluster-staging, created at start like our other
folders, then kept at mode 0700) and renamed from there over its target: the target folder
only ever shows final names, each appearing at once with its whole content.

rename(2) does not cross file systems. The staging folder serves a target folder only when
both have the same st_dev; otherwise (an etc/shared on a disk of its own, a staging folder
that cannot be created or is not ours) the temporary file is written in the target folder
under the name Wazuh 3.0's own cluster used, `NAME.tmp.cluster` (modulesd reads
`001.tmp.cluster` as agent 001), a name that is never synchronised (pathrules.TEMP_PATTERN).
A rename that fails with EXDEV although the devices match (a bind mount) switches that folder
to the in-place name for the rest of the process: that file fails and travels again at the
next round. Each folder served in place is logged once.

Crash cleanup at start (SPEC section 4): every file in the staging folder is ours and goes;
in the item folders, `NAME.tmp.cluster` files go, and the `.NAME.RANDOM.tmp` files that
versions before the staging folder left next to their targets. Except held files
(`.NAME.RANDOM.held.tmp.cluster`, held_name): a local edit that a rename replaced and that
could not be backed up (localedits) waits under that name for its backup, never removed here.
"""
from __future__ import absolute_import, division, print_function

import binascii
import errno
import os
import re
import stat

from wazuh_cluster import compat, fsops
from wazuh_cluster.pathrules import MAX_COMPONENT, TEMP_SUFFIX, escape

STAGING_MODE = 0o700
MAX_NOTED_FOLDERS = 256
_RANDOM_HEX = 12
# In the staging folder: NAME.RANDOM.tmp, NAME cut short to fit in MAX_COMPONENT.
_STAGED_OVERHEAD = len(".") + _RANDOM_HEX + len(".tmp")
# Versions before the staging folder: .NAME.RANDOM.tmp next to the target.
_LEGACY_RE = re.compile(u"^\\.(.+)\\.[0-9a-f]{12}\\.tmp$")
_LEGACY_OVERHEAD = len(".") + len(".") + _RANDOM_HEX + len(".tmp")
HELD_SUFFIX = ".held" + TEMP_SUFFIX
_HELD_OVERHEAD = len(".") + len(".") + _RANDOM_HEX + len(HELD_SUFFIX)


def staged_name(base):
    """A fresh name in the staging folder for a file whose final base name is `base`."""
    random = binascii.hexlify(os.urandom(_RANDOM_HEX // 2)).decode("ascii")
    return base[:MAX_COMPONENT - _STAGED_OVERHEAD] + "." + random + ".tmp"


def side_name(base):
    """A fresh name, next to a temporary file, for a file its rename replaces
    (localedits: kept for a check, then removed): `.NAME.RANDOM.tmp`, a name the crash
    cleanup removes in the staging folder and in the item folders alike."""
    random = binascii.hexlify(os.urandom(_RANDOM_HEX // 2)).decode("ascii")
    return "." + base[:MAX_COMPONENT - _LEGACY_OVERHEAD] + "." + random + ".tmp"


def held_name(base):
    """A fresh name, in the same folder, for a replaced local edit whose backup failed
    (localedits): `.NAME.RANDOM.held.tmp.cluster`, never synchronised (pathrules.TEMP_PATTERN)
    and never removed by the crash cleanup."""
    random = binascii.hexlify(os.urandom(_RANDOM_HEX // 2)).decode("ascii")
    return "." + base[:MAX_COMPONENT - _HELD_OVERHEAD] + "." + random + HELD_SUFFIX


def in_place_name(base):
    """Wazuh 3.0's temporary name, next to the target: `base.tmp.cluster`."""
    return base[:MAX_COMPONENT - len(TEMP_SUFFIX)] + TEMP_SUFFIX


def _stem_of(name):
    """The final base name (maybe cut short) a leftover temporary name stands for, or None."""
    if name.endswith(TEMP_SUFFIX) and len(name) > len(TEMP_SUFFIX):
        return name[:-len(TEMP_SUFFIX)], MAX_COMPONENT - len(TEMP_SUFFIX)
    match = _LEGACY_RE.match(name)
    if match is not None:
        return match.group(1), MAX_COMPONENT - _LEGACY_OVERHEAD
    return None, None


def _held(name):
    """True for a held file's name (held_name), text or bytes."""
    return compat.to_text(name, errors="replace").endswith(HELD_SUFFIX)


def _temp_of(name, base):
    """True when `name` is one of our temporary names for the final base name `base`."""
    stem, cut = _stem_of(name)
    if stem is None:
        return False
    return stem == base or (len(stem) == cut and base.startswith(stem))


class Staging(object):
    """The staging folder `folder` and the choice of a temporary name per target folder.

    `log` is a logging.Logger. Not thread-safe: the Receiver uses it under its lock.
    """

    def __init__(self, folder, log):
        self.folder = compat.native_str(os.path.abspath(folder))
        self.log = log
        self.dev = None
        self.cross = set()       # target folders whose rename from here failed with EXDEV
        self._noted = set()      # target folders already logged as served in place
        self._unusable = None    # the reason last logged for not using the folder

    def check(self):
        """(Re)verify the staging folder, creating it when missing; its st_dev or None.

        Called at start and by each batch that writes a file (one lstat): a folder removed
        by hand comes back, one replaced by a symlink or by another user's folder is not used.
        """
        try:
            st = self._lstat_or_create()
            if not stat.S_ISDIR(st.st_mode):
                raise _Unusable("it is %s" % fsops.kind(st.st_mode))
            if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
                raise _Unusable("it belongs to uid %d, not to this daemon" % st.st_uid)
            if stat.S_IMODE(st.st_mode) != STAGING_MODE:
                self._tighten()
        except _Unusable as exc:
            return self._not_usable(exc.args[0])
        except OSError as exc:
            return self._not_usable(fsops.why(exc))
        if self._unusable is not None:
            self.log.info("staging folder %s usable again", escape(self.folder))
            self._unusable = None
        self.dev = st.st_dev
        return self.dev

    def _lstat_or_create(self):
        try:
            return os.lstat(self.folder)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        try:
            os.mkdir(self.folder, STAGING_MODE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return os.lstat(self.folder)

    def _tighten(self):
        # By descriptor: a name swapped for a symlink meanwhile is not followed.
        fd = fsops.open_folder(self.folder)
        try:
            os.fchmod(fd, STAGING_MODE)
        finally:
            os.close(fd)

    def _not_usable(self, reason):
        self.dev = None
        if reason != self._unusable:
            self.log.warning("staging folder %s not usable (%s): temporary files are written "
                             "next to their targets as NAME%s", escape(self.folder), reason,
                             TEMP_SUFFIX)
            self._unusable = reason
        return None

    def temp_path(self, folder, dev, base):
        """(path of a new temporary file for target `folder`/`base`, True when staged here).

        `dev` is the st_dev of the target folder, from the receiver's walk.
        """
        if self.dev is not None and dev == self.dev and folder not in self.cross:
            return os.path.join(self.folder, compat.native_str(staged_name(base))), True
        if folder not in self._noted and len(self._noted) < MAX_NOTED_FOLDERS:
            self._noted.add(folder)
            why = "a rename from the staging folder failed" if folder in self.cross else \
                "it is not on the staging folder's file system"
            self.log.info("temporary files for %s are written in place as NAME%s: %s",
                          escape(folder), TEMP_SUFFIX, why)
        return os.path.join(folder, compat.native_str(in_place_name(base))), False

    def cross_device(self, folder):
        """A rename from the staging folder into `folder` failed with EXDEV."""
        if len(self.cross) < MAX_NOTED_FOLDERS:
            self.cross.add(folder)

    # -- crash cleanup -------------------------------------------------------------------------

    def cleanup(self, home, items):
        """Remove every leftover temporary file (staging folder and item folders); the count.

        Call it at start, before any batch: a batch in progress owns such files.
        """
        removed = self._clean_staging()
        for item in items:
            parts = [compat.native_str(p) for p in item.path.split("/")]
            if item.kind == "file":
                folder, only, deep = parts[:-1], parts[-1], False
            else:
                folder, only, deep = parts, None, item.recursive
            path = _existing_folder(home, folder)
            if path is not None:
                removed += self._clean_folder(path, only, deep)
        return removed

    def _clean_staging(self):
        removed = 0
        if self.check() is None:
            return 0
        for entry in self._entries(self.folder):
            if self._is_folder(entry) or _held(entry.name):
                continue  # never made by us: left for an operator to look at
            removed += self._unlink(entry.path)
        return removed

    def _clean_folder(self, path, only, deep):
        """Remove our temporary files in `path` (and below when `deep`).

        Entries are taken one at a time and a name is matched before anything is stat-ed:
        queue/agent-info may hold 100 000 files, and listing them all with their stat results
        at start would double the daemon's memory.
        """
        removed = 0
        for entry in self._entries(path):
            name = compat.to_text(entry.name, errors="replace")
            stem, _cut = _stem_of(name)
            if stem is None or _held(name):
                if deep and self._is_folder(entry):
                    removed += self._clean_folder(entry.path, only, deep)
                continue
            if only is not None and not _temp_of(name, compat.to_text(only)):
                continue
            try:
                if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                    continue
            except OSError:
                continue
            removed += self._unlink(entry.path)
        return removed

    def _entries(self, path):
        try:
            return compat.scandir(path)
        except OSError as exc:
            self.log.warning("cannot list %s: %s", escape(path), fsops.why(exc))
            return ()

    def _unlink(self, path):
        try:
            os.unlink(path)
            return 1
        except OSError as exc:
            if exc.errno not in fsops.GONE:
                self.log.warning("cannot remove %s: %s", escape(path), fsops.why(exc))
            return 0

    @staticmethod
    def _is_folder(entry):
        try:
            return entry.is_dir(follow_symlinks=False)
        except OSError:
            return False


class _Unusable(Exception):
    """The staging folder exists but must not be used (the reason is args[0])."""


def _existing_folder(home, parts):
    """Path of home/parts when every component is a real folder (no symlink), else None."""
    path = home
    for part in parts:
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except OSError:
            return None
    return path
