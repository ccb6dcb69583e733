"""One writer per sweep directory: ``<out_dir>/sweep.lock``, created atomically, holding the writer's pid and host.

Two sweeps on one ``out_dir`` would each reset the runs the other is training. The lock file is created with
``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), so exactly one process gets it. A lock left by a process that died
(SIGKILL, a lost machine) is stale: on the same host, a dead pid is taken over with a note; a lock from another host
cannot be checked from here, so it is refused with the command that removes it. The lock is re-entrant within one
process (the sweep and its executor may both take it). Not ``fcntl.flock``: it is unreliable on network file systems,
where sweeps on a cluster keep their store.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..runtime import pid_alive

LOCK = "sweep.lock"
EMPTY_GRACE_S = 10.0  # a lock without a pid is young (being written) for this long, then stale


class SweepLockedError(ValueError):
    """Another live process holds the sweep directory's lock."""


def _holder(path: Path) -> tuple[int | None, str]:
    """``(pid, host)`` written in the lock; ``pid`` is ``None`` when the file is empty or unreadable."""
    try:
        lines = path.read_text(encoding="utf-8").split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None, ""
    pid = int(lines[0]) if lines and lines[0].isdigit() else None
    return pid, lines[1] if len(lines) > 1 else ""


class SweepLock:
    """``with SweepLock(out_dir): ...`` holds ``out_dir/sweep.lock`` for the block.

    Raises:
        SweepLockedError: another live sweep holds it, naming its pid and how to go on.
    """

    def __init__(self, root: str | os.PathLike, log: Callable[[str], None] = print):
        self.path, self.log, self._owner = Path(root).expanduser() / LOCK, log, False
        self._me = f"{os.getpid()} {socket.gethostname()}\n"

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask decides, as for any file
            except FileExistsError:
                if self._held_here():
                    return self  # this process holds it already (re-entered): the outer block releases it
                self._take_over_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._me)
            self._owner = True
            return self
        raise self._locked(*_holder(self.path))

    def _held_here(self) -> bool:
        pid, host = _holder(self.path)
        return pid == os.getpid() and host == socket.gethostname()

    def _take_over_stale(self) -> None:
        """Remove the lock if its process is gone; else raise :class:`SweepLockedError`."""
        pid, host = _holder(self.path)
        if pid is None:  # no pid yet: just created by a live process, or by one killed before writing it
            try:
                young = time.time() - self.path.stat().st_mtime < EMPTY_GRACE_S
            except FileNotFoundError:
                return  # released meanwhile: create it again
            if young:
                raise self._locked(pid, host)
        elif host not in ("", socket.gethostname()) or pid_alive(pid):
            raise self._locked(pid, host)
        # Two processes may take over the same stale lock: each moves the file aside atomically and checks it moved
        # the stale one; one that moved a fresh lock (made by the other after it read the stale one) puts it back.
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # taken over by another process first: try to create it again
        if _holder(aside) != (pid, host):
            os.replace(aside, self.path)
            raise self._locked(*_holder(self.path))
        self.log(f"note: taking over the stale lock {self.path} (pid {pid} is not running)")
        aside.unlink(missing_ok=True)

    def _locked(self, pid: int | None, host: str) -> SweepLockedError:
        where = ("pid unknown" if pid is None else f"pid {pid}") + (
            f" on {host}" if host and host != socket.gethostname() else ""
        )
        return SweepLockedError(
            f"another sweep ({where}) is writing to {self.path.parent}; wait for it to end, or "
            f"use another out_dir. If no sweep runs there any more, remove {self.path}"
        )

    def __exit__(self, *exc) -> None:
        if self._owner and _holder(self.path)[0] == os.getpid():
            self.path.unlink(missing_ok=True)
        self._owner = False


def lock_holder(root: str | os.PathLike) -> int | None:
    """The pid of a live sweep holding ``root``'s lock on this host, else ``None`` (for a dry run's note)."""
    pid, host = _holder(Path(root).expanduser() / LOCK)
    return pid if pid is not None and host in ("", socket.gethostname()) and pid_alive(pid) else None
