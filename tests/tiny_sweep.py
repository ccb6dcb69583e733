"""The tiny model's sweep config, written once for the tests that plan or run a sweep: a dict, as its TOML file
holds it, and the TOML text for it."""

from __future__ import annotations

import copy
import json
from pathlib import Path


def tiny_sweep(model: Path, data: Path, out_dir: Path, *, name: str = "tiny", grid: dict | None = None,
               **changes) -> dict:
    """Runs of two steps of 2 × 32 tokens on the tiny model, LoRA rank 4 on q/v, one eval at the end; the grid is
    ``lora.init`` ∈ {standard, reversed} unless ``grid`` replaces it. ``changes`` set dotted keys, as :func:`with_`
    (``**{"train.max_steps": 3, "pack": 2}``)."""
    cfg = {"name": name, "out_dir": str(out_dir), "model": {"name": str(model)},
           "data": {"source": str(data), "seq_len": 32, "max_train_chunks": 8, "max_eval_chunks": 2},
           "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]},
           "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "device": "cpu"},
           "grid": {"lora.init": ["standard", "reversed"]} if grid is None else grid}
    return with_(cfg, **changes)


def with_(cfg: dict, **changes) -> dict:
    """``cfg`` with dotted keys set, e.g. ``with_(cfg, **{"train.lr": 0})``."""
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        *tables, last = key.split(".")
        node = cfg
        for t in tables:
            node = node.setdefault(t, {})
        node[last] = value
    return cfg


def toml_text(table: dict) -> str:
    """A TOML document for a dict of scalars, lists and (one level of) tables; JSON literals are valid TOML here."""
    top = [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{json.dumps(kk)} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in table.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def write_toml(path: Path, table: dict) -> Path:
    path.write_text(toml_text(table), encoding="utf-8")
    return path


def sweep(capsys, tmp_path: Path, cfg: dict, *extra: str) -> tuple[int, str, str]:
    """``loralab sweep`` on ``cfg`` in this process: its exit code, stdout and stderr."""
    from loralab.cli import main

    rc = main(["sweep", str(write_toml(tmp_path / "sweep.toml", cfg)), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err
