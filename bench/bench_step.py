"""Training-step throughput: loralab vs HF PEFT (eager, compiled) vs the frozen base, side by side in one process.

Every variant trains the same model on the same batches: LoRA on ``--targets`` with AdamW and grad clipping.
``base`` is the ceiling: the frozen model's forward + backward down to the input embeddings (no adapter, no
optimizer) with HF's loss; ``base-fused`` is the same with loralab's fused loss, the ceiling for loralab's own
LoRA overhead. On CPU the variants are timed in interleaved rounds (so a noisy neighbour slows all of
them alike) and the median step is reported; on CUDA they run one after another, each alone on the device, and the
peak memory of its steps is reported too.

    python bench/bench_step.py                                    # CPU: SmolLM2-135M, the quick preset's settings
    python bench/bench_step.py --model qwen1.5b-shaped --batch 8 --seq 512 --rank 16 --targets all-linear \\
        --dropout 0 --dtype bfloat16 --compile                    # the GPU reference setting
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    if name == "qwen1.5b-shaped":   # Qwen2.5-1.5B's shapes, random weights: no download needed
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):
            return Qwen2ForCausalLM(cfg).to(dtype)
    from loralab.lab.config.schema import ModelConfig
    from loralab.lab.run.models import load_model

    return load_model(ModelConfig(name=name, dtype=str(dtype).removeprefix("torch.")), device)[0]


def peft_variant(base, args, compile_: bool):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                          target_modules=args.targets, lora_dropout=args.dropout))
    fwd = torch.compile(model) if compile_ else model

    def loss(ids):
        return fwd(input_ids=ids, labels=ids).loss
    return model, loss


def loralab_variant(base, args, compile_: bool):
    from loralab import LoraConfig, inject
    from loralab.lab.run.loss import sequence_losses

    model = inject(copy.deepcopy(base), LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=args.targets,
                                                   dropout=args.dropout))
    if compile_:   # as the lab does with train.compile = true
        from loralab.lab.run.train import compile_backbone

        compile_backbone(model)
    return model, lambda ids: sequence_losses(model, ids).mean()


def base_variant(base, args, compile_: bool):
    model = copy.deepcopy(base).requires_grad_(False)
    fwd = torch.compile(model) if compile_ else model
    emb = model.get_input_embeddings()

    def loss(ids):
        return fwd(inputs_embeds=emb(ids).detach().requires_grad_(), labels=ids).loss
    return model, loss


def base_fused_variant(base, args, compile_: bool):
    """The frozen base with the lab's fused loss: the ceiling for loralab itself (same loss, no adapter)."""
    from loralab.lab.run.loss import sequence_losses
    from loralab.lab.run.train import compile_backbone

    model = copy.deepcopy(base).requires_grad_(False)
    # backward stops at the embeddings' output, as in `base`: input gradients only
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    if compile_:
        compile_backbone(model)
    return model, lambda ids: sequence_losses(model, ids).mean()


class Variant:
    """A model, its loss and optimizer; ``step(ids)`` is one training step, synchronized."""

    def __init__(self, name, model, loss, device):
        self.name, self.model, self.loss, self.device = name, model, loss, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=device.type == "cuda") if self.params else None
        self.times: list[float] = []
        self.round_medians: list[float] = []   # CPU: one per interleaved round, for paired ratios
        self.peak_bytes = 0

    def step(self, ids) -> float:
        t0 = time.perf_counter()
        self.loss(ids).backward()
        if self.opt:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


VARIANTS = {"base": base_variant, "base-fused": base_fused_variant, "peft": peft_variant,
            "loralab": loralab_variant}


def random_batches(base, args, device, n: int = 4) -> list[torch.Tensor]:
    """``n`` seeded ``(batch, seq)`` batches of token ids (throughput does not depend on the text)."""
    vocab = base.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(n)]


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    base = build_model(args.model, device, dtype).requires_grad_(False)
    batches = random_batches(base, args, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and dtype != torch.float32 \
        else torch.autocast("cpu", enabled=False)
    names = [(v, c) for v in args.variants for c in ([False, True] if args.compile else [False])]
    sequential = device.type == "cuda"
    rows = []

    def make(name, compile_):
        model, loss = VARIANTS[name](base, args, compile_)
        return Variant(name + ("+compile" if compile_ else ""), model, loss, device)

    def measure(v: Variant, steps: int):
        times = []
        for i in range(steps):
            with amp:
                times.append(v.step(batches[i % len(batches)]))
        v.times += times
        v.round_medians.append(statistics.median(times))

    def warm_up(v: Variant):   # compile, allocator and cache warm-up: not timed
        with amp:
            for i in range(args.warmup):
                v.step(batches[i % len(batches)])

    if sequential:   # CUDA: one variant on the device at a time, for a clean peak-memory figure
        for name, c in names:
            resident = torch.cuda.memory_allocated()   # the shared base every variant copies from
            v = make(name, c)
            warm_up(v)
            torch.cuda.reset_peak_memory_stats()
            measure(v, args.steps)
            v.peak_bytes = torch.cuda.max_memory_allocated() - resident   # its weights, states, activations
            rows.append(summary(v, args))
            del v
            gc.collect()
            torch.cuda.empty_cache()
        return rows
    variants = {(n, c): make(n, c) for n, c in names}
    for v in variants.values():
        warm_up(v)
    for _ in range(args.rounds):   # interleaved: each round times every variant for a few steps
        for v in variants.values():
            measure(v, max(1, args.steps // args.rounds))
    rows = [summary(v, args) for v in variants.values()]
    for ref in ("peft", "base"):
        if ref in args.variants:
            paired(rows, list(variants.values()), ref)
    return rows


def paired(rows: list[dict], variants: list[Variant], ref: str) -> None:
    """Add ``x_<ref>_paired``: the speedup over ``ref`` within each round (both timed minutes apart at most, so a
    slow spell of the machine cancels out), as the median and quartiles over rounds."""
    ref_rounds = next(v.round_medians for v in variants if v.name == ref)
    for row, v in zip(rows, variants):
        ratios = [r / t for r, t in zip(ref_rounds, v.round_medians)]
        q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        row[f"x_{ref}_paired"] = {"median": med, "q1": q1, "q3": q3, "rounds": len(ratios)}


def summary(v: Variant, args) -> dict:
    med = statistics.median(v.times)
    return {"variant": v.name, "median_step_s": med, "tokens_per_s": args.batch * args.seq / med,
            "steps_timed": len(v.times), "peak_gb": v.peak_bytes / 2**30 if v.peak_bytes else None}


def table(rows: list[dict]) -> str:
    ref = {r["variant"]: r["tokens_per_s"] for r in rows}
    lines = ["| variant | tokens/s | median step (s) | × PEFT eager | × base | × PEFT, paired by round (IQR) "
             "| × base, paired by round (IQR) | peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = [f"{r['tokens_per_s'] / ref[k]:.2f}" if k in ref else "-" for k in ("peft", "base")]
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['median_step_s']:.3f} | {' | '.join(times)} | "
                     f"{_paired_cell(r.get('x_peft_paired'))} | {_paired_cell(r.get('x_base_paired'))} | "
                     f"{'-' if r['peak_gb'] is None else format(r['peak_gb'], '.1f')} |")
    return "\n".join(lines)


def _paired_cell(p: dict | None) -> str:
    return "-" if p is None else f"{p['median']:.2f} ({p['q1']:.2f}–{p['q3']:.2f})"


def environment(variants=("peft",)) -> dict:
    import importlib.metadata
    import platform

    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": dev, "threads": torch.get_num_threads()}
    if "peft" in variants:   # only when timed: the other variants run without peft installed
        env["peft"] = importlib.metadata.version("peft")
    return env


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a model dir, or qwen1.5b-shaped")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma list, or all-linear")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--variants", default="base,base-fused,peft,loralab")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd PEFT / loralab / base")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=4, help="CPU: interleaved rounds")
    p.add_argument("--out", default=None, help="write the rows and environment as JSON here")
    args = p.parse_args(argv)
    args.targets = ALL_LINEAR if args.targets == "all-linear" else args.targets.split(",")
    args.variants = args.variants.split(",")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    rows = run(args)
    env = environment(args.variants)
    print(f"# {args.model}, batch {args.batch} x {args.seq} tokens, r={args.rank}, targets={','.join(args.targets)}, "
          f"dropout={args.dropout}, {args.dtype}; {env}")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "env": env,
                                              "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
