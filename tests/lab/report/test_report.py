"""Tests of the sweep report, on synthetic stores whose expected numbers the tests compute themselves."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics

import pytest
from matplotlib import image as mpimg

from loralab.lab.report.cells import Cell, fmt_value
from loralab.lab.report.markup import to_html, to_markdown
from loralab.lab.report.write import write_report
from synthetic_store import (
    CHUNKED_INITS,
    CHUNKED_LRS,
    CHUNKED_SEEDS,
    ERROR,
    FAILED,
    INITS,
    LRS,
    PARTLY_DIVERGED,
    QR_DELTA,
    build_chunked_store,
    build_grid_store,
    build_study_store,
    rewrite_result,
)


def md_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(nearest heading above, header, rows)`` of every markdown table."""
    out, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("# ")
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            split = lambda s: [c.strip() for c in re.split(r"(?<!\\)\|", s)[1:-1]]  # noqa: E731
            header, rows, i = split(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split(lines[i]))
                i += 1
            out.append((heading, header, rows))
        i += 1
    return out


def table(text: str, heading: str) -> dict[str, list[str]]:
    """The first table under ``heading`` as row label → cells."""
    _, header, rows = next(t for t in md_tables(text) if t[0] == heading)
    return {r[0].strip("`"): r[1:] for r in rows}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    written = build_study_store(root)
    paths = write_report(root)
    return root, written, paths, paths["md"].read_text()


def expected_cells(written) -> dict[tuple[str, float], dict]:
    """Per (init, lr): the ok finals, the number of diverged / failed seeds — computed from what was written."""
    cells = {}
    for axes, status, final in written.runs.values():
        c = cells.setdefault((axes["lora.init"], axes["train.lr"]), {"ok": [], "diverged": 0, "failed": 0, "n": 0})
        c["n"] += 1
        if status == "ok":
            c["ok"].append(final)
        elif status in ("diverged", "failed"):
            c[status] += 1
    return cells


def test_table_values_are_mean_and_std_over_ok_seeds(study):
    _, written, _, md = study
    tab = table(md, "Final eval loss")
    for (init, lr), c in expected_cells(written).items():
        text = tab[init][LRS.index(lr)].strip("*")
        if c["ok"]:
            want = f"{statistics.mean(c['ok']):.4f}"
            if len(c["ok"]) > 1:
                want += f" ± {statistics.stdev(c['ok']):.4f}"
            assert text.startswith(want), (init, lr, text)
        elif c["diverged"]:
            assert text.startswith(f"diverged ({c['diverged']}/{c['n']})"), (init, lr, text)
        assert ("†" in text) == bool(c["ok"] and c["diverged"]), text
        assert ("‡" in text) == bool(c["failed"]), text


def test_partly_diverged_and_failed_cells_are_marked(study):
    _, written, _, md = study
    tab = table(md, "Final eval loss")
    init, lr, _ = PARTLY_DIVERGED
    assert tab[init][LRS.index(lr)].endswith("†1")
    assert tab[FAILED[0]][LRS.index(FAILED[1])].endswith("‡1")
    assert tab["standard"][LRS.index(1e-2)] == "diverged (2/2)"  # the study: everything diverges at 1e-2


def test_best_cell_per_column_is_bold(study):
    _, written, _, md = study
    tab, cells = table(md, "Final eval loss"), expected_cells(written)
    for j, lr in enumerate(LRS):
        clean = {i: statistics.mean(cells[i, lr]["ok"]) for i in INITS
                 if cells[i, lr]["ok"] and not cells[i, lr]["diverged"]}
        bold = {i for i in INITS if tab[i][j].startswith("**")}
        assert bold == ({min(clean, key=clean.get)} if clean else set()), lr
    assert tab["standard"][LRS.index(2e-3)].startswith("**")  # the study's headline: standard wins from 5e-4 up


def test_relative_table_is_percent_of_standard(study):
    _, written, _, md = study
    rel, cells = table(md, "Relative to `standard`"), expected_cells(written)
    for (init, lr), c in cells.items():
        ref = cells["standard", lr]["ok"]
        if c["ok"] and ref:
            want = 100 * (statistics.mean(c["ok"]) / statistics.mean(ref) - 1)
            assert rel[init][LRS.index(lr)].strip("*").startswith(f"{want:+.2f}%"), (init, lr)
    assert rel["reversed"][LRS.index(5e-3)] == "diverged (2/2)"


def test_no_edge_warning_when_every_optimum_is_inside_the_grid(study):
    md = study[3]
    assert "WARNING" not in md.replace("orthogonal-qr-match", "")  # qr-match's best (2e-4) is inside too
    assert "`standard`: best train.lr = 2e-3" in md


def test_edge_warning_when_the_best_lr_is_on_the_grid_edge(tmp_path):
    build_study_store(tmp_path, lrs=(2e-4, 5e-4, 1e-3, 2e-3), incomplete=False)
    md = write_report(tmp_path)["md"].read_text()
    warned = set(re.findall(r"WARNING\*\*: `([^`]+)`: the best train\.lr \(\S+\) is the (\w+)", md))
    # standard's best 2e-3 is now the highest value; reversed and qr-match are best at 2e-4, the lowest
    assert warned == {("standard", "highest"), ("reversed", "lowest"), ("orthogonal-qr-match", "lowest")}


def test_failed_run_is_listed_with_its_error_and_traceback_location(study):
    _, _, _, md = study
    section = md.split("## Failed runs (1)")[1].split("##")[0]
    assert ERROR in section and "more detail" not in section  # first line of the error only
    assert "runs/orthogonal-eye__lr0.001__s1/result.json" in section


def test_every_run_is_listed_with_its_status(study):
    _, written, _, md = study
    _, header, rows = next(t for t in md_tables(md) if t[0].startswith("All runs"))
    listed = {r[0].strip("`"): r[header.index("status")] for r in rows}
    assert listed == {rid: status for rid, (_, status, _) in written.runs.items()}
    counts = {s: sum(v == s for v in listed.values()) for s in set(listed.values())}
    header_line = md.splitlines()[2]
    assert all(f"{n} {s}" in header_line for s, n in counts.items()) and f"**{len(listed)} runs**" in header_line


def test_diagnostics_table_shows_exact_zeros(study):
    diag = table(study[3], "Step-0 diagnostics")
    assert diag["standard"][2] == "0" and diag["reversed"][3] == "0"  # ∇A = 0 under standard, ∇B = 0 under reversed
    assert float(diag["reversed"][5]) == pytest.approx(1 / 24, rel=1e-3)  # Var(B) = 1/(3r)


def test_files_exist_and_pngs_are_valid(study):
    _, _, paths, _ = study
    assert set(paths) == {"md", "html", "loss_vs_lr", "loss_vs_lr_zoom", "curves", "diagnostics"}
    for key in ("loss_vs_lr", "loss_vs_lr_zoom", "curves", "diagnostics"):
        img = mpimg.imread(paths[key])
        assert paths[key].parent.name == "report" and paths[key].stat().st_size > 20_000
        assert img.shape[0] >= 400 and img.shape[1] >= 800 and img.std() > 0.05, key  # not blank


def test_html_is_self_contained(study):
    html = study[2]["html"].read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html)
    assert len(refs) == 4 and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "http://" not in html and "https://" not in html and "<link" not in html and "@import" not in html
    assert html.count("<table>") == len(md_tables(study[3]))


def test_other_axes_give_one_table_per_combination(tmp_path):
    grid = {"lora.init": ["standard", "reversed"], "lora.rank": [4, 16], "train.lr": [1e-4, 1e-3], "train.seed": [0, 1]}
    build_grid_store(tmp_path, grid, lambda a: ("ok", 2 + a["lora.rank"] / 100 + a["train.seed"] / 1000))
    md = write_report(tmp_path)["md"].read_text()
    assert table(md, "lora.rank = 4")["standard"][0].strip("*") == f"2.0405 ± {statistics.stdev([2.04, 2.041]):.4f} n=2"
    assert table(md, "lora.rank = 16")["reversed"][1] == f"2.1605 ± {statistics.stdev([2.16, 2.161]):.4f} n=2"


def test_missing_axes_give_one_row_or_column(tmp_path):
    build_grid_store(tmp_path, {"train.lr": [1e-3, 1e-2], "train.seed": [0, 1, 2]},
                     lambda a: ("ok", 2 + a["train.seed"] / 10), base={"lora": {"init": "standard"}})
    md = write_report(tmp_path)["md"].read_text()
    tab = table(md, "Final eval loss")
    assert list(tab) == ["lora.init = standard"] and tab["lora.init = standard"] == ["2.1000 ± 0.1000 n=3"] * 2
    md = write_report(tmp_path, col_axis="train.grad_clip")["md"].read_text()  # train.lr becomes a grouping axis
    assert table(md, "train.lr = 1e-2")["lora.init = standard"] == ["2.1000 ± 0.1000 n=3"]
    assert "WARNING**: only one value of train.grad_clip" in md


def test_cli_report_pivots_on_any_axis_and_refuses_a_typo(tmp_path, capsys):
    from loralab.cli import main

    grid = {"lora.rank": [4, 16], "train.lr": [1e-4, 1e-3], "train.seed": [0, 1]}
    build_grid_store(tmp_path, grid, lambda a: ("ok", 2 + a["lora.rank"] / 100 + a["train.lr"] * 10),
                     base={"lora": {"init": "standard"}})
    assert main(["report", str(tmp_path), "--rows", "lora.rank", "--out", str(tmp_path / "r")]) == 0
    tab = table((tmp_path / "r" / "report.md").read_text(), "Final eval loss")
    assert list(tab) == ["4", "16"] and tab["16"][1] == "2.1700 ± 0.0000 n=2"
    assert main(["report", str(tmp_path), "--rows", "lora.rnak", "--out", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "(--rows) 'lora.rnak'" in err and "lora.rank" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path), "--rows", "train.lr"]) == 2   # rows and cols the same axis
    assert "(--rows, --cols, --reps) must differ" in capsys.readouterr().err


def test_report_can_be_written_elsewhere(tmp_path):
    build_grid_store(tmp_path / "s", {"train.lr": [1e-3]}, lambda a: ("ok", 2.0))
    paths = write_report(tmp_path / "s", out=tmp_path / "elsewhere")
    assert all(p.parent == tmp_path / "elsewhere" and p.exists() for p in paths.values())
    assert not (tmp_path / "s" / "report").exists()


def test_report_needs_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        write_report(tmp_path)


def test_cell_text_rules():
    from loralab.lab.store import RunResult

    class R:  # the fields of a RunRecord that Cell reads
        def __init__(self, status, loss=None, initial=2.5):
            self.status, self.final_eval_loss, self.eval_chunks = status, loss, None
            self.result = RunResult("r", status, final_eval_loss=loss, initial_eval_loss=initial) \
                if status in ("ok", "diverged", "failed") else None

    assert Cell((R("ok", 2.0),)).text() == "2.0000 n=1"
    assert Cell((R("diverged", 8.0),) * 4).text() == "diverged (4/4)"
    assert Cell((R("diverged", 8.0),) * 4).text("included") == "8.0000 ± 0.0000 n=4 †4 ▲4"
    assert Cell((R("ok", 2.0), R("ok", 2.2), R("diverged", None))).text() == f"2.1000 ± {math.sqrt(0.02):.4f} n=2 †1"
    assert Cell((R("ok", 2.0), R("ok", 2.2), R("diverged", None))).text("included") == "not finite n=3 †1 ▲1"
    assert Cell((R("ok", 2.0), R("ok", 2.6))).text() == f"2.3000 ± {math.sqrt(0.18):.4f} n=2 ▲1"   # 2.6 > 2.5
    assert Cell((R("failed"), R("pending"))).text() == "failed (1/2) (1 not run)"
    assert Cell((R("pending"),)).text() == "pending" and Cell(()).text() == "—"
    assert Cell((R("ok", 2.2),)).relative_text(Cell((R("ok", 2.0),))) == "+10.00% n=1"
    rel = Cell((R("ok", 2.2), R("diverged", 5.8))).relative_text(Cell((R("ok", 2.0),)), "included")
    assert rel == "+100.00% n=2 †1 ▲1"   # the published convention: (2.2 + 5.8) / 2 = 4.0 = 2 × 2.0


def test_axis_values_are_formatted_for_humans():
    assert [fmt_value(v) for v in (1e-4, 2.5e-3, 1e-2, 0.5, 3, "standard")] == [
        "1e-4", "2.5e-3", "1e-2", "0.5", "3", "standard"]


def test_markup_escapes_text_in_html():
    blocks = [("h", 1, "a <b>"), ("table", ["x|y"], [["**1**"]]), ("warn", "w & z")]
    html = to_html(blocks, "t")
    assert "a &lt;b&gt;" in html and "<strong>1</strong>" in html and "w &amp; z" in html
    assert "| x\\|y |" in to_markdown(blocks)


@pytest.mark.parametrize("text", ['{"run_id": "x", "status": "ok", "final_eval_loss": 2.\x01', "[1, 2]"],
                         ids=["truncated", "a list"])
def test_unreadable_result_is_listed_as_unfinished_with_its_path(tmp_path, text):
    build_grid_store(tmp_path, {"train.lr": [1e-3, 1e-2]}, lambda a: ("ok", 2.0))
    bad = tmp_path / "runs" / "lr0.01" / "result.json"
    bad.write_text(text)
    md = write_report(tmp_path)["md"].read_text()
    assert "**2 runs**: 1 ok · 1 unfinished" in md
    (line,) = [x for x in md.splitlines() if x.startswith("- `lr0.01`")]
    assert "unfinished" in line and str(bad) in line and "rerun the sweep" in line
    assert bad.read_text() == text   # the report only reads


def test_unreadable_manifest_is_named(tmp_path, capsys):
    from loralab.cli import main
    from loralab.lab.store import CorruptFileError

    (tmp_path / "sweep.json").write_text('{"name": "s", "grid": {"train.lr": [0.1, 0.')
    with pytest.raises(CorruptFileError, match="sweep.json is not valid JSON"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'sweep.json'} is not valid JSON" in err


# ---- a store with per-chunk losses: intervals, paired differences, the tuned comparison -----------------------------

CI = re.compile(r"^\**(?P<mean>-?\d+\.\d+) \[(?P<lo>-?\d+\.\d+), (?P<hi>-?\d+\.\d+)\] n=(?P<n>\d+)")
DELTA = re.compile(r"^(?P<mean>[+-]\d+\.\d+) \[(?P<lo>[+-]\d+\.\d+), (?P<hi>[+-]\d+\.\d+)\](?P<star> ✱)? n=(?P<n>\d+)")


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    written = build_chunked_store(root)
    return root, written, write_report(root)["md"].read_text()


def counted(written, init, lr, convention) -> list[int]:
    keep = ("ok",) if convention == "excluded" else ("ok", "diverged")
    return [s for s in CHUNKED_SEEDS if written.status[init, lr, s] in keep]


@pytest.mark.parametrize("convention, heading", [("excluded", "Final eval loss"),
                                                 ("included", "Final eval loss, diverged runs included")])
def test_every_cell_has_an_interval_around_its_test_mean_and_its_seed_count(chunked, convention, heading):
    _, written, md = chunked
    tab = table(md, heading)
    for init in CHUNKED_INITS:
        for j, lr in enumerate(CHUNKED_LRS):
            seeds = counted(written, init, lr, convention)
            m = CI.match(tab[init][j])
            want = statistics.fmean(float(written.final[init, lr, s]["test"].mean()) for s in seeds)
            assert float(m["mean"]) == pytest.approx(want, abs=1e-4) and int(m["n"]) == len(seeds), (init, lr)
            assert float(m["lo"]) < float(m["mean"]) < float(m["hi"])
    qr_high = tab["qr"][CHUNKED_LRS.index(1e-2)]
    assert ("†1" in qr_high) and ("▲" in qr_high)   # the blown-up seed: left out or counted, marked either way


def test_paired_table_flags_the_planted_difference_and_not_the_zero_one(chunked):
    _, written, md = chunked
    tab = table(md, "Paired difference vs `standard`")
    assert tab["standard"] == ["baseline"] * 3
    for j, lr in enumerate(CHUNKED_LRS):
        zero, planted = DELTA.match(tab["reversed"][j]), DELTA.match(tab["qr"][j])
        assert not zero["star"] and float(zero["lo"]) <= 0 <= float(zero["hi"])
        if lr != 1e-2:   # qr at 1e-2 carries a run that ended above the pretrained model too
            assert planted["star"] and float(planted["lo"]) <= QR_DELTA <= float(planted["hi"])
            cell = CI.match(table(md, "Final eval loss")["qr"][j])
            # pairing cancels the chunks' spread: the difference is known ~50x better than either mean
            assert float(planted["hi"]) - float(planted["lo"]) < (float(cell["hi"]) - float(cell["lo"])) / 20


def test_tuned_comparison_chooses_on_validation_and_reports_test(chunked):
    _, written, md = chunked
    _, header, rows = next(t for t in md_tables(md) if t[0].startswith("Tuned comparison") and "included" not in t[0])
    tuned = {r[0].strip("`"): r for r in rows}
    # standard's val loss is lowest at 1e-3 while its test loss is lowest at 1e-2: the choice follows val
    assert tuned["standard"][1] == "1e-3" and tuned["qr"][1] == "1e-3"
    test_mean = statistics.fmean(float(written.final["standard", 1e-3, s]["test"].mean()) for s in CHUNKED_SEEDS)
    assert float(CI.match(tuned["standard"][3])["mean"]) == pytest.approx(test_mean, abs=1e-4)
    assert DELTA.match(tuned["qr"][4])["star"] and not DELTA.match(tuned["reversed"][4])["star"]


def test_selection_never_reads_test_chunks(tmp_path):
    """Rewrite every test loss so that another lr looks best on test: the chosen lrs do not move."""
    from loralab.lab.store import EvalChunks, SweepStore

    build_chunked_store(tmp_path)
    before = write_report(tmp_path)["md"].read_text()
    store = SweepStore(tmp_path)
    for rid in store.run_ids():
        run = store.run(rid)
        chunks = run.eval_chunks()
        lr = run.config()["axes"]["train.lr"]
        test = chunks.splits["test"]
        tampered = dataclasses.replace(test, final=test.final - (1.0 if lr == 1e-4 else 0.0))
        run.write_eval_chunks(EvalChunks(chunks.pool_digest, {"val": chunks.splits["val"], "test": tampered}))
    after = write_report(tmp_path)["md"].read_text()

    def chosen(md):
        return [[r[1] for r in rows] for h, _, rows in md_tables(md) if h.startswith("Tuned comparison")]

    assert chosen(after) == chosen(before) == [["1e-3", "1e-3", "1e-3"]] * 2
    assert table(after, "Final eval loss")["standard"][0] != table(before, "Final eval loss")["standard"][0]


def test_both_conventions_are_named_above_each_table(chunked):
    md = chunked[2]
    blocks = md.split("\n\n")
    for i, b in enumerate(blocks):
        if b.startswith("| ") and not blocks[i - 1].startswith("#") and "Convention:" not in blocks[i - 1]:
            heading = next(x for x in reversed(blocks[:i]) if x.startswith("## "))
            assert heading.startswith(("## All runs", "## Step-0")), heading
    headings = [b for b in blocks if b.startswith("## ")]
    for kind in ("Final eval loss", "Paired difference vs `standard`", "Tuned comparison"):
        assert sum(h.startswith(f"## {kind}") for h in headings) == 2, kind


def test_without_a_validation_split_the_tuned_choice_warns_of_selection_bias(tmp_path):
    build_chunked_store(tmp_path, splits=("eval",))
    md = write_report(tmp_path)["md"].read_text()
    assert "no validation split" in md and "biased low" in md
    assert "✱" in table(md, "Paired difference vs `standard`")["qr"][0]


def test_a_store_without_per_chunk_losses_says_what_it_lacks(study):
    md = study[3]
    assert "No intervals, paired differences or tuned comparison" in md and "no per-chunk eval losses" in md
    assert "Relative to `standard`, diverged runs included" in md


def test_runs_evaluated_on_other_chunks_are_not_paired(tmp_path):
    from loralab.lab.store import EvalChunks, SweepStore

    build_chunked_store(tmp_path)
    run = SweepStore(tmp_path).run("qr__lr0.001__s1")
    chunks = run.eval_chunks()
    run.write_eval_chunks(EvalChunks("another-pool", chunks.splits))
    md = write_report(tmp_path)["md"].read_text()
    assert "were evaluated on different chunks" in md and "qr__lr0.001__s1" in md and "✱" not in md


def test_a_store_that_computed_on_two_devices_says_so_and_still_pairs_by_seed(tmp_path):
    from loralab.lab.store import SweepStore

    build_chunked_store(tmp_path)
    store = SweepStore(tmp_path)

    def computed(rid: str, device: str, dtype: str) -> None:
        rewrite_result(store.run(rid), device=device, dtype=dtype)

    for rid in store.manifest()["run_ids"]:
        computed(rid, "cuda:0", "bfloat16")
    computed("qr__lr0.001__s1", "cpu", "float32")
    computed("standard__lr0.001__s2", "cpu", "float32")
    md = write_report(tmp_path)["md"].read_text()
    assert "more than one device or dtype (25 on cuda bfloat16, 2 on cpu float32)" in md
    assert "scripts/same_runs.py" in md   # how to measure what it costs
    at = CHUNKED_LRS.index(1e-3)
    assert DELTA.match(table(md, "Paired difference vs `standard`")["qr"][at])["n"] == "3"
    listing = table(md, "All runs (27)")   # each run names where it computed
    assert listing["qr__lr0.001__s1"][-1] == "cpu float32" and listing["qr__lr0.001__s0"][-1] == "cuda bfloat16"


def test_a_store_computed_on_one_device_has_no_device_note(chunked):
    assert "more than one device or dtype" not in chunked[2]


def test_baseline_option(tmp_path, capsys):
    from loralab.cli import main

    build_chunked_store(tmp_path)
    assert main(["report", str(tmp_path), "--baseline", "qr", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    tab = table(md, "Paired difference vs `qr`")
    assert tab["qr"] == ["baseline"] * 3 and float(DELTA.match(tab["standard"][0])["mean"]) == pytest.approx(
        -QR_DELTA, abs=0.005)
    assert main(["report", str(tmp_path), "--baseline", "qr-match"]) == 2
    err = capsys.readouterr().err
    assert "'qr-match' is not a row" in err and "standard, reversed, qr" in err


def test_without_a_diverged_run_one_set_of_tables_says_why(tmp_path):
    build_grid_store(tmp_path, {"lora.init": ["standard", "reversed"], "train.lr": [1e-3, 1e-2]},
                     lambda a: ("ok", 2.0 + a["train.lr"]))
    md = write_report(tmp_path)["md"].read_text()
    assert "No run diverged, so the two conventions" in md and "diverged runs included" not in md
    assert md.count("Convention: **diverged runs excluded**") == 3   # loss, relative, best lr


def _edit_result(path, **fields):
    import json

    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **fields}))   # json.dumps writes NaN as the bare token NaN, like a hand edit


@pytest.mark.parametrize("value", [float("nan"), "abc"], ids=["NaN", "a string"])
def test_a_hand_edited_final_loss_does_not_stop_the_report(tmp_path, capsys, value):
    from loralab.cli import main

    grid = {"lora.init": ["standard", "reversed"], "train.seed": [0, 1, 2]}
    build_grid_store(tmp_path, grid, lambda a: ("ok", 2.0 + a["train.seed"] / 10))
    bad = tmp_path / "runs" / "initstandard__seed0" / "result.json"
    _edit_result(bad, final_eval_loss=value)
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "md: " in out
    md = (tmp_path / "report" / "report.md").read_text()
    cells = {k: [c.strip("*") for c in v] for k, v in table(md, "Final eval loss").items()}   # bold: the best
    mean, std = statistics.fmean([2.0, 2.1, 2.2]), statistics.stdev([2.0, 2.1, 2.2])
    assert cells["reversed"] == [f"{mean:.4f} ± {std:.4f} n=3"]
    assert cells["standard"][0].startswith(f"{statistics.fmean([2.1, 2.2]):.4f} ± {statistics.stdev([2.1, 2.2]):.4f}")
    if value == "abc":   # named, marked unreadable, left out of the numbers
        (line,) = [x for x in md.splitlines() if x.startswith("- `initstandard__seed0`")]
        assert "unfinished" in line and str(bad) in line and "final_eval_loss" in line


def test_runs_of_another_config_are_left_out_and_named(tmp_path):
    """Two configs in one out_dir (sweep.json lost, then another config run there): a 2-seed grid's cells hold the
    sweep's 2 runs, never 4, and the other config's runs are named with the field that differs (issue 22, item 1)."""
    from loralab.lab.store import RunResult, SweepStore

    grid = {"lora.init": ["standard", "reversed"], "train.seed": [0, 1]}
    build_grid_store(tmp_path, grid, lambda a: ("ok", 2.0 + a["train.seed"] / 10), base={"train": {"max_steps": 60}})
    store = SweepStore(tmp_path)
    for rid in store.run_ids():
        store.run(rid).write_config(rid, {}, {"train": {"max_steps": 60, "compile": False}})
    for init in grid["lora.init"]:   # the old config's runs: other ids, same axes, far lower losses
        for seed in grid["train.seed"]:
            axes, rid = {"lora.init": init, "train.seed": seed}, f"old-{init}-{seed}"
            store.run(rid).write_config(rid, axes, {"train": {"max_steps": 400, "compile": True}})
            store.run(rid).write_result(RunResult(rid, "ok", axes, final_eval_loss=1.0))
    md = write_report(tmp_path)["md"].read_text()
    cells = {k: [c.strip("*") for c in v] for k, v in table(md, "Final eval loss").items()}
    assert cells == {init: [f"{statistics.fmean([2.0, 2.1]):.4f} ± {statistics.stdev([2.0, 2.1]):.4f} n=2"]
                     for init in grid["lora.init"]}
    assert "**4 runs**: 4 ok." in md
    section = md.split("## Runs of another config, left out (4)")[1].split("\n## ")[0]
    assert section.count("train.max_steps: 400 in the run, 60 in the sweep") == 4
    assert "compile" not in section   # how fast a run trains is not what it is (left out of run ids too)


def test_a_slice_of_the_grid_keeps_only_its_runs_and_names_what_it_lacks(tmp_path):
    from loralab.lab.report.table import open_table

    written = build_study_store(tmp_path, seeds=(0, 1, 2), incomplete=False)
    opened = open_table(tmp_path, only={"train.seed": [2, 0]})
    assert opened.manifest["grid"]["train.seed"] == [0, 2]   # grid order
    kept = {r.run_id for r in opened.records}
    assert kept == {rid for rid, (axes, *_) in written.runs.items() if axes["train.seed"] != 1}
    assert all(r.axes["train.seed"] != 1 for c in opened.table.cells.values() for r in c.runs)
    with pytest.raises(ValueError, match=r"train\.seed = 3 is not in this sweep's grid \(0, 1, 2\)"):
        open_table(tmp_path, only={"train.seed": [0, 3]})
    with pytest.raises(ValueError, match=r"lora\.rank is not an axis of this sweep's grid \(lora\.init, train\.lr, "):
        open_table(tmp_path, only={"lora.rank": [8]})
