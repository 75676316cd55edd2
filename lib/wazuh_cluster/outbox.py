"""Room for what we send: the batches of one session, each read under a grant of the
process's budget and giving it back as soon as it is on the wire (budget.py: the invariant).

A batch of `size` bytes of file data and `entries` names holds at worst, while it is read,
encoded and sent: the files (size), their compressed stream (about size at worst, deflate
adds a few bytes a block), the header (ENTRY_COST a name, as JSON text and the dicts it is
made from) and the frame being sealed (its slice and its ciphertext: FRAME_COST, or twice
the message when it is smaller than a chunk: a one-line push is not granted 2 MiB). That is
granted before the first file is read; once the message is encoded only the message and the
frame are kept (Grant.keep); once it is sent, nothing (Grant.close). The answer is waited for
holding nothing: it is granted by the receiving side like every answer.
"""
from __future__ import absolute_import, division, print_function

import threading

from wazuh_cluster import protocol
from wazuh_cluster.errors import RequestError

ENTRY_COST = 640
FRAME_COST = 2 * protocol.CHUNK_SIZE
ENVELOPE = 4096   # a message's header beside its entries (command, stamps), with room to spare


def batch_cost(size, entries):
    """The worst case of a batch (see the module doc)."""
    # its message: the data (compressed: deflate adds a few bytes a block) and the header
    message = size + size // 256 + ENTRY_COST * entries + ENVELOPE
    return 2 * size + ENTRY_COST * entries + frame_cost(message)


def frame_cost(message):
    """What sealing a message of `message` bytes holds beside it: one frame's slice and its
    ciphertext."""
    return 2 * min(protocol.CHUNK_SIZE, message)


class Room(object):
    """One session's grants for sending, from `budget` (a budget.Budget).

    `closed()`: True once the session ended (a grant is no longer waited for then).
    """

    def __init__(self, budget, name, closed):
        self.budget = budget
        self.holder = budget.holder(name, sends=True)
        self.closed = closed

    def batch_bytes(self, wanted, entries):
        """The data a batch of up to `entries` names may hold so that it can be granted
        (at most `wanted`; a small budget makes smaller batches)."""
        room = self.budget.grantable(self.holder) - ENTRY_COST * entries - FRAME_COST
        return max(protocol.CHUNK_SIZE, min(wanted, room // 2))

    def grant(self, nbytes):
        """A Grant of `nbytes` (at most what can ever be granted: one file larger than that
        is sent alone, with the whole pool), waited for in the budget's fair order."""
        nbytes = self.budget.grantable(self.holder, nbytes)
        if not self.budget.acquire(self.holder, nbytes, abandon=self.closed):
            raise RequestError("session closed while waiting for room to send", "closed")
        return Grant(self.budget, self.holder, nbytes)


class Grant(object):
    """Bytes held for one batch; given back in steps (from any thread), never asked for again."""

    def __init__(self, budget, holder, nbytes):
        self.budget = budget
        self.holder = holder
        self.held = nbytes
        self._lock = threading.Lock()

    def keep(self, nbytes):
        """The batch is encoded into a message of `nbytes`: keep room for it and its frame."""
        self._keep_at_most(nbytes + frame_cost(nbytes))

    def close(self):
        """Everything back (sent, or failed); closing again does nothing."""
        self._keep_at_most(0)

    def _keep_at_most(self, nbytes):
        with self._lock:
            extra = max(0, self.held - nbytes)
            self.held -= extra
        if extra:
            self.budget.release(self.holder, extra)
