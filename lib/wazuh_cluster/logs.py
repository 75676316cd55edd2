"""OSSEC-style log lines ("YYYY/MM/DD HH:MM:SS DAEMON: LEVEL: message") on logrotate-safe files."""
from __future__ import absolute_import, division, print_function

import logging
import logging.handlers
import os
import sys

LOGGER = "wazuh_cluster"
LOG_MODE = 0o660


class OssecFormatter(logging.Formatter):
    """The line format of Wazuh 3.0's logs; exceptions stay on one line unless debugging."""

    def __init__(self, daemon, tracebacks=False):
        logging.Formatter.__init__(self, "%(asctime)s " + daemon + ": %(levelname)s: %(message)s",
                                   "%Y/%m/%d %H:%M:%S")
        self.tracebacks = tracebacks

    def formatException(self, ei):
        if self.tracebacks:
            return logging.Formatter.formatException(self, ei)
        return "%s: %s" % (ei[0].__name__, ei[1])


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
