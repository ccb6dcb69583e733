"""Where a training step's time goes: torch.profiler over steps of each bench_step variant, grouped by kind of op.

    python bench/profile_step.py --steps 3 --out docs/bench/cpu_profile.json   # CPU, SmolLM2-135M, quick preset

It takes bench_step.py's options; ``--steps`` is the number of profiled steps per variant.

Groups: matmul (aten::mm/addmm/bmm/baddbmm: the base's projections, the lm_head and the LoRA factors), attention
(SDPA), dropout (drawing the LoRA input masks; applying loralab's float mask is a multiply, counted in other), loss
(softmax / log-softmax / logsumexp and their backward), other (norms, activations, rotary, copies, adds, and AdamW's
small elementwise updates).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
          "attention": ("scaled_dot_product",),
          "dropout": ("bernoulli", "aten::randint", "aten::random_", "aten::where", "aten::ge"),
          "loss": ("softmax", "logsumexp", "aten::exp", "nll_loss", "aten::sub")}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def profile_variant(variant: bench_step.Variant, batches, steps: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        variant.step(batches[i % len(batches)])   # warm up allocators and caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            variant.step(batches[i % len(batches)])
    seconds = defaultdict(float)
    for event in prof.key_averages():
        seconds[group_of(event.key)] += event.self_cpu_time_total / 1e6 / steps
    return dict(seconds)


def main(argv=None) -> int:
    args = bench_step.parse(argv)   # bench_step's options; --steps counts the profiled steps
    steps, out = args.steps, args.out
    device = torch.device(args.device or "cpu")
    base = bench_step.build_model(args.model, device, getattr(torch, args.dtype)).requires_grad_(False)
    batches = bench_step.random_batches(base, args, device)
    table = {}
    for name in args.variants:
        model, loss = bench_step.VARIANTS[name](base, args, False)
        table[name] = profile_variant(bench_step.Variant(name, model, loss, device), batches, steps,
                                      args.warmup)
        del model, loss
    groups = [*GROUPS, "other"]
    print(f"# seconds per step by kind of op (self CPU time, mean of {steps} profiled steps)")
    print("| variant | " + " | ".join(groups) + " | total |\n|---|" + "---|" * (len(groups) + 1))
    for name, secs in table.items():
        print(f"| {name} | " + " | ".join(f"{secs.get(k, 0.0):.3f}" for k in groups) + f" | {sum(secs.values()):.3f} |")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"steps": steps, "seconds_per_step": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
