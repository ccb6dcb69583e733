"""scripts/compare_study.py on synthetic stores with planted effects: its verdicts follow the planted signs against
the published ones, its intervals are the report's own, and a store still running is compared on what finished."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import compare_study  # noqa: E402

from loralab.lab.report.write import write_report  # noqa: E402
from synthetic_store import build_published_store  # noqa: E402

LRS = (1e-4, 2e-4, 2e-3, 5e-3)
SHIFT = {"standard": 0.0, "reversed": 0.05, "orthogonal-eye": -0.05, "orthogonal-qr-const": 0.0,
         "orthogonal-qr-match": 0.05}
QR_MATCH_BLOWS_UP = ("orthogonal-qr-match", 2e-3, 1)


def shift(init: str, lr: float) -> float:
    return SHIFT[init]


def run(store: Path, capsys, *args: str) -> tuple[int, list[dict[str, list[str]]], str]:
    """Exit code, the four tables (relative, point by point, per init, tuned) as rows keyed by their first cells
    (joined by a space where one is not unique), and the whole output."""
    code = compare_study.main([str(store), *args])
    captured = capsys.readouterr()
    tables: list[dict[str, list[str]]] = []
    for block in captured.out.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("| ")][1:]  # past the header
        if lines:
            cells = [[c.strip() for c in ln.strip("| ").split(" | ")] for ln in lines]
            two = len({c[0] for c in cells}) < len(cells)
            tables.append({(f"{c[0]} {c[1]}" if two else c[0]): c for c in cells})
    return code, tables, captured.out + captured.err


def test_verdicts_follow_the_planted_signs_against_the_published_ones(tmp_path, capsys):
    build_published_store(tmp_path, lrs=LRS, seeds=(0, 1), shift=shift, diverged=(QR_MATCH_BLOWS_UP,))
    code, (_, rows, per_init, tuned), out = run(tmp_path, capsys)
    assert code == 0
    # reversed is planted 0.05 worse: the published table has it better at 1e-4 and worse from 2e-4 up
    assert rows["0.0001 `reversed`"][2] == "-0.0063" and rows["0.0001 `reversed`"][4] == "opposite"
    assert rows["0.0002 `reversed`"][4] == "holds"
    assert rows["0.0002 `orthogonal-eye`"][4] == "opposite"  # planted better, published worse
    for lr in LRS:  # planted zero
        assert rows[f"{lr:g} `orthogonal-qr-const`"][4] == "cannot decide", lr
    # the published reversed diverged at 5e-3; ours is only worse, and the verdict says both
    assert rows["0.005 `reversed`"][4] == "holds in direction only; `reversed` did not diverge here"
    assert rows["0.002 `orthogonal-qr-match`"][4] == "holds"  # ours diverged there too (included: worse)
    assert "0.0005, 0.001, 0.01 is not in this store" in out
    assert "Point by point: 5 opposite, 5 holds, 4 cannot decide, 2 holds in direction only." in out
    # divergence: qr-match first diverges at 2e-3 in both; reversed at 5e-3 published, not here
    assert per_init["`orthogonal-qr-match`"][5:8] == ["0.002 (1 of 2 seeds)", "0.002", "same"]
    assert per_init["`reversed`"][5:8] == ["none ≤ 0.005", "0.005", "later here (or never)"]


# val prefers 2e-3, test prefers 5e-3: a choice that peeked at test would pick 5e-3
U_SHAPED = {"val": {1e-4: 0.0, 2e-4: -0.1, 2e-3: -0.2, 5e-3: -0.15}, "test": {1e-4: 0.0, 2e-4: -0.1, 2e-3: -0.15,
                                                                           5e-3: -0.25}}


def test_intervals_and_the_tuned_choice_are_the_reports(tmp_path, capsys):
    finals = build_published_store(tmp_path, lrs=LRS, seeds=(0, 1), shift=shift, diverged=(QR_MATCH_BLOWS_UP,),
                                   lr_effect=lambda split, lr: U_SHAPED[split][lr])
    _, (_, rows, per_init, tuned), out = run(tmp_path, capsys)
    report = write_report(tmp_path, out=tmp_path / "report")["md"].read_text()
    for lr in ("0.0002", "0.002"):
        ours = rows[f"{lr} `reversed`"][3]
        assert ours.endswith("n=2") and ours in report, (lr, ours)
    # each init's best lr: the lowest validation mean over seeds (diverged runs included), computed here
    for init in compare_study.INITS:
        val = {lr: np.mean([finals[init, lr, s]["val"] for s in (0, 1)]) for lr in LRS}
        best = min(val, key=val.__getitem__)
        assert best == (5e-3 if init == "orthogonal-qr-match" else 2e-3)  # qr-match blew up at 2e-3
        assert per_init[f"`{init}`"][1].startswith(f"{best:g} "), (init, per_init[f"`{init}`"])
        if init != "standard":
            assert tuned[f"`{init}`"][1].startswith(f"{best:g} / "), (init, tuned[f"`{init}`"])
    assert tuned["`reversed`"][1] == "0.002 / 0.0002"
    # reversed at the published best (2e-4) against ours (2e-3), same init, paired on test: planted +0.05 there
    cost = per_init["`reversed`"][4]
    assert cost.endswith("✱ n=2") and abs(float(cost.split()[0]) - 0.05) < 0.01, cost
    assert per_init["`standard`"][4] == "same lr"   # published best 2e-3 too
    # the runner-up is val's second choice too: 5e-3, which test prefers by 0.10, shown as such, not swapped in
    runner_up = per_init["`reversed`"][2]
    lr, diff = runner_up.split(": ")
    assert lr == "0.005" and abs(float(diff.split()[0]) + 0.10) < 0.01 and diff.endswith("✱ n=2"), runner_up
    assert abs(float(tuned["`reversed`"][3].split()[0]) - SHIFT["reversed"]) < 0.01
    assert tuned["`reversed`"][4] == "holds"
    # eye is planted better; qr-const the same; qr-match, worse by 0.05 at the same lr, is tuned to 5e-3 where
    # test is 0.10 lower than at standard's 2e-3: the tuned comparison pays each init at its own lr
    assert "Tuned: 2 opposite, 1 holds, 1 cannot decide." in out


def test_the_best_lr_is_chosen_among_the_learning_rates_both_grids_have(tmp_path, capsys):
    effect = {1e-4: 0.0, 3e-4: -0.3, 2e-3: -0.1}  # 3e-4, the store's best, is not in the published grid
    build_published_store(tmp_path, lrs=tuple(effect), seeds=(0, 1), shift=shift,
                          lr_effect=lambda split, lr: effect[lr])
    _, (_, _, per_init, tuned), out = run(tmp_path, capsys)
    assert "Learning rates compared: 0.0001, 0.002 " in out
    assert per_init["`standard`"][1] == "0.002 (grid edge) n=2"   # the top of the store's own grid
    assert tuned["`reversed`"][1] == "0.002 / 0.0001"


def test_an_init_that_diverged_at_every_published_lr_has_no_published_best(tmp_path, capsys):
    build_published_store(tmp_path, lrs=(5e-3, 1e-2), seeds=(0, 1), shift=shift)
    code, (_, _, per_init, tuned), _ = run(tmp_path, capsys)
    assert code == 0
    assert per_init["`orthogonal-qr-match`"][3:5] == ["none (all diverged)", "—"]
    assert tuned["`reversed`"][2] == "every published cell of it or of `standard` diverged"


def test_one_seed_is_not_a_finding_unless_asked(tmp_path, capsys):
    build_published_store(tmp_path, lrs=LRS, seeds=(0,), shift=shift)
    _, (_, rows, *_), _ = run(tmp_path, capsys)
    assert rows["0.0002 `reversed`"][4] == "holds? (1 seed: not a finding)"
    assert rows["0.0002 `orthogonal-qr-const`"][4] == "cannot decide"
    _, (_, rows, *_), _ = run(tmp_path, capsys, "--min-seeds", "1")
    assert rows["0.0002 `reversed`"][4] == "holds"


def test_a_store_still_running_is_compared_on_what_finished(tmp_path, capsys):
    pending = (("reversed", 2e-4, 1), ("reversed", 1e-4, 0), ("reversed", 1e-4, 1), ("orthogonal-qr-match", 2e-4, 1))
    build_published_store(tmp_path, lrs=LRS, seeds=(0, 1), shift=shift, pending=pending,
                          diverged=(QR_MATCH_BLOWS_UP,))
    code, (_, rows, per_init, _), out = run(tmp_path, capsys)
    assert code == 0
    assert "4 pending (4 not finished" in out
    assert rows["0.0002 `reversed`"][3].endswith("n=1")
    assert rows["0.0001 `reversed`"][3:] == ["no seed in common", "no paired runs yet"]
    assert per_init["`reversed`"][7] == "not yet known"
    # a run below the first divergence could still diverge: same lr as published, but not known yet
    assert per_init["`orthogonal-qr-match`"][5:] == ["0.002 (1 of 2 seeds) so far (1 run below not finished)",
                                                     "0.002", "not yet known"]


def test_seeds_compares_a_finished_slice_of_a_store_still_running(tmp_path, capsys):
    """Seeds 0 and 1 finished, seed 2 running: --seeds 0,1 gives what a store of seeds 0 and 1 alone gives."""
    pending = tuple((init, lr, 2) for init in compare_study.INITS for lr in LRS[:2])  # seed 2's low lrs
    build_published_store(tmp_path / "running", lrs=LRS, seeds=(0, 1, 2), shift=shift, pending=pending,
                          diverged=(QR_MATCH_BLOWS_UP,))
    build_published_store(tmp_path / "two", lrs=LRS, seeds=(0, 1), shift=shift, diverged=(QR_MATCH_BLOWS_UP,))
    _, (_, _, per_init, _), out = run(tmp_path / "running", capsys)
    assert per_init["`orthogonal-qr-match`"][7] == "not yet known"   # seed 2 below 2e-3 could still diverge
    code, sliced, out = run(tmp_path / "running", capsys, "--seeds", "0,1")
    assert code == 0 and "Compared on seeds 0, 1 only (--seeds)." in out and "pending" not in out.split("\n")[0]
    _, two, _ = run(tmp_path / "two", capsys)
    assert sliced == two   # same runs, same numbers: every table (intervals are seeded by the cells' labels)
    assert sliced[2]["`orthogonal-qr-match`"][7] == "same"


def test_seeds_the_grid_does_not_have_are_refused(tmp_path, capsys):
    build_published_store(tmp_path, lrs=LRS, seeds=(0, 1), shift=shift)
    code, _, out = run(tmp_path, capsys, "--seeds", "0,7")
    assert code == 2 and "train.seed = 7 is not in this sweep's grid (0, 1)" in out
    with pytest.raises(SystemExit) as e:
        compare_study.main([str(tmp_path), "--seeds", "zero"])
    assert e.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def test_stores_it_cannot_compare_are_refused_with_the_reason(tmp_path, capsys):
    build_published_store(tmp_path / "a", lrs=(3e-4, 7e-4), seeds=(0,), shift=shift)
    code, _, out = run(tmp_path / "a", capsys)
    assert code == 2 and "a learning rate of the published grid" in out
    code, _, out = run(tmp_path / "nothing", capsys)
    assert code == 2 and "not a sweep directory" in out
