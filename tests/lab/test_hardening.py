"""Attacks on the lab as a whole (issue 22): what a careless or hostile user does to a sweep, its store and its files.

Each test builds its damage itself (files cut, bytes flipped, configs swapped) and checks what the user gets: one
clear line naming the problem and the fix, never a traceback, never a silent mix of results, nothing lost.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.lab.sweep.lock import SweepLock
from tiny_sweep import sweep, tiny_sweep


@pytest.fixture
def cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """Two runs (standard, reversed) of two steps each on the tiny model, caches inside ``tmp_path``."""
    cache = str(tmp_path / "cache")
    return tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "out", name="h",
                      **{"model.cache_dir": cache, "data.cache_dir": cache})


@pytest.fixture
def umask_002():
    """A umask that tells 0664 (what ordinary files get) from 0644 and from mkstemp's 0600."""
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(root.rglob("*"))}


# ---- item 16: every file a sweep writes gets the mode the umask gives ordinary files --------------------------------

def test_every_file_a_sweep_and_its_report_write_follows_the_umask(cfg, tmp_path, capsys, umask_002, one_thread):
    rc, out, _ = sweep(capsys, tmp_path, cfg)
    assert rc == 0, out
    assert main(["report", cfg["out_dir"]]) == 0
    written = {**{f"out/{k}": v for k, v in modes(tmp_path / "out").items()},
               **{f"cache/{k}": v for k, v in modes(tmp_path / "cache").items()}}
    assert any(k.endswith("result.json") for k in written) and any(k.endswith(".pt") for k in written)
    want = {k: oct((0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask_002) for k in written}
    assert written == want


def test_the_sweep_lock_follows_the_umask(tmp_path, umask_002):
    with SweepLock(tmp_path, log=lambda s: None) as lock:
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o666 & ~umask_002
