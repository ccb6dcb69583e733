"""The identity check of every init scheme on a real model: max |Δ logits| between adapted and pretrained."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from loralab import init_schemes, inject
from loralab.config import LoraConfig

from ..config.schema import ModelConfig
from ..run.models import load_model

PROBE_TEXT = "User: What is low-rank adaptation?\nAssistant: A small trainable update to a frozen weight."
IDENTITY_TOL = 1e-4  # max |Δ logits| relative to max |logits|: float32 noise is ~1e-6, a real change far above


@torch.no_grad()
def identity_table(model_cfg: ModelConfig, lora: LoraConfig, *, seed: int = 0) -> list[dict]:
    """One row per registered scheme: its promises and the measured max |Δ logits| at init on ``model_cfg``.

    The reference is the model's own logits before injection, so a scheme that rewrites the base (pissa, olora) is
    checked against the true pretrained model, not against its own reconstruction of it.
    """
    model, tokenizer = load_model(model_cfg, "cpu")
    model.requires_grad_(False).eval()
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    ref = model(input_ids=ids).logits.float()
    ref_scale = ref.abs().max().item()
    rows = []
    for name, scheme in init_schemes().items():
        row = {
            "init": name,
            "preserves_output": scheme.preserves_output,
            "modifies_base": scheme.modifies_base,
            "max_abs_logits": None,
            "relative": None,
            "ok": None,
            "note": "",
        }
        try:
            cfg = dataclasses.replace(lora, init=name, init_kwargs={} if name != lora.init else lora.init_kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapted = inject(copy.deepcopy(model), cfg, seed=seed)
            delta = (adapted(input_ids=ids).logits.float() - ref).abs().max().item()
            row.update(
                max_abs_logits=delta,
                relative=delta / ref_scale,
                ok=(delta / ref_scale < IDENTITY_TOL) == scheme.preserves_output,
            )
        except ValueError as e:  # e.g. an odd rank for the orthogonal family
            row["note"] = str(e).splitlines()[0]
        rows.append(row)
    return rows


def format_identity_table(rows: list[dict]) -> str:
    lines = [f"{'init':<22}{'preserves':>10}{'moves base':>11}{'max |Δ logits|':>16}{'relative':>11}  verdict"]
    for r in rows:
        if r["max_abs_logits"] is None:
            lines.append(f"{r['init']:<22}{'':>10}{'':>11}{'-':>16}{'-':>11}  skipped: {r['note']}")
            continue
        verdict = "ok" if r["ok"] else "BROKEN PROMISE"
        lines.append(
            f"{r['init']:<22}{str(r['preserves_output']):>10}{str(r['modifies_base']):>11}"
            f"{r['max_abs_logits']:>16.3g}{r['relative']:>11.2e}  {verdict}"
        )
    return "\n".join(lines)


__all__ = ["identity_table", "format_identity_table"]
