"""Give the C heap's free memory back to the system after a big answer.

Python returns its own small-object arenas when they empty, but the C library keeps freed
heap memory for later: after one cluster_control -a of 100 000 agents (every object freed)
the internal daemon still held +10-25 MB. glibc's malloc_trim(0) hands it back; elsewhere
(another C library, no ctypes) release_free_memory() does nothing.
"""
from __future__ import absolute_import, division, print_function

_TRIM = []  # [the malloc_trim function or None], looked up once


def _lookup():
    try:
        import ctypes
        import ctypes.util
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (ImportError, OSError, AttributeError):
        return None


def release_free_memory():
    """malloc_trim(0) where the C library has it; True when it ran."""
    if not _TRIM:
        _TRIM.append(_lookup())
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True
