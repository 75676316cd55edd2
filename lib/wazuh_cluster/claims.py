"""Which batch is applying which name: the receiver's per-name locking.

Batches from several peers are applied at once (one peer's large batch must not hold the
others back past their request timeout); only two batches that write the same name need an
order, because "the newest keepalive wins" compares the incoming mtime with the local file's
and must rename before anyone else compares (SPEC section 4). So each name is claimed by one
batch from its check until its file is renamed and flushed.

No deadlock: a batch that finds a name claimed by another first finishes (flushes, renames,
releases) everything it staged, so a waiting batch never holds a claim; and the owner, told
that its name is wanted, finishes its own part after the file it is staging, so nobody waits
for the rest of a long batch.
"""
from __future__ import absolute_import, division, print_function

import threading


class Claims(object):
    """Names claimed by owners (any object: a receiver's batch). Thread-safe."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owners = {}
        self._wanted = set()   # ids of owners that another one waits for
        self.waits = 0         # times a batch had to wait for another's name (tests, logs)

    def try_claim(self, name, owner):
        """Claim `name` for `owner` unless another owner holds it; True when it is owner's."""
        with self._cond:
            holder = self._owners.get(name)
            if holder is None:
                self._owners[name] = owner
                return True
            return holder is owner

    def claim_free(self, names, owner):
        """Claim for `owner` those of `names` no other owner holds, under one lock (a
        keepalive batch's thousands of names); return the others, in their order."""
        busy = []
        with self._cond:
            owners = self._owners
            for name in names:
                holder = owners.setdefault(name, owner)
                if holder is not owner:
                    busy.append(name)
        return busy

    def claim(self, name, owner):
        """Wait until `name` is free, then claim it. The caller must hold no other claim."""
        with self._cond:
            while True:
                holder = self._owners.get(name)
                if holder is None or holder is owner:
                    self._owners[name] = owner
                    return
                self.waits += 1
                self._wanted.add(id(holder))
                self._cond.wait()

    def wanted(self, owner):
        """True when another owner waits for a name `owner` holds."""
        return id(owner) in self._wanted

    def release(self, owner, names):
        """Give back `names` held by `owner` and wake the waiters."""
        with self._cond:
            for name in names:
                if self._owners.get(name) is owner:
                    del self._owners[name]
            self._wanted.discard(id(owner))
            self._cond.notify_all()
