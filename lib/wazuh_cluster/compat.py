"""Every difference between Python 2.7 and 3.x lives here (STYLE section 2)."""
from __future__ import absolute_import, division, print_function

import binascii
import functools
import hashlib
import os
import sys
import threading
import time

PY2 = sys.version_info[0] == 2
VERSION = "%d.%d.%d" % sys.version_info[:3]
# 3.9 and later build a string with escapes in place; before, from a list of its pieces
# (what protocol.json_cost charges for them)
JSON_PIECES = sys.version_info < (3, 9)

if PY2:  # pragma: no cover - exercised by the 2.7 run
    import SocketServer as socketserver  # noqa: F401
    import Queue as queue  # noqa: F401
    text_type = unicode  # noqa: F821
    binary_type = str
    string_types = (str, unicode)  # noqa: F821
    integer_types = (int, long)  # noqa: F821
    FileExistsError = OSError
    FileNotFoundError = OSError
    InterruptedError = OSError
    ConnectionError = OSError
    BrokenPipeError = OSError
    from itertools import imap  # noqa: F401 - map's lazy form on 2.7
else:
    import socketserver  # noqa: F401
    import queue  # noqa: F401
    text_type = str
    binary_type = bytes
    string_types = (str,)
    integer_types = (int,)
    import builtins as _builtins
    FileExistsError = _builtins.FileExistsError
    FileNotFoundError = _builtins.FileNotFoundError
    InterruptedError = _builtins.InterruptedError
    ConnectionError = _builtins.ConnectionError
    BrokenPipeError = _builtins.BrokenPipeError
    imap = map

def _ctypes_clock(clock_id):
    """A function returning clock_gettime(clock_id) in seconds (2.7 has no time.clock_gettime)."""
    import ctypes
    import ctypes.util

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    librt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
    clock_gettime = librt.clock_gettime
    clock_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
    ts = _Timespec()

    def _now():
        if clock_gettime(clock_id, ctypes.byref(ts)) != 0:
            raise OSError(ctypes.get_errno(), "clock_gettime failed")
        return ts.tv_sec + ts.tv_nsec * 1e-9
    return _now


try:
    monotonic = time.monotonic
except AttributeError:  # 2.7
    def monotonic():
        """Seconds from an arbitrary point, never going backwards (CLOCK_MONOTONIC)."""
        return _monotonic_27()

    def _monotonic_27():
        global _monotonic_27
        _monotonic_27 = _ctypes_clock(1)
        return _monotonic_27()

_LINUX_CLOCK_BOOTTIME = 7
if hasattr(time, "CLOCK_BOOTTIME"):
    def boottime():
        """Monotonic seconds that go on while the machine is suspended (election leases)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
elif hasattr(time, "clock_gettime") and sys.platform.startswith("linux"):
    def boottime():  # 3.6 has clock_gettime but not the CLOCK_BOOTTIME constant (3.7)
        """Monotonic seconds that go on while the machine is suspended (election leases)."""
        return time.clock_gettime(_LINUX_CLOCK_BOOTTIME)
elif PY2 and sys.platform.startswith("linux"):  # pragma: no cover - 2.7 run
    def boottime():
        """Monotonic seconds that go on while the machine is suspended (election leases)."""
        return _boottime_27()

    def _boottime_27():
        global _boottime_27
        _boottime_27 = _ctypes_clock(_LINUX_CLOCK_BOOTTIME)
        return _boottime_27()
else:
    boottime = monotonic


def to_bytes(value, encoding="utf-8"):
    """Text to bytes at the boundary; bytes pass through."""
    if isinstance(value, binary_type):
        return value
    return value.encode(encoding)


def to_text(value, encoding="utf-8", errors="strict"):
    """Bytes to text at the boundary; text passes through."""
    if isinstance(value, text_type):
        return value
    return value.decode(encoding, errors)


if hasattr(int, "from_bytes"):
    def uint_be(data):
        """The unsigned big-endian integer of some bytes."""
        return int.from_bytes(data, "big")
else:
    def uint_be(data):
        return int(binascii.hexlify(data), 16)


def native_str(value):
    """The interpreter's own str type (bytes on 2.7, text on 3.x)."""
    if PY2:
        return to_bytes(value)
    return to_text(value)


class DirEntry(object):
    """The part of os.DirEntry we use, for listdir+lstat on 2.7 (no inode(): os.listdir
    gives none). `prefix` is the folder's path with its trailing separator (an
    os.path.join per entry was a fifth of a listing)."""
    __slots__ = ("name", "path", "_st")

    def __init__(self, prefix, name):
        self.name = name
        self.path = prefix + name
        self._st = None

    def stat(self, follow_symlinks=False):
        if self._st is None:
            self._st = os.lstat(self.path)
        return self._st

    def is_dir(self, follow_symlinks=False):
        import stat
        return stat.S_ISDIR(self.stat().st_mode)

    def is_file(self, follow_symlinks=False):
        import stat
        return stat.S_ISREG(self.stat().st_mode)

    def is_symlink(self):
        import stat
        return stat.S_ISLNK(self.stat().st_mode)


class NameListing(object):
    """2.7's scandir(): os.listdir's `names`, iterated as DirEntry objects. Such a listing
    has no inodes, so a caller that only wants to know which known entries were replaced
    lstats its `names` in bulk first, then iterates `only()` the others."""
    __slots__ = ("path", "names")

    def __init__(self, path, names=None):
        self.path = path
        # listed here, so that a missing folder raises at the call
        self.names = os.listdir(path) if names is None else names

    def __iter__(self):
        prefix = os.path.join(self.path, "")
        return (DirEntry(prefix, name) for name in self.names)

    def only(self, names):
        """The same listing restricted to these of its names."""
        return NameListing(self.path, names)


def scandir(path):
    """Iterate a folder's entries without following symlinks: os.scandir on 3.x."""
    if hasattr(os, "scandir"):
        return os.scandir(path)
    return NameListing(path)


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _lstats_in(folder, names):
    """[lstat(name) for names in `folder`] by 2.7, which has no dir_fd: from inside the folder
    (chdir), back to the working folder after; the kernel walks no path per name (a 2.7
    master's full pass over 10 000 shared files every 10 s: 28-40 -> 18-22 ms). Only in a
    process of one thread (the internal daemon): for that while, relative names elsewhere
    would be resolved in `folder`. A folder not entered: the joined paths."""
    joined = imap(os.lstat, imap(os.path.join(folder, "").__add__, names))
    try:
        here = os.open(".", _DIR_FLAGS)  # a working folder we may not read: joined
    except OSError:
        return joined
    try:
        try:
            os.chdir(folder)
        except OSError:
            return list(joined)
        try:
            return list(imap(os.lstat, names))
        finally:
            os.fchdir(here)
    finally:
        os.close(here)


class FolderLstat(object):
    """lstat of names in one folder: `lstat(name)`. On 3.x relative to the folder's open
    descriptor (the kernel walks no path per call: 100 000 agent-info files in 0.30 s instead
    of 0.41 s); 2.7 joins the paths. close() (or `with`) closes the descriptor."""

    def __init__(self, folder, follow=True):
        self._fd = None
        self._folder = folder
        self._prefix = os.path.join(folder, "")
        if os.stat in getattr(os, "supports_dir_fd", ()) and \
                os.stat in getattr(os, "supports_follow_symlinks", ()):
            flags = _DIR_FLAGS
            if not follow:
                flags |= getattr(os, "O_NOFOLLOW", 0)
            try:
                self._fd = os.open(folder, flags)
            except OSError:
                pass  # a missing folder: every name is missing, as the joined paths say

    def lstat(self, name):
        if self._fd is None or u"/" in name:  # a path in a name: as joined, never absolute
            return os.lstat(self._prefix + name)
        return os.stat(name, dir_fd=self._fd, follow_symlinks=False)

    def base_lstat(self):
        """lstat(name) for names without a "/" (a folder's own entries), as one C call per
        name where it can be: a scanner's full pass makes 10 000 of them every 10 s, and the
        method above was a tenth of each."""
        if self._fd is None:
            prefix = self._prefix
            return lambda name: os.lstat(prefix + name)
        return functools.partial(os.stat, dir_fd=self._fd, follow_symlinks=False)

    def lstats(self, names):
        """An iterator of lstat(name) for names without a "/", looping in C (2.7 included: no
        Python call per name); the first failure raises OSError from the iteration (or, on
        2.7 in a process of one thread, from this call)."""
        if self._fd is None:
            if threading.active_count() == 1:
                return _lstats_in(self._folder, names)
            return imap(os.lstat, imap(self._prefix.__add__, names))
        return imap(functools.partial(os.stat, dir_fd=self._fd, follow_symlinks=False), names)

    def folder_stat(self):
        """The folder's own stat: of the descriptor the names are looked up in (an lstat of
        the path on 2.7, or when it could not be opened)."""
        if self._fd is None:
            return os.lstat(self._folder)
        return os.fstat(self._fd)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def set_cloexec(fd):
    """Close-on-exec for a descriptor (3.x does it by default; 2.7 does not)."""
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def stat_mtime_ns(st):
    """A file's mtime in integer nanoseconds (2.7 only has the float)."""
    ns = getattr(st, "st_mtime_ns", None)
    if ns is not None:
        return ns
    return int(round(st.st_mtime * 1e9))


def stat_ctime_ns(st):
    """A file's ctime in integer nanoseconds."""
    ns = getattr(st, "st_ctime_ns", None)
    if ns is not None:
        return ns
    return int(round(st.st_ctime * 1e9))


def set_mtime_ns(path, mtime_ns):
    """Set a file's atime and mtime from integer nanoseconds."""
    if hasattr(os, "utime") and not PY2:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    else:
        seconds = mtime_ns / 1e9
        os.utime(path, (seconds, seconds))


def hmac_compare(a, b):
    """Constant-time comparison (hmac.compare_digest exists from 2.7.7)."""
    import hmac
    return hmac.compare_digest(a, b)


# -- SHA-256 --------------------------------------------------------------------------------
# The 2.7 we run on has no OpenSSL hashlib (_hashlib needs OpenSSL 1.x): its builtin SHA-256
# is 3-8x slower than OpenSSL's and holds the GIL for the whole call. A 9.4 MB client.keys
# took 85-200 ms of it, during which no other thread of wazuh-clusterd ran (a 2.7 master's
# sessions stalled at every append), and the internal daemon spent three quarters of its time
# hashing it. cryptography (a run-time dependency anyway) reaches OpenSSL through cffi, which
# releases the GIL. Setting up one of its Hash objects costs ~100 us, so small inputs stay
# with hashlib: the first SHA256_SMALL bytes are hashed there and kept, and handed over when
# more come.

SHA256_SMALL = 64 << 10
_BIG_SHA256 = []  # the factory of large inputs' hash objects, once loaded


def _openssl_sha256():
    """A factory of cryptography's SHA-256 Hash objects (hashlib's if it cannot be had)."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography 3.3 warns on import under 2.7
            from cryptography.hazmat.backends import default_backend
            from cryptography.hazmat.primitives import hashes
    except ImportError:  # pragma: no cover - cryptography is a run-time dependency
        return hashlib.sha256
    backend = default_backend()
    return lambda: hashes.Hash(hashes.SHA256(), backend=backend)


class Sha256(object):
    """hashlib.sha256's API (update, digest, hexdigest), over OpenSSL for large inputs."""
    __slots__ = ("_small", "_kept", "_size", "_big")

    def __init__(self, data=b""):
        self._small = hashlib.sha256()
        self._kept = []     # copies of what _small was given, for the hand-over
        self._size = 0
        self._big = None
        if data:
            self.update(data)

    def update(self, data):
        if self._big is None:
            size = len(data)
            if self._size + size <= SHA256_SMALL:
                self._small.update(data)
                self._kept.append(data if isinstance(data, bytes) else
                                  memoryview(data).tobytes())
                self._size += size
                return
            if not _BIG_SHA256:  # at the first large input: cryptography is imported then
                _BIG_SHA256.append(_openssl_sha256())
            self._big = _BIG_SHA256[0]()
            for kept in self._kept:
                self._big.update(kept)
            self._small = self._kept = None
        self._big.update(data)

    def copy(self):
        other = Sha256.__new__(Sha256)
        other._small = self._small and self._small.copy()
        other._kept = self._kept and list(self._kept)
        other._size = self._size
        other._big = self._big and self._big.copy()
        return other

    def digest(self):
        if self._big is None:
            return self._small.digest()
        big = self._big.copy()
        return big.finalize() if hasattr(big, "finalize") else big.digest()

    def hexdigest(self):
        return native_str(binascii.hexlify(self.digest()))  # as hashlib's: str on 2.7 too


def _sha256():
    if getattr(hashlib.sha256, "__name__", "") == "openssl_sha256":
        return hashlib.sha256  # OpenSSL's already, and it releases the GIL on large inputs
    return Sha256


# hashlib.sha256 or Sha256: use it wherever the input may be large (a file, a message body)
sha256 = _sha256()


# -- timed waits ----------------------------------------------------------------------------------
# 2.7's Condition.wait(timeout) and Event.wait(timeout) poll, sleeping up to 50 ms between
# looks: a thread told to go on wakes late (a push ~25 ms late on average) and an idle
# thread waiting with a timeout still wakes ~20 times a second. There, timed waits block
# like untimed ones and one timer thread per process, asleep in select() until the next
# deadline, wakes the waiters whose time is up.

if PY2:  # pragma: no cover - exercised by the 2.7 run
    import heapq as _heapq
    import itertools as _itertools
    import select as _select
    import threading as _threading

    class _Timers(object):
        """Calls callbacks at monotonic deadlines, from one daemon thread (started lazily)."""

        def __init__(self):
            self.lock = _threading.Lock()
            self.heap = []
            self.seq = _itertools.count()
            self.pid = None
            self.pipe = None

        def add(self, deadline, callback):
            entry = [deadline, next(self.seq), callback]
            with self.lock:
                if self.pid != os.getpid():  # first use, or a forked child: no thread yet
                    self._start()
                _heapq.heappush(self.heap, entry)
                first = self.heap[0] is entry
            if first:
                os.write(self.pipe[1], b"x")
            return entry

        @staticmethod
        def cancel(entry):
            entry[2] = None  # dropped when it reaches the top

        def _start(self):
            if self.pipe is not None:  # a forked child: the parent's pipe and thread
                for fd in self.pipe:
                    os.close(fd)
            self.pid = os.getpid()
            self.heap = []
            self.pipe = os.pipe()
            for fd in self.pipe:
                set_cloexec(fd)
            thread = _threading.Thread(target=self._run, args=(self.pipe[0],),
                                       name="timed-waits")
            thread.daemon = True
            thread.start()

        def _run(self, wake_fd):
            while True:
                due = []
                with self.lock:
                    now = monotonic()
                    while self.heap and (self.heap[0][2] is None or self.heap[0][0] <= now):
                        due.append(_heapq.heappop(self.heap)[2])
                    timeout = self.heap[0][0] - now if self.heap else None
                for callback in due:
                    if callback is not None:
                        callback()
                try:
                    if _select.select([wake_fd], [], [], timeout)[0]:
                        os.read(wake_fd, 4096)
                except (OSError, IOError, _select.error):
                    pass  # EINTR: look at the heap again

    _TIMERS = _Timers()

    class Condition(_threading._Condition):
        """threading.Condition whose timed wait blocks and is woken by the timer thread."""

        def __init__(self, lock=None):
            _threading._Condition.__init__(self, lock)

        def wait(self, timeout=None):
            if timeout is None:
                return _threading._Condition.wait(self)
            entry = _TIMERS.add(monotonic() + max(0.0, timeout), self._expire)
            try:
                _threading._Condition.wait(self)
            finally:
                _TIMERS.cancel(entry)

        def _expire(self):
            with self:
                self.notify_all()

    class Event(object):
        """threading.Event with Condition above: the same API, prompt on 2.7."""

        def __init__(self):
            self._cond = Condition(_threading.Lock())
            self._flag = False

        def is_set(self):
            return self._flag
        isSet = is_set

        def set(self):
            with self._cond:
                self._flag = True
                self._cond.notify_all()

        def clear(self):
            with self._cond:
                self._flag = False

        def wait(self, timeout=None):
            deadline = None if timeout is None else monotonic() + timeout
            with self._cond:
                while not self._flag:
                    left = None if deadline is None else deadline - monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
                return self._flag
else:
    import threading as _threading
    Condition = _threading.Condition
    Event = _threading.Event


# -- JSON from peers ------------------------------------------------------------------------------
# 2.7's json gives every string as unicode, and this build's unicode takes 4 bytes a character
# (sys.maxunicode 0x10FFFF; 2 on a narrow build), and its C decoder makes every key again for
# every object: an entry of a sync_files header (a name, a SHA-256, two numbers; 177 bytes of
# text) took 1 147 bytes decoded on 2.7, 457 on 3.11, and a client's batches of 2 000 of
# them, several applied at once, are what a 2.7 master's memory peaked with (issue 11). An
# ASCII string taken as str (what every name and checksum is) costs a byte a character, and
# 2.7 str and unicode of the same ASCII text compare, hash and join alike: 513 bytes.

# The most bytes one character of a string from JSON costs once decoded, per character of
# its text (the text holds at least one byte per character).
TEXT_CHAR_BYTES = 1 if not PY2 else (4 if sys.maxunicode > 0xFFFF else 2)
JSON_NATIVE_FROM = 64 << 10  # bytes of JSON text (about 370 entries of a batch)

# 2.7 and 3.6 make an int of any number of digits, in a time that grows as their square,
# holding the GIL: a header's 400 000-digit number took 0.9 s, its 16 MiB would take some
# 25 minutes. 3.7.14 and later refuse more than this many digits themselves (ValueError);
# here a number that long is refused the same way (an honest one has at most 20 digits).
MAX_INT_DIGITS = 4300


def _bounded_int(text):
    if len(text) > MAX_INT_DIGITS:
        raise ValueError("a number of %d digits (at most %d)" % (len(text), MAX_INT_DIGITS))
    return int(text)


_INT_HOOK = {"parse_int": _bounded_int}
# digits to "0", every other byte to ".": a run of more digits than allowed is then found by
# one search (an int hook on every number doubled the parsing of 2 000 file entries)
_DIGITS = bytes(bytearray(48 if 48 <= byte <= 57 else 46 for byte in range(256)))
_TOO_MANY_DIGITS = b"0" * (MAX_INT_DIGITS + 1)


if hasattr(sys, "set_int_max_str_digits"):
    def _int_hook(data):
        return {}
else:
    def _int_hook(data):
        """The int hook where `data` may hold too long a number (2.7, 3.6), else none."""
        if len(data) > MAX_INT_DIGITS and \
                _TOO_MANY_DIGITS in bytes(data).translate(_DIGITS):
            return _INT_HOOK
        return {}

if PY2:  # pragma: no cover - exercised by the 2.7 run
    import json as _json

    def _ascii_str(value):
        try:
            return value.encode("ascii")
        except UnicodeError:
            return value

    # Distinct keys `memo` keeps: a document's field names are few; names as keys (an
    # answer's states) are each once anyway, and a dict of them all grown at once beside
    # the object's own took a hostile peer's header of keys to 1.6 times its cost.
    _MEMO_KEYS = 256

    def _ascii_pairs(memo):
        """An object_pairs_hook: the object with its ASCII string values (and those of a list
        value) as str, and each of the first _MEMO_KEYS keys once per document in `memo`
        (2.7's C decoder makes a new one for every object: 4 keys were 290 of a batch
        entry's bytes)."""
        def pairs_hook(pairs):
            out = {}
            keep = len(memo) + len(pairs) <= _MEMO_KEYS
            for key, value in pairs:
                kind = type(value)
                if kind is unicode:  # noqa: F821
                    value = _ascii_str(value)
                elif kind is list:
                    for at, element in enumerate(value):
                        if type(element) is unicode:  # noqa: F821
                            value[at] = _ascii_str(element)
                out[memo.setdefault(key, key) if keep else memo.get(key, key)] = value
            return out
        return pairs_hook

    def json_loads(data):
        """json.loads of a peer's or the internal daemon's message, UTF-8 `data` (bytes):
        read as bytes, never copied whole into unicode first (4 times its size here); a
        long one (a batch, a list of names) with its ASCII strings as the native str (see
        above; that costs 2.7 twice the decoding time, so a short one is decoded as it is).
        """
        if len(data) < JSON_NATIVE_FROM:
            return _json.loads(data, **_int_hook(data))
        return _json.loads(data, object_pairs_hook=_ascii_pairs({}), **_int_hook(data))
else:
    import json as _json

    def json_loads(data):
        """json.loads of a peer's or the internal daemon's message, UTF-8 `data` (bytes, or
        a memoryview of them: decoded where they lie)."""
        hook = _int_hook(data)   # its copies gone before the text is decoded
        return _json.loads(str(data, "utf-8"), **hook)


class _NoLock(object):
    """A context manager that holds nothing (contextlib.nullcontext is 3.7+)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NO_LOCK = _NoLock()
