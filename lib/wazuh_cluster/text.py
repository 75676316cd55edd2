"""One rule for showing text that may come from a peer: in a log line, a terminal or a row.

A peer holding the key chooses the names in its batches, its version string, the reason of its
CLOSE and the message of its ERROR or refusal. Written as they are, a newline forges a whole
log line and an escape sequence takes over the operator's terminal. A leaf: nothing from the
package but compat.

The rule (the same as Python's repr, so readers know it): printable ASCII (0x20-0x7e) stays as it
is; every other code point becomes \\xNN (below 0x100: control characters, DEL, C1 controls,
Latin-1), \\uNNNN or \\UNNNNNNNN; a byte string's bytes above 0x7f become \\xNN. The output is
printable ASCII, so it is one line, and escaping it again changes nothing. Beyond `limit`
characters the value is cut and "...(N characters)" tells its real length.

  printable(value, limit)  for log messages, terminal tables, stored names: backslashes stay
                           as they are (so an already escaped text is left alone);
  quote(value, limit)      a name inside a log message: quoted, with backslash and quote
                           escaped too, so that it is unambiguous;
  peer_version(value)      a version string from a HELLO_INFO: kept when it matches
                           VERSION_RE, else INVALID_VERSION (the session is still allowed:
                           the version is informational, the protocol is what must match).
"""
from __future__ import absolute_import, division, print_function

import re

from wazuh_cluster import compat

DEFAULT_LIMIT = 160
# A reason or an error message from a peer: long enough for any of ours.
REASON_LIMIT = 256
# \Z, not $: "$" also matches before a final newline.
VERSION_RE = re.compile(u"\\A[A-Za-z0-9][A-Za-z0-9._+~-]{0,31}\\Z")
# Not in VERSION_RE's alphabet: no peer can send a version that reads like this marker.
INVALID_VERSION = u"(invalid)"

_UNSAFE = re.compile(u"[^\\x20-\\x7e]")
_UNSAFE_QUOTED = re.compile(u"[^\\x20-\\x26\\x28-\\x5b\\x5d-\\x7e]")
# str.isascii is 3.7+: 2.7's unicode and 3.6 take the regex (staterows and keepalive too).
FAST_TEXT = hasattr(compat.text_type, "isascii")


def _code(char):
    code = ord(char)
    if char in (u"\\", u"'"):
        return u"\\" + char
    if code < 0x100:
        return u"\\x%02x" % code
    if code < 0x10000:
        return u"\\u%04x" % code
    return u"\\U%08x" % code


def _as_text(value):
    """Text of `value` with the bytes of a byte string as code points 0-255 (never fails)."""
    if isinstance(value, compat.text_type):
        return value
    return value.decode("latin-1")


def _escaped(value, limit, unsafe):
    text = _as_text(value)
    total = len(text)
    if limit is not None and total > limit:
        text = text[:limit]
    if unsafe.search(text):
        text = unsafe.sub(lambda match: _code(match.group(0)), text)
    if limit is not None and total > limit:
        text += u"...(%d characters)" % total
    return text


def printable(value, limit=DEFAULT_LIMIT):
    """`value` as one line of printable ASCII text, at most `limit` source characters (None:
    no limit). Anything that is not text or bytes is shown as <TYPE>. Never raises."""
    if not isinstance(value, (compat.text_type, compat.binary_type)):
        return u"<%s>" % type(value).__name__
    return _escaped(value, limit, _UNSAFE)


def quote(value, limit=DEFAULT_LIMIT):
    """`value` quoted ('...'), with backslash and quote escaped as well: unambiguous inside a
    log message. Anything that is not text or bytes is shown as <TYPE>. Never raises."""
    if not isinstance(value, (compat.text_type, compat.binary_type)):
        return u"<%s>" % type(value).__name__
    shown = _escaped(value, limit, _UNSAFE_QUOTED)
    if limit is not None and len(value) > limit:
        head, tail = shown.rsplit(u"...(", 1)
        return u"'" + head + u"'...(" + tail
    return u"'" + shown + u"'"


def is_printable(value):
    """True when `value` is text or bytes of printable ASCII only (printable() keeps it).
    Text on 3.7+ is asked str.isascii (a flag of the string) and str.isprintable, the same
    answer for every code point at a few steps a character, not the regex's tens
    (cluster_control checks 5 MB of cells this way at 100 000 agents)."""
    if FAST_TEXT and isinstance(value, compat.text_type):
        return value.isascii() and value.isprintable()
    return isinstance(value, (compat.text_type, compat.binary_type)) and \
        not _UNSAFE.search(_as_text(value))


def peer_version(value):
    """The version a peer announced, safe to log, store and show.

    None stays None (not sent); a string matching VERSION_RE is kept; anything else (a
    newline, an escape sequence, 1 MiB, a number) is INVALID_VERSION.
    """
    if value is None:
        return None
    if isinstance(value, compat.string_types) and VERSION_RE.match(value):
        return compat.to_text(value)
    return INVALID_VERSION
