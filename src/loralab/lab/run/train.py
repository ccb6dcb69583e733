"""Training: one run, or a pack of runs sharing one frozen base (:mod:`.pack`); a visible loop, evals, divergence.

The loop is written out (nanoGPT style) in :meth:`_Trainer.loop`: AdamW over the LoRA factors (one parameter group
per run: its own lr, schedule and weight decay), linear schedule with warmup (HF's formula), gradient accumulation,
per-run clipping, autocast for a half-precision model, and the fused chunked loss of :mod:`.loss` where the model
allows it. A solo run is a pack of one. A run that blows up (NaN/inf loss, or a loss above ``diverge_factor`` × its
initial eval loss) leaves the pack with status ``diverged`` after a last eval; it is recorded, never dropped, and the
others go on. Step-0 diagnostics come from the first micro-batch's backward, so they cost nothing extra.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from loralab.inject import eval_mode
from loralab.layers import LoraLayer

from ..config.grid import RunSpec
from ..config.schema import TrainConfig
from ..runtime import versions
from ..store import RunResult, RunStore
from .data import PackedData, iterate_batches
from .loss import fused_loss_ok, sequence_losses
from .pack import Pack

__all__ = ["autocast_for", "compile_backbone", "evaluate", "lr_factor", "total_steps", "train_pack", "train_run"]

Amp = Callable[[], AbstractContextManager]


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
def evaluate(model: nn.Module, chunks: torch.Tensor, batch_size: int, runs: int, amp: Amp, fused: bool) -> list[float]:
    """Mean eval loss of each of the ``runs`` active runs of a packed model (each sees every chunk)."""
    device = next(model.parameters()).device
    sums = torch.zeros(runs, dtype=torch.float64)
    with eval_mode(model):
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i:i + batch_size].to(device)
            with amp():
                losses = sequence_losses(model, ids.repeat(runs, 1), fused=fused)   # run-major (runs·b,)
            sums += losses.view(runs, -1).sum(1).cpu().double()   # float64 on the host: MPS has none
    return (sums / len(chunks)).tolist()


def compile_backbone(model: nn.Module) -> None:
    """``torch.compile`` the model's backbone (``model.base_model``, or the model itself), in place.

    The backbone's bound forward is compiled, not the module (which would call back into itself); the fused loss
    stays eager around it (it is a custom autograd function over chunks).
    """
    backbone = getattr(model, "base_model", model)
    backbone.forward = torch.compile(backbone.forward)


def autocast_for(model: nn.Module) -> Amp:
    """A half-precision model: autocast in the model's dtype, so the float32 adapters' matmuls run in it too. A
    float32 model runs as it is: the configured dtype is what the run computes in."""
    p = next(model.parameters())
    if p.dtype in (torch.bfloat16, torch.float16) and p.device.type in ("cuda", "cpu"):
        return lambda: torch.autocast(p.device.type, dtype=p.dtype)
    return contextlib.nullcontext


def _diagnostics(layers: dict[str, LoraLayer], identity: float, grad_scale: float, fused: bool) -> dict:
    out = {}
    for name, layer in layers.items():
        a, b = layer.lora_A, layer.lora_B
        out[name] = {"grad_norm_a": a.grad.norm().item() * grad_scale if a.grad is not None else 0.0,
                     "grad_norm_b": b.grad.norm().item() * grad_scale if b.grad is not None else 0.0,
                     "var_a": a.var().item(), "var_b": b.var().item()}
    return {"identity_max_abs": identity, "fused_loss": fused, "layers": out}


def _blown(loss: float, ref: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * ref


@dataclass
class _Run:
    """One run's spec, store and progress inside a pack."""

    spec: RunSpec
    store: RunStore
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

    @property
    def cfg(self) -> TrainConfig:
        return self.spec.run.train


def _micro_batches(data: PackedData, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        yield from iterate_batches(data.train, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        epoch += 1


def train_run(spec: RunSpec, store: RunStore, *, base_model: nn.Module, data: PackedData,
              progress: bool = True) -> RunResult:
    """Train one LoRA run on ``base_model`` (its frozen tensors are shared, never changed) and record everything in
    ``store`` (a pack of one)."""
    return train_pack([spec], [store], base_model=base_model, data=data, progress=progress)[0]


OnDone = Callable[[int, RunResult, nn.Module], None]


def train_pack(specs: Sequence[RunSpec], stores: Sequence[RunStore], *, base_model: nn.Module, data: PackedData,
               progress: bool = True, on_done: OnDone | None = None) -> list[RunResult]:
    """Train ``specs`` together on ``base_model`` (they must share a :func:`.pack.pack_key`).

    Metrics and diagnostics go to each run's store as it trains; ``on_done(k, result, model)`` is called the moment
    run ``k`` ends, with run ``k``'s own injected model (``Pack.models[k]``, what ``loralab.save_adapter`` takes): the
    sweep saves its adapter and writes its result then, so a crash later in the pack loses nothing finished.
    """
    trainer = _Trainer(specs, stores, base_model, data, progress, on_done or (lambda k, res, model: None))
    trainer.loop()
    return [r.result for r in trainer.runs if r.result is not None]


class _Trainer:
    """The state of one pack's training: its model, optimizer, runs, data and how it computes."""

    def __init__(self, specs: Sequence[RunSpec], stores: Sequence[RunStore], base_model: nn.Module,
                 data: PackedData, progress: bool, on_done: OnDone):
        self.start, first = time.perf_counter(), specs[0].run.train
        self.data, self.progress, self.on_done = data, progress, on_done
        self.device = next(base_model.parameters()).device
        self.amp = autocast_for(base_model)
        torch.manual_seed(first.seed)  # dropout masks
        self.pack = Pack(base_model, [s.run for s in specs])
        self.pack.model.train()
        if first.compile:
            compile_backbone(self.pack.model)
        self.total = total_steps(first, len(data.train))
        self.runs = [_Run(s, st, _micro_batches(data, s.run.train), math.ceil(s.run.train.warmup_ratio * self.total))
                     for s, st in zip(specs, stores)]
        everyone = list(range(len(self.runs)))
        self.pack.set_active([])   # the base alone, for one row of input
        with self.amp():   # both checks in the precision the run computes in
            self.fused = fused_loss_ok(self.pack.model, data.eval[:1].to(self.device))
            idents = self.pack.identity(data.eval[:2].to(self.device), everyone, base_model)
        for r, ident in zip(self.runs, idents):
            r.identity = ident
        self.pack.set_active(everyone)
        for r, loss in zip(self.runs, evaluate(self.pack.model, data.eval, first.batch_size, len(self.runs),
                                               self.amp, self.fused)):
            r.initial = r.best = r.last = loss
            r.store.append_metric({"kind": "eval", "step": 0, "eval_loss": loss, "elapsed_s": self.elapsed()})
        groups = [{"params": self.pack.run_params(k), "lr": r.cfg.lr, "weight_decay": r.cfg.weight_decay}
                  for k, r in enumerate(self.runs)]
        self.opt = torch.optim.AdamW(groups, fused=self.device.type == "cuda")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def loop(self) -> None:
        """The training loop: step every running run, evaluate on schedule, finish runs as they end."""
        from tqdm.auto import tqdm

        rs, eval_every = self.runs, self.runs[0].cfg.eval_every
        bar = tqdm(total=self.total, disable=not self.progress, leave=False, unit="step",
                   desc="train" if len(rs) == 1 else f"train x{len(rs)}")
        step, pack_time = 0, 0.0
        while active := [k for k, r in enumerate(rs) if r.status == "running"]:
            self.pack.set_active(active)
            t0 = time.perf_counter()
            losses = self.accumulate(active, first_step=step == 0)
            lrs = self.step(active, step)
            step, dt = step + 1, time.perf_counter() - t0
            pack_time += dt
            for k, loss in zip(active, losses):
                r = rs[k]
                r.step, r.train_time = step, r.train_time + dt
                r.store.append_metric({"kind": "train", "step": step, "loss": loss, "lr": lrs[k], "tokens": r.tokens,
                                       "elapsed_s": self.elapsed()})
                if _blown(loss, r.initial, r.cfg.diverge_factor):
                    r.status = "diverged"
            bar.update(1)
            bar.set_postfix(loss=f"{losses[0]:.3f}" if len(rs) == 1 else f"{min(losses):.3f}..{max(losses):.3f}",
                            tok_s=f"{sum(r.tokens for r in rs) / pack_time:.0f}")
            running = [k for k in active if rs[k].status == "running"]
            if running and (step % eval_every == 0 or step == self.total):
                self.eval(running)
            stale = [k for k in active if rs[k].status == "diverged" and rs[k].last_eval_step != step]
            if stale:   # a diverged run's final loss is measured, not carried over from its last eval
                self.eval(stale)
            for k in active:
                r = rs[k]
                if r.status == "running" and step == self.total:
                    r.status = "ok"
                if r.status != "running":
                    r.result = self.result(r)
                    self.on_done(k, r.result, self.pack.models[k])
        bar.close()

    def accumulate(self, active: list[int], first_step: bool) -> list[float]:
        """Forward/backward of one optimizer step's micro-batches for the ``active`` runs; their mean train losses."""
        rs, cfg = self.runs, self.runs[active[0]].cfg
        sums = torch.zeros(len(active), device=self.device)   # float32 on the device, read once per step: one sync
        for micro in range(cfg.grad_accum):
            ids = torch.cat([next(rs[k].batches) for k in active]).to(self.device)        # run-major (K·b, T)
            with self.amp():
                losses = sequence_losses(self.pack.model, ids, fused=self.fused).view(len(active), -1).mean(1)  # (K,)
            (losses.sum() / cfg.grad_accum).backward()    # run k's factors get the gradient of run k's loss only
            sums += losses.detach().float() / cfg.grad_accum
            for k in active:
                rs[k].tokens += ids.numel() // len(active)
            if first_step and micro == 0:
                for k in active:
                    rs[k].store.write_diagnostics(_diagnostics(self.pack.run_layers(k), rs[k].identity,
                                                               cfg.grad_accum, self.fused))
        return sums.tolist()

    def step(self, active: list[int], step: int) -> dict[int, float]:
        """Per-run clipping and learning rate, then one AdamW step for every active run; returns the lrs used."""
        lrs = {}
        for k in active:
            cfg = self.runs[k].cfg
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.pack.run_params(k), cfg.grad_clip)
            lrs[k] = self.opt.param_groups[k]["lr"] = cfg.lr * lr_factor(step, self.total, self.runs[k].warmup)
        self.opt.step()   # inactive runs have no grads, so AdamW leaves them alone
        self.opt.zero_grad(set_to_none=True)
        return lrs

    def eval(self, which: list[int]) -> None:
        self.pack.set_active(which)
        losses = evaluate(self.pack.model, self.data.eval, self.runs[which[0]].cfg.batch_size, len(which), self.amp,
                          self.fused)
        for k, loss in zip(which, losses):
            r = self.runs[k]
            r.last, r.last_eval_step, r.best = loss, r.step, min(r.best, loss)
            r.store.append_metric({"kind": "eval", "step": r.step, "eval_loss": loss, "elapsed_s": self.elapsed()})
            if r.status == "running" and _blown(loss, r.initial, r.cfg.diverge_factor):
                r.status = "diverged"

    def result(self, r: _Run) -> RunResult:
        return RunResult(run_id=r.spec.run_id, status=r.status, axes=r.spec.axes, final_eval_loss=r.last,
                         best_eval_loss=r.best, initial_eval_loss=r.initial, steps=r.step, tokens=r.tokens,
                         wall_time_s=self.elapsed(), tokens_per_s=r.tokens / max(r.train_time, 1e-9),
                         versions=versions(), device=str(self.device), pack_size=len(self.runs),
                         dtype=str(next(self.pack.model.parameters()).dtype).removeprefix("torch."))
