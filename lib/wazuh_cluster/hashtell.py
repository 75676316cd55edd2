"""wazuh-clusterd tells the internal daemon the SHA-256 of our hot files it read to push.

Under an append a second, wazuh-clusterd reads each new client.keys to push it (versions.py,
hashing only the appended tail), and the internal daemon's next poll hashed the same 9.4 MB
again to record it (~5 ms a second, ~0.5 % of a core). The reader now sends it a "hashed"
request: the name, the descriptor's fstat fingerprint, the same before and after the read,
the SHA-256 of the bytes read and the wall time the read began. The internal daemon takes it
only for a hot file it sends, only while the file's lstat is exactly that fingerprint, under
the scanner's racy rule (catalog._cmd_hashed, scanner.Scanner.hint_hot); otherwise it hashes
the file as before, so a lost or refused request costs that hash and nothing else.

The requests go from a thread of their own, newest per file (an older one would be refused
anyway): the session that read the file pushes it without waiting for the internal daemon.
"""
from __future__ import absolute_import, division, print_function

import os
import threading

from wazuh_cluster import logs


class HashTeller(object):
    """Calls `call("hashed", args)` (InternalLink.call) for the newest version told of each
    of our hot files `names` (relative names; paths under `home`)."""

    def __init__(self, call, home, names):
        self.call = call
        self.log = logs.get("sync")
        self._names = dict((os.path.join(home, *name.split("/")), name) for name in names)
        self._cond = threading.Condition(threading.Lock())
        self._waiting = {}   # name -> the newest request not sent yet
        self._thread = None
        self._stopping = False

    def tell(self, path, fingerprint, sha256, hashed_at):
        """versions.VersionStore.told: one version of the file at `path` read."""
        name = self._names.get(path)
        if name is None:
            return
        with self._cond:
            if self._stopping:
                return
            self._waiting[name] = {"name": name, "fingerprint": list(fingerprint),
                                   "sha256": sha256, "hashed_at": hashed_at}
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hash-tell")
                self._thread.daemon = True
                self._thread.start()
            self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                requests, self._waiting = list(self._waiting.values()), {}
            for args in requests:
                try:
                    self.call("hashed", args)
                except Exception as exc:  # the internal daemon hashes it itself: no loss
                    self.log.debug("hashed %s not told: %s", args["name"], exc)

    def stop(self):
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(5.0)
