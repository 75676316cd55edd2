"""Benchmark of change detection (SPEC section 8): run by hand, never collected by pytest.

    PYTHONPATH=lib python3 tests/bench/bench_scan.py [--shared N] [--agents N] [--tracked N]

Builds a temporary installation with N shared files (default 10 000, ~1.7 KB each, 100 per
group) and N agent-info files (default 50 000), then prints, same run, same tree:
- a steady full pass (nothing changed) in us/file next to `find DIR -printf ...`;
- the first full pass (hashes everything) and the cost of storing it in the database;
- poll() cost per call;
- detection: which pass sees each kind of change, that pass's cost, and the delay implied by
  the default cadence (poll every 1 s, full pass every 10 s);
- the idle CPU estimate: poll cost / poll interval + full pass cost / scan interval;
- RSS of a separate process (same interpreter) holding --tracked files (default 100 000)
  through Catalog + ClusterDB, like the internal daemon.
"""
from __future__ import absolute_import, division, print_function

import collections
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib"))

from wazuh_cluster import catalog, compat, db as dbmod, scanner  # noqa: E402

Item = collections.namedtuple("Item", ("name", "path", "kind", "source", "recursive", "mode",
                                       "dir_mode", "hot", "mtime_is_data", "delete_dirs"))
ITEMS = (
    Item("client.keys", "etc/client.keys", "file", "master", False, 0o640, 0o770, True, False,
         False),
    Item("shared", "etc/shared", "dir", "master", True, 0o660, 0o770, False, False, True),
    Item("agent-groups", "queue/agent-groups", "dir", "master", False, 0o660, 0o770, False,
         False, False),
    Item("agent-info", "queue/agent-info", "dir", "client", False, 0o660, 0o770, False, True,
         False),
)
EXCLUDE = ("merged.mg", "ar.conf", "ossec.conf", "*~", ".*.tmp", "*.tmp", "*.swp", ".*")
POLL_INTERVAL = 1.0
SCAN_INTERVAL = 10.0
FOREIGN_INTERVAL = catalog.FOREIGN_SCAN_INTERVAL
SHARED_BLOB = (b"<agent_config>\n  <localfile><location>/var/log/x</location></localfile>\n"
               b"</agent_config>\n") * 20


def build_tree(home, shared, agents):
    """A Wazuh-like tree: shared groups of 100 files, agent-info, client.keys."""
    for folder in ("etc/shared", "queue/agent-info", "queue/agent-groups", "var/db"):
        os.makedirs(os.path.join(home, folder))
    for i in range(shared):
        group = os.path.join(home, "etc/shared", "group%03d" % (i // 100))
        if i % 100 == 0:
            os.mkdir(group)
        with open(os.path.join(group, "file%05d.conf" % i), "wb") as handle:
            handle.write(SHARED_BLOB[:1600] + (b"%05d\n" % i if not compat.PY2 else
                                                ("%05d\n" % i).encode()))
    info = os.path.join(home, "queue/agent-info")
    lines = []
    for i in range(agents):
        name = "agent%06d-10.%d.%d.%d" % (i, (i >> 16) & 255, (i >> 8) & 255, i & 255)
        with open(os.path.join(info, name), "wb") as handle:
            handle.write(("Linux agent%06d 3.10.0 x86_64 - Wazuh v3.0.0 / abc\n"
                          "#\"manager_hostname\":manager01\n#\"node_name\":node01\n"
                          % i).encode())
        lines.append("%03d agent%06d any %s" % (i + 1, i, "k" * 64))
    with open(os.path.join(home, "etc/client.keys"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def timed(func, repeat):
    """(median wall seconds per call, result of the last call)."""
    costs = []
    result = None
    for _ in range(repeat):
        start = compat.monotonic()
        result = func()
        costs.append(compat.monotonic() - start)
    return median(costs), result


def cpu_timed(func, repeat, children=False):
    """(CPU seconds per call, user + system, of this process or of its children, result).

    CPU time rather than wall time: the idle target is a share of a core, and the test
    machine is shared with other jobs that make wall-clock figures noisy.
    """
    before = os.times()
    result = None
    for _ in range(repeat):
        result = func()
    after = os.times()
    if children:
        used = (after[2] - before[2]) + (after[3] - before[3])
    else:
        used = (after[0] - before[0]) + (after[1] - before[1])
    return used / repeat, result


def run_find(home):
    with open(os.devnull, "w") as null:
        subprocess.check_call(["find", home, "-printf", "%p %s %T@ %i %C@\n"], stdout=null)


def vm_status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_child(home):
    """Child mode: hold every file of `home` through Catalog + ClusterDB, print RSS."""
    before = vm_status("VmRSS")
    log = logging.getLogger("bench")
    log.addHandler(logging.NullHandler())
    db = dbmod.ClusterDB(os.path.join(home, "var/db/cluster.db"), log)
    cat = catalog.Catalog(home, ITEMS, EXCLUDE, db, log)
    event = cat.tick(compat.monotonic())
    del event
    cat.tick(compat.monotonic() + SCAN_INTERVAL)  # a steady full pass
    print("%d %.1f %.1f %.1f" % (len(cat.scanner), before, vm_status("VmRSS"),
                                 vm_status("VmHWM")))


def detection(home, scan):
    """For each change kind: which pass reports it first, and what that pass costs."""
    keys = os.path.join(home, "etc/client.keys")
    shared = os.path.join(home, "etc/shared/group007")
    rows = []

    def edit_keys():
        with open(keys, "r+b") as handle:  # in place, same size
            handle.seek(0)
            handle.write(b"999")
        return "etc/client.keys"

    def create_shared():
        with open(os.path.join(shared, "new.conf"), "wb") as handle:
            handle.write(b"new")
        return "etc/shared/group007/new.conf"

    def rename_over():
        tmp = os.path.join(shared, ".file00701.conf.x.tmp")
        with open(tmp, "wb") as handle:
            handle.write(b"replaced")
        os.rename(tmp, os.path.join(shared, "file00701.conf"))
        return "etc/shared/group007/file00701.conf"

    def delete_shared():
        os.unlink(os.path.join(shared, "file00702.conf"))
        return "etc/shared/group007/file00702.conf"

    def edit_shared_in_place():
        with open(os.path.join(shared, "file00703.conf"), "r+b") as handle:
            handle.write(b"<edited>")
        return "etc/shared/group007/file00703.conf"

    def touch_agent_info():
        path = os.path.join(home, "queue/agent-info/agent000042-10.0.0.42")
        os.utime(path, None)
        return "queue/agent-info/agent000042-10.0.0.42"

    for label, change in (("client.keys edited in place", edit_keys),
                          ("shared file created", create_shared),
                          ("shared file renamed over", rename_over),
                          ("shared file deleted", delete_shared),
                          ("shared file edited in place", edit_shared_in_place),
                          ("agent-info keepalive (touch)", touch_agent_info)):
        name = change()
        start = compat.monotonic()
        found = scan.poll()
        cost = compat.monotonic() - start
        seen = name in found.changed + found.deleted + found.touched
        if seen:
            interval, how = POLL_INTERVAL, "poll"
        else:
            # The full pass of the node that owns the file, over that file's item.
            only = frozenset([scan.item_of(name).name])
            start = compat.monotonic()
            found = scan.full_pass(only)
            cost = compat.monotonic() - start
            seen = name in found.changed + found.deleted + found.touched
            interval, how = SCAN_INTERVAL, "full pass" if seen else "NOT SEEN"
        # The change lands at a uniformly random phase of the cadence.
        rows.append((label, how, cost, 0.5 * interval + cost, 0.99 * interval + cost))
        time.sleep(RACY_SETTLE)  # let the edited file leave the racy window
        scan.poll()
        scan.poll()
    return rows


RACY_SETTLE = scanner.RACY_NS / 1e9 + 0.1


def main(argv):
    """Run the benchmark; returns an exit code."""
    opts = {"--shared": 10000, "--agents": 50000, "--tracked": 100000}
    args = list(argv)
    if args[:1] == ["--rss-child"]:
        rss_child(args[1])
        return 0
    while args:
        key = args.pop(0)
        opts[key] = int(args.pop(0))
    workdir = tempfile.mkdtemp(prefix="wzc-bench-scan-")
    try:
        return run(workdir, opts)
    finally:
        shutil.rmtree(workdir)


def run(workdir, opts):
    home = os.path.join(workdir, "home")
    shared, agents = opts["--shared"], opts["--agents"]
    print("python %s, sqlite %s, %d shared + %d agent-info files"
          % (compat.VERSION, dbmod.sqlite3.sqlite_version, shared, agents))
    start = time.time()
    build_tree(home, shared, agents)
    print("tree built in %.1f s" % (time.time() - start))
    time.sleep(RACY_SETTLE)  # fresh files would be "racy" and re-hashed by the next polls
    total = shared + agents + 1

    scan = scanner.Scanner(home, ITEMS, EXCLUDE)
    first, changes = timed(scan.full_pass, 1)
    print("first full pass (stat + SHA-256 of every file): %.3f s, %.1f us/file, %d files"
          % (first, first / total * 1e6, len(changes.changed)))
    log = logging.getLogger("bench")
    log.addHandler(logging.NullHandler())
    cdb = dbmod.ClusterDB(os.path.join(home, "var/db/cluster.db"), log)
    rows = list(scan.rows())
    store, _ = timed(lambda: cdb.save_files(rows), 1)
    print("store %d file rows in one transaction: %.3f s" % (len(rows), store))
    cdb.close()

    run_find(home)  # warm the dentry cache the same way for both
    wall_full, _ = timed(scan.full_pass, 3)
    wall_find, _ = timed(lambda: run_find(home), 3)
    full, changes = cpu_timed(scan.full_pass, 10)
    assert changes.is_empty(), changes
    find_cost, _ = cpu_timed(lambda: run_find(home), 10, children=True)
    print("steady full pass: CPU %.3f s = %.2f us/file (wall %.3f s); find -printf: CPU "
          "%.3f s = %.2f us/file (wall %.3f s); ratio %.2f"
          % (full, full / total * 1e6, wall_full, find_cost, find_cost / total * 1e6,
             wall_find, full / find_cost))
    poll, changes = cpu_timed(scan.poll, 200)
    assert changes.is_empty(), changes
    print("poll(): CPU %.3f ms per call (%d folders, hot client.keys)"
          % (poll * 1e3, len(scan._dirs)))
    info = os.path.join(home, "queue/agent-info")

    def one_more_agent():
        # What a master sees all day: sync renames a received agent-info file into place,
        # so the folder's mtime changes and the poll re-lists 50 000 entries.
        tmp = os.path.join(info, ".agent000001-10.0.0.1.x.tmp")
        with open(tmp, "wb") as handle:
            handle.write(b"Linux agent000001 updated\n")
        os.rename(tmp, os.path.join(info, "agent000001-10.0.0.1"))
        return scan.poll()
    busy, changes = cpu_timed(one_more_agent, 20)
    assert changes.changed + changes.touched == ["queue/agent-info/agent000001-10.0.0.1"], \
        changes
    print("poll() re-listing agent-info after a file was renamed into it: CPU %.1f ms"
          % (busy * 1e3))
    own = frozenset(("client.keys", "shared", "agent-groups"))
    own_cost, _ = cpu_timed(lambda: scan.full_pass(own), 10)
    foreign_cost, _ = cpu_timed(lambda: scan.full_pass(frozenset(["agent-info"])), 10)
    cpu = poll / POLL_INTERVAL + full / SCAN_INTERVAL
    print("idle cost, every item passed every %gs, poll every %gs: %.2f%% of one core "
          "(poll %.3f%% + full pass %.2f%%)"
          % (SCAN_INTERVAL, POLL_INTERVAL, cpu * 100, poll / POLL_INTERVAL * 100,
             full / SCAN_INTERVAL * 100))
    poll_own, _ = cpu_timed(lambda: scan.poll(own), 200)
    # Catalog on a master: polls its own items every poll, every folder every scan_interval,
    # passes its own items every scan_interval and agent-info every FOREIGN_INTERVAL.
    cpu = (poll_own / POLL_INTERVAL + max(0.0, poll - poll_own) / SCAN_INTERVAL
           + own_cost / SCAN_INTERVAL + foreign_cost / FOREIGN_INTERVAL)
    print("idle cost of a master as Catalog runs it (poll of its own items every %gs: CPU "
          "%.3f ms; own items passed every %gs: CPU %.3f s; agent-info, which it only "
          "receives, every %gs: CPU %.3f s): %.2f%% of one core"
          % (POLL_INTERVAL, poll_own * 1e3, SCAN_INTERVAL, own_cost, FOREIGN_INTERVAL,
             foreign_cost, cpu * 100))
    print("detection (delay = uniform phase within the cadence + cost of the pass):")
    print("  %-30s %-10s %10s %9s %9s" % ("change", "seen by", "pass cost", "p50", "p99"))
    for label, how, cost, p50, p99 in detection(home, scan):
        print("  %-30s %-10s %8.1fms %8.2fs %8.2fs" % (label, how, cost * 1e3, p50, p99))

    tracked = opts["--tracked"]
    home2 = os.path.join(workdir, "home2")
    build_tree(home2, min(shared, tracked // 10), tracked - min(shared, tracked // 10) - 1)
    out = subprocess.check_output([sys.executable, os.path.abspath(__file__), "--rss-child",
                                   home2], env=dict(os.environ, PYTHONPATH=os.path.join(
                                       os.path.dirname(os.path.dirname(HERE)), "lib")))
    count, before, rss, hwm = out.decode().split()
    print("RSS holding %s tracked files (Catalog + ClusterDB): %s MB (interpreter + imports "
          "%s MB; peak %s MB)" % (count, rss, before, hwm))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
