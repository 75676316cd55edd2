"""OSSEC-style log lines ("YYYY/MM/DD HH:MM:SS DAEMON: LEVEL: message") on logrotate-safe files.

One record is one line, always: operators grep these files and feed them to SIEMs, and a peer
must not be able to forge a line by putting a newline in a name or a reason. So, whatever a
call site passed (its arguments, an exception's text), the formatter escapes every character
that is not printable ASCII (text.printable: \\xNN, \\uNNNN) and cuts a message at
MESSAGE_LIMIT characters. Call sites still escape and bound what a peer sent (text.quote), so
that the line reads well; this is the second layer that holds when one forgets.

An exception goes on the same line after " | ": its type and text, or at log level 2 its
whole traceback, one " | "-separated part per traceback line (each escaped), so that a
traceback is one event too.
"""
from __future__ import absolute_import, division, print_function

import logging
import logging.handlers
import os
import sys
import traceback

from wazuh_cluster import compat, text

LOGGER = "wazuh_cluster"
LOG_MODE = 0o660
MESSAGE_LIMIT = 4096
# Each part of an exception: its text, or one line of a traceback.
EXCEPTION_LIMIT = 1024
SEPARATOR = u" | "


class OssecFormatter(logging.Formatter):
    """The line format of Wazuh 3.0's logs, one escaped line per record (see the module doc)."""

    def __init__(self, daemon, tracebacks=False):
        logging.Formatter.__init__(self, None, "%Y/%m/%d %H:%M:%S")
        self.daemon = daemon
        self.tracebacks = tracebacks

    def format(self, record):
        message = text.printable(_message(record), MESSAGE_LIMIT)
        if record.exc_info:
            message += SEPARATOR + self.formatException(record.exc_info)
        stack = getattr(record, "stack_info", None)  # 3.x: log(..., stack_info=True)
        if stack:
            message += SEPARATOR + _joined(stack.splitlines())
        return u"%s %s: %s: %s" % (self.formatTime(record, self.datefmt), self.daemon,
                                   text.printable(record.levelname, 32), message)

    def formatException(self, ei):
        last = text.printable(u"%s: %s" % (_text(ei[0].__name__), _exception_text(ei[1])),
                              EXCEPTION_LIMIT)
        if not self.tracebacks:
            return last
        # The frames come from our source; the exception's text may come from a peer: it is
        # escaped as a whole, so that its newlines cannot pass for traceback lines.
        frames = u"".join(_text(line) for line in traceback.format_tb(ei[2]))
        return SEPARATOR.join([u"Traceback (most recent call last):",
                               _joined(frames.splitlines()), last])


def _text(value):
    return value if isinstance(value, compat.text_type) else \
        compat.to_text(value, errors="replace")


def _message(record):
    message = record.getMessage()
    return message if isinstance(message, (compat.text_type, compat.binary_type)) \
        else compat.text_type(message)


def _exception_text(value):
    try:
        return compat.text_type(value)
    except (UnicodeError, TypeError, ValueError):  # 2.7: bytes text that is not ASCII
        return _text(repr(value))


def _joined(lines):
    return SEPARATOR.join(text.printable(line.strip(), EXCEPTION_LIMIT)
                          for line in lines if line.strip())


class OssecFileHandler(logging.handlers.WatchedFileHandler):
    """Reopens the file after logrotate moves it, and creates it 0660 like Wazuh does."""

    def _open(self):
        if not os.path.exists(self.baseFilename):
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE)
            os.fchmod(fd, LOG_MODE)  # the umask must not narrow it
            os.close(fd)
        return logging.handlers.WatchedFileHandler._open(self)


def setup(daemon, log_file, debug=0, foreground=False):
    """Configure the package logger for one daemon and return it.

    `debug` follows OSSEC's -d: 0 info, 1 debug, 2 debug with tracebacks. In the foreground
    the lines go to stderr too.
    """
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = OssecFormatter(daemon, tracebacks=debug >= 2)
    handlers = []
    if log_file:
        handlers.append(OssecFileHandler(log_file, encoding="utf-8"))
    if foreground or not log_file:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    return logger


def get(name=None):
    """The package logger, or a child of it."""
    return logging.getLogger(LOGGER + ("." + name if name else ""))


class OnceLog(object):
    """Log a repeated condition once, then its count when it clears or changes.

    A dead peer or a broken file must not write a thousand identical lines.
    """

    def __init__(self, logger):
        self.logger = logger
        self.seen = {}

    def warning(self, key, message, *args):
        count = self.seen.get(key, 0)
        self.seen[key] = count + 1
        if count == 0:
            self.logger.warning(message, *args)

    def clear(self, key, message=None, *args):
        count = self.seen.pop(key, 0)
        if count and message:
            self.logger.info(message + " (after %d repeats)", *(args + (count,)))
