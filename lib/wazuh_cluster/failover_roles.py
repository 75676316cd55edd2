"""cluster.failover=1: the data plane follows the election (one thread, off the election's).

The code of both roles exists once (sync.py, inbox.py, the internal daemon's catalog); this
module switches which one runs. A node that acts as master sends and receives as Wazuh 3.0's
master did; a node that follows a leader is a client of it; a node that knows no leader keeps
its role but, as a master, does nothing without its lease (sync.PeerSync.may_act). The switch
tells, in order: the internal daemon (what it owns and whom its changes are for; its restarts
too), the receiving side, then the sending side (sync.SyncManager.set_roles). A step that
fails (the internal daemon restarting) is tried again a second later.
"""
from __future__ import absolute_import, division, print_function

import threading

from wazuh_cluster import compat, logs
from wazuh_cluster.errors import RequestError

RETRY = 1.0


class RoleSwitch(object):

    def __init__(self, failover, node_name, role, link, supervisor, inbox, sync):
        self.failover = failover
        self.node_name = node_name
        self.role = role
        self.link = link
        self.supervisor = supervisor
        self.inbox = inbox
        self.sync = sync
        self.log = logs.get("failover")
        self.once = logs.OnceLog(self.log)
        self.cond = compat.Condition()   # 2.7: the idle switch must not poll
        self.poked = False
        self.applied = None         # (acting, leader name) the data plane was set for
        self.stopped = False
        self.thread = None
        failover.listeners.append(self.changed)

    def start(self):
        # made here, not before the daemon forks
        self.thread = threading.Thread(target=self._run, name="failover-roles")
        self.thread.daemon = True
        self.thread.start()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(5.0)

    def changed(self, acting, leader):
        """Failover listener: only wakes the thread, which reads the election's state itself
        (listeners of two threads may be called in either order)."""
        with self.cond:
            self.poked = True
            self.cond.notify()

    def reapply(self):
        """The internal daemon restarted (it starts with the last role set): tell it again."""
        with self.cond:
            self.applied = None
            self.poked = True
            self.cond.notify()

    def _run(self):
        while True:
            with self.cond:
                if not self.stopped and not self.poked:
                    self.cond.wait(RETRY)
                self.poked = False
                if self.stopped:
                    return
            wanted = (self.failover.is_acting(), self.failover.leader_name())
            if wanted == self.applied:
                continue
            try:
                self.apply(*wanted)
            except RequestError as err:
                self.once.warning("postponed", "Failover: role change postponed: %s", err)
                continue
            self.once.clear("postponed", "Failover: role change done")
            self.applied = wanted

    def apply(self, acting, leader):
        if acting:
            role = "master"
        elif leader is not None and leader != self.node_name:
            role = "client"
        else:
            role = self.role
        self.link.call("set_role", {"role": role})
        self.supervisor.set_node_type(role)
        if role != self.role:
            self.log.info("Failover: this node now synchronises as a %s (leader %s).", role,
                          leader)
            self.role = role
        self.inbox.set_role(role)
        self.sync.set_roles(role, None if leader == self.node_name else leader)
