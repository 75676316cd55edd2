"""socketserver's accept loop without its poll interval.

serve_forever(0.2) wakes its thread five times a second to look at a stop flag. wazuh-clusterd
runs two such servers (peers, cluster_control), and an idle master's clusterd woke about 30
times a second in all, which was most of its CPU while nothing happened (issue 11: idle
<= 1 % of a core for both daemons). Here the thread blocks in select() on the listening
socket and a pipe of its own, with no timeout, and stop() writes to the pipe: it wakes only
for a connection or to stop, and stops as promptly as before.
"""
from __future__ import absolute_import, division, print_function

import errno
import os
import select

from wazuh_cluster import compat


class QuietServe(object):
    """Mixin for a socketserver server, named after it among the bases (2.7's socketserver
    classes are old-style: before them, object's __init__ would come first): new_waker()
    before the serving thread starts, serve_quietly() in it, stop_serving(thread, timeout)
    from any other thread."""

    _waker = None

    def new_waker(self):
        """The pipe that stop_serving() writes to; call before the serving thread starts."""
        self._waker = os.pipe()
        for fd in self._waker:
            compat.set_cloexec(fd)

    def serve_quietly(self):
        wake = self._waker[0]
        while True:
            try:
                readable = select.select([self.socket, wake], [], [])[0]
            except (select.error, OSError) as err:
                if err.args[0] == errno.EINTR:
                    continue
                raise
            if wake in readable:
                return
            if readable:
                # accept, verify_request, process_request (a thread per connection): what
                # serve_forever does for a readable socket
                self._handle_request_noblock()

    def stop_serving(self, thread, timeout):
        """Wake the serving thread, wait up to `timeout` s for it, close the pipe."""
        if self._waker is None:
            return
        try:
            os.write(self._waker[1], b"x")
        except OSError:
            pass
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return  # still in select() on the pipe: left open, as the thread's
        for fd in self._waker:
            try:
                os.close(fd)
            except OSError:
                pass
        self._waker = None
