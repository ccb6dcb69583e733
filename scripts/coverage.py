"""How often the report's 95% intervals cover a planted difference, on synthetic paired data (docs/evaluation.md).

Each synthetic sweep is a paired difference per seed and chunk, ``delta + a_s + b_c + e_sc`` (a seed's effect, a
chunk's effect, noise), evaluated with the report's own bootstrap (:func:`loralab.lab.report.stats.bootstrap_means`,
1000 replicates); 400 sweeps per design, so a coverage has a binomial standard error of about 1.1%.

    python scripts/coverage.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.lab.report.stats import bootstrap_means  # noqa: E402

DESIGNS = [  # seeds, chunks, sd of the seed term, of the chunk term, of the noise
    (1, 200, 0.0, 0.05, 0.05),
    (2, 200, 0.0, 0.05, 0.05),
    (2, 200, 0.01, 0.05, 0.05),
    (4, 200, 0.005, 0.05, 0.05),
    (4, 200, 0.01, 0.05, 0.05),
    (8, 200, 0.01, 0.05, 0.05),
]


def main() -> int:
    delta, reps = 0.02, 400
    print("| seeds | chunks | sd seed | sd chunk | sd noise | coverage of delta | zero-delta flagged |")
    print("|---" * 7 + "|")
    for seeds, chunks, sd_a, sd_b, sd_e in DESIGNS:
        rng = np.random.default_rng(0)
        out = []
        for d in (delta, 0.0):
            x = (
                d
                + rng.normal(0, sd_a, (reps, seeds, 1))
                + rng.normal(0, sd_b, (reps, 1, chunks))
                + rng.normal(0, sd_e, (reps, seeds, chunks))
            )
            lo, hi = np.quantile(bootstrap_means(x, 1000, np.random.default_rng(1)), [0.025, 0.975], axis=-1)
            out.append(((lo <= d) & (d <= hi)).mean() if d else ((lo > 0) | (hi < 0)).mean())
        print(f"| {seeds} | {chunks} | {sd_a} | {sd_b} | {sd_e} | {out[0]:.1%} | {out[1]:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
