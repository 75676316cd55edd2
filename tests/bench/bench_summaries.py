"""CPU of a master's internal daemon making its clients' round summaries (summary.py), in
process: run by hand (never collected by pytest).

    python3 tests/bench/bench_summaries.py [CLIENTS [AGENT-INFO PER CLIENT]]   (10 10000)

A master catalog (real SQLite, real files in a temporary folder) holding CLIENTS x AGENT-INFO
files, each client's agents recorded; prints the CPU (user + system) of making the CLIENTS
summaries the rounds ask for (in the form this version asks for): the first time, again with
nothing changed (as after any agent rows), and after every file kept alive (utime, told to the
catalog as "received" rows, as the keepalive path does). Run it from two worktrees,
alternated, to compare versions.
"""
from __future__ import absolute_import, division, print_function

import logging, os, sys, time, tempfile, shutil
tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
K = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
sys.path.insert(0, os.path.join(tree, "lib"))
from wazuh_cluster import catalog as catalog_mod, db as dbmod, config, deltarx, summary
ITEMS, EXCLUDE = config.load_items(os.path.join(tree, "etc", "cluster.json"))
home = tempfile.mkdtemp(prefix="wazuh-bench-summaries.")
for f in ("etc/shared/default", "queue/agent-info", "var/db"):
    os.makedirs(os.path.join(home, f))
names = ["agent%06d-10.0.%d.%d" % (i, i // 256 % 256, i % 256) for i in range(N * K)]
info = os.path.join(home, "queue", "agent-info")
for i, n in enumerate(names):
    with open(os.path.join(info, n), "w") as h:
        h.write("Linux agent %d 3.10.0 - Wazuh v3.0.0 / ab12\n" % i)
    os.utime(os.path.join(info, n), (1500000000 + i, 1500000000 + i))
log = logging.getLogger("wave")
db = dbmod.ClusterDB(os.path.join(home, "var/db/cluster.db"), log)
cat = catalog_mod.Catalog(home, ITEMS, EXCLUDE, db, log, role="master", node_name="master01")
cat.tick(0.0)
while cat.scanner.backlog():
    cat.tick(0.1)
cat.handle("agent_nodes", {"rows": [[n, "c%02d" % (i % N)] for i, n in enumerate(names)]})
# The form this version's rounds ask for (none before form 2: 1).
form = {"form": summary.FORM} if getattr(summary, "FORM", 1) != 1 else {}
def summaries():
    t = sum(os.times()[:2])
    for c in range(N):
        cat.handle("summary", dict({"source": "client", "node": "c%02d" % c}, **form))
    return sum(os.times()[:2]) - t
first = summaries()
cat._summaries.clear()   # as after any agent rows: made again from the records
again = summaries()
# the wave: every file touched, told to the daemon as "received" rows (keepalive path)
for i, n in enumerate(names):
    os.utime(os.path.join(info, n), (1600000000 + i, 1600000000 + i))
rows = [deltarx.written_row(home, "queue/agent-info/" + n,
                           cat.scanner.row("queue/agent-info/" + n)[7]) for n in names]
for at in range(0, len(rows), 2000):
    cat.handle("received", {"rows": rows[at:at + 2000]})
cat.handle("agent_nodes", {"rows": [[n, "c%02d" % (i % N)] for i, n in enumerate(names)]})
after = summaries()
print("%s, Python %s, form %s: %d clients x %d: summaries first %.3f s, again unchanged "
      "%.3f s, after the wave %.3f s (CPU)" % (tree, sys.version.split()[0], form.get("form", 1),
                                                N, K, first, again, after))
shutil.rmtree(home)
