"""Width sweep: how LoRA's largest stable learning rate moves with the adapted layer's width n (issue 6, part 2).

Hayou, Ghosh and Yu (NeurIPS 2024, "The Impact of Initialization on LoRA Finetuning Dynamics") predict that with Adam
the largest stable LR scales like n^-1/2 under Init[A] (``standard``) and n^-1 under Init[B] (``reversed``). This
module runs the measurement, following REFERENCE.md "Measuring width scaling": the config, the pretrained students and
the fine-tuning task, one search per cell, the resumable store. ``probe.py`` holds the model family, the probe
and the search rule; ``report.py`` fits, tabulates and plots.

Task: the pretraining target is a teacher of the family at the same width (O(1) outputs per coordinate at every n);
the student learns it briefly with Adam at lr = pretrain_lr / fan_in per layer, a rule that only keeps pretraining
equally stable at every width (pretraining is not what is measured). Fine-tuning target: the teacher with its head
changed by a rank-k ΔW = U Vᵀ (U, V Gaussian), its effect ΔW z scaled to per-coordinate RMS exactly ``shift_scale`` at
every width.

Search per cell: the start guess is the same init and seed at the previous width, moved by n^-3/4 (between the two
predictions). A cell's probes share the adapter init and batch order, so the LR is all that changes between them.

Store: ``<out>/results.json``, written atomically after each cell; a rerun skips finished cells, and a fingerprint of
the settings that change results refuses to mix experiments. A session is recorded with its first finished cell, so a
rerun with nothing left to train leaves the file byte-identical (it is rewritten only when the grid changed, since the
report reads the grid from it). Pretrained students are cached in ``<out>/cache/`` or ``cache_dir`` (a ``.gitignore``
written there keeps the large files out of git).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab import LoraConfig
from loralab.io import atomic_write

from ...config.schema import require
from ...config.toml import apply_overrides, read_toml
from ...config.typecheck import ConfigError, from_dict, to_dict
from ...runtime import pick_device, versions
from ...store import atomic_write_json, read_json
from .probe import (
    FamilyConfig,
    Features,
    ProbeConfig,
    WidthMLP,
    cell_key,
    generator,
    max_stable,
    run_probe,
)

__all__ = [
    "RESULTS",
    "STUDY_INITS",
    "WidthConfig",
    "features",
    "load_width",
    "out_dir",
    "plan_width",
    "pretrained",
    "run_width",
    "search_cell",
]

STUDY_INITS = ("standard", "reversed", "orthogonal-eye", "orthogonal-qr-const", "orthogonal-qr-match")
RESULTS = "results.json"


@dataclass(frozen=True)
class WidthConfig:
    """A width sweep: every init × width × seed gets its max stable LR (TOML: top-level keys, [family], [probe])."""

    name: str = "width"
    out_dir: str = ""  # results.json, tables, figures (required here or as --out)
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    inits: tuple[str, ...] = STUDY_INITS
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed redraws teacher, student, data, shift and adapter
    device: str = "auto"  # auto | cpu | cuda ; auto = cuda when available
    fit_largest: int = 3  # the second slope fit uses this many largest widths
    cache_dir: str = ""  # pretrained students; "" = <out>/cache (share one between experiments)
    family: FamilyConfig = field(default_factory=FamilyConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        w = list(self.widths)
        require(
            len(w) >= 2 and w == sorted(set(w)),
            f"widths must be >= 2 distinct increasing integers, e.g. [64, 128, 256]; got {w}",
        )
        require(w[0] >= self.probe.rank, f"widths: {w[0]} is below probe.rank = {self.probe.rank}; LoRA needs n >= r")
        require(
            bool(self.inits) and len(set(self.inits)) == len(self.inits),
            f"inits must list distinct schemes; got {list(self.inits)}",
        )
        for init in self.inits:
            try:
                LoraConfig(rank=self.probe.rank, alpha=self.probe.alpha, init=init, targets=["head"])
            except ValueError as e:
                raise ValueError(f"inits: {e}") from None
        require(
            bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
            f"seeds must be distinct integers; got {list(self.seeds)}",
        )
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda; got {self.device!r}")
        require(2 <= self.fit_largest <= len(w), f"fit_largest must be in [2, {len(w)}]; got {self.fit_largest}")


def load_width(path: str | Path, overrides: Sequence[str] = ()) -> WidthConfig:
    """Read a width-sweep TOML file, apply ``key=value`` overrides (values parsed as TOML), check everything.

    Raises:
        ConfigError: naming the file and the key (unknown keys included) and how to fix it.
    """
    data = read_toml(path)
    if not data:  # a wrong or emptied file would otherwise start the full default study (105 cells)
        raise ConfigError(
            f"{path} is empty: a width study's config names at least where its results go (out_dir); "
            "start from configs/width.toml"
        )
    apply_overrides(data, overrides, "probe.steps=50, widths=[64,128]")
    try:
        return from_dict(WidthConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# ---- pretrained students and the fine-tuning task ------------------------------------------------------------------


def _pretrain(fam: FamilyConfig, width: int, seed: int, device: torch.device) -> tuple[WidthMLP, dict]:
    teacher = WidthMLP(fam.d_in, width, fam.depth, generator(seed, width, "teacher")).to(device).requires_grad_(False)
    student = WidthMLP(fam.d_in, width, fam.depth, generator(seed, width, "student")).to(device)
    opt = torch.optim.Adam(
        [
            {"params": [m.weight], "lr": fam.pretrain_lr / m.in_features}
            for m in student.modules()
            if isinstance(m, nn.Linear)
        ]
    )
    g, losses = generator(seed, width, "pretrain-data"), []
    for _ in range(fam.pretrain_steps):
        x = torch.randn(fam.pretrain_batch, fam.d_in, generator=g).to(device)
        loss = F.mse_loss(student(x), teacher(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return student, {
        "pretrain_loss_first": losses[0] if losses else None,
        "pretrain_loss_last": losses[-1] if losses else None,
    }


def pretrained(fam: FamilyConfig, width: int, seed: int, device: torch.device, cache: Path) -> tuple[WidthMLP, dict]:
    """The pretrained student at ``width`` and ``seed``, from ``cache`` when it is there (else trained, then cached)."""
    key = hashlib.sha256(
        repr((fam.d_in, fam.depth, fam.pretrain_steps, fam.pretrain_batch, fam.pretrain_lr)).encode()
    ).hexdigest()[:8]
    path = cache / f"student-n{width}-seed{seed}-{key}.pt"
    if path.exists():
        blob = torch.load(path, map_location=device)
        model = WidthMLP(fam.d_in, width, fam.depth, None)
        model.load_state_dict(blob["state"], assign=True)
        return model, blob["info"]
    model, info = _pretrain(fam, width, seed, device)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("# written by loralab width: pretrained weights, large and regenerated\n*\n")
    atomic_write(path, lambda tmp: torch.save({"state": model.state_dict(), "info": info}, tmp))
    return model, info


def features(fam: FamilyConfig, width: int, seed: int, device: torch.device, cache: Path) -> Features:
    """Pretrained student (cached), fine-tuning inputs and shifted-teacher targets at ``width`` and ``seed``."""
    student, info = pretrained(fam, width, seed, device, cache)
    teacher = WidthMLP(fam.d_in, width, fam.depth, generator(seed, width, "teacher")).to(device)
    g = generator(seed, width, "shift")
    u, v = (torch.randn(width, fam.shift_rank, generator=g).to(device) for _ in range(2))
    x = torch.randn(fam.samples, fam.d_in, generator=generator(seed, width, "finetune-data")).to(device)
    with torch.no_grad():
        zt = teacher.features(x)
        shift = (zt @ v) @ u.T  # ΔW z without the n×n ΔW; scaled to RMS c exactly, not just in expectation
        shift *= fam.shift_scale / shift.square().mean().sqrt()
        y, z = teacher.head(zt) + shift, student.features(x)
        rms = {k: t.square().mean().sqrt().item() for k, t in [("target_rms", y), ("shift_rms", shift), ("z_rms", z)]}
        return Features(z=z, base=student.head(z), y=y, head=student.head, info={**info, **rms})


# ---- one cell, the sweep: resumable, one results.json --------------------------------------------------------------


def search_cell(feats: Features, init: str, probe: ProbeConfig, seed: int, start_lr: float) -> dict:
    """Max stable LR of one init at one width and seed: ``{k, max_lr, censored, loss0, probes, cliff}``."""
    p = probe.per_octave
    k_min, k_max = math.ceil(math.log2(probe.lr_min) * p - 1e-9), math.floor(math.log2(probe.lr_max) * p + 1e-9)
    probes: dict[int, dict] = {}

    def stable(k: int) -> bool:
        probes[k] = run_probe(feats, init, 2.0 ** (k / p), probe, seed)
        return probes[k]["stable"]

    k = max_stable(stable, k_min, k_max, round(math.log2(start_lr) * p), p, probe.confirm)
    short = lambda x: x if not isinstance(x, float) else float(f"{x:.5g}")  # noqa: E731 (keeps results.json small)
    curve = lambda j: [short(x) for x in probes[j]["losses"]] if j in probes else None  # noqa: E731
    return {
        "k": k,
        "max_lr": None if k is None else 2.0 ** (k / p),
        "censored": "below the grid" if k is None else "grid top" if k == k_max else None,
        "loss0": probes[min(probes)]["losses"][0],
        "probes": [
            {"k": j, **{f: short(v) for f, v in pr.items() if f != "losses"}} for j, pr in sorted(probes.items())
        ],
        "cliff": {"stable": None if k is None else curve(k), "unstable": curve(k_min if k is None else k + 1)},
    }


def _start_lr(cells: dict, init: str, width: int, seed: int, widths: Sequence[int]) -> float:
    """The same init and seed at the nearest smaller width, moved by n^-3/4 (between the predicted n^-1/2 and n^-1)."""
    done = [
        (n, cells[cell_key(init, n, seed)]["max_lr"])
        for n in widths
        if n < width and (cells.get(cell_key(init, n, seed)) or {}).get("max_lr")
    ]
    return done[-1][1] * (width / done[-1][0]) ** -0.75 if done else 2.0**-7


def _open(path: Path, cfg: WidthConfig, device: torch.device) -> tuple[dict, bool]:
    """The store at ``path`` (new or resumed) and whether its config changed; refuses one made with settings that
    change a cell's result."""
    fingerprint: dict[str, Any] = {"family": to_dict(cfg.family), "probe": to_dict(cfg.probe), "device": device.type}
    empty = {"fingerprint": fingerprint, "cells": {}, "pretrain": {}, "sessions": []}
    store: dict[str, Any] = read_json(path) if path.exists() else empty
    if store["fingerprint"] != fingerprint:
        diff = ", ".join(k for k in fingerprint if fingerprint[k] != store["fingerprint"].get(k))
        raise ConfigError(
            f"{path} holds results made with other settings ({diff} differ): write to another --out, "
            f"or delete {path} to start over"
        )
    config = to_dict(cfg)  # widths, inits and seeds may grow between sessions; cells are reused
    changed = store.get("config") != config
    store["config"] = config
    return store, changed


def _session(device: torch.device) -> dict:
    """This session's entry in the store's ``sessions``: when, on what; ``cells`` and ``wall_s`` grow as it runs."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": 0.0,
        "cells": 0,
        "device": str(device),
        **versions(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def out_dir(cfg: WidthConfig, out: str | Path | None = None) -> Path:
    """Where the results go: ``out`` (``--out``), else the config's ``out_dir``; never a default nobody chose."""
    if not (out or cfg.out_dir):
        raise ConfigError(
            'the config sets no out_dir: say where the results go, out_dir = "runs/width" in the file or --out DIR'
        )
    return Path(out or cfg.out_dir)


def plan_width(cfg: WidthConfig, out: str | Path | None = None) -> str:
    """What :func:`run_width` would do, checked as it would check it (device, store settings), training nothing."""
    out, device = out_dir(cfg, out), pick_device(cfg.device)
    path = out / RESULTS
    cells = _open(path, cfg, device)[0]["cells"]  # reads, never writes: a missing store is an empty one
    keys = [cell_key(i, n, s) for n in cfg.widths for s in cfg.seeds for i in cfg.inits]
    todo = sum(k not in cells for k in keys)
    return (
        f"width sweep '{cfg.name}' -> {path}: {len(cfg.widths)} widths {list(cfg.widths)} x "
        f"{len(cfg.seeds)} seeds x {len(cfg.inits)} inits ({', '.join(cfg.inits)}) = {len(keys)} cells, "
        f"{len(keys) - todo} already done, {todo} to search on {device}"
    )


def run_width(cfg: WidthConfig, out: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Find the max stable LR of every init × width × seed not yet in ``<out>/results.json``; returns the store."""
    out, device, started = out_dir(cfg, out), pick_device(cfg.device), time.perf_counter()
    path, cache = out / RESULTS, Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    (store, config_changed), session = _open(path, cfg, device), _session(device)
    cells, total = store["cells"], len(cfg.widths) * len(cfg.seeds) * len(cfg.inits)
    done = sum(cell_key(i, n, s) in cells for i in cfg.inits for n in cfg.widths for s in cfg.seeds)
    for width in cfg.widths:
        for seed in cfg.seeds:
            todo = [init for init in cfg.inits if cell_key(init, width, seed) not in cells]
            if not todo:
                continue
            feats = features(cfg.family, width, seed, device, cache)
            store["pretrain"][f"n{width}|seed{seed}"] = feats.info
            for init in todo:
                t0 = time.perf_counter()
                cell = search_cell(feats, init, cfg.probe, seed, _start_lr(cells, init, width, seed, cfg.widths))
                cells[cell_key(init, width, seed)] = {
                    "init": init,
                    "width": width,
                    "seed": seed,
                    **cell,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                if not session["cells"]:
                    store["sessions"].append(session)  # with its first cell: a rerun that trains nothing adds none
                session["cells"], done = session["cells"] + 1, done + 1
                session["wall_s"] = round(time.perf_counter() - started, 1)
                atomic_write_json(path, store)
                lr = "none" if cell["max_lr"] is None else f"{cell['max_lr']:.3g}"
                log(
                    f"[{done}/{total}] {init:<20} n={width:<6} seed={seed}: max stable lr {lr} "
                    f"({len(cell['probes'])} probes, {time.perf_counter() - t0:.1f} s)"
                )
    if session["cells"] or config_changed:  # else nothing changed: leave results.json as it is, byte for byte
        session["wall_s"] = round(time.perf_counter() - started, 1)
        atomic_write_json(path, store)
    return store
