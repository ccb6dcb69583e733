"""What an eval chunk costs next to a training step, on the offline SmolLM2 (docs/evaluation.md sizes the presets' evals
with it).

On a CPU shared with other jobs, seconds are not comparable from one minute to the next; their *ratio* within one
process, measured interleaved, is steadier. Rounds alternate one training step of quick.toml's shape (4 × 128 tokens,
LoRA r = 8 on q/k/v/o, AdamW) with the eval of 32 chunks of 128 tokens at eval batch 32 and at batch 4 (the train
batch, which the lab used before ``train.eval_batch_size``); medians over the rounds are printed.

    python scripts/eval_cost.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import loralab  # noqa: E402
from loralab.config import LoraConfig  # noqa: E402
from loralab.lab.config.schema import DataConfig, ModelConfig  # noqa: E402
from loralab.lab.run.data import load_data  # noqa: E402
from loralab.lab.run.loss import fused_loss_ok, sequence_losses  # noqa: E402
from loralab.lab.run.models import load_model  # noqa: E402
from loralab.lab.run.train import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    base, tok = load_model(ModelConfig(), "cpu")
    base.requires_grad_(False)
    data = load_data(DataConfig(seq_len=128, max_train_chunks=256, val_chunks=32, test_chunks=32), tok)
    model = loralab.inject(
        base, LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), dropout=0.05), seed=0
    )
    fused = fused_loss_ok(model, data.eval[:1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    chunks = data.eval[:32]
    times: dict[str, list[float]] = {"train step (4 x 128)": [], "eval chunk, batch 32": [], "eval chunk, batch 4": []}
    for i in range(args.rounds + 1):  # round 0 warms up and is not counted
        t = time.perf_counter()
        model.train()
        sequence_losses(model, data.train[4 * i : 4 * i + 4], fused=fused).mean().backward()
        opt.step()
        opt.zero_grad()
        step = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(model, chunks, 32, 1, contextlib.nullcontext, fused)
        e32 = (time.perf_counter() - t) / len(chunks)
        t = time.perf_counter()
        evaluate(model, chunks, 4, 1, contextlib.nullcontext, fused)
        e4 = (time.perf_counter() - t) / len(chunks)
        if i:
            for k, v in zip(times, (step, e32, e4)):
                times[k].append(v)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load:.2f} at the end; medians of {args.rounds} rounds"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k}: {v:.3f} s")
    step = med["train step (4 x 128)"]
    print(
        f"  eval chunk / train step: {med['eval chunk, batch 32'] / step:.3f} (batch 32), "
        f"{med['eval chunk, batch 4'] / step:.3f} (batch 4)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
