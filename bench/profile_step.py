"""Where a training step's time goes: torch.profiler over steps of each bench_step variant, grouped by kind of op.

    python bench/profile_step.py                      # CPU, SmolLM2-135M, the quick preset's settings
    python bench/profile_step.py --steps 3 --out docs/bench/cpu_profile.json

Groups: matmul (aten::mm/addmm/bmm: the base's projections, the lm_head and the LoRA factors), attention (SDPA),
dropout (the LoRA input masks), loss (softmax / log-softmax / logsumexp and their backward), other (norms,
activations, rotary, copies, adds, and AdamW's small elementwise updates).
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

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
          "attention": ("scaled_dot_product",),
          "dropout": ("bernoulli", "aten::randint", "aten::random_", "aten::where"),
          "loss": ("softmax", "logsumexp", "aten::exp", "nll_loss", "aten::sub")}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def profile_variant(variant: bench_step.Variant, batches, steps: int) -> dict[str, float]:
    for ids in batches[:2]:
        variant.step(ids)   # warm up allocators and caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            variant.step(batches[i % len(batches)])
    seconds = defaultdict(float)
    for event in prof.key_averages():
        seconds[group_of(event.key)] += event.self_cpu_time_total / 1e6 / steps
    return dict(seconds)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps, out = 3, None
    if "--steps" in argv:
        i = argv.index("--steps")
        steps = int(argv.pop(i + 1))
        argv.pop(i)
    if "--out" in argv:
        i = argv.index("--out")
        out = argv.pop(i + 1)
        argv.pop(i)
    args = bench_step.parse(argv)
    device = torch.device(args.device or "cpu")
    base = bench_step.build_model(args.model, device, getattr(torch, args.dtype)).requires_grad_(False)
    vocab = base.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    table = {}
    for name in args.variants:
        model, loss = bench_step.VARIANTS[name](base, args, False)
        table[name] = profile_variant(bench_step.Variant(name, model, loss, device), batches, steps)
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
