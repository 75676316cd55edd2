"""The installation layout in one place. A leaf: pure path arithmetic, no I/O but `find_home`."""
from __future__ import absolute_import, division, print_function

import os

DEFAULT_HOME = "/var/ossec"
INIT_CONF = "/etc/ossec-init.conf"


class Paths(object):
    """Every file and folder the cluster uses, under one installation directory."""

    def __init__(self, home):
        self.home = os.path.abspath(home)

    def join(self, *parts):
        return os.path.join(self.home, *parts)

    def rel(self, name):
        """A cluster file name ("etc/shared/x", '/'-separated, relative) to an absolute path."""
        return os.path.join(self.home, *name.split("/"))

    @property
    def ossec_conf(self):
        return self.join("etc", "ossec.conf")

    @property
    def internal_options(self):
        return self.join("etc", "internal_options.conf")

    @property
    def local_internal_options(self):
        return self.join("etc", "local_internal_options.conf")

    @property
    def cluster_json(self):
        return self.join("etc", "cluster.json")

    @property
    def client_keys(self):
        return self.join("etc", "client.keys")

    @property
    def run_dir(self):
        return self.join("var", "run")

    @property
    def db_file(self):
        return self.join("var", "db", "cluster.db")

    @property
    def internal_socket(self):
        return self.join("queue", "ossec", "cluster_db")

    @property
    def control_socket(self):
        return self.join("queue", "ossec", "cluster_control")

    @property
    def staging_dir(self):
        """The receiver's temporary files (staging.py): a folder of ours, next to queue/*."""
        return self.join("queue", "cluster-staging")

    @property
    def cluster_log(self):
        return self.join("logs", "cluster.log")

    @property
    def ossec_log(self):
        return self.join("logs", "ossec.log")

    def daemon_dirs(self):
        """Folders the daemons write into; created (and handed to ossec) when missing."""
        return [os.path.dirname(self.cluster_log), self.run_dir, os.path.dirname(self.db_file),
                os.path.dirname(self.internal_socket), self.staging_dir]

    def pid_file(self, daemon, pid):
        return os.path.join(self.run_dir, "%s-%d.pid" % (daemon, pid))


def read_init_conf(path=INIT_CONF):
    """DIRECTORY= from /etc/ossec-init.conf, or None when absent or unreadable."""
    try:
        with open(path) as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "DIRECTORY":
                    return value.strip().strip('"').strip("'") or None
    except (IOError, OSError):
        return None
    return None


def find_home(explicit=None, script=None, init_conf=INIT_CONF):
    """The installation directory: -D, else the tree the script runs from, else ossec-init.conf.

    The script's own tree comes before /etc/ossec-init.conf so that an installation in a
    temporary prefix (tests, a lab) never reaches for the system one.
    """
    if explicit:
        return os.path.abspath(explicit)
    if script:
        here = os.path.dirname(os.path.realpath(script))
        for up in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
            if os.path.isfile(os.path.join(up, "etc", "ossec.conf")):
                return up
    return read_init_conf(init_conf) or DEFAULT_HOME
