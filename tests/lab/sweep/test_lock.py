"""The sweep directory's lock: one writer at a time, stale locks taken over, a clear error naming the other sweep."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from loralab.lab.sweep.lock import LOCK, SweepLock, SweepLockedError, lock_holder


@pytest.fixture
def other_process():
    """A live process that is not this one (its pid stands in for another sweep's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_holds_the_pid_and_is_released(tmp_path):
    with SweepLock(tmp_path / "out", log=lambda s: None):
        assert (tmp_path / "out" / LOCK).read_text().split() == [str(os.getpid()), socket.gethostname()]
        with SweepLock(tmp_path / "out", log=lambda s: None):   # re-entrant: the Ray driver inside run_sweep
            pass
        assert (tmp_path / "out" / LOCK).exists()   # the inner block does not release the outer one's lock
    assert not (tmp_path / "out" / LOCK).exists()


def test_a_live_sweep_holding_the_lock_is_refused_by_name(tmp_path, other_process):
    (tmp_path / LOCK).write_text(f"{other_process} {socket.gethostname()}\n")
    with pytest.raises(SweepLockedError) as e:
        with SweepLock(tmp_path, log=lambda s: None):
            pass
    assert f"another sweep (pid {other_process}) is writing to {tmp_path}" in str(e.value)
    assert (tmp_path / LOCK).read_text().split()[0] == str(other_process)   # left alone
    assert lock_holder(tmp_path) == other_process


def test_a_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK).write_text("1 some-other-host\n")
    with pytest.raises(SweepLockedError, match=f"pid 1 on some-other-host.*remove {tmp_path / LOCK}"):
        with SweepLock(tmp_path, log=lambda s: None):
            pass


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK).write_text(f"{pid} {socket.gethostname()}\n")
    notes = []
    with SweepLock(tmp_path, log=notes.append):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())
    assert len(notes) == 1 and "stale" in notes[0] and str(pid) in notes[0]
    assert lock_holder(tmp_path) is None


def test_an_empty_lock_is_young_then_stale(tmp_path):
    """Created but not yet written by a live process: refused; left empty by a killed one: taken over later."""
    (tmp_path / LOCK).write_text("")
    with pytest.raises(SweepLockedError, match="pid unknown"):
        with SweepLock(tmp_path, log=lambda s: None):
            pass
    old = time.time() - 60
    os.utime(tmp_path / LOCK, (old, old))
    with SweepLock(tmp_path, log=lambda s: None):
        assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())


def test_a_fresh_lock_made_during_a_takeover_is_given_back(tmp_path, monkeypatch, other_process):
    """Two sweeps read the same stale lock; the first takes it over and writes its own; the second must not then
    remove that fresh lock (it moves it aside, sees it is not the stale one, puts it back and is refused)."""
    from loralab.lab.sweep import lock as lock_mod

    stale = dead_pid()
    (tmp_path / LOCK).write_text(f"{stale} {socket.gethostname()}\n")
    real = lock_mod._holder
    reads = []

    def racing(path):
        got = real(path)
        if len(reads) == 1:   # right after the takeover's read of the stale lock, the other sweep takes it over
            (tmp_path / LOCK).write_text(f"{other_process} {socket.gethostname()}\n")
        reads.append(got)
        return got

    monkeypatch.setattr(lock_mod, "_holder", racing)
    with pytest.raises(SweepLockedError, match=f"pid {other_process}"):
        with SweepLock(tmp_path, log=lambda s: None):
            pass
    assert (tmp_path / LOCK).read_text().split()[0] == str(other_process)
    assert not list(tmp_path.glob(f"{LOCK}.stale.*"))
