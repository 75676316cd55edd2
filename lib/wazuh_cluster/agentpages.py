"""The agent listing between nodes in pages (cluster_control -a on a client).

A client's listing is the master's. Sent as one peer message (agentrows.result), the master
held every row joined into one string and again as the encoded message, the client held
it whole as well, and nothing overlapped: cluster_control only started decoding once the
last byte had crossed both daemons (1.10 s at 100 060 agents, against 0.93 s on the master).

"cluster_agents_page" asks for the listing a page at a time instead:
  {"keepalives": false}                     opens a listing (args as for "agents") and
                                            answers its first page;
  {"listing": TOKEN}                        the next page of that listing.
The answer is {"count": N, "columns": agentrows.COLUMNS, "listing": TOKEN, "more": bool}
and the page in the message's data: PAGE_CHUNKS of the internal daemon's chunks joined,
rows separated by commas without brackets (an agentrows chunk, so cluster_control takes it
as it is). The master holds a page and the chunk after it (for "more"), the internal daemon
what is not read yet; an open listing is the requesting peer's only (Listings), closed at
its last page, after `idle` seconds without a request, or when MAX_OPEN are open.

The client relays each page to cluster_control as a chunk of a streamed answer, the bytes
the master sent, without decoding them: the answer names the master ("source") and
cluster_control, which decodes every chunk anyway, checks the rows (agentrows: JSON rows of
scalar values, never more than the count announced and exactly as many at the end; decoding
them here too cost the client daemon ~0.8 s of CPU per listing on 2.7). The client checks
what needs no decoding (check_page): the token, "more", a page within PAGE_LIMIT bytes, and
no empty page but the last. Either way a bad page ends the listing with one line naming the
master (bad_page). A master without the request (older versions answer "unknown_command")
gets the one-message request instead (fetch returns None); an older client keeps asking
that, which the master still answers.
"""
from __future__ import absolute_import, division, print_function

import binascii
import os
import threading
import time

from wazuh_cluster import agentrows, compat, localsock, text
from wazuh_cluster.errors import ProtocolError, RequestError

REQUEST = "cluster_agents_page"
PAGE_CHUNKS = 4                        # of agentrows.ROWS_PER_CHUNK rows: ~0.3 MB a page
PAGE_LIMIT = localsock.MAX_CHUNK       # a page is relayed as one chunk to cluster_control
MAX_OPEN = 4                           # listings open at once on the master, all peers


# -- the master -------------------------------------------------------------------------------

class _Listing(object):
    """One open listing: the internal daemon's chunks, read a page at a time."""

    def __init__(self, peer, count, chunks):
        self.peer = peer
        self.count = count
        self.chunks = chunks
        self.used = compat.monotonic()
        self.lock = threading.Lock()
        self.ahead = next(chunks, None)

    def next_page(self):
        """(the next page's bytes, whether another follows)."""
        with self.lock:
            self.used = compat.monotonic()
            parts = []
            while len(parts) < PAGE_CHUNKS and self.ahead is not None:
                parts.append(self.ahead)
                self.ahead = next(self.chunks, None)
            return b",".join(parts), self.ahead is not None

    def close(self):
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()  # the internal daemon's connection (internal_link.stream)


class Listings(object):
    """The master's open listings, by token; `stream(args)` opens the internal daemon's
    (result, chunks) of "agents" for a peer's args."""

    def __init__(self, stream, idle):
        self.stream = stream
        self.idle = idle
        self.open = {}
        self.lock = threading.Lock()
        self.reaper = None

    def page(self, peer, args):
        """(result, page bytes) of "cluster_agents_page" from `peer` (its name)."""
        token = args.get("listing")
        if token is None:
            token, listing = self._start(peer, args)
        else:
            with self.lock:
                listing = self.open.get(token) if isinstance(token, compat.string_types) \
                    else None
            if listing is None or listing.peer != peer:
                raise RequestError("no open agent listing %s" % text.quote(token, 32), "gone")
        try:
            page, more = listing.next_page()
        except (RequestError, ProtocolError):
            self._end(token)
            raise
        if not more:
            self._end(token)
        return {"count": listing.count, "columns": list(agentrows.COLUMNS), "listing": token,
                "more": more}, page

    def _start(self, peer, args):
        result, chunks = self.stream(args)
        count = result.get("count") if isinstance(result, dict) else None
        listing = _Listing(peer, count, iter(chunks))
        token = compat.to_text(binascii.hexlify(os.urandom(8)))
        with self.lock:
            self.open[token] = listing
            extra = sorted(self.open, key=lambda t: self.open[t].used)[:-MAX_OPEN]
            if self.reaper is None:
                self.reaper = threading.Thread(target=self._reap, name="agent-pages")
                self.reaper.daemon = True
                self.reaper.start()
        for old in extra:
            self._end(old)
        return token, listing

    def _end(self, token):
        with self.lock:
            listing = self.open.pop(token, None)
        if listing is not None:
            listing.close()

    def _reap(self):
        """Close the listings no request asked for in `idle` seconds (a client that went
        away); the thread ends with the last open listing."""
        while True:
            time.sleep(min(5.0, self.idle / 2))
            now = compat.monotonic()
            with self.lock:
                stale = [t for t, listing in self.open.items() if now - listing.used > self.idle]
            for token in stale:
                self._end(token)
            with self.lock:
                if not self.open:
                    self.reaper = None  # _start makes another under this lock
                    return


# -- the client -------------------------------------------------------------------------------

def fetch(session, args, timeout):
    """The master's listing as a localsock.Chunked of checked pages, or None when the master
    does not know the request (ask it the old way). `args`: the internal daemon's "agents"
    args. RequestError/ProtocolError for a master that fails or breaks the rules before the
    first page is taken."""
    try:
        result, page = session.call(REQUEST, args, timeout=timeout)
    except RequestError as err:
        if err.code == "unknown_command":
            return None
        raise
    pages = Pages(session.peer_name, result, page)
    return localsock.Chunked(agentrows.streamed(pages.count, session.peer_name),
                             pages.relay(session, timeout))


def bad_page(peer, why):
    """The one line that tells a bad page from master `peer` (here and in cluster_control)."""
    return "master %s sent a bad page of the agent listing: %s" % (text.quote(peer, 64), why)


class Pages(object):
    """The checks of a listing's pages from master `peer` (check_page)."""

    def __init__(self, peer, first, page):
        self.peer = peer
        self.rows = 0
        if not isinstance(first, dict) or first.get("columns") != list(agentrows.COLUMNS):
            raise self.bad("its answer does not announce the columns %s"
                           % ",".join(agentrows.COLUMNS))
        count, token = first.get("count"), first.get("listing")
        if not isinstance(count, compat.integer_types) or isinstance(count, bool) or count < 0:
            raise self.bad("the row count is not a number")
        if not isinstance(token, compat.string_types) or not 0 < len(token) <= 64:
            raise self.bad("the listing has no token")
        self.count, self.token = count, token
        self.first = self.check_page(first, page)

    def bad(self, why):
        return ProtocolError(bad_page(self.peer, why))

    def check_page(self, result, page):
        """(page, more) of a next page of the listing with its `result`, else ProtocolError
        naming the master. Its rows are cluster_control's to check (see the module
        docstring): it decodes them anyway."""
        if not isinstance(result, dict) or result.get("listing") != self.token:
            raise self.bad("it belongs to another listing")
        more = result.get("more")
        if not isinstance(more, bool):
            raise self.bad("'more' is not true or false")
        if len(page) > PAGE_LIMIT:
            raise self.bad("%d bytes (at most %d)" % (len(page), PAGE_LIMIT))
        if not page and more:
            raise self.bad("a page without rows is not the last")
        return page, more

    def relay(self, session, timeout):
        """Yield the pages' bytes, asking for the next while cluster_control decodes this."""
        page, more = self.first
        self.first = None
        while True:
            if page:
                yield page
            if not more:
                return
            result, data = session.call(REQUEST, {"listing": self.token}, timeout=timeout)
            page, more = self.check_page(result, data)
