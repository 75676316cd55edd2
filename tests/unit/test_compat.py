"""compat's timed waits: threading's API, on 2.7 woken by one timer thread instead of polling."""
from __future__ import absolute_import, division, print_function

import hashlib
import os
import stat
import sys
import threading

import pytest

from wazuh_cluster import compat


def test_event_wait_times_out_false_after_its_timeout():
    event = compat.Event()
    start = compat.monotonic()
    assert event.wait(0.05) is False
    assert compat.monotonic() - start >= 0.05 - 1e-3


def test_event_set_by_another_thread_ends_a_long_wait():
    event = compat.Event()
    threading.Thread(target=event.set).start()
    assert event.wait(600) is True  # returns as soon as it is set, not after the timeout
    assert event.is_set()
    event.clear()
    assert not event.is_set() and event.wait(0) is False


def test_condition_notify_wakes_a_timed_wait_and_a_timeout_ends_one():
    cond = compat.Condition()
    state = []

    def produce():
        with cond:
            state.append("ready")
            cond.notify()
    with cond:
        threading.Thread(target=produce).start()
        while not state:
            cond.wait(600)
        start = compat.monotonic()
        cond.wait(0.05)
        assert compat.monotonic() - start >= 0.05 - 1e-3
    assert state == ["ready"]


def test_many_waiters_with_different_deadlines_all_return():
    events = [compat.Event() for _ in range(20)]
    results = []

    def wait(event, timeout):
        results.append(event.wait(timeout))
    threads = [threading.Thread(target=wait, args=(e, 0.01 * (k % 5)))
               for k, e in enumerate(events)]
    for thread in threads:
        thread.start()
    for event in events[::2]:
        event.set()
    for thread in threads:
        thread.join(60)
    assert len(results) == 20 and not any(t.is_alive() for t in threads)


# Forking with a thread running is the point (3.12+ warns about it): a child forked after
# the 2.7 timer thread started must still time its waits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_timed_waits_work_in_a_forked_child():
    if compat.PY2:
        compat.Event().wait(0.01)  # the parent's timer thread exists before the fork
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = compat.Event().wait(0.01) is False
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_lease_clock_is_the_boot_time_clock_on_every_interpreter():
    # Election leases need a clock that runs on while the machine is suspended; 3.6 has
    # time.clock_gettime but not the CLOCK_BOOTTIME constant, 2.7 neither.
    assert compat.boottime is not compat.monotonic
    first, monotonic = compat.boottime(), compat.monotonic()
    assert first >= monotonic - 0.5      # boot time = monotonic time + time suspended
    assert compat.boottime() >= first


def test_folder_lstat_finds_names_in_its_folder_only(tmp_path):
    folder, other = tmp_path / "agent-info", tmp_path / "elsewhere"
    folder.mkdir()
    other.mkdir()
    (folder / "agent-1.2.3.4").write_bytes(b"x" * 7)
    (other / "secret").write_bytes(b"")
    with compat.FolderLstat(str(folder)) as in_folder:
        assert in_folder.lstat(u"agent-1.2.3.4").st_size == 7
        for name in (u"missing", str(other / "secret")):  # an absolute name stays inside
            with pytest.raises(OSError):
                in_folder.lstat(name)
    with compat.FolderLstat(str(tmp_path / "gone")) as in_gone:
        with pytest.raises(OSError):
            in_gone.lstat(u"agent-1.2.3.4")


def test_folder_lstats_iterates_the_lstats_of_names_in_its_folder(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "a").write_bytes(b"x" * 3)
    os.symlink("a", str(folder / "link"))
    for follow in (True, False):
        with compat.FolderLstat(str(folder), follow=follow) as in_folder:
            got = [(st.st_size, stat.S_ISLNK(st.st_mode))
                   for st in in_folder.lstats([str("a"), str("link")])]
            assert got == [(3, False), (1, True)]  # the link itself
            with pytest.raises(OSError):
                list(in_folder.lstats([str("a"), str("missing")]))


def test_without_dir_fd_a_single_threaded_process_lstats_names_from_inside_their_folder(
        tmp_path, monkeypatch):
    """2.7 has no dir_fd: the internal daemon (one thread) lstats a folder's names from
    inside it (chdir), so the kernel walks no path per name, and is back in its working
    folder after, a name missing or the folder gone too; with other threads, by the joined
    paths (they would resolve their relative names in that folder meanwhile)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "a").write_bytes(b"x" * 3)
    (folder / "b").write_bytes(b"x" * 5)
    here = os.getcwd()
    asked = []
    real = os.lstat

    def lstat(path):
        asked.append(path)
        return real(path)
    monkeypatch.setattr(os, "lstat", lstat)
    for threads, wanted in ((1, [str("a"), str("b")]),
                            (2, [str(folder / "a"), str(folder / "b")])):
        monkeypatch.setattr(compat.threading, "active_count", lambda: threads)
        with compat.FolderLstat(str(folder), follow=False) as in_folder:
            in_folder.close()   # as on 2.7: no descriptor
            del asked[:]
            assert [st.st_size for st in in_folder.lstats([str("a"), str("b")])] == [3, 5]
            assert asked == wanted and os.getcwd() == here
            with pytest.raises(OSError):
                list(in_folder.lstats([str("a"), str("missing")]))
            assert os.getcwd() == here
        with compat.FolderLstat(str(tmp_path / "gone"), follow=False) as in_gone:
            with pytest.raises(OSError):
                list(in_gone.lstats([str("a")]))
            assert os.getcwd() == here


@pytest.mark.parametrize("sizes", [(), (0,), (3,), (compat.SHA256_SMALL,),
                                   (compat.SHA256_SMALL, 1), (100, compat.SHA256_SMALL, 7),
                                   (5 << 20,), (1000,) * 70])
def test_sha256_is_hashlib_s_for_any_split_and_buffer_type(sizes):
    # Small inputs stay with hashlib; the first large one hands over what was kept.
    pieces = [os.urandom(size) for size in sizes]
    expected = hashlib.sha256(b"".join(pieces))
    for kind in (bytes, bytearray, memoryview):
        digest = compat.sha256()
        for piece in pieces:
            digest.update(kind(piece))
        assert digest.hexdigest() == expected.hexdigest()
        assert type(digest.hexdigest()) is type(expected.hexdigest())  # str on 2.7 too
        assert digest.digest() == expected.digest()  # twice, as hashlib allows
        digest.update(b"more")
        assert digest.digest() == hashlib.sha256(b"".join(pieces) + b"more").digest()
    assert compat.sha256(b"".join(pieces)).hexdigest() == expected.hexdigest()



@pytest.mark.parametrize("sizes", [(), (3,), (compat.SHA256_SMALL, 1), (5 << 20,)])
@pytest.mark.parametrize("factory", [compat.sha256, compat.Sha256])
def test_a_copy_of_a_sha256_goes_on_alone_from_the_bytes_given_so_far(sizes, factory):
    # deltarx checks an append from a copy of the object that hashed the base.
    pieces = [os.urandom(size) for size in sizes]
    digest = factory()
    for piece in pieces:
        digest.update(piece)
    copy = digest.copy()
    copy.update(b"appended")
    digest.update(b"other")
    assert copy.hexdigest() == hashlib.sha256(b"".join(pieces) + b"appended").hexdigest()
    assert digest.hexdigest() == hashlib.sha256(b"".join(pieces) + b"other").hexdigest()

def test_sha256_of_a_large_input_lets_other_threads_run():
    # 2.7's builtin SHA-256 (no OpenSSL hashlib) held the GIL for a whole large input: a
    # 9.4 MB client.keys stopped every other thread of wazuh-clusterd for 85-200 ms. A
    # thread spinning meanwhile gets only a few switch intervals' worth of loops then.
    data = os.urandom(1 << 20) * 32
    spins, stop = [0], []

    def spin():
        while not stop:
            spins[0] += 1
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        during = []
        for _ in range(5):  # the spinner may not get a CPU during one: a busy machine
            before = spins[0]
            compat.sha256(data).digest()
            during.append(spins[0] - before)
            if during[-1] > 20000:
                break
    finally:
        stop.append(True)
        thread.join()
    assert max(during) > 20000, during
