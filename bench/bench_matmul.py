"""Matmul throughput, float32 vs bfloat16, at the shapes a SmolLM2 training step multiplies: whether this CPU makes
bfloat16 pay (what ``model.dtype = auto`` decides from the CPU's flags, ``loralab.lab.runtime``).

    python bench/bench_matmul.py [--out docs/bench/cpu_matmul.json]

Each product is timed as the median of ``--repeat`` runs after one warm-up, float32 and bfloat16 side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from loralab.lab import runtime

# (rows, inner, cols): a 4 x 128-token batch through SmolLM2's MLP up-projection and its head, forward and backward
SHAPES = {"mlp up, forward": (512, 576, 1536), "mlp up, grad of input": (512, 1536, 576),
          "head chunk (8,192 of the vocabulary), forward": (512, 576, 8192)}


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        t32 = timed(lambda: a @ b, args.repeat)
        a16, b16 = a.bfloat16(), b.bfloat16()
        t16 = timed(lambda: a16 @ b16, args.repeat)
        rows.append({"product": name, "shape": [m, k, n], "float32_s": t32, "bfloat16_s": t16,
                     "bf16_speedup": t32 / t16})
    env = {"native_bf16": runtime.cpu_has_native_bf16(), "auto_dtype_cpu": runtime.auto_dtype("cpu"),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    print(f"# {env}")
    print("| product | shape | float32 (s) | bfloat16 (s) | bf16 speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['product']} | {'x'.join(map(str, r['shape']))} | {r['float32_s']:.4f} | {r['bfloat16_s']:.4f} | "
              f"{r['bf16_speedup']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
