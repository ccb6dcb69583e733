"""Statistics that can tell inits apart: bootstrap intervals over seeds and eval chunks, paired differences, and the
choice of a tuned value on validation data. Pure functions over numpy arrays; the report feeds them from the store.

A cell's losses are a matrix ``(S seeds, N chunks)``: every run of a sweep is evaluated on the same held-out chunks
(the same ids), so two cells' rows pair by seed and their columns by chunk. A paired difference (init − baseline, same
seed, same chunk) cancels what the two share: how hard a chunk is, and a seed's batch order. On the SmolLM2 presets
that shrinks the standard error of a comparison several-fold against two independent means (docs/evaluation.md).

Intervals are 95% percentile bootstrap intervals by the *pigeonhole* scheme (Owen 2007, "The pigeonhole bootstrap",
Ann. Appl. Stat. 1(2)): each replicate resamples seeds with replacement and, independently, chunks with replacement,
one chunk draw shared by every seed of the replicate. Seeds and chunks are crossed (every seed sees every chunk), not
nested: resampling chunks separately within each seed (a nested two-level bootstrap) would treat a hard chunk as hard
for one seed only and understate the chunk term of a mean over several seeds. For a crossed mean the pigeonhole
variance is mildly conservative (Owen 2007). Its weak point is the number of seeds: with S seeds the resampled seed
term has (S − 1)/S of its plug-in variance and only a handful of distinct values, so with 1 seed an interval covers
chunk-to-chunk noise only, and with 2–3 seeds it can be too narrow when seeds disagree more than chunks do. The
tests measure the coverage on synthetic data with a planted difference.

Replicates are drawn from a generator seeded per cell (by the report, from the cell's labels), so a report is
reproducible and one cell's interval does not depend on which other cells the sweep has.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LEVEL",
    "N_BOOT",
    "Estimate",
    "Losses",
    "bootstrap_means",
    "choose",
    "interval",
    "paired_difference",
    "seed_for",
]

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Losses:
    """Per-chunk losses of one cell: row ``i`` is the run with replicate value ``seeds[i]``, columns are chunks
    (the same chunk ids, in the same order, for every cell of a sweep)."""

    seeds: tuple[Any, ...]
    values: np.ndarray  # (S, N)

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != len(self.seeds):
            raise ValueError(f"values must be (seeds, chunks) with {len(self.seeds)} rows; got {self.values.shape}")


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval (``lo``/``hi`` NaN when there is none: a non-finite loss)."""

    mean: float
    lo: float
    hi: float
    seeds: int
    chunks: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (False without an interval)."""
        return bool(self.lo > 0 or self.hi < 0)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.mean) and math.isfinite(self.lo) and math.isfinite(self.hi)


def seed_for(*labels: Any) -> int:
    """A bootstrap seed from a cell's labels: the same cell gets the same replicates in every report."""
    return zlib.crc32(repr(labels).encode())


def bootstrap_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Pigeonhole bootstrap replicates of the mean of ``x`` ``(..., S, N)``: shape ``(..., n_boot)``.

    Replicate b weighs seed s by ``w[b, s]`` and chunk c by ``v[b, c]`` (multinomial counts: resampling with
    replacement), so its mean is ``Σ w x v / (S N)``; leading axes share the draws (many synthetic data sets at once).
    """
    s, n = x.shape[-2:]
    w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)  # (B, S)
    v = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, N)
    per_seed = x @ v.T  # (..., S, B): each seed's chunk-weighted sum
    return np.einsum("...sb,bs->...b", per_seed, w) / (s * n)


def interval(x: np.ndarray, *, seed: int, n_boot: int = N_BOOT, level: float = LEVEL) -> Estimate:
    """The mean of ``x`` ``(S, N)`` over seeds and chunks with its percentile bootstrap interval.

    A non-finite loss (a blown-up run kept in by the "included" convention) gives its mean (inf or NaN) and no
    interval: a resampled mean over an infinite loss is not an estimate of anything.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"interval needs a non-empty (seeds, chunks) matrix; got shape {x.shape}")
    mean = float(x.mean())
    if not np.isfinite(x).all():
        return Estimate(mean, math.nan, math.nan, x.shape[0], x.shape[1])
    reps = bootstrap_means(x, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(mean, float(lo), float(hi), x.shape[0], x.shape[1])


def paired_difference(a: Losses, b: Losses, *, seed: int, n_boot: int = N_BOOT) -> Estimate | None:
    """``a − b`` on the seeds both have (same seed, same chunk), with its interval; ``None`` without a common seed.

    Raises:
        ValueError: the two have different numbers of chunks (they were not evaluated on the same chunks).
    """
    if a.values.shape[1] != b.values.shape[1]:
        raise ValueError(f"paired cells must share their chunks; got {a.values.shape[1]} and {b.values.shape[1]}")
    common = sorted((s for s in a.seeds if s in b.seeds), key=repr)  # one order: the same replicates either way
    if not common:
        return None
    rows_a = [a.seeds.index(s) for s in common]
    rows_b = [b.seeds.index(s) for s in common]
    return interval(a.values[rows_a] - b.values[rows_b], seed=seed, n_boot=n_boot)


def choose(val_means: Mapping[Any, float] | Sequence[float]) -> Any:
    """The key (or index) of the lowest finite validation mean, ``None`` when there is none.

    This is the whole of the tuned selection, and it sees validation means only: what is reported for the choice
    comes from test chunks it never reads. Ties go to the first key.
    """
    items = val_means.items() if isinstance(val_means, Mapping) else enumerate(val_means)
    finite = [(v, i, k) for i, (k, v) in enumerate(items) if v is not None and math.isfinite(v)]
    return min(finite)[2] if finite else None
