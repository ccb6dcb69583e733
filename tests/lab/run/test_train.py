"""Tests of loralab.lab.train: the schedule, step-0 diagnostics, the metrics stream, determinism, divergence, and
that a run leaves the base model alone. All on the tiny offline Llama (hidden 32) with tiny chat data: seconds."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from loralab import IdentityWarning, lora_layers
from loralab.config import LoraConfig
from loralab.lab.config.grid import RunSpec
from loralab.lab.config.schema import RunConfig, TrainConfig
from loralab.lab.run.train import lr_factor, train_run
from loralab.lab.store import RunStore

SEQ_LEN = 32   # the chunk length of conftest's tiny_assets
TARGETS = ("q_proj", "v_proj")


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def train(assets, root, *, init="standard", **train_kw):
    """One run of the tiny model in ``root``; returns ``(RunResult, RunStore)``."""
    model, data = assets
    cfg = RunConfig(lora=LoraConfig(rank=4, alpha=8.0, init=init, targets=TARGETS),
                    train=TrainConfig(**{"max_steps": 4, "batch_size": 2, "eval_every": 2, "device": "cpu",
                                         "lr": 1e-3, **train_kw}))
    store = RunStore(root)
    return train_run(RunSpec(root.name, {}, cfg), store, base_model=model, data=data, progress=False), store


def of_kind(store: RunStore, kind: str) -> list[dict]:
    return [m for m in store.metrics() if m["kind"] == kind]


# ---- the learning-rate schedule -----------------------------------------------------------------------------------

def hf_factors(total: int, warmup: int, n: int) -> list[float]:
    """The multipliers of HF's ``get_linear_schedule_with_warmup`` at steps 0..n-1 (a dummy optimizer with lr 1)."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total,warmup", [(10, 0), (10, 1), (10, 3), (12, 6), (7, 6), (1, 0), (100, 10)])
def test_lr_factor_matches_hf_linear_schedule(total, warmup):
    n = total + 3   # past the end too: HF clamps at 0
    ours = [lr_factor(s, total, warmup) for s in range(n)]
    assert ours == pytest.approx(hf_factors(total, warmup, n), abs=1e-12)
    assert max(ours) == pytest.approx(1.0) and ours[total] == 0.0


def test_logged_lr_follows_the_hf_schedule(assets, tmp_path):
    """The lr each optimizer step used (metrics "lr") is lr × HF's multiplier at that step (0-based)."""
    lr, steps, warmup_ratio = 2e-3, 6, 0.3   # HF Trainer: ceil(0.3 * 6) = 2 warmup steps (round() would give 1)
    _, store = train(assets, tmp_path / "run", lr=lr, max_steps=steps, warmup_ratio=warmup_ratio, eval_every=6)
    logged = [m["lr"] for m in of_kind(store, "train")]
    expected = [lr * f for f in hf_factors(steps, 2, steps)]
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert logged[0] == 0.0 and max(logged) == pytest.approx(lr)   # warmup starts at 0 and reaches the peak


# ---- step-0 diagnostics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init,zero_grad,live_grad", [("standard", "grad_norm_a", "grad_norm_b"),
                                                      ("reversed", "grad_norm_b", "grad_norm_a")])
def test_diagnostics_first_gradients(assets, tmp_path, init, zero_grad, live_grad):
    """With B = 0 (standard) dL/dA = Bᵀ(...) = 0 while dL/dB ≠ 0; with A = 0 (reversed) the opposite."""
    _, store = train(assets, tmp_path / "run", init=init, max_steps=1)
    diag = store.diagnostics()
    assert diag is not None
    expected = {n for n, _ in assets[0].named_modules() if n.endswith(TARGETS)}
    assert set(diag["layers"]) == expected and len(expected) == 4   # 2 layers × (q_proj, v_proj)
    for name, layer in diag["layers"].items():
        assert layer[zero_grad] == 0.0, name
        assert layer[live_grad] > 0.0, name
    assert diag["identity_max_abs"] == 0.0   # both preserve the output exactly at init


def test_diagnostics_identity_of_a_non_preserving_init(assets, tmp_path):
    with pytest.warns(IdentityWarning, match="random-both"):   # said when the run starts, not only in the file
        _, store = train(assets, tmp_path / "run", init="random-both", max_steps=1)
    diag = store.diagnostics()
    assert diag["identity_max_abs"] > 1e-4
    for layer in diag["layers"].values():
        assert layer["grad_norm_a"] > 0 and layer["grad_norm_b"] > 0 and layer["var_a"] > 0 and layer["var_b"] > 0


def test_diagnostics_are_of_the_first_step(assets, tmp_path):
    """Written at step 0: a longer run has the same diagnostics as a one-step run of the same config."""
    _, one = train(assets, tmp_path / "one", max_steps=1)
    _, four = train(assets, tmp_path / "four", max_steps=4)
    assert one.diagnostics() == four.diagnostics()


# ---- the metrics stream and the result ----------------------------------------------------------------------------

@pytest.mark.parametrize("steps,every", [(5, 2), (6, 3), (3, 10)])
def test_metrics_steps(assets, tmp_path, steps, every):
    result, store = train(assets, tmp_path / "run", max_steps=steps, eval_every=every)
    assert result.status == "ok" and result.steps == steps
    assert [m["step"] for m in of_kind(store, "train")] == list(range(1, steps + 1))
    evals = [m["step"] for m in of_kind(store, "eval")]
    assert evals == [0] + [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
    losses = [m["eval_loss"] for m in of_kind(store, "eval")]
    assert result.initial_eval_loss == losses[0]
    assert result.final_eval_loss == losses[-1]
    assert result.best_eval_loss == min(losses)
    assert all(math.isfinite(m["loss"]) for m in of_kind(store, "train"))


def test_training_lowers_the_loss(assets, tmp_path):
    result, _ = train(assets, tmp_path / "run", max_steps=8, lr=1e-2, eval_every=8)
    assert result.final_eval_loss < result.initial_eval_loss


def test_run_is_deterministic(assets, tmp_path):
    def curves(store):
        return [(m["kind"], m["step"], m.get("loss"), m.get("eval_loss"), m.get("tokens")) for m in store.metrics()]

    r1, s1 = train(assets, tmp_path / "a", init="gaussian", max_steps=4)
    r2, s2 = train(assets, tmp_path / "b", init="gaussian", max_steps=4)
    assert curves(s1) == curves(s2)   # bit-identical losses, not approximately equal
    assert s1.diagnostics() == s2.diagnostics()
    assert r1.final_eval_loss == r2.final_eval_loss
    _, s3 = train(assets, tmp_path / "c", init="gaussian", max_steps=4, seed=1)
    assert [m.get("loss") for m in s3.metrics()] != [m.get("loss") for m in s1.metrics()]   # the seed matters


@pytest.mark.parametrize("init", ["standard", "pissa"])   # pissa rewrites the base weight: of the copy only
def test_base_model_is_not_modified(assets, tmp_path, init):
    model = assets[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    train(assets, tmp_path / "run", init=init, max_steps=2, lr=1e-2)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lora_layers(model) == {}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())


# ---- gradient accumulation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("accum", [1, 2])
def test_tokens_count_micro_batches(assets, tmp_path, accum):
    steps, batch = 3, 2
    result, store = train(assets, tmp_path / "run", max_steps=steps, batch_size=batch, grad_accum=accum)
    per_step = accum * batch * SEQ_LEN
    assert result.tokens == steps * per_step
    assert [m["tokens"] for m in of_kind(store, "train")] == [per_step * s for s in range(1, steps + 1)]


def test_train_records_hold_the_gradient_norm_before_clipping_and_tokens_per_second(assets, tmp_path):
    """``grad_norm`` is measured before clipping: with a clip far above it (never triggers) and with clipping off
    (measured only) the runs are the same and log the same norms; with a tight clip every logged norm is above the
    clip (after clipping it would be at most the clip), the first (same weights, same batch) equal to the unclipped
    run's."""
    runs = {clip: train(assets, tmp_path / f"clip{clip}", max_steps=3, lr=5e-3, grad_clip=clip)[1]
            for clip in (0.0, 1e9, 1e-3)}
    norms = {clip: [m["grad_norm"] for m in of_kind(store, "train")] for clip, store in runs.items()}
    assert all(math.isfinite(n) and n > 0 for n in norms[0.0])
    assert norms[1e9] == pytest.approx(norms[0.0], rel=1e-6)
    assert norms[1e-3][0] == pytest.approx(norms[0.0][0], rel=1e-6)
    assert all(n > 10 * 1e-3 for n in norms[1e-3])   # each step was clipped, and its norm before clipping logged
    for m in of_kind(runs[0.0], "train"):
        assert m["tokens_per_s"] > 0


def test_grad_accum_matches_a_full_batch(assets, tmp_path):
    """2 micro-batches of 2 ≡ 1 batch of 4: the batch order is one permutation sliced in order, and each micro
    loss is divided by grad_accum, so the accumulated gradient is the full batch's (up to float rounding)."""
    _, full = train(assets, tmp_path / "full", max_steps=3, batch_size=4, grad_accum=1, lr=5e-3)
    _, accum = train(assets, tmp_path / "accum", max_steps=3, batch_size=2, grad_accum=2, lr=5e-3)
    for a, b in zip(full.metrics(), accum.metrics(), strict=True):
        assert (a["kind"], a["step"], a.get("tokens")) == (b["kind"], b["step"], b.get("tokens"))
        key = "loss" if a["kind"] == "train" else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-4)


def test_diagnostics_are_per_micro_batch_gradients_under_accumulation(assets, tmp_path):
    """Step-0 diagnostics come from the first micro-batch, rescaled by grad_accum: the same numbers as a run without
    accumulation whose first batch is that micro-batch (same seed and batch_size, so the same chunks)."""
    _, plain = train(assets, tmp_path / "plain", max_steps=1, batch_size=2, grad_accum=1)
    _, accum = train(assets, tmp_path / "accum", max_steps=1, batch_size=2, grad_accum=2)
    a, b = plain.diagnostics()["layers"], accum.diagnostics()["layers"]
    assert a.keys() == b.keys()
    for name in a:
        assert b[name]["grad_norm_b"] == pytest.approx(a[name]["grad_norm_b"], rel=1e-5), name
        assert a[name]["grad_norm_b"] > 0


# ---- divergence ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eval_every", [2, 100], ids=["caught by an eval", "caught by a train loss"])
def test_huge_lr_diverges_and_is_recorded(assets, tmp_path, eval_every):
    result, store = train(assets, tmp_path / "run", lr=1e3, max_steps=12, eval_every=eval_every, warmup_ratio=0.0)
    assert result.status == "diverged"
    assert result.steps < 12   # stopped early
    assert [m["step"] for m in of_kind(store, "train")] == list(range(1, result.steps + 1))
    evals = of_kind(store, "eval")
    assert evals[-1]["step"] == result.steps   # the state it stopped in is evaluated, once
    assert len({m["step"] for m in evals}) == len(evals)
    assert result.initial_eval_loss is not None and math.isfinite(result.initial_eval_loss)
    blown = result.final_eval_loss
    assert blown is None or blown > 2.0 * result.initial_eval_loss or not math.isfinite(blown)


# ---- train.compile ---------------------------------------------------------------------------------------------------

def test_compile_traces_the_backbone_and_trains_the_same_run(assets, tmp_path, monkeypatch):
    """``train.compile`` hands the backbone to torch.compile (here with a recording backend that runs the captured
    graphs as they are, so the numbers must match the eager run) and keeps the run's id."""
    from loralab.lab.config.grid import run_id

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=recording))
    torch._dynamo.reset()
    try:
        compiled, c_store = train(assets, tmp_path / "compiled", compile=True)
    finally:
        torch._dynamo.reset()
    eager, e_store = train(assets, tmp_path / "eager")
    assert graphs, "nothing was compiled"
    assert compiled.status == eager.status == "ok"
    for a, b in zip(of_kind(c_store, "train"), of_kind(e_store, "train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert compiled.final_eval_loss == pytest.approx(eager.final_eval_loss, rel=1e-5)
    cfg = RunConfig(lora=LoraConfig(targets=TARGETS))
    on = RunConfig(lora=cfg.lora, train=TrainConfig(compile=True))
    assert run_id(on, {}) == run_id(cfg, {})   # a speed setting: an existing store resumes with it switched on


# ---- the final eval: per chunk, stored; periodic evals on the curve chunks ----------------------------------------

@pytest.fixture(scope="module")
def split_assets(tiny_assets, tiny_lm_dir, chat_jsonl):
    """The tiny model with data that has a val/test split: 3 val + 3 test chunks, curves on the first 2 val chunks."""
    from transformers import AutoTokenizer

    from loralab.lab.config.schema import DataConfig
    from loralab.lab.run.data import load_data

    cfg = DataConfig(source=str(chat_jsonl), seq_len=SEQ_LEN, max_train_chunks=16, eval_fraction=0.3, val_chunks=3,
                     test_chunks=3, curve_chunks=2)
    return tiny_assets[0], load_data(cfg, AutoTokenizer.from_pretrained(tiny_lm_dir))


def test_final_eval_is_stored_per_chunk_and_matches_the_result(assets, tmp_path):
    result, store = train(assets, tmp_path / "run", max_steps=3, eval_every=2)
    chunks = store.eval_chunks()
    (split,) = chunks.splits.values()
    assert list(chunks.splits) == ["eval"] and split.ids.tolist() == assets[1].splits["eval"].tolist()
    assert split.final.mean() == pytest.approx(result.final_eval_loss, rel=1e-6)
    assert split.step0.mean() == pytest.approx(result.initial_eval_loss, rel=1e-6)
    assert (split.step0 == split.pretrained).all()   # standard preserves the output: its step 0 is the base's
    assert (split.final != split.step0).all()   # trained: every chunk's loss moved
    assert chunks.pool_digest == assets[1].pool_digest


def test_val_test_split_curves_on_val_chunks_result_on_test(split_assets, tmp_path):
    result, store = train(split_assets, tmp_path / "run", max_steps=4, eval_every=2, lr=1e-2)
    chunks, data = store.eval_chunks(), split_assets[1]
    val, test = chunks.splits["val"], chunks.splits["test"]
    assert list(chunks.splits) == ["val", "test"] and not set(val.ids) & set(test.ids)
    evals = of_kind(store, "eval")
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert evals[0]["eval_loss"] == pytest.approx(val.step0[:data.curve_rows].mean(), rel=1e-6)
    assert evals[-1]["eval_loss"] == pytest.approx(val.final[:data.curve_rows].mean(), rel=1e-6)
    assert result.final_eval_loss == pytest.approx(test.final.mean(), rel=1e-6)   # reported on test
    assert result.initial_eval_loss == pytest.approx(test.step0.mean(), rel=1e-6)


def test_a_non_preserving_init_is_evaluated_at_step_0_and_the_pretrained_losses_are_shared(split_assets, tmp_path):
    cache: dict = {}
    model, data = split_assets
    runs = {}
    for init in ("standard", "random-both"):
        cfg = RunConfig(lora=LoraConfig(rank=4, alpha=8.0, init=init, targets=TARGETS),
                        train=TrainConfig(max_steps=1, batch_size=2, device="cpu"))
        store = RunStore(tmp_path / init)
        with pytest.warns() if init == "random-both" else contextlib.nullcontext():
            train_run(RunSpec(init, {}, cfg), store, base_model=model, data=data, progress=False,
                      pretrained_cache=cache)
        runs[init] = store.eval_chunks().splits["test"]
    assert len(cache) == 1   # the base was evaluated once for both runs
    std, rnd = runs["standard"], runs["random-both"]
    assert (std.pretrained == rnd.pretrained).all() and (std.step0 == std.pretrained).all()
    assert (rnd.step0 > rnd.pretrained).mean() > 0.5   # a cold start costs loss on most chunks


def test_on_divergence_continue_trains_to_the_end(assets, tmp_path):
    """The published protocol: a blown-up run keeps training; its status says diverged and when; NaN crashes nothing."""
    result, store = train(assets, tmp_path / "run", lr=1e3, max_steps=8, eval_every=2, warmup_ratio=0.0,
                          on_divergence="continue")
    assert result.status == "diverged" and result.steps == 8
    assert result.diverged_at_step is not None and 1 <= result.diverged_at_step < 8
    assert [m["step"] for m in of_kind(store, "train")] == list(range(1, 9))
    assert [m["step"] for m in of_kind(store, "eval")] == [0, 2, 4, 6, 8]
    assert store.eval_chunks().splits["eval"].final.shape == (len(assets[1].eval),)
    stopped, _ = train(assets, tmp_path / "stop", lr=1e3, max_steps=8, eval_every=2, warmup_ratio=0.0)
    assert stopped.status == "diverged" and stopped.steps == stopped.diverged_at_step == result.diverged_at_step


# ---- the curve's per-chunk losses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["standard", "random-both"])
def test_the_curve_is_stored_per_chunk_and_agrees_with_the_metrics(assets, tmp_path, init):
    """Every periodic eval (step 0 and the last included) is in eval_chunks.npz per chunk; its mean is the logged
    eval loss, and its step-0 row is the step-0 eval of those chunks (the pretrained model's for standard)."""
    with pytest.warns() if init == "random-both" else contextlib.nullcontext():
        _, store = train(assets, tmp_path / "run", init=init, max_steps=5, eval_every=2)
    chunks = store.eval_chunks()
    curve, first = chunks.curve, next(iter(chunks.splits.values()))
    logged = of_kind(store, "eval")
    assert curve.steps.tolist() == [m["step"] for m in logged] == [0, 2, 4, 5]
    assert curve.losses.mean(1).tolist() == pytest.approx([m["eval_loss"] for m in logged], rel=1e-6)
    c = len(curve.ids)
    assert c > 0 and curve.ids.tolist() == first.ids[:c].tolist()
    np.testing.assert_allclose(curve.losses[0], first.step0[:c], rtol=1e-6)
    np.testing.assert_allclose(curve.losses[-1], first.final[:c], rtol=1e-6)
    assert np.array_equal(first.step0[:c], first.pretrained[:c]) == (init == "standard")
