"""Attacks on the lab as a whole (issue 22): what a careless or hostile user does to a sweep, its store and its files.

Each test builds its damage itself (files cut, bytes flipped, configs swapped) and checks what the user gets: one
clear line naming the problem and the fix, never a traceback, never a silent mix of results, nothing lost.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sweep.test_dry_run import toml_text

from loralab.cli import main
from loralab.lab.sweep.lock import SweepLock


@pytest.fixture
def cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> dict:
    """Two runs (standard, reversed) of two steps each on the tiny model, caches inside ``tmp_path``."""
    return {"name": "h", "out_dir": str(tmp_path / "out"),
            "model": {"name": str(tiny_lm_dir), "cache_dir": str(tmp_path / "cache")},
            "data": {"source": str(chat_jsonl), "seq_len": 32, "max_train_chunks": 8, "max_eval_chunks": 2,
                     "cache_dir": str(tmp_path / "cache")},
            "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
            "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "device": "cpu"},
            "grid": {"lora.init": ["standard", "reversed"]}}


def sweep(capsys, tmp_path: Path, cfg: dict, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "sweep.toml"
    path.write_text(toml_text(cfg), encoding="utf-8")
    rc = main(["sweep", str(path), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


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
