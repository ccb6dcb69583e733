"""scripts/compare_study.py on a synthetic store whose cell means are the published table: every relative figure
matches the published one, and the only difference it reports is the one seed the store makes diverge early."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))

import compare_study  # noqa: E402

from synthetic_store import FAILED, PARTLY_DIVERGED, build_study_store  # noqa: E402


def test_a_store_with_the_published_means_reproduces_the_published_comparison(tmp_path, capsys):
    build_study_store(tmp_path, incomplete=False)
    assert compare_study.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for lr in compare_study.LRS:   # ours / published are equal wherever no seed of ours diverged
        cells = rows[f"{lr:g}"].strip("| ").split(" | ")[1:5]
        for init, cell in zip(compare_study.INITS[1:], cells):
            mine, pub = cell.split(" / ")
            if "†" not in mine and "—" not in mine and (init, lr) != FAILED[:2]:   # one seed of that cell failed
                assert mine == pub, (lr, init, cell)
    assert rows["0.001"].endswith("| standard | standard |")
    assert rows["0.01"].endswith("| none (all diverged) | none (all diverged) |")
    init, lr, _ = PARTLY_DIVERGED   # one seed of qr-const diverges at 5e-3 in the store, not in the paper
    assert rows[init].endswith(f"| {lr:g} | 0.01 |")
    assert rows["orthogonal-qr-match"].endswith("| 0.0002 | 0.0002 | 0.002 | 0.002 |")
    for init in compare_study.INITS:   # best lr per init: the same in both, since the means are the same
        best_mine, best_pub = rows[init].strip("| ").split(" | ")[1:3]
        assert best_mine == best_pub, init
    assert "ours `standard` at lr 0.002" in out and "published `standard` at lr 0.002" in out


def test_an_unfinished_store_is_an_error_that_says_what_to_do(tmp_path, capsys):
    build_study_store(tmp_path, lrs=(1e-4, 1e-3))
    assert compare_study.main([str(tmp_path)]) == 2
    assert "finish the sweep first" in capsys.readouterr().err
