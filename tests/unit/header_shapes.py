"""Hostile JSON headers and what decoding them peaks at, against what the budget charges.

A peer's header is charged (protocol.json_cost, then metapack.split_copy) before it is
parsed; the charge must bound the most memory parsing it holds at once, whatever its shape
and on every interpreter. Each shape here is a header of about `size` bytes of text, and
one decode (with the split of its packed names) is measured: by tracemalloc on 3.x
(traced_peak), on 2.7 (no tracemalloc) in a child process with SHIM preloaded, which counts
every malloc and takes PyObject_Malloc's place (shim_peaks). The resident set is no
measure: memory freed earlier and reused unseen made it under-count by half.

Run as a script for the table of every shape, peak / charge:
    python header_shapes.py [SIZE] [traced|shim] [local]
("local": the internal daemon's messages, localsock.decode against json_cost).
"""
from __future__ import absolute_import, division, print_function

import binascii
import gc
import hashlib
import json
import os
import struct
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib")
if LIB not in sys.path:
    sys.path.insert(0, LIB)

from wazuh_cluster import localsock, metapack, protocol  # noqa: E402


def _repeat(unit, size):
    return unit * max(1, size // len(unit))


def _string(text, size):
    """{"x": "<text repeated>"}: one long string (text is JSON already, escapes and all)."""
    return b'{"x":"' + _repeat(text, size) + b'"}'


def _strings(text, size):
    """{"x": ["<text>", ...]}: many short strings."""
    return b'{"x":[' + _repeat(b'"' + text + b'",', size)[:-1] + b']}'


def _packed(size, name=b"queue/agent-info/a"):
    """A sync_files request whose packed names are as long as metapack lets them be."""
    count = metapack.MAX_NAMES
    length = max(1, size // count - 2)
    names = b"\\n".join([name + b"m" * max(0, length - len(name))] * count)
    records = binascii.b2a_base64(b"\0" * metapack.RECORD.size * count).strip()
    return (b'{"cmd":"sync_files","args":{"meta_names":"' + names +
            b'","meta_records":"' + records + b'"}}')


def _honest(size, packed=True):
    """A keepalive batch of agent-info names as sync.Batch sends it (size / 100 names, at
    most a batch's 2 000), packed or in the JSON form."""
    names = [u"queue/agent-info/agent%06d-10.0.%d.%d" % (i, i // 256 % 256, i % 256)
             for i in range(min(2000, max(1, size // 100)))]
    meta = [{"name": name, "sha256": hashlib.sha256(name.encode("ascii")).hexdigest(),
             "mtime_ns": 1733000000000000000 + i} for i, name in enumerate(names)]
    args = {"files": [], "delete": [], "delete_dirs": []}
    if packed:
        args.update(metapack.encode(meta))
    else:
        args["files"] = [dict(entry, size=500 + i % 100) for i, entry in enumerate(meta)]
    return json.dumps({"cmd": "sync_files", "args": args}, separators=(",", ":"),
                      sort_keys=True).encode("ascii")


def _keys(size):
    return b"{" + b",".join(b'"k%d":0' % i for i in range(size // 8)) + b"}"


def _objects_of_distinct_keys(size):
    """[{"0":0},{"1":0},...]: many small objects, each with a key of its own (a new key
    string, an entry of the decoder's memo of keys, and its dict's table of entries)."""
    return b'{"x":[' + b",".join(b'{"%d":0}' % i for i in range(size // 12)) + b"]}"


def _nested(size, depth=400):
    one = b"[" * depth + b"]" * depth
    return b'{"x":[' + b",".join([one] * max(1, size // (len(one) + 1))) + b"]}"


ESCAPES = [b"\\n", b"\\\"", b"\\\\", b"\\/", b"\\b", b"\\f", b"\\r", b"\\t", b"\\u0000",
           b"\\u001b", b"\\u007f", b"\\u00e9", b"\\u0100", b"\\ud83d\\ude00", b"\\ud800"]
RAW = [u"\u00e9".encode("utf-8"), u"\u20ac".encode("utf-8"), u"\U0001f600".encode("utf-8")]

# name -> a function of the size giving the header's text
SHAPES = {
    "string": lambda size: _string(b"a", size),
    "strings": lambda size: _strings(b"ab", size),
    "strings-empty": lambda size: _strings(b"", size),
    "keys": _keys,
    "duplicate-keys": lambda size: b"{" + _repeat(b'"a":0,', size)[:-1] + b"}",
    "lists": lambda size: b'{"x":[' + _repeat(b"[],", size)[:-1] + b"]}",
    "objects": lambda size: b'{"x":[' + _repeat(b"{},", size)[:-1] + b"]}",
    "objects-distinct-keys": _objects_of_distinct_keys,
    "nested": _nested,
    "literals": lambda size: b'{"x":[' + _repeat(b"true,null,", size)[:-1] + b"]}",
    "floats": lambda size: b'{"x":[' + _repeat(b"1.5,", size)[:-1] + b"]}",
    "small-ints": lambda size: b'{"x":[' + _repeat(b"7,", size)[:-1] + b"]}",
    "big-ints": lambda size: b'{"x":[' + _repeat(b"9" * 4000 + b",", size)[:-1] + b"]}",
    "packed-names": _packed,
    "honest-packed": _honest,
    "honest-json": lambda size: _honest(size, packed=False),
    "packed-wide-names": lambda size: _packed(size, b"queue/agent-info/\\u0100"),
}
WORDS = {b"\\n": "newline", b"\\\"": "quote", b"\\\\": "backslash", b"\\/": "slash"}
for _esc in ESCAPES:
    _word = WORDS.get(_esc) or _esc.decode("ascii").replace("\\", "")
    SHAPES["run-" + _word] = lambda size, e=_esc: _string(e, size)
    SHAPES["ab-" + _word] = lambda size, e=_esc: _string(b"ab" + e, size)
    SHAPES["strings-" + _word] = lambda size, e=_esc: _strings(b"ab" + e, size)
for _raw in RAW:
    _word = "raw" + str(len(_raw))
    SHAPES[_word] = lambda size, r=_raw: _string(r, size)
    SHAPES[_word + "-ab-n"] = lambda size, r=_raw: _string(r * 2 + b"\\n", size)
    SHAPES[_word + "-strings"] = lambda size, r=_raw: _strings(r, size)


def body_of(text):
    return struct.pack(">I", len(text)) + text


def decode(body):
    """Decode a frame's body as a session does (and split its packed names): (cost, what it
    made)."""
    header, data, cost = protocol.decode_costed(body)
    args = header.get("args")
    made = metapack.decode(args) if isinstance(args, dict) else None
    return cost + len(data), (header, made)


def decode_local(text):
    """A message of the internal daemon's socket (as read, without its length): (its charge,
    what it made)."""
    return protocol.json_cost(text), localsock.decode(text)


def traced_peak(text, decoder=decode):
    """(peak bytes above what was held before, charge) of one decode, by tracemalloc."""
    import tracemalloc
    text = body_of(text) if decoder is decode else text
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        charge, made = decoder(text)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    del made
    return peak, charge


# What every allocation of a process holds, counted where Python allocates: malloc and,
# in place of pymalloc (whose arenas hide what is freed and reused), PyObject_Malloc. For
# an interpreter without tracemalloc (2.7); its libpython calls these through the dynamic
# linker, so a preloaded library takes them. A block counts at malloc_usable_size: what
# Python asked for and what malloc rounds it up to.
SHIM = r"""
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
static long current, peak;
static void *held(void *p) {
    if (p) { current += (long)malloc_usable_size(p); if (current > peak) peak = current; }
    return p;
}
void *malloc(size_t n) { return held(__libc_malloc(n)); }
void *calloc(size_t n, size_t m) { return held(__libc_calloc(n, m)); }
void free(void *p) { if (p) current -= (long)malloc_usable_size(p); __libc_free(p); }
/* a block moved by a copy is there twice meanwhile; one in place, or mapped on its own
   (glibc's IS_MMAPPED bit: mremap moves its pages), once */
void *realloc(void *p, size_t n) {
    long old = p ? (long)malloc_usable_size(p) : 0;
    int mapped = p && (((size_t *)p)[-1] & 2);
    void *q = __libc_realloc(p, n);
    if (q && (q == p || mapped)) { current -= old; held(q); }
    else if (q) { held(q); current -= old; }
    else if (!n) current -= old;
    return q;
}
void *PyObject_Malloc(size_t n) { return malloc(n ? n : 1); }
void *PyObject_Realloc(void *p, size_t n) { return realloc(p, n ? n : 1); }
void PyObject_Free(void *p) { free(p); }
long shim_current(void) { return current; }
long shim_peak(void) { return peak; }
void shim_reset(void) { peak = current; }
"""


def build_shim(folder):
    """The counting library built in `folder` (None when no C compiler is there)."""
    source = os.path.join(folder, "alloc_shim.c")
    library = os.path.join(folder, "alloc_shim.so")
    with open(source, "w") as handle:
        handle.write(SHIM)
    try:
        subprocess.check_call(["cc", "-shared", "-fPIC", "-O2", "-o", library, source])
    except (OSError, subprocess.CalledProcessError):
        return None
    return library


def shim_peak(text, decoder=decode):
    """(peak bytes above what was held before, charge) of one decode, counted by the
    preloaded library (LD_PRELOAD=build_shim's)."""
    import ctypes
    shim = ctypes.CDLL(None)
    shim.shim_current.restype = shim.shim_peak.restype = ctypes.c_long
    text = body_of(text) if decoder is decode else text
    gc.collect()
    shim.shim_reset()
    before = shim.shim_current()
    charge, made = decoder(text)
    peak = shim.shim_peak() - before
    del made
    return peak, charge


def shim_peaks(python, library, names, size, local=False, env=None):
    """{name: (peak, charge)} of each shape, each decoded by `python` in a child process of
    its own with `library` preloaded, reading the text from a file (`env`: more of its
    environment). A refused shape's charge is the refusal's text."""
    env = dict(os.environ, LD_PRELOAD=library, **(env or {}))
    out = {}
    handle, path = tempfile.mkstemp(prefix="header-shape-")
    os.close(handle)
    try:
        for name in names:
            with open(path, "wb") as handle:
                handle.write(SHAPES[name](size))
            script = ("import sys; sys.path.insert(0, %r); import header_shapes as h\n"
                      "text = open(%r, 'rb').read()\n"
                      "try: print('%%d %%d' %% h.shim_peak(text, %s))\n"
                      "except Exception as exc: print('0 refused: %%s' %% str(exc)[:80])"
                      % (HERE, path, "h.decode_local" if local else "h.decode"))
            result = subprocess.check_output([python, "-c", script], env=env)
            peak, charge = result.decode("ascii", "replace").split(None, 1)
            charge = charge.strip()
            out[name] = (int(peak), int(charge) if charge.isdigit() else charge)
    finally:
        os.unlink(path)
    return out


def main(argv):
    size = int(argv[1]) if len(argv) > 1 else 1 << 20
    method = (argv[2:3] or [""])[0] or ("shim" if sys.version_info[0] == 2 else "traced")
    local = len(argv) > 3 and argv[3] == "local"
    names = sorted(SHAPES)
    if method == "shim":
        folder = tempfile.mkdtemp(prefix="header-shapes-")
        try:
            peaks = shim_peaks(sys.executable, build_shim(folder), names, size, local)
        finally:
            shutil.rmtree(folder)
    else:
        decoder = decode_local if local else decode
        peaks = {}
        for name in names:
            try:
                peaks[name] = traced_peak(SHAPES[name](size), decoder)
            except Exception as exc:  # a refusal is a result too
                peaks[name] = (0, str(exc)[:60])
    print("python %s, %s, %d bytes, %s" % (sys.version.split()[0], method, size,
                                            "localsock" if local else "peer header"))
    for name in names:
        peak, charge = peaks[name]
        if not isinstance(charge, int):
            print("%-22s refused: %s" % (name, charge))
            continue
        print("%-22s peak %10d charge %10d ratio %.2f%s" % (
            name, peak, charge, peak / max(1, charge), "  OVER" if peak > charge else ""))


if __name__ == "__main__":
    main(sys.argv)
