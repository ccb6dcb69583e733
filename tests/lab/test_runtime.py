"""Tests for loralab.lab.runtime and what rests on it: the device rule, what ``model.dtype = auto`` means, and how the
resolved dtype enters run ids (``config/grid.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loralab import LoraConfig
from loralab.lab import runtime
from loralab.lab.config.grid import RunSpec, plan_runs, run_id
from loralab.lab.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
from loralab.lab.config.toml import parse_sweep
from loralab.lab.run.data import load_data
from loralab.lab.run.models import load_model, resolve_dtype
from loralab.lab.run.train import train_run
from loralab.lab.store import RunStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[False, True], ids=["cpu-without-bf16", "cpu-with-native-bf16"])
def native_bf16(request, monkeypatch) -> bool:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_native_bf16_is_read_from_the_flags_not_the_vendor():
    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 fma avx512f\n"
    assert not runtime.native_bf16_in(amd)
    assert runtime.native_bf16_in(amd.replace("avx512f", "avx512f avx512_bf16"))
    assert runtime.native_bf16_in("flags : fpu amx_tile amx_bf16\n") and not runtime.native_bf16_in("")


def test_auto_is_bfloat16_on_cuda_and_on_cpus_with_native_bf16(native_bf16):
    assert runtime.auto_dtype("cuda") == "bfloat16"
    assert runtime.auto_dtype("cpu") == ("bfloat16" if native_bf16 else "float32")
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("float32", "cpu") == torch.float32   # an explicit dtype is what it says anywhere


def _run(dtype: str, device: str = "cpu") -> RunConfig:
    return RunConfig(model=ModelConfig(dtype=dtype), train=TrainConfig(device=device))


def test_run_ids_hash_the_dtype_a_run_computes_in(native_bf16):
    ids = {d: run_id(_run(d), {}) for d in ("auto", "float32", "bfloat16")}
    assert ids["float32"] != ids["bfloat16"]
    assert ids["auto"] == (ids["bfloat16"] if native_bf16 else ids["float32"])
    # CUDA's auto was bfloat16 before CPUs could get it, and stays so under the same id
    assert run_id(_run("auto", "cuda"), {}) == run_id(_run("bfloat16", "cuda"), {})


def test_the_committed_store_keeps_its_ids_where_it_computed_as_it_would_now(native_bf16):
    """Made in float32 under auto: the same ids on a CPU without native bf16, and with model.dtype=float32 anywhere."""
    manifest = json.loads((ROOT / "docs/results/study-smollm2/store/sweep.json").read_text())
    recorded = {"name": manifest["name"], "out_dir": "runs/x", **manifest["base"], "grid": manifest["grid"]}
    auto = [r.run_id for r in plan_runs(parse_sweep(recorded))]
    fp32 = [r.run_id for r in plan_runs(parse_sweep(recorded, ["model.dtype=float32"]))]
    assert fp32 == manifest["run_ids"]
    assert (auto == manifest["run_ids"]) == (not native_bf16)


def test_a_run_in_auto_on_a_native_bf16_cpu_trains_in_bfloat16(tiny_lm_dir, chat_jsonl, tmp_path, monkeypatch):
    """Frozen base in bf16, float32 adapters, autocast: finite losses, identity to bf16 rounding, the dtype recorded."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    model, tok = load_model(ModelConfig(name=str(tiny_lm_dir)), "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    model.requires_grad_(False)
    data = load_data(DataConfig(source=str(chat_jsonl), seq_len=32, max_train_chunks=16, max_eval_chunks=4), tok)
    run = RunConfig(model=ModelConfig(name=str(tiny_lm_dir)), lora=LoraConfig(rank=4, targets=("q_proj", "v_proj")),
                    train=TrainConfig(max_steps=3, batch_size=2, eval_every=3, device="cpu", lr=2e-3))
    store = RunStore(tmp_path / "r")
    result = train_run(RunSpec("r", {}, run), store, base_model=model, data=data, progress=False)
    assert result.status == "ok" and result.dtype == "bfloat16"
    assert math.isfinite(result.final_eval_loss) and result.final_eval_loss != result.initial_eval_loss
    layers = store.diagnostics()["layers"]
    assert all(v["var_b"] == 0.0 for v in layers.values())   # standard: B = 0, so the output is the base's
    assert store.diagnostics()["identity_max_abs"] == 0.0
    assert store.diagnostics()["fused_loss"] is True   # the fused loss checked in bf16, under autocast
