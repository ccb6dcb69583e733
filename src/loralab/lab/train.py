"""Training: one run, or a pack of runs sharing one frozen base (:mod:`.pack`); a visible loop, evals, divergence.

The loop is written out (nanoGPT style): AdamW over the LoRA factors (one parameter group per run: its own lr,
schedule and weight decay), linear schedule with warmup (HF's formula), gradient accumulation, per-run clipping,
autocast on CUDA for a half-precision model, and the fused chunked loss of :mod:`.loss` where the model allows it. A solo run is a pack of
one. A run that blows up (NaN/inf loss, or a loss above ``diverge_factor`` × its initial eval loss) leaves the pack
with status ``diverged`` after a last eval; it is recorded, never dropped, and the others go on. Step-0 diagnostics
come from the first micro-batch's backward, so they cost nothing extra.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

import loralab
from loralab.layers import LoraLayer

from .config import RunConfig, TrainConfig
from .data import PackedData, iterate_batches
from .loss import fused_loss_ok, sequence_losses
from .pack import Pack
from .store import RunResult, RunStore


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def versions() -> dict[str, str]:
    import transformers

    return {"loralab": loralab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """HF's linear schedule: 0 → 1 over ``warmup`` steps, then linearly to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = n_train // cfg.batch_size // cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * per_epoch))


@torch.no_grad()
def evaluate(model: nn.Module, chunks: torch.Tensor, batch_size: int, runs: int, amp, fused: bool) -> list[float]:
    """Mean eval loss of each of the ``runs`` active runs of a packed model (each sees every chunk)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(runs, dtype=torch.float64)
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i:i + batch_size].to(device)
        with amp():
            losses = sequence_losses(model, ids.repeat(runs, 1), fused=fused)   # run-major (runs·b,)
        sums += losses.view(runs, -1).sum(1).cpu().double()   # float64 on the host: MPS has none
    model.train(was_training)
    return (sums / len(chunks)).tolist()


def _diagnostics(layers: dict[str, LoraLayer], identity: float, grad_scale: float, fused: bool) -> dict:
    out = {}
    for name, layer in layers.items():
        a, b = layer.lora_A, layer.lora_B
        out[name] = {"grad_norm_a": a.grad.norm().item() * grad_scale if a.grad is not None else 0.0,
                     "grad_norm_b": b.grad.norm().item() * grad_scale if b.grad is not None else 0.0,
                     "var_a": a.var().item(), "var_b": b.var().item()}
    return {"identity_max_abs": identity, "fused_loss": fused, "layers": out}


@dataclass
class _Run:
    """One run's config, store and progress inside a pack."""

    cfg: RunConfig
    store: RunStore
    run_id: str
    axes: dict
    batches: Iterator[torch.Tensor]
    warmup: int
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    status: str = "running"
    initial: float = math.nan
    best: float = math.inf
    last: float = math.nan
    last_eval_step: int = 0
    identity: float = 0.0
    result: RunResult | None = None   # set the moment the run ends


def _blown(loss: float, ref: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * ref


def _no_amp():
    return contextlib.nullcontext()


def compile_backbone(model: nn.Module) -> None:
    """``torch.compile`` the model's backbone (``model.base_model``, or the model itself), in place.

    The backbone's bound forward is compiled, not the module (which would call back into itself); the fused loss
    stays eager around it (it is a custom autograd function over chunks).
    """
    backbone = getattr(model, "base_model", model)
    backbone.forward = torch.compile(backbone.forward)


def autocast_for(model: nn.Module):
    """CUDA and a half-precision model: autocast in the model's dtype, so the float32 adapters' matmuls run in it
    too. A float32 model (or another device) runs as it is: the configured dtype is what the run computes in."""
    p = next(model.parameters())
    if p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast("cuda", dtype=p.dtype)
    return _no_amp


def _micro_batches(data: PackedData, cfg: TrainConfig):
    epoch = 0
    while True:
        yield from iterate_batches(data.train, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        epoch += 1


def train_run(run: RunConfig, store: RunStore, *, base_model: nn.Module, data: PackedData, run_id: str,
              axes: dict, progress: bool = True) -> RunResult:
    """Train one LoRA run on ``base_model`` (its frozen tensors are shared, never changed) and record everything in
    ``store`` (a pack of one)."""
    return train_pack([run], [store], base_model=base_model, data=data, run_ids=[run_id], axes=[axes],
                      progress=progress)[0]


def train_pack(runs: Sequence[RunConfig], stores: Sequence[RunStore], *, base_model: nn.Module, data: PackedData,
               run_ids: Sequence[str], axes: Sequence[dict], progress: bool = True,
               on_done: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """Train ``runs`` together on one copy of ``base_model`` (they must share a :func:`.pack.pack_key`).

    Metrics and diagnostics go to each run's store as it trains; ``on_done(k, result)`` is called the moment run
    ``k`` ends (the sweep writes its result then, so a crash later in the pack loses nothing finished).
    """
    start, first = time.perf_counter(), runs[0].train
    device = next(base_model.parameters()).device
    amp = autocast_for(base_model)
    torch.manual_seed(first.seed)  # dropout masks
    pack = Pack(base_model, list(runs))
    pack.model.train()
    if first.compile:
        compile_backbone(pack.model)
    total = total_steps(first, len(data.train))
    rs = [_Run(cfg, st, rid, ax, _micro_batches(data, cfg.train), math.ceil(cfg.train.warmup_ratio * total))
          for cfg, st, rid, ax in zip(runs, stores, run_ids, axes)]
    everyone = list(range(len(rs)))
    pack.set_active([])
    fused = fused_loss_ok(pack.model, data.eval[:1].to(device))
    for r, ident in zip(rs, pack.identity(data.eval[:2].to(device), everyone, base_model)):
        r.identity = ident
    pack.set_active(everyone)
    for r, loss in zip(rs, evaluate(pack.model, data.eval, first.batch_size, len(rs), amp, fused)):
        r.initial = r.best = r.last = loss
        r.store.append_metric({"kind": "eval", "step": 0, "eval_loss": loss, "elapsed_s": time.perf_counter() - start})
    groups = [{"params": pack.run_params(k), "lr": r.cfg.train.lr, "weight_decay": r.cfg.train.weight_decay}
              for k, r in enumerate(rs)]
    opt = torch.optim.AdamW(groups, fused=device.type == "cuda")
    _loop(pack, opt, rs, data, total, amp, fused, start, progress, on_done or (lambda k, res: None))
    return [r.result for r in rs]


def _result(r: _Run, wall_time_s: float, device, pack_size: int) -> RunResult:
    return RunResult(run_id=r.run_id, status=r.status, axes=r.axes, final_eval_loss=r.last, best_eval_loss=r.best,
                     initial_eval_loss=r.initial, steps=r.step, tokens=r.tokens, wall_time_s=wall_time_s,
                     tokens_per_s=r.tokens / max(r.train_time, 1e-9), versions=versions(), device=str(device),
                     pack_size=pack_size)


def _accumulate(pack: Pack, rs: list[_Run], active: list[int], first_step: bool, amp, fused: bool) -> list[float]:
    """Forward/backward of one optimizer step's micro-batches for the ``active`` runs; their mean train losses."""
    cfg = rs[active[0]].cfg.train
    device = next(pack.model.parameters()).device
    sums = torch.zeros(len(active), device=device)   # float32 on the device, read once per step: one sync
    for micro in range(cfg.grad_accum):
        ids = torch.cat([next(rs[k].batches) for k in active]).to(device)        # run-major (K·b, T)
        with amp():
            losses = sequence_losses(pack.model, ids, fused=fused).view(len(active), -1).mean(1)   # (K,)
        (losses.sum() / cfg.grad_accum).backward()    # run k's factors get the gradient of run k's loss only
        sums += losses.detach().float() / cfg.grad_accum
        for k in active:
            rs[k].tokens += ids.numel() // len(active)
        if first_step and micro == 0:
            for k in active:
                rs[k].store.write_diagnostics(_diagnostics(pack.run_layers(k), rs[k].identity, cfg.grad_accum, fused))
    return sums.tolist()


def _step(pack: Pack, opt, rs: list[_Run], active: list[int], step: int, total: int) -> dict[int, float]:
    """Per-run clipping and learning rate, then one AdamW step for every active run; returns the lrs used."""
    lrs = {}
    for k in active:
        cfg = rs[k].cfg.train
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(pack.run_params(k), cfg.grad_clip)
        lrs[k] = opt.param_groups[k]["lr"] = cfg.lr * lr_factor(step, total, rs[k].warmup)
    opt.step()   # inactive runs have no grads, so AdamW leaves them alone
    opt.zero_grad(set_to_none=True)
    return lrs


def _eval(pack: Pack, rs: list[_Run], which: list[int], data: PackedData, amp, fused: bool, start: float) -> None:
    pack.set_active(which)
    losses = evaluate(pack.model, data.eval, rs[which[0]].cfg.train.batch_size, len(which), amp, fused)
    for k, loss in zip(which, losses):
        r = rs[k]
        r.last, r.last_eval_step, r.best = loss, r.step, min(r.best, loss)
        r.store.append_metric({"kind": "eval", "step": r.step, "eval_loss": loss,
                               "elapsed_s": time.perf_counter() - start})
        if r.status == "running" and _blown(loss, r.initial, r.cfg.train.diverge_factor):
            r.status = "diverged"


def _loop(pack, opt, rs, data, total, amp, fused, start, progress, on_done) -> None:
    from tqdm.auto import tqdm

    eval_every = rs[0].cfg.train.eval_every
    bar = tqdm(total=total, disable=not progress, leave=False, unit="step",
               desc="train" if len(rs) == 1 else f"train x{len(rs)}")
    step, pack_time = 0, 0.0
    while active := [k for k, r in enumerate(rs) if r.status == "running"]:
        pack.set_active(active)
        t0 = time.perf_counter()
        losses = _accumulate(pack, rs, active, step == 0, amp, fused)
        lrs = _step(pack, opt, rs, active, step, total)
        step, dt = step + 1, time.perf_counter() - t0
        pack_time += dt
        for k, loss in zip(active, losses):
            r = rs[k]
            r.step, r.train_time = step, r.train_time + dt
            r.store.append_metric({"kind": "train", "step": step, "loss": loss, "lr": lrs[k], "tokens": r.tokens,
                                   "elapsed_s": time.perf_counter() - start})
            if _blown(loss, r.initial, r.cfg.train.diverge_factor):
                r.status = "diverged"
        bar.update(1)
        bar.set_postfix(loss=f"{losses[0]:.3f}" if len(rs) == 1 else f"{min(losses):.3f}..{max(losses):.3f}",
                        tok_s=f"{sum(r.tokens for r in rs) / pack_time:.0f}")
        running = [k for k in active if rs[k].status == "running"]
        if running and (step % eval_every == 0 or step == total):
            _eval(pack, rs, running, data, amp, fused, start)
        stale = [k for k in active if rs[k].status == "diverged" and rs[k].last_eval_step != step]
        if stale:   # a diverged run's final loss is measured, not carried over from its last eval
            _eval(pack, rs, stale, data, amp, fused, start)
        for k in active:
            r = rs[k]
            if r.status == "running" and step == total:
                r.status = "ok"
            if r.status != "running":
                r.result = _result(r, time.perf_counter() - start, next(pack.model.parameters()).device, len(rs))
                on_done(k, r.result)
    bar.close()
