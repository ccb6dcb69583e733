"""The benchmark scripts run on CPU (the GPU path is the same code with another device) and report what they claim:
every variant trains (its LoRA factors move), throughputs are consistent with the timed steps, packed and solo
sweeps agree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_sweep import tiny_sweep, write_toml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_step  # noqa: E402
import bench_sweep  # noqa: E402
import profile_step  # noqa: E402


def test_bench_step_times_every_variant_side_by_side(tiny_lm_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "step.json"
    assert bench_step.main(["--model", str(tiny_lm_dir), "--batch", "2", "--seq", "16", "--rank", "4",
                            "--steps", "4", "--rounds", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"base", "base-fused", "peft", "loralab"}
    for r in rows.values():
        assert r["steps_timed"] == 4
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_step_s"])
        assert r["x_peft_paired"]["rounds"] == r["x_base_paired"]["rounds"] == 2
        assert r["x_peft_paired"]["q1"] <= r["x_peft_paired"]["median"] <= r["x_peft_paired"]["q3"]
    assert rows["peft"]["x_peft_paired"]["median"] == 1.0 and rows["base"]["x_base_paired"]["q3"] == 1.0
    assert data["env"]["peft"] and data["env"]["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert "| loralab |" in table and "× PEFT eager" in table and "paired by round" in table


def test_paired_ratios_cancel_a_slow_spell():
    """A machine slow for a round slows both variants in it; the ratio within each round is what is reported."""
    class V:
        def __init__(self, name, rounds):
            self.name, self.round_medians = name, rounds
    ref, fast = V("peft", [2.0, 6.0, 2.0, 2.2]), V("loralab", [1.0, 3.0, 1.0, 1.0])   # round 2: 3x slower machine
    rows = [{}, {}]
    bench_step.paired(rows, [ref, fast], "peft")
    assert rows[0]["x_peft_paired"] == {"median": 1.0, "q1": 1.0, "q3": 1.0, "rounds": 4}
    assert rows[1]["x_peft_paired"]["median"] == pytest.approx(2.0)
    assert rows[1]["x_peft_paired"]["q3"] == pytest.approx(2.05)


def test_variants_train_the_same_adapters(tiny_lm_dir, one_thread):
    """loralab and PEFT variants update LoRA factors (and only those); base has none to update."""
    args = bench_step.parse(["--model", str(tiny_lm_dir), "--rank", "4", "--dropout", "0"])
    base = bench_step.build_model(args.model, torch.device("cpu"), torch.float32).requires_grad_(False)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in ("peft", "loralab"):
        model, loss = bench_step.VARIANTS[name](base, args, False)
        v = bench_step.Variant(name, model, loss, torch.device("cpu"))
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora" in n for n in trainable)
        v.step(ids)
        v.step(ids)
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
        assert moved, name
    model, base_loss = bench_step.VARIANTS["base"](base, args, False)
    assert not any(p.requires_grad for p in model.parameters())
    fused_model, fused_loss = bench_step.VARIANTS["base-fused"](base, args, False)
    assert not any(p.requires_grad for p in fused_model.parameters())
    # the two ceilings do the same work: HF's loss and the fused one agree, in value and in what backward reaches
    a, b = base_loss(ids), fused_loss(ids)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert a.grad_fn is not None and b.grad_fn is not None


def test_bench_sweep_runs_both_modes(tiny_lm_dir, chat_jsonl, tmp_path, capsys, one_thread):
    grid = {"lora.init": ["standard", "reversed"], "train.lr": [1e-3, 2e-3]}
    cfg = write_toml(tmp_path / "s.toml", tiny_sweep(tiny_lm_dir, chat_jsonl, tmp_path / "unused", name="b", grid=grid,
                                                     **{"data.max_train_chunks": 16, "data.max_eval_chunks": 4,
                                                        "train.max_steps": 3}))
    out = tmp_path / "sweep.json"
    assert bench_sweep.main([str(cfg), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["row"]
    assert row["runs"] == 4 and row["pack"] == 4 and row["same_status"]
    assert row["speedup"] == pytest.approx(row["one_by_one_s"] / row["packed_s"])
    assert row["max_final_loss_gap"] < 1e-3   # dropout 0: packed and solo runs train the same function
    assert not (tmp_path / "unused").exists()   # both modes write to temporary stores only


def test_profile_step_groups_every_variants_time(tiny_lm_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "profile.json"
    assert profile_step.main(["--model", str(tiny_lm_dir), "--batch", "2", "--seq", "16", "--rank", "4",
                              "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    table = data["seconds_per_step"]
    assert data["steps"] == 2 and set(table) == {"base", "base-fused", "peft", "loralab"}
    for name, secs in table.items():
        assert set(secs) <= {*profile_step.GROUPS, "other"} and secs["matmul"] > 0, name
    assert "dropout" not in table["base"]           # no adapter, no dropout
    assert table["peft"].get("dropout", 0) > 0 and table["loralab"].get("dropout", 0) > 0   # dropout 0.05
    assert "| loralab |" in capsys.readouterr().out


def test_table_shows_ratios_only_against_variants_that_ran():
    rows = [{"variant": "peft", "tokens_per_s": 100.0, "median_step_s": 1.0, "peak_gb": None},
            {"variant": "loralab", "tokens_per_s": 125.0, "median_step_s": 0.8, "peak_gb": 2.0,
             "x_peft_paired": {"median": 1.2, "q1": 1.1, "q3": 1.3, "rounds": 3}}]
    lines = bench_step.table(rows).splitlines()
    assert lines[3] == "| loralab | 125 | 0.800 | 1.25 | - | 1.20 (1.10–1.30) | - | 2.0 |"
