"""Training: one run, or a pack of runs sharing one frozen base (:mod:`.pack`); a visible loop, evals, divergence.

The loop is written out (nanoGPT style) in :meth:`_Trainer.loop`: AdamW over the LoRA factors (one parameter group
per run: its own lr, schedule and weight decay), linear schedule with warmup (HF's formula), gradient accumulation,
per-run clipping, autocast for a half-precision model, and the fused chunked loss of :mod:`.loss` where the model
allows it. A solo run is a pack of one. A run that blows up (NaN/inf loss, or a loss above ``diverge_factor`` × its
initial eval loss) is ``diverged``: with ``on_divergence = "stop"`` it leaves the pack after its final eval, with
``"continue"`` it trains to the last step as the published study's runs did (its final loss is the blown-up one); it
is recorded either way, never dropped, and the others go on. Step-0 diagnostics come from the first micro-batch's
backward, so they cost nothing extra. Each step's train record holds each run's loss, lr, gradient norm (before
clipping) and tokens/s, its losses and norms read from the device together, in one sync per step.

Evaluation (docs/evaluation.md): the *final* eval of a run (when it ends) covers every held-out chunk of the data
(val and test, or the one eval set) and is stored per chunk, with the pretrained model's and the run's step-0 losses,
in ``eval_chunks.npz`` before ``result.json``. Periodic evals (curves, divergence checks) cover only the first
``curve_rows`` chunks, so a large eval set does not multiply the run time; their per-chunk losses (step 0's among
them) go to the same file, so a curve can have intervals. The pretrained model's losses are computed
once per process and data (``pretrained_cache``) and serve as the step-0 losses of every run whose init preserves the
output (its diagnostics record the largest change of the output, 0 or ~1e-7); a run whose init does not (random-both)
is evaluated at step 0 itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from loralab.inits import get_scheme
from loralab.inject import eval_mode
from loralab.layers import LoraLayer

from ..config.grid import RunSpec
from ..config.schema import RunConfig, TrainConfig
from ..runtime import versions
from ..store import CurveLosses, EvalChunks, RunResult, RunStore, SplitLosses
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
def evaluate(model: nn.Module, chunks: torch.Tensor, batch_size: int, runs: int, amp: Amp, fused: bool) -> torch.Tensor:
    """Per-chunk eval losses ``(runs, n)`` (float64, on the host) of the ``runs`` active runs of a packed model (each
    sees every chunk). A chunk's loss is the mean over its predicted tokens, all chunks have as many, so the mean over
    chunks is the mean over tokens."""
    device = next(model.parameters()).device
    out = torch.empty(runs, len(chunks), dtype=torch.float64)
    with eval_mode(model):
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i : i + batch_size].to(device)
            with amp():
                losses = sequence_losses(model, ids.repeat(runs, 1), fused=fused)  # run-major (runs·b,)
            out[:, i : i + len(ids)] = losses.view(runs, -1).cpu().double()  # float64 on the host: MPS has none
    return out


def _preserves_output(run: RunConfig) -> bool:
    return all(get_scheme(i).preserves_output for i in {run.lora.init, *run.lora.init_pattern.values()})


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
        out[name] = {
            "grad_norm_a": a.grad.norm().item() * grad_scale if a.grad is not None else 0.0,
            "grad_norm_b": b.grad.norm().item() * grad_scale if b.grad is not None else 0.0,
            "var_a": a.var().item(),
            "var_b": b.var().item(),
        }
    return {"identity_max_abs": identity, "fused_loss": fused, "layers": out}


def _grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of ``params``' gradients (what clipping would measure), as a 0-d tensor."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


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
    initial: float = math.nan  # step-0 eval on the curve chunks: the reference of the divergence test
    best: float = math.inf
    last: float = math.nan
    last_eval_step: int = 0
    diverged_at: int | None = None
    identity: float = 0.0
    step0: torch.Tensor | None = None  # per-chunk losses of the final eval's chunks at step 0 and at the end
    final: torch.Tensor | None = None
    curve: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, per-chunk losses on curve chunks)
    result: RunResult | None = None  # set the moment the run ends

    @property
    def cfg(self) -> TrainConfig:
        return self.spec.run.train


def _micro_batches(data: PackedData, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        yield from iterate_batches(data.train, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        epoch += 1


def train_run(
    spec: RunSpec,
    store: RunStore,
    *,
    base_model: nn.Module,
    data: PackedData,
    progress: bool = True,
    pretrained_cache: dict | None = None,
) -> RunResult:
    """Train one LoRA run on ``base_model`` (its frozen tensors are shared, never changed) and record everything in
    ``store`` (a pack of one)."""
    return train_pack(
        [spec], [store], base_model=base_model, data=data, progress=progress, pretrained_cache=pretrained_cache
    )[0]


OnDone = Callable[[int, RunResult, nn.Module], None]


def train_pack(
    specs: Sequence[RunSpec],
    stores: Sequence[RunStore],
    *,
    base_model: nn.Module,
    data: PackedData,
    progress: bool = True,
    on_done: OnDone | None = None,
    pretrained_cache: dict | None = None,
) -> list[RunResult]:
    """Train ``specs`` together on ``base_model`` (they must share a :func:`.pack.pack_key`).

    Metrics and diagnostics go to each run's store as it trains; ``on_done(k, result, model)`` is called the moment
    run ``k`` ends, with run ``k``'s own injected model (``Pack.models[k]``, what ``loralab.save_adapter`` takes): the
    sweep saves its adapter and writes its result then, so a crash later in the pack loses nothing finished.
    ``pretrained_cache``: a dict kept with ``base_model`` and ``data`` (see :class:`.assets.Assets`), where the
    pretrained model's per-chunk losses are kept once computed.
    """
    trainer = _Trainer(
        specs,
        stores,
        base_model,
        data,
        progress,
        on_done or (lambda k, res, model: None),
        {} if pretrained_cache is None else pretrained_cache,
    )
    trainer.loop()
    return [r.result for r in trainer.runs if r.result is not None]


class _Trainer:
    """The state of one pack's training: its model, optimizer, runs, data and how it computes."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        stores: Sequence[RunStore],
        base_model: nn.Module,
        data: PackedData,
        progress: bool,
        on_done: OnDone,
        pretrained_cache: dict,
    ):
        self.start, first = time.perf_counter(), specs[0].run.train
        self.data, self.progress, self.on_done = data, progress, on_done
        self.eval_bs = first.eval_batch_size or first.batch_size
        self.device = next(base_model.parameters()).device
        self.amp = autocast_for(base_model)
        torch.manual_seed(first.seed)  # dropout masks
        self.pack = Pack(base_model, [s.run for s in specs])
        self.pack.model.train()
        if first.compile:
            compile_backbone(self.pack.model)
        self.total = total_steps(first, len(data.train))
        self.runs = [
            _Run(s, st, _micro_batches(data, s.run.train), math.ceil(s.run.train.warmup_ratio * self.total))
            for s, st in zip(specs, stores)
        ]
        everyone = list(range(len(self.runs)))
        self.pack.set_active([])  # the base alone, for one row of input
        with self.amp():  # both checks in the precision the run computes in
            self.fused = fused_loss_ok(self.pack.model, data.eval[:1].to(self.device))
            idents = self.pack.identity(data.eval[:2].to(self.device), everyone, base_model)
        for r, ident in zip(self.runs, idents):
            r.identity = ident
        self.pretrained = self.pretrained_losses(base_model, pretrained_cache)
        self.step0(everyone)
        self.pack.set_active(everyone)
        groups = [
            {"params": self.pack.run_params(k), "lr": r.cfg.lr, "weight_decay": r.cfg.weight_decay}
            for k, r in enumerate(self.runs)
        ]
        self.opt = torch.optim.AdamW(groups, fused=self.device.type == "cuda")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def pretrained_losses(self, base_model: nn.Module, cache: dict) -> torch.Tensor:
        """The pretrained model's per-chunk losses on the final eval's chunks, computed once per cache."""
        key = ("pretrained", self.eval_bs, self.fused)  # batching and the loss path change the last bits
        if key not in cache:
            cache[key] = evaluate(base_model, self.data.eval, self.eval_bs, 1, self.amp, self.fused)[0]
        return cache[key]

    def step0(self, which: list[int]) -> None:
        """Step-0 losses of every run: the pretrained model's for an output-preserving init, else evaluated."""
        changed = [k for k in which if not _preserves_output(self.runs[k].spec.run)]
        own = {}
        if changed:
            self.pack.set_active(changed)
            own = dict(
                zip(
                    changed, evaluate(self.pack.model, self.data.eval, self.eval_bs, len(changed), self.amp, self.fused)
                )
            )
        for k in which:
            r = self.runs[k]
            r.step0 = own.get(k, self.pretrained)
            r.curve = [(0, r.step0[: self.data.curve_rows])]
            r.initial = r.best = r.last = r.curve[0][1].mean().item()
            r.store.append_metric({"kind": "eval", "step": 0, "eval_loss": r.initial, "elapsed_s": self.elapsed()})

    def loop(self) -> None:
        """The training loop: step every running run, evaluate on schedule, finish runs as they end."""
        from tqdm.auto import tqdm

        rs, eval_every = self.runs, self.runs[0].cfg.eval_every
        bar = tqdm(
            total=self.total,
            disable=not self.progress,
            leave=False,
            unit="step",
            desc="train" if len(rs) == 1 else f"train x{len(rs)}",
        )
        step, pack_time = 0, 0.0
        while active := [k for k, r in enumerate(rs) if r.status == "running"]:
            self.pack.set_active(active)
            t0, tokens0 = time.perf_counter(), [rs[k].tokens for k in active]
            sums = self.accumulate(active, first_step=step == 0)
            lrs, norms = self.step(active, step)
            losses, grad_norms = torch.stack([sums, norms]).tolist()  # the one sync of a step
            step, dt = step + 1, time.perf_counter() - t0
            pack_time += dt
            for k, loss, norm, before in zip(active, losses, grad_norms, tokens0):
                r = rs[k]
                r.step, r.train_time = step, r.train_time + dt
                r.store.append_metric(
                    {
                        "kind": "train",
                        "step": step,
                        "loss": loss,
                        "lr": lrs[k],
                        "grad_norm": norm,
                        "tokens": r.tokens,
                        "tokens_per_s": (r.tokens - before) / max(dt, 1e-9),  # this run's share of the step
                        "elapsed_s": self.elapsed(),
                    }
                )
                self.check(r, loss)
            bar.update(1)
            bar.set_postfix(
                loss=f"{losses[0]:.3f}" if len(rs) == 1 else f"{min(losses):.3f}..{max(losses):.3f}",
                tok_s=f"{sum(r.tokens for r in rs) / pack_time:.0f}",
            )
            running = [k for k in active if rs[k].status == "running"]
            if running and step % eval_every == 0 and step < self.total:
                self.eval(running)
            ending = [k for k in active if rs[k].status != "running" or step == self.total]
            if ending:  # a run's final loss is measured when it ends, on every eval chunk
                self.final_eval(ending)
            for k in ending:
                r = rs[k]
                r.status = "ok" if r.diverged_at is None else "diverged"
                r.result = self.result(r)
                self.on_done(k, r.result, self.pack.models[k])
        bar.close()

    def accumulate(self, active: list[int], first_step: bool) -> torch.Tensor:
        """Forward/backward of one optimizer step's micro-batches for the ``active`` runs; their mean train losses
        ``(K,)``, float32 on the device (read by the caller, with the gradient norms)."""
        rs, cfg = self.runs, self.runs[active[0]].cfg
        sums = torch.zeros(len(active), device=self.device)  # float32 on the device, read once per step: one sync
        for micro in range(cfg.grad_accum):
            ids = torch.cat([next(rs[k].batches) for k in active]).to(self.device)  # run-major (K·b, T)
            with self.amp():
                losses = sequence_losses(self.pack.model, ids, fused=self.fused).view(len(active), -1).mean(1)  # (K,)
            (losses.sum() / cfg.grad_accum).backward()  # run k's factors get the gradient of run k's loss only
            sums += losses.detach().float() / cfg.grad_accum
            for k in active:
                rs[k].tokens += ids.numel() // len(active)
            if first_step and micro == 0:
                for k in active:
                    rs[k].store.write_diagnostics(
                        _diagnostics(self.pack.run_layers(k), rs[k].identity, cfg.grad_accum, self.fused)
                    )
        return sums

    def step(self, active: list[int], step: int) -> tuple[dict[int, float], torch.Tensor]:
        """Per-run clipping and learning rate, then one AdamW step for every active run; returns the lrs used and
        the active runs' gradient norms before clipping ``(K,)``, float32 on the device."""
        lrs, norms = {}, []
        for k in active:
            cfg, params = self.runs[k].cfg, self.pack.run_params(k)
            if cfg.grad_clip > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:  # measured only: the gradients stay as they are, NaN or not
                norms.append(_grad_norm(params))
            lrs[k] = self.opt.param_groups[k]["lr"] = cfg.lr * lr_factor(step, self.total, self.runs[k].warmup)
        self.opt.step()  # inactive runs have no grads, so AdamW leaves them alone
        self.opt.zero_grad(set_to_none=True)
        return lrs, torch.stack([n.float().to(self.device) for n in norms])

    def check(self, r: _Run, loss: float) -> None:
        """Record a blow-up (once); with ``on_divergence = "stop"`` the run ends at this step."""
        if r.diverged_at is None and _blown(loss, r.initial, r.cfg.diverge_factor):
            r.diverged_at = r.step
            if r.cfg.on_divergence == "stop":
                r.status = "diverged"

    def eval(self, which: list[int]) -> None:
        """A periodic eval, on the curve chunks."""
        self.pack.set_active(which)
        losses = evaluate(
            self.pack.model, self.data.eval[: self.data.curve_rows], self.eval_bs, len(which), self.amp, self.fused
        )
        for k, chunk_losses in zip(which, losses):
            self.log_eval(self.runs[k], chunk_losses)

    def log_eval(self, r: _Run, chunk_losses: torch.Tensor) -> None:
        """Record a periodic eval: its mean in the metrics, its per-chunk losses for ``eval_chunks.npz``."""
        loss = chunk_losses.mean().item()
        r.curve.append((r.step, chunk_losses))
        r.last, r.last_eval_step, r.best = loss, r.step, min(r.best, loss)
        r.store.append_metric({"kind": "eval", "step": r.step, "eval_loss": loss, "elapsed_s": self.elapsed()})
        self.check(r, loss)

    def final_eval(self, which: list[int]) -> None:
        """The final eval of runs that end now, on every eval chunk; stored per chunk before their results."""
        self.pack.set_active(which)
        losses = evaluate(self.pack.model, self.data.eval, self.eval_bs, len(which), self.amp, self.fused)
        for k, chunk_losses in zip(which, losses):
            r = self.runs[k]
            r.final = chunk_losses
            if r.last_eval_step != r.step:  # a periodic eval at this step already logged the curve chunks
                self.log_eval(r, chunk_losses[: self.data.curve_rows])
            self.write_chunks(r)

    def write_chunks(self, r: _Run) -> None:
        assert r.step0 is not None and r.final is not None
        data, rows = self.data, self.data.rows()
        r.store.write_eval_chunks(
            EvalChunks(
                data.pool_digest,
                {
                    name: SplitLosses(
                        ids=ids.numpy(),
                        pretrained=self.pretrained[rows[name]].numpy(),
                        step0=r.step0[rows[name]].numpy(),
                        final=r.final[rows[name]].numpy(),
                    )
                    for name, ids in data.splits.items()
                },
                CurveLosses(
                    ids=torch.cat(list(data.splits.values()))[: data.curve_rows].numpy(),
                    steps=np.array([step for step, _ in r.curve], dtype=np.int64),
                    losses=torch.stack([losses for _, losses in r.curve]).numpy(),
                ),
            )
        )

    def result(self, r: _Run) -> RunResult:
        assert r.step0 is not None and r.final is not None
        reported = self.data.rows()["test" if "test" in self.data.splits else "eval"]
        return RunResult(
            run_id=r.spec.run_id,
            status=r.status,
            axes=r.spec.axes,
            final_eval_loss=r.final[reported].mean().item(),
            best_eval_loss=r.best,
            initial_eval_loss=r.step0[reported].mean().item(),
            steps=r.step,
            tokens=r.tokens,
            wall_time_s=self.elapsed(),
            tokens_per_s=r.tokens / max(r.train_time, 1e-9),
            versions=versions(),
            device=str(self.device),
            pack_size=len(self.runs),
            dtype=str(next(self.pack.model.parameters()).dtype).removeprefix("torch."),
            diverged_at_step=r.diverged_at,
        )
