"""The states rows of every peer's sync thread, written to the internal daemon together.

After each push and round a sync thread records what the peer answered (set_states) and
waits for it: a master appending an agent a second made ten such calls a second, one per
client, to an internal daemon that answers one request at a time while it also stores the
clients' keepalives. At 100 000 agents under churn a push's states took up to 6.8 s there,
and that peer's next push waited for them. Rows that arrive while a write is under way now
go together in the next one (group commit): each caller still returns only once its own rows
are stored, or with the error that write met; the order of writes is the order of calls.
"""
from __future__ import absolute_import, division, print_function

import threading

from wazuh_cluster import staterows


class GroupCommit(object):
    """write(rows) for several threads; `call(command, args)`: InternalLink.call."""

    def __init__(self, call):
        self.call = call
        self.cond = threading.Condition(threading.Lock())
        self.rows = []        # rows of the batch still open
        self.open = 1         # number of that batch
        self.done = 0         # the batches up to this one are written (or failed)
        self.busy = False
        self.errors = {}      # batch number -> the error its write met (recent ones)

    def write(self, rows):
        if not rows:
            return
        with self.cond:
            self.rows.extend(rows)
            mine = self.open
            while self.busy and self.done < mine:
                self.cond.wait()
            if self.done >= mine:
                error = self.errors.get(mine)
                if error is not None:
                    raise error
                return
            # Nobody writes: this thread writes the open batch, its rows and those of others.
            self.busy = True
            batch, self.rows = self.rows, []
            self.open += 1
        error = None
        try:
            for request in staterows.requests(batch):
                self.call("set_states", request)
        except Exception as exc:  # every caller of the batch gets it (raised below)
            error = exc
        with self.cond:
            self.busy = False
            self.done = mine
            if error is not None:
                self.errors[mine] = error
            for old in [n for n in self.errors if n < mine - 64]:
                del self.errors[old]
            self.cond.notify_all()
        if error is not None:
            raise error
