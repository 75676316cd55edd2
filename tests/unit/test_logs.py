"""The OSSEC log formatter: one escaped line per record, whatever a call site passed."""
from __future__ import absolute_import, division, print_function

import io
import logging
import os
import re
import shutil
import sys
import tempfile

import pytest

from wazuh_cluster import logs

LINE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} wazuh-clusterd: "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL): [\x20-\x7e]*$")
FORGED = u"version 3.0\n2031/01/01 00:00:00 wazuh-clusterd: ERROR: forged line"


def record(message, args=(), exc_info=None, level=logging.ERROR):
    return logging.LogRecord("wazuh_cluster", level, __file__, 1, message, args, exc_info)


def raised(exc):
    try:
        raise exc
    except Exception:  # the test wants exactly what it raised
        return sys.exc_info()


def one_line(formatted):
    assert LINE.match(formatted), repr(formatted)
    return formatted


@pytest.mark.parametrize("tracebacks", [False, True])
@pytest.mark.parametrize("hostile", [
    FORGED, u"cr\r2031/01/01 00:00:00 x", u"esc \x1b[2J\x1b]0;owned\x07", u"nul \x00",
    u"non-ascii \u00e9 \u2028 \u202e \U0001f600", b"bytes \n\xff", u"\x85\x9b",
])
def test_messages_and_arguments_become_one_escaped_line(hostile, tracebacks):
    formatter = logs.OssecFormatter("wazuh-clusterd", tracebacks)
    one_line(formatter.format(record(hostile)))
    one_line(formatter.format(record("peer said %s", (hostile,))))
    one_line(formatter.format(record("failed", exc_info=raised(ValueError(hostile)))))


def test_a_forged_line_stays_inside_the_real_one():
    line = one_line(logs.OssecFormatter("wazuh-clusterd").format(record("got %s", (FORGED,))))
    assert line.count(u"wazuh-clusterd: ERROR:") == 2  # the real prefix, the quoted one
    assert u"3.0\\x0a2031/01/01 00:00:00" in line


def test_exception_text_with_a_newline_stays_on_the_line():
    exc_info = raised(ValueError(u"first\nsecond\r\x1b[31m"))
    plain = one_line(logs.OssecFormatter("wazuh-clusterd").format(
        record("boom", exc_info=exc_info)))
    assert plain.endswith(u": boom | ValueError: first\\x0asecond\\x0d\\x1b[31m")
    full = one_line(logs.OssecFormatter("wazuh-clusterd", tracebacks=True).format(
        record("boom", exc_info=exc_info)))
    assert u"boom | Traceback (most recent call last): | File " in full
    assert full.endswith(u" | ValueError: first\\x0asecond\\x0d\\x1b[31m")


def test_very_long_messages_are_cut():
    line = one_line(logs.OssecFormatter("wazuh-clusterd").format(
        record("name %s", (u"\n" * (1 << 20),))))
    assert len(line) < 5 * logs.MESSAGE_LIMIT
    assert line.endswith(u"...(%d characters)" % ((1 << 20) + len("name ")))


def test_message_that_is_not_a_string():
    one_line(logs.OssecFormatter("wazuh-clusterd").format(record({"a": u"\n"})))


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="wzc-logs-")
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("debug", [0, 2])
def test_the_log_file_holds_one_line_per_record(folder, debug):
    path = os.path.join(folder, "cluster.log")
    log = logs.setup("wazuh-clusterd", path, debug=debug)
    try:
        log.warning("refused %s from %s", FORGED, u"node\x1b[31m")
        try:
            raise RuntimeError(FORGED)
        except RuntimeError:
            log.exception("handler for %s failed", u"peer\r\n")
        log.error(u"\u00e9\u2028" + FORGED)
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
    with io.open(path, "rb") as handle:
        data = handle.read()
    lines = data.decode("ascii").split(u"\n")
    assert lines[-1] == u"" and len(lines) == 4, lines
    for line in lines[:-1]:
        one_line(line)
        assert not line.startswith(u"2031/")
