"""Durable file operations of the receiving side: flushing (fsync, syncfs), writing, removing.

No policy lives here (that is receive.py): these helpers only do one system-level thing each,
the same on 2.7 and 3.x.
"""
from __future__ import absolute_import, division, print_function

import errno
import os
import stat
import struct

from wazuh_cluster import compat

try:
    import ctypes
except ImportError:  # pragma: no cover - interpreters built without ctypes
    ctypes = None

CHUNK = 1 << 20
GONE = (errno.ENOENT, errno.ENOTDIR)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC
# os.utime(fd, ns=...) exists where the platform has futimens (3.3+); on 2.7 futimens(3) is
# called through ctypes (load_futimens), and only without it does set_mtime go by path.
# os.utime(fd, ns=...) (3.3+); a keepalive batch calls it directly (touches.py)
UTIME_FD = os.utime in getattr(os, "supports_fd", ())


def load_syncfs():
    """syncfs(2) through ctypes, or None where the C library lacks it (glibc < 2.14)."""
    if ctypes is None:
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int

    def syncfs(fd):
        if func(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return syncfs


def load_futimens():
    """futimens(3) through ctypes as futimens(fd, ns), or None where it cannot be had."""
    if ctypes is None:
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).futimens
    except (OSError, AttributeError):
        return None

    # struct timespec[2] packed by struct: time_t and long are both C long under Linux's C
    # libraries, 32- or 64-bit. Building ctypes Structures instead cost 2.7 a master ~25 us
    # per keepalive applied, twice the call itself.
    times = struct.Struct("@llll").pack
    func.argtypes = [ctypes.c_int, ctypes.c_char_p]
    func.restype = ctypes.c_int

    def futimens(fd, mtime_ns):
        seconds, nanoseconds = divmod(mtime_ns, 10 ** 9)
        if func(fd, times(seconds, nanoseconds, seconds, nanoseconds)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return futimens


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# renameat2's system call number where the C library has no wrapper (glibc < 2.28)
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def load_renameat2():
    """renameat2(2) through ctypes as renameat2(old, new, flags): the C library's function,
    else the system call on x86_64 and aarch64; None where neither can be had. A kernel
    older than 3.15 answers ENOSYS, a file system without the flag EINVAL."""
    if ctypes is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        call = func
    else:
        number = _SYS_RENAMEAT2.get(os.uname()[4])
        syscall = getattr(libc, "syscall", None)
        if number is None or syscall is None:
            return None
        syscall.restype = ctypes.c_long

        def call(olddir, old, newdir, new, flags):
            return syscall(ctypes.c_long(number), ctypes.c_int(olddir), ctypes.c_char_p(old),
                           ctypes.c_int(newdir), ctypes.c_char_p(new), ctypes.c_uint(flags))

    def renameat2(old, new, flags):
        if call(_AT_FDCWD, _path_bytes(old), _AT_FDCWD, _path_bytes(new), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), new)
    return renameat2


def _path_bytes(path):
    if isinstance(path, bytes):
        return path
    encode = getattr(os, "fsencode", None)       # 3.x; a 2.7 path here is bytes already
    return encode(path) if encode is not None else path.encode("utf-8")


# Module level so that a test can set it to None and exercise the per-file fsync path (the
# link-and-rename path of swap_in); callers read them as fsops.NAME at each use.
SYNCFS = load_syncfs()
FUTIMENS = None if UTIME_FD else load_futimens()
RENAMEAT2 = load_renameat2()


def utime_by_fd():
    """True when set_mtime can work on a descriptor alone (never through a name)."""
    return UTIME_FD or FUTIMENS is not None


def set_mtime(fd, path, mtime_ns):
    """Set the file's atime and mtime to `mtime_ns`: by descriptor where possible.

    `path` is only used where no descriptor-based call exists; None there raises ENOSYS.
    """
    if UTIME_FD:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    elif FUTIMENS is not None:
        FUTIMENS(fd, mtime_ns)
    elif path is not None:
        compat.set_mtime_ns(path, mtime_ns)
    else:
        raise OSError(errno.ENOSYS, "no way to set a file's times through its descriptor")


def swap_in(temp, target):
    """Put the file `temp` at `target` in one atomic step and return True when `temp` now
    names exactly the file that was at `target` (RENAME_EXCHANGE), False when there was none
    (RENAME_NOREPLACE: a file created there meanwhile is never overwritten unseen). OSError
    ENOSYS or EINVAL where the kernel or the file system cannot (callers fall back)."""
    if RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", target)
    # (flag, the error meaning "try the other", what success means)
    tries = ((RENAME_EXCHANGE, errno.ENOENT, True), (RENAME_NOREPLACE, errno.EEXIST, False))
    for _ in range(3):
        for flag, other, swapped in tries:
            try:
                RENAMEAT2(temp, target, flag)
                return swapped
            except OSError as exc:
                if exc.errno != other:
                    raise
    raise OSError(errno.EAGAIN, "the target keeps appearing and vanishing", target)


def fsync_folder(path):
    """fsync(2) a folder: the names created, renamed or removed in it become durable."""
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs_folder(path):
    """syncfs(2) of the file system holding the folder `path`."""
    fd = os.open(path, DIR_FLAGS)
    try:
        SYNCFS(fd)
    finally:
        os.close(fd)


def sha256_of_fd(fd):
    """SHA-256 hex of what is left to read from `fd`."""
    sha = compat.sha256()
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return sha.hexdigest()
        sha.update(chunk)


def write_all(fd, data):
    """Write all of `data` (bytes or a memoryview), CHUNK at most per call."""
    size = len(data)
    if size > CHUNK and isinstance(data, bytes):
        data = memoryview(data)     # slices of bytes would be copies
    offset = 0
    while offset < size:
        # At most CHUNK per call; slicing a memoryview copies nothing.
        piece = data if offset == 0 and size <= CHUNK else data[offset:offset + CHUNK]
        written = os.write(fd, piece)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        offset += written


def copy_fd(fd, source):
    """Copy what is left to read from descriptor `source` into `fd`; SHA-256 hex of it.

    The digest is of the bytes copied: checking it proves what was written, with no window
    between a check and a later read.
    """
    sha = compat.sha256()
    while True:
        chunk = os.read(source, CHUNK)
        if not chunk:
            return sha.hexdigest()
        sha.update(chunk)
        write_all(fd, chunk)


def open_folder(path):
    """A descriptor of the folder `path` itself: a symlink there is not followed (ELOOP)."""
    return os.open(path, DIR_FLAGS | _O_NOFOLLOW)


def rmtree(path):
    """Remove a folder and everything below it; symlinks are removed, never followed.

    Iterative: a local tree deeper than the recursion limit must not break a batch.
    """
    stack = [(path, False)]
    while stack:
        current, emptied = stack.pop()
        if emptied:
            os.rmdir(current)
            continue
        stack.append((current, True))
        for base in os.listdir(current):
            child = os.path.join(current, base)
            try:
                mode = os.lstat(child).st_mode
            except OSError as exc:
                if exc.errno in GONE:
                    continue
                raise
            if stat.S_ISDIR(mode):
                stack.append((child, False))
            else:
                os.unlink(child)


def kind(mode):
    """What a non-regular file is, for a refusal message."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def why(exc):
    """The one-line reason of an exception, for states and log lines."""
    if isinstance(exc, (OSError, IOError)):
        return exc.strerror or str(exc)
    return str(exc)
