"""The cold-start shock (issue 18, part 1): does a random B start the model high and cost training time?

A client of the lab: the runs are two ordinary sweeps (``configs/cold-start.toml``: arms × learning rates × seeds
with per-chunk curves; ``configs/cold-start-shock.toml``: step-0 evals of random-both against α), read back through
the store; the statistics are :mod:`..report.stats`'s (paired differences over seeds and chunks, pigeonhole bootstrap
intervals). This module turns them into the numbers, figures and verdict of ``docs/results/cold-start.md``, applying
exactly the criteria written there before the run (the constants below).

The page keeps everything above :data:`MARKER` (the criteria) byte for byte and replaces what follows it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralab.inits import get_scheme
from loralab.io import atomic_write

from ..report.cells import mixed_compute
from ..report.stats import Estimate, Losses, interval, paired_difference, seed_for
from ..store import RunRecord, SweepStore, atomic_write_json

__all__ = ["MARKER", "Judgement", "analyze", "arm_label", "judge", "shock_table", "write_cold_start"]

# ---- the criteria of docs/results/cold-start.md, written before the run ---------------------------------------------
BASELINE, CLAIM, CONTROL = "standard", "random-both", "random-both-subtracted"
SHOCK = 0.45  # nats: the step-0 jump measured before (α = 16, r = 8, SmolLM2)
NEAR = (0.30, 0.68)  # "starts near the measured shock": 0.45 × 2/3 to × 3/2
FEW_STEPS = 6  # "closes within a few steps": at step 6 or earlier
SUBSTANTIAL = 0.5  # "a substantial part of training": not closed by step T/2
LEVELS = (0.25, 0.5, 0.75)  # loss levels: the base's loss minus these fractions of standard's gain by step T
READ_AT = (0.0, 0.5, 1.0)  # the control's decomposition is reported at these fractions of T
SHOCK_BEFORE = {4.0: 0.04, 16.0: 0.45, 64.0: 8.0}  # α -> the earlier measurement (nats), checked within:
SHOCK_RATIO = (2 / 3, 3 / 2)
MARKER = "<!-- results: everything below this line is written by `loralab cold-start` -->"


def arm_label(rec: RunRecord) -> str | None:
    """``random-both`` or ``random-both, dist=xavier``: the init and the options it sets away from their defaults
    (so ``dist = "kaiming"`` given explicitly is the same arm as none); ``None`` without a config."""
    lora = ((rec.config or {}).get("config") or {}).get("lora")
    if not isinstance(lora, Mapping):
        return None
    init, kwargs = lora.get("init", "standard"), lora.get("init_kwargs") or {}
    defaults = {k: p.default for k, p in inspect.signature(get_scheme(init).fn).parameters.items()}
    set_ = [f"{k}={v}" for k, v in sorted(kwargs.items()) if defaults.get(k, inspect.Parameter.empty) != v]
    return ", ".join([init, *set_])


def _field(rec: RunRecord, section: str, name: str) -> Any:
    return (((rec.config or {}).get("config") or {}).get(section) or {}).get(name)


@dataclass(frozen=True)
class Judgement:
    """One arm at one learning rate, by the pre-registered rule (module constants).

    Attributes:
        verdict: ``supported``, ``refuted`` or ``undecided``.
        start: the step-0 gap; near: whether it counts as near the measured shock.
        closed_at: the first eval step > 0 whose interval reaches 0 (lo ≤ 0), ``None`` if it never does.
        ends_lower: the arm is below ``standard`` at the last step (hi < 0).
        last_step: T, the last step both curves have.
        why: one sentence.
    """

    verdict: str
    start: Estimate
    near: bool
    closed_at: int | None
    ends_lower: bool
    last_step: int
    why: str


def judge(gaps: Sequence[tuple[int, Estimate]], total: int, *, measured: bool = True) -> Judgement:
    """The verdict of one gap curve ``[(step, gap), ...]`` (step 0 first) of a run of ``total`` steps.

    ``measured``: the arm's shock was measured before (random-both): "near" means :data:`NEAR`; otherwise (the
    xavier arm) only that the step-0 interval excludes zero.
    """
    gaps = sorted(gaps, key=lambda p: p[0])
    if not gaps or gaps[0][0] != 0:
        raise ValueError("a gap curve needs its step-0 point")
    start = gaps[0][1]
    near = NEAR[0] <= start.mean <= NEAR[1] if measured else start.lo > 0
    closed_at = next((t for t, g in gaps[1:] if g.lo <= 0), None)  # NaN (a blown-up loss) never closes
    last_step, last = gaps[-1]
    ends_lower = last_step == total and last.hi < 0
    half = SUBSTANTIAL * total
    if (closed_at is not None and closed_at <= FEW_STEPS) or ends_lower:
        why = "ends lower than standard" if ends_lower else f"the gap closes at step {closed_at} (≤ {FEW_STEPS})"
        return Judgement("refuted", start, near, closed_at, ends_lower, last_step, why)
    lasts = (closed_at is None or closed_at > half) and last_step >= half
    if near and lasts:
        stays = "never closes" if closed_at is None else f"closes only at step {closed_at}"
        why = f"starts at {start.mean:+.3f} and {stays} (> {half:g})"
        return Judgement("supported", start, near, closed_at, ends_lower, last_step, why)
    why = f"starts at {start.mean:+.3f}, not near {SHOCK}" if not near else ""
    if not lasts:
        late = f"the gap closes at step {closed_at}, after {FEW_STEPS} but by {half:g}"
        why = f"{why}; {late}" if why else late
    return Judgement("undecided", start, near, closed_at, ends_lower, last_step, why)


def claim_verdict(by_lr: Mapping[float, Judgement]) -> str:
    """Supported at every learning rate, refuted at every one, or partly (naming where)."""
    verdicts = {j.verdict for j in by_lr.values()}
    if len(verdicts) == 1:
        return verdicts.pop()
    return "partly (" + "; ".join(f"{j.verdict} at lr {lr:g}" for lr, j in by_lr.items()) + ")"


# ---- reading the training sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arms:
    """Per (arm, lr): seed -> (steps, (k, c) per-chunk losses on the curve chunks). Runs left out, with why;
    ``mixed``: what the report says when the runs computed on more than one device or dtype, else ``None``."""

    curves: Mapping[tuple[str, float], Mapping[int, tuple[np.ndarray, np.ndarray]]]
    skipped: tuple[str, ...]
    mixed: str | None = None

    def arms(self) -> list[str]:
        return list(dict.fromkeys(a for a, _ in self.curves))

    def lrs(self) -> list[float]:
        return sorted({lr for _, lr in self.curves})


def read_arms(records: Sequence[RunRecord]) -> Arms:
    """The curves of every finished run that stored them; every other run is named in ``skipped``."""
    curves: dict[tuple[str, float], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    skipped, ids, kept = [], None, []
    for rec in records:
        arm, chunks = arm_label(rec), rec.eval_chunks
        if rec.status not in ("ok", "diverged") or arm is None or chunks is None or chunks.curve is None:
            why = rec.status if rec.status not in ("ok", "diverged") else "no per-chunk curve in eval_chunks.npz"
            skipped.append(f"{rec.run_id} ({why})")
            continue
        if ids is not None and not np.array_equal(ids, chunks.curve.ids):
            raise ValueError(f"run {rec.run_id} was evaluated on other curve chunks than the others: not paired")
        ids = chunks.curve.ids
        lr, seed = float(_field(rec, "train", "lr")), int(_field(rec, "train", "seed"))
        curves.setdefault((arm, lr), {})[seed] = (chunks.curve.steps, chunks.curve.losses.astype(np.float64))
        kept.append(rec)
    return Arms(curves, tuple(skipped), mixed_compute(kept))


def _at(curve: tuple[np.ndarray, np.ndarray], step: int) -> np.ndarray | None:
    steps, losses = curve
    hit = np.flatnonzero(steps == step)
    return losses[hit[0]] if len(hit) else None


def _cell(arms: Arms, arm: str, lr: float, step: int) -> Losses | None:
    runs = arms.curves.get((arm, lr), {})
    found = {s: _at(c, step) for s, c in sorted(runs.items())}
    rows = {s: r for s, r in found.items() if r is not None}
    return Losses(tuple(rows), np.stack(list(rows.values()))) if rows else None


def common_steps(arms: Arms, lr: float, names: Sequence[str]) -> list[int]:
    """Eval steps that every run of ``names`` at ``lr`` has (a run stopped by divergence has fewer)."""
    sets = [set(c[0].tolist()) for n in names for c in arms.curves.get((n, lr), {}).values()]
    return sorted(set.intersection(*sets)) if sets else []


def gap_curve(arms: Arms, arm: str, ref: str, lr: float) -> list[tuple[int, Estimate]]:
    """``[(step, arm − ref)]``: paired over seeds and curve chunks, at every step both have."""
    out = []
    for step in common_steps(arms, lr, [arm, ref]):
        a, b = _cell(arms, arm, lr, step), _cell(arms, ref, lr, step)
        est = None if a is None or b is None else paired_difference(a, b, seed=seed_for("gap", arm, ref, lr, step))
        if est is not None:
            out.append((step, est))
    return out


def mean_curve(arms: Arms, arm: str, lr: float) -> list[tuple[int, Estimate]]:
    """``[(step, mean loss)]`` over seeds and curve chunks, with its interval, at steps every seed has."""
    out = []
    for step in common_steps(arms, lr, [arm]):
        cell = _cell(arms, arm, lr, step)
        if cell is not None:
            out.append((step, interval(cell.values, seed=seed_for("curve", arm, lr, step))))
    return out


def steps_to_levels(arms: Arms, lr: float) -> dict[str, list[int | None]]:
    """Per arm, the first eval step whose mean loss is at or below each :data:`LEVELS` level (``None``: never)."""
    ref = mean_curve(arms, BASELINE, lr)
    if len(ref) < 2:
        return {}
    base, end = ref[0][1].mean, ref[-1][1].mean
    levels = [base - f * (base - end) for f in LEVELS]
    out = {}
    for arm in arms.arms():
        curve = mean_curve(arms, arm, lr)
        out[arm] = [next((t for t, e in curve if e.mean <= level), None) for level in levels]
    return out


# ---- the shock against α -----------------------------------------------------------------------------------------


def shock_table(records: Sequence[RunRecord]) -> dict[str, dict[float, Estimate]]:
    """Per arm and α: the step-0 loss minus the base model's on every stored chunk (val and test), over seeds."""
    cells: dict[tuple[str, float], dict[int, np.ndarray]] = {}
    for rec in records:
        arm, chunks = arm_label(rec), rec.eval_chunks
        if rec.status not in ("ok", "diverged") or arm is None or chunks is None:
            continue
        diff = np.concatenate([s.step0.astype(np.float64) - s.pretrained for s in chunks.splits.values()])
        alpha, seed = float(_field(rec, "lora", "alpha")), int(_field(rec, "train", "seed"))
        cells.setdefault((arm, alpha), {})[seed] = diff
    out: dict[str, dict[float, Estimate]] = {}
    for (arm, alpha), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        x = np.stack([by_seed[s] for s in sorted(by_seed)])
        out.setdefault(arm, {})[alpha] = interval(x, seed=seed_for("shock", arm, alpha))
    return out


def shock_check(table: Mapping[str, Mapping[float, Estimate]]) -> list[tuple[float, float, float | None, bool | None]]:
    """``[(α, measured before, measured now, within the ratio)]`` for the claim's arm (``None``: not in the sweep)."""
    now = table.get(CLAIM, {})
    rows = []
    for alpha, before in SHOCK_BEFORE.items():
        est = now.get(alpha)
        ok = None if est is None else SHOCK_RATIO[0] * before <= est.mean <= SHOCK_RATIO[1] * before
        rows.append((alpha, before, None if est is None else est.mean, ok))
    return rows


# ---- the whole analysis -----------------------------------------------------------------------------------------


def analyze(run_dir: str | Path, shock_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the page says, as plain data (also written to ``results.json``)."""
    store = SweepStore(run_dir)
    if store.manifest() is None:
        raise ValueError(f"{run_dir} is not a sweep's out_dir (no sweep.json): run `loralab sweep` first")
    arms = read_arms(store.records())
    if not any(a == BASELINE for a, _ in arms.curves):
        raise ValueError(
            f"{run_dir} has no finished `{BASELINE}` run with per-chunk curves: the gaps are measured against it"
            + (f" (left out: {', '.join(arms.skipped[:3])})" if arms.skipped else "")
        )
    out: dict[str, Any] = {"skipped": list(arms.skipped), "lrs": arms.lrs(), "arms": arms.arms(), "by_lr": {}}
    if arms.mixed:
        out["mixed"] = arms.mixed
    verdicts: dict[str, dict[float, Judgement]] = {}
    for lr in arms.lrs():
        total = max((int(c[0].max()) for c in arms.curves.get((BASELINE, lr), {}).values()), default=0)
        entry: dict[str, Any] = {"total": total, "gaps": {}, "judgements": {}, "curves": {}}
        for arm in arms.arms():
            entry["curves"][arm] = [(t, asdict(e)) for t, e in mean_curve(arms, arm, lr)]
            if arm == BASELINE:
                continue
            gaps = gap_curve(arms, arm, BASELINE, lr)
            entry["gaps"][arm] = [(t, asdict(e)) for t, e in gaps]
            if gaps and gaps[0][0] == 0 and arm != CONTROL:
                j = judge(gaps, total, measured=arm == CLAIM)
                verdicts.setdefault(arm, {})[lr] = j
                entry["judgements"][arm] = {**asdict(j), "start": asdict(j.start)}
        entry["levels"] = steps_to_levels(arms, lr)
        entry["control"] = _control(arms, lr, total)
        out["by_lr"][lr] = entry
    out["verdicts"] = {arm: claim_verdict(by) for arm, by in verdicts.items()}
    if shock_dir is not None:
        table = shock_table(SweepStore(shock_dir).records())
        out["shock"] = {arm: {a: asdict(e) for a, e in t.items()} for arm, t in table.items()}
        out["shock_check"] = shock_check(table)
    return out


def _control(arms: Arms, lr: float, total: int) -> dict[str, Any] | None:
    """The decomposition: noise in the output (random-both − control) and both factors non-zero (control −
    standard), at :data:`READ_AT` fractions of T; and whether the shock is attributed to the noise."""
    if (CONTROL, lr) not in arms.curves or (CLAIM, lr) not in arms.curves:
        return None
    noise, nonzero = gap_curve(arms, CLAIM, CONTROL, lr), gap_curve(arms, CONTROL, BASELINE, lr)
    claim = gap_curve(arms, CLAIM, BASELINE, lr)

    def closed(gaps: list[tuple[int, Estimate]]) -> int | None:
        return next((t for t, g in gaps[1:] if g.lo <= 0), None)

    def at(gaps: list[tuple[int, Estimate]], frac: float) -> tuple[int, dict] | None:
        steps = [t for t, _ in gaps if t >= frac * total]
        return (steps[0], asdict(dict(gaps)[steps[0]])) if steps else None

    def reading(gaps: list[tuple[int, Estimate]]) -> str:
        if not gaps or gaps[-1][0] != total:
            return "not measured at the last step"
        e = gaps[-1][1]
        return "costs" if e.lo > 0 else "helps" if e.hi < 0 else "no measurable effect"

    # the control's own gap starts at 0 by construction: it "closes" unless it opens later
    c_closed, rb_closed = closed(nonzero), closed(claim)
    noise_explains = c_closed is not None and c_closed <= FEW_STEPS and (rb_closed is None or rb_closed > FEW_STEPS)
    return {
        "noise": {"at": [at(noise, f) for f in READ_AT], "reading": reading(noise)},
        "nonzero": {"at": [at(nonzero, f) for f in READ_AT], "reading": reading(nonzero), "closed_at": c_closed},
        "noise_explains_the_shock": bool(noise_explains),
    }


# ---- figures and page ------------------------------------------------------------------------------------------


def _figures(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    from matplotlib.figure import Figure

    from ..report.plots import DPI, init_colors

    colors = init_colors(result["arms"])
    lrs, paths = result["lrs"], {}
    for kind in ("curves", "gap"):
        fig = Figure(figsize=(5.2 * len(lrs), 3.8), dpi=DPI, layout="constrained")
        for ax, lr in zip(fig.subplots(1, len(lrs), squeeze=False)[0], lrs):
            entry = result["by_lr"][lr]
            series = entry["curves"] if kind == "curves" else entry["gaps"]
            for arm, pts in series.items():
                t = [p[0] for p in pts]
                m, lo, hi = ([p[1][k] for p in pts] for k in ("mean", "lo", "hi"))
                ax.plot(t, m, marker=".", color=colors[arm], label=arm)
                ax.fill_between(t, lo, hi, color=colors[arm], alpha=0.2, linewidth=0)
            if kind == "gap":
                ax.axhline(0, color="black", linewidth=0.8)
                ax.axhline(SHOCK, color="grey", linestyle=":", linewidth=0.8)
                ax.axvline(SUBSTANTIAL * entry["total"], color="grey", linestyle="--", linewidth=0.8)
                ax.set_ylabel("eval loss − standard's (nats), 95% paired interval")
            else:
                ax.set_ylabel("eval loss (mean over seeds and chunks, 95% interval)")
            ax.set_xlabel("optimizer step")
            ax.set_title(f"lr {lr:g}")
        fig.axes[0].legend(fontsize=8)
        paths[kind] = out / f"{kind}.png"
        fig.savefig(paths[kind], dpi=DPI)
    fig = Figure(figsize=(5.2 * len(lrs), 3.4), dpi=DPI, layout="constrained")
    for ax, lr in zip(fig.subplots(1, len(lrs), squeeze=False)[0], lrs):
        entry, x = result["by_lr"][lr], [100 * f for f in LEVELS]
        top = entry["total"] + 3  # "not reached" is drawn above the last step
        for i, (arm, steps) in enumerate(entry["levels"].items()):
            y = [top if s is None else s for s in steps]
            ax.plot([v + 1.5 * (i - 1.5) for v in x], y, marker="o", color=colors[arm], label=arm)
        ax.axhline(top, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xticks(x, [f"{v:g}%" for v in x])
        ax.set_xlabel("share of standard's gain by the last step")
        ax.set_ylabel("first eval step at or below it (dotted: not reached)")
        ax.set_title(f"lr {lr:g}")
    fig.axes[0].legend(fontsize=8)
    paths["levels"] = out / "levels.png"
    fig.savefig(paths["levels"], dpi=DPI)
    if result.get("shock"):
        fig = Figure(figsize=(5.5, 3.8), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        shock_colors = init_colors(list(result["shock"]))
        for arm, by_alpha in result["shock"].items():
            a = sorted(by_alpha)
            means = np.array([by_alpha[x]["mean"] for x in a])
            err = np.array(
                [[by_alpha[x]["mean"] - by_alpha[x]["lo"], by_alpha[x]["hi"] - by_alpha[x]["mean"]] for x in a]
            )
            ax.errorbar(a, means, yerr=err.T, marker="o", capsize=3, color=shock_colors[arm], label=arm)
        ax.scatter(list(SHOCK_BEFORE), list(SHOCK_BEFORE.values()), marker="x", color="black", label="measured before")
        ax.set_xscale("log", base=2)
        positive = all(e["lo"] > 0 for t in result["shock"].values() for e in t.values())
        ax.set_yscale("log") if positive else ax.set_yscale("symlog", linthresh=0.01)  # the shock spans 3 decades
        ax.set_xlabel("α (r = 8)")
        ax.set_ylabel("step-0 loss − base model's (nats)")
        ax.legend(fontsize=8)
        paths["shock"] = out / "shock_vs_alpha.png"
        fig.savefig(paths["shock"], dpi=DPI)
    return paths


def _e(e: Mapping[str, float]) -> str:
    if not all(math.isfinite(e[k]) for k in ("mean", "lo", "hi")):
        return "not finite"
    return f"{e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"


def results_markdown(result: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The results section (below :data:`MARKER`); ``figures`` maps a kind to its path relative to the page."""
    lines = ["", "## Results", ""]
    for arm, v in result["verdicts"].items():
        lines += [f"**Verdict for `{arm}`: {v}.**" + (" (the claim's init)" if arm == CLAIM else ""), ""]
    lines += ["| lr | arm | step-0 gap | closes at | ends lower | verdict | why |", "|---|---|---|---|---|---|---|"]
    for lr in result["lrs"]:
        for arm, j in result["by_lr"][lr]["judgements"].items():
            closes = "never" if j["closed_at"] is None else f"step {j['closed_at']}"
            lines.append(
                f"| {lr:g} | `{arm}` | {_e(j['start'])} | {closes} | {'yes' if j['ends_lower'] else 'no'} | "
                f"{j['verdict']} | {j['why']} |"
            )
    lines += ["", f"![eval loss over steps]({figures['curves']})", f"![gap to standard]({figures['gap']})", ""]
    lines += ["### Gap to `standard` at each eval step (nats, 95% paired interval over seeds and curve chunks)", ""]
    for lr in result["lrs"]:
        entry = result["by_lr"][lr]
        arms = list(entry["gaps"])
        steps = sorted({t for pts in entry["gaps"].values() for t, _ in pts})
        lines += [
            f"lr {lr:g}:",
            "",
            "| step | " + " | ".join(f"`{a}`" for a in arms) + " |",
            "|---" * (len(arms) + 1) + "|",
        ]
        for t in steps:
            cells = [next((_e(e) for s, e in entry["gaps"][a] if s == t), "—") for a in arms]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Steps to reach a loss level", "", f"![steps to reach a loss level]({figures['levels']})", ""]
    head = " | ".join(f"{int(f * 100)}% of standard's gain" for f in LEVELS)
    lines += [f"| lr | arm | {head} |", "|---|---|" + "---|" * len(LEVELS)]
    for lr in result["lrs"]:
        for arm, steps in result["by_lr"][lr]["levels"].items():
            row = " | ".join("not reached" if s is None else str(s) for s in steps)
            lines.append(f"| {lr:g} | `{arm}` | {row} |")
    lines += ["", "### The control: noise in the output, or both factors non-zero?", ""]
    for lr in result["lrs"]:
        c = result["by_lr"][lr]["control"]
        if c is None:
            lines.append(f"- lr {lr:g}: the sweep lacks `{CLAIM}` or `{CONTROL}`.")
            continue
        at = lambda pts: ", ".join(f"step {p[0]}: {_e(p[1])}" for p in pts if p is not None)  # noqa: E731
        lines.append(
            f"- lr {lr:g}: noise in the output (`{CLAIM}` − `{CONTROL}`) {at(c['noise']['at'])} — at the end "
            f"{c['noise']['reading']}; both factors non-zero (`{CONTROL}` − `standard`) {at(c['nonzero']['at'])} — "
            f"at the end {c['nonzero']['reading']}. The shock is "
            f"{'' if c['noise_explains_the_shock'] else 'not '}attributed to the noise in the output."
        )
    if "shock" in result:
        sizes = {(e["seeds"], e["chunks"]) for t in result["shock"].values() for e in t.values()}
        size = ", ".join(f"{s} seeds × {c} chunks" for s, c in sorted(sizes))
        lines += ["", f"### The shock against α (step-0 loss − the base model's, paired; {size})", ""]
        arms = list(result["shock"])
        alphas = sorted({a for t in result["shock"].values() for a in t})
        lines += ["| α | " + " | ".join(f"`{a}`" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for a in alphas:
            lines.append(
                f"| {a:g} | "
                + " | ".join(_e(result["shock"][arm][a]) if a in result["shock"][arm] else "—" for arm in arms)
                + " |"
            )
        lines += ["", f"![shock against alpha]({figures['shock']})", ""]
        for alpha, before, now, ok in result["shock_check"]:
            state = "not in the sweep" if ok is None else f"now {now:+.3f}: {'reproduced' if ok else 'not reproduced'}"
            lines.append(f"- α = {alpha:g}: measured before {before:g} nats; {state} (within ×2/3–×3/2).")
    if result["skipped"]:
        lines += ["", "Runs left out: " + ", ".join(result["skipped"]) + "."]
    if result.get("mixed"):
        lines += ["", result["mixed"]]
    return "\n".join(lines) + "\n"


def write_cold_start(
    run_dir: str | Path, out: str | Path, *, shock_dir: str | Path | None = None, page: str | Path | None = None
) -> dict[str, Path]:
    """Analyze, draw the figures into ``out``, write ``out/results.json``, and the results below :data:`MARKER` in
    ``page`` (default: ``<out>.md`` when it exists, else ``out/results.md``)."""
    out = Path(out)
    result = analyze(run_dir, shock_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _figures(result, out)
    default = out.with_name(out.name + ".md")
    target = Path(page) if page is not None else (default if default.exists() else out / "results.md")
    rel = {
        k: str(p.relative_to(target.parent)) if p.is_relative_to(target.parent) else str(p) for k, p in paths.items()
    }
    body = results_markdown(result, rel)
    if target.exists():
        text = target.read_text(encoding="utf-8")
        if MARKER not in text:
            raise ValueError(
                f"{target} has no results marker line {MARKER!r}: add it below the criteria, or pass --page"
            )
        text = text[: text.index(MARKER) + len(MARKER)] + "\n" + body
    else:
        text = f"# The cold-start shock: results\n\n{MARKER}\n{body}"
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write_json(out / "results.json", {**result, "by_lr": {str(k): v for k, v in result["by_lr"].items()}})
    return {**paths, "page": target, "results": out / "results.json"}
