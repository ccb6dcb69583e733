"""One run: inject LoRA into a copy of the base, a visible training loop, evals, divergence detection, diagnostics.

The loop is written out (nanoGPT style): AdamW over the LoRA factors, linear schedule with warmup (HF's formula),
gradient accumulation and clipping, bf16 autocast on CUDA. A run that blows up (NaN/inf loss, or a loss above
``diverge_factor`` × the initial eval loss) stops early with status ``diverged``; it is recorded, never dropped.
Step-0 diagnostics come from the first micro-batch's backward, so they cost nothing extra.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import loralab
from loralab import check_identity, inject, lora_layers, lora_param_groups

from .config import RunConfig, TrainConfig
from .data import PackedData, iterate_batches
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


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a packed batch ``ids (B, T)`` (labels = inputs, shifted here)."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


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
def evaluate(model: nn.Module, chunks: torch.Tensor, batch_size: int, device: torch.device, amp) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(chunks), batch_size):
        with amp():
            losses.append(lm_loss(model, chunks[i:i + batch_size].to(device)).item() * len(chunks[i:i + batch_size]))
    model.train(was_training)
    return sum(losses) / len(chunks)


def _diagnostics(model: nn.Module, identity: float, grad_scale: float) -> dict:
    layers = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A, layer.lora_B
        layers[name] = {"grad_norm_a": a.grad.norm().item() * grad_scale if a.grad is not None else 0.0,
                        "grad_norm_b": b.grad.norm().item() * grad_scale if b.grad is not None else 0.0,
                        "var_a": a.var().item(), "var_b": b.var().item()}
    return {"identity_max_abs": identity, "layers": layers}


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    status: str = "ok"
    best: float = math.inf
    last: float = math.nan
    last_eval_step: int = 0


def _blown(loss: float, ref: float, factor: float) -> bool:
    return not math.isfinite(loss) or loss > factor * ref


def train_run(run: RunConfig, store: RunStore, *, base_model: nn.Module, data: PackedData, run_id: str,
              axes: dict, progress: bool = True) -> RunResult:
    """Train one LoRA run on a deep copy of ``base_model`` and record everything in ``store``."""
    cfg, start = run.train, time.perf_counter()
    device = next(base_model.parameters()).device
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else _no_amp
    torch.manual_seed(cfg.seed)  # dropout masks
    model = inject(copy.deepcopy(base_model), run.lora, seed=cfg.seed)
    model.train()
    identity = check_identity(model, data.eval[:2].to(device))
    initial = evaluate(model, data.eval, cfg.batch_size, device, amp)
    store.append_metric({"kind": "eval", "step": 0, "eval_loss": initial, "elapsed_s": time.perf_counter() - start})
    opt = torch.optim.AdamW(lora_param_groups(model, cfg.lr, weight_decay=cfg.weight_decay),
                            fused=device.type == "cuda")
    total = total_steps(cfg, len(data.train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, math.ceil(cfg.warmup_ratio * total)))
    st = _State(best=initial, last=initial)
    _loop(model, opt, sched, data, cfg, total, st, store, identity, initial, amp, start, progress)
    if st.status == "diverged" and st.last_eval_step != st.step:
        st.last = evaluate(model, data.eval, cfg.batch_size, device, amp)
        store.append_metric({"kind": "eval", "step": st.step, "eval_loss": st.last,
                             "elapsed_s": time.perf_counter() - start})
    return RunResult(run_id=run_id, status=st.status, axes=axes, final_eval_loss=st.last,
                     best_eval_loss=st.best, initial_eval_loss=initial, steps=st.step, tokens=st.tokens,
                     wall_time_s=time.perf_counter() - start, tokens_per_s=st.tokens / max(st.train_time, 1e-9),
                     versions=versions(), device=str(device))


def _no_amp():
    import contextlib

    return contextlib.nullcontext()


def _micro_batches(data: PackedData, cfg: TrainConfig):
    epoch = 0
    while True:
        yield from iterate_batches(data.train, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        epoch += 1


def _loop(model, opt, sched, data, cfg, total, st, store, identity, initial, amp, start, progress):
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = _micro_batches(data, cfg)
    bar = tqdm(total=total, disable=not progress, leave=False, desc="train", unit="step")
    while st.step < total:
        t0, loss_sum = time.perf_counter(), 0.0
        for micro in range(cfg.grad_accum):
            ids = next(batches).to(device)
            with amp():
                loss = lm_loss(model, ids)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            st.tokens += ids.numel()
            if st.step == 0 and micro == 0:
                store.write_diagnostics(_diagnostics(model, identity, cfg.grad_accum))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        st.train_time += time.perf_counter() - t0
        store.append_metric({"kind": "train", "step": st.step, "loss": loss_sum, "lr": lr, "tokens": st.tokens,
                             "elapsed_s": time.perf_counter() - start})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{st.tokens / st.train_time:.0f}")
        if _blown(loss_sum, initial, cfg.diverge_factor):
            st.status = "diverged"
            break
        if st.step % cfg.eval_every == 0 or st.step == total:
            st.last, st.last_eval_step = evaluate(model, data.eval, cfg.batch_size, device, amp), st.step
            st.best = min(st.best, st.last)
            store.append_metric({"kind": "eval", "step": st.step, "eval_loss": st.last,
                                 "elapsed_s": time.perf_counter() - start})
            if _blown(st.last, initial, cfg.diverge_factor):
                st.status = "diverged"
                break
    bar.close()
