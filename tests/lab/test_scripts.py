"""The scripts under ``scripts/``: ``curve_gap.ahead_from`` on planted gap sequences, ``same_runs`` on stores with a
planted difference, ``shard_sweep``'s TOML literals
(round trip through ``tomllib``), its shards (which axes are pinned, the run ids they share with the whole sweep) and,
end to end on the tiny model, a sharded sweep gathered into one store that ``loralab sweep`` finds finished."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.lab.config.grid import plan_runs
from loralab.lab.config.toml import load_sweep, parse_override
from loralab.lab.report.stats import Estimate
from loralab.lab.store import RunResult, SweepStore
from tiny_sweep import tiny_sweep, write_toml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import curve_gap  # noqa: E402
import same_runs  # noqa: E402
import shard_sweep  # noqa: E402

# ---------------------------------------------------------------------------------------------------------- curve_gap


def gaps(*intervals: tuple[float, float], start: int = 0, every: int = 10) -> list[tuple[int, Estimate]]:
    """``[(step, Estimate)]`` at steps ``start, start + every, ...`` for ``(lo, hi)`` intervals."""
    return [(start + i * every, Estimate((lo + hi) / 2, lo, hi, 3, 4)) for i, (lo, hi) in enumerate(intervals)]


ARM = (-0.3, -0.1)  # the arm's loss is lower: the interval of (arm - ref) is below 0
REF = (0.1, 0.3)  # the reference's loss is lower
TIE = (-0.1, 0.1)  # the interval holds 0


@pytest.mark.parametrize(
    "seq,expected",
    [
        ([ARM, ARM, TIE, REF, REF, REF], ("ref", 30)),  # arm ahead early, then ref from the fourth eval to the end
        ([REF, REF, REF, TIE], None),  # back inside zero at the last eval: nobody is ahead to the end
        ([TIE, REF, REF, ARM, ARM], ("arm", 30)),  # a switch of side: only the last run counts
        ([ARM, REF, ARM, ARM], ("arm", 20)),  # a switch with no tie between: the same
        ([ARM, ARM, ARM], ("arm", 0)),  # ahead from the first eval
        ([REF], ("ref", 0)),
        ([TIE, TIE], None),
        ([], None),
    ],
    ids=[
        "arm-then-ref",
        "ends-inside-zero",
        "switch-after-tie",
        "switch-no-tie",
        "all-arm",
        "one-eval",
        "ties",
        "none",
    ],
)
def test_ahead_from_is_the_first_step_of_the_last_run_on_one_side(seq, expected):
    assert curve_gap.ahead_from(gaps(*seq)) == expected


def test_ahead_from_reports_the_eval_steps_given_not_positions():
    assert curve_gap.ahead_from(gaps(TIE, ARM, ARM, start=5, every=50)) == ("arm", 55)


def test_ahead_from_an_interval_touching_zero_or_without_bounds_is_not_ahead():
    touching = gaps(REF, REF, (0.0, 0.2))  # lo == 0 does not exclude 0
    assert curve_gap.ahead_from(touching) is None
    assert curve_gap.ahead_from(gaps(REF, (0.0, 0.2), REF)) == ("ref", 20)
    nan = [(0, Estimate(0.2, 0.1, 0.3, 3, 4)), (10, Estimate(math.nan, math.nan, math.nan, 3, 4))]
    assert curve_gap.ahead_from(nan) is None  # a non-finite loss at the end has no interval


# -------------------------------------------------------------------------------------------------- shard_sweep: TOML


@pytest.mark.parametrize(
    "value",
    [
        'say "hi"',
        "C:\\path\\to\\dir",
        'both \\" and "\\',
        "two\nlines",
        "",
        2e-4,
        1e-05,
        0.001,
        3.0,
        -1.5e10,
        7,
        0,
        True,
        False,
        ["standard", "reversed"],
        [1e-3, 2e-3],
        {"rank": 8, "alpha": 16.0, "init": "standard"},
        {"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}, "train": {"lr": 2e-4, "x": [True, False]}},
        [{"a": 1}, {"a": 'q"uote'}],
        "a\rb\x01c\x7fd\té",  # control characters and non-ASCII: TOML wants them escaped
        {"a.b": 1, "a b": 2},  # keys that a bare TOML key cannot hold
    ],
)
def test_toml_value_round_trips_through_tomllib(value):
    literal = shard_sweep.toml_value(value)
    assert tomllib.loads(f"x = {literal}") == {"x": value}, literal
    assert parse_override(f"k={literal}") == ("k", value)  # as `loralab sweep --set k=...` reads it


def test_toml_value_keeps_float_and_int_apart():
    parsed = tomllib.loads(f"a = {shard_sweep.toml_value(1.0)}\nb = {shard_sweep.toml_value(1)}")
    assert type(parsed["a"]) is float and type(parsed["b"]) is int


def test_toml_value_refuses_what_toml_cannot_hold():
    with pytest.raises(TypeError, match="NoneType"):
        shard_sweep.toml_value(None)


# ------------------------------------------------------------------------------------------------ shard_sweep: shards


@pytest.fixture
def sweep_cfg(tiny_lm_dir, chat_jsonl, tmp_path) -> Path:
    """A 2 x 2 sweep (lora.init x train.lr) of the tiny model, two steps a run, as a TOML file."""
    grid = {"lora.init": ["standard", "reversed"], "train.lr": [1e-3, 2e-3]}
    return write_toml(tmp_path / "sweep.toml", tiny_sweep(
        tiny_lm_dir, chat_jsonl, tmp_path / "out", name="shards", grid=grid,
        **{"model.dtype": "float32", "train.save_adapter": False}))


def planned(cfg: Path, sets: list[str] | None = None) -> list[str]:
    return [s.run_id for s in plan_runs(load_sweep(cfg, sets or []))]


def test_kept_axes_stay_whole_inside_a_shard(sweep_cfg, tmp_path):
    out = tmp_path / "out"
    shards = shard_sweep.shards_of(f"{sweep_cfg}:train.lr", [])
    assert len(shards) == 2
    assert [s.pins for s in shards] == [{"lora.init": "standard"}, {"lora.init": "reversed"}]
    assert [len(s.run_ids) for s in shards] == [2, 2]
    assert [r for s in shards for r in s.run_ids] == planned(sweep_cfg)  # each run once, in the grid's order
    assert len({s.name for s in shards}) == 2
    assert all(s.out_dir == out for s in shards)
    manifest = json.loads((out / "sweep.json").read_text())  # the whole sweep's manifest, written first
    assert manifest["run_ids"] == planned(sweep_cfg)


def test_by_default_a_shard_is_one_run(sweep_cfg):
    shards = shard_sweep.shards_of(str(sweep_cfg), [])
    assert [s.run_ids for s in shards] == [[r] for r in planned(sweep_cfg)]
    assert [s.name for s in shards] == planned(sweep_cfg)
    assert {tuple(sorted(s.pins)) for s in shards} == {("lora.init", "train.lr")}


@pytest.mark.parametrize("keep", ["", ":train.lr", ":lora.init,train.lr"])
def test_a_shards_command_plans_exactly_its_runs_under_the_same_ids(sweep_cfg, keep):
    """The overrides a shard's ``loralab sweep`` gets give the shard's runs with the whole sweep's ids, in its own
    out_dir under ``shards/``: what makes gathering them into one store a resume of the same sweep."""
    sets = ["train.save_adapter=false"]
    shards = shard_sweep.shards_of(f"{sweep_cfg}{keep}", sets)
    for shard in shards:
        cmd = shard_sweep.command(shard, sets)
        assert cmd[:5] == [sys.executable, "-m", "loralab", "sweep", str(sweep_cfg)]
        overrides = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        assert overrides[0] == sets[0]
        sub = load_sweep(sweep_cfg, overrides)
        assert Path(sub.out_dir) == shard.out_dir / "shards" / shard.name
        assert [s.run_id for s in plan_runs(sub)] == shard.run_ids


def test_a_table_axis_is_pinned_as_an_inline_table_under_the_same_ids(sweep_cfg):
    """A value of an axis over a whole table (``lora``) goes to the shard as a TOML inline table, nested tables
    and all: the shard plans the same run as the whole sweep."""
    variants = 'lora = [{init = "standard"}, {init = "random-both", init_kwargs = {dist = "xavier"}}]'
    text = sweep_cfg.read_text().replace('"lora.init" = ["standard", "reversed"]', variants)
    assert variants in text
    sweep_cfg.write_text(text)
    shards = shard_sweep.shards_of(str(sweep_cfg), [])
    assert [s.pins["lora"] for s in shards[::2]] == [
        {"init": "standard"},
        {"init": "random-both", "init_kwargs": {"dist": "xavier"}},
    ]
    for shard in shards:
        cmd = shard_sweep.command(shard, [])
        sub = load_sweep(sweep_cfg, [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"])
        assert [s.run_id for s in plan_runs(sub)] == shard.run_ids


def test_an_unknown_axis_is_named_and_nothing_is_written(sweep_cfg, tmp_path):
    with pytest.raises(SystemExit) as e:
        shard_sweep.shards_of(f"{sweep_cfg}:train.lr,nope", [])
    spec = f"{sweep_cfg}:train.lr,nope"
    assert e.value.code == f"{spec}: nope is not a grid axis of {sweep_cfg}; axes: lora.init, train.lr"
    assert not (tmp_path / "out").exists()


def write_results(out: Path, statuses: dict[str, str]) -> None:
    store = SweepStore(out)
    for rid, status in statuses.items():
        store.run(rid).write_result(RunResult(run_id=rid, status=status))


def test_finished_runs_are_left_out_of_the_shards(sweep_cfg, tmp_path):
    ids = planned(sweep_cfg)
    write_results(tmp_path / "out", {ids[1]: "ok", ids[3]: "diverged"})  # results: never redone
    (tmp_path / "out" / "runs" / ids[2]).mkdir()  # started, not finished: still to run
    shards = shard_sweep.shards_of(str(sweep_cfg), [])
    assert [r for s in shards for r in s.run_ids] == [ids[0], ids[2]]


def test_failed_runs_are_sharded_again(sweep_cfg, tmp_path):
    ids = planned(sweep_cfg)
    write_results(tmp_path / "out", {ids[0]: "ok", ids[1]: "failed"})
    shards = shard_sweep.shards_of(str(sweep_cfg), [])
    assert [r for s in shards for r in s.run_ids] == ids[1:]


def shard_with_runs(out: Path, name: str, status: dict[str, str | None]) -> shard_sweep.Shard:
    """A shard whose own store holds ``run_id -> status`` runs (None: started, no result), and its log."""
    src = out / "shards" / name
    for rid, st in status.items():
        (src / "runs" / rid).mkdir(parents=True)
        (src / "runs" / rid / "metrics.jsonl").write_text(rid)
        if st is not None:
            write_results(src, {rid: st})
    (out / "shards" / f"{name}.log").write_text("log")
    return shard_sweep.Shard("c.toml", out, name, {}, list(status))


def test_gather_moves_the_finished_runs_and_keeps_the_rest_of_a_shard(tmp_path):
    out = tmp_path / "out"
    shard = shard_with_runs(out, "shard000-a", {"a": "ok", "b": None, "f": "failed"})
    stale = out / "runs" / "a"  # a failed attempt of an earlier sweep: the shard's finished run replaces it
    write_results(out, {"a": "failed"})
    (stale / "metrics.jsonl").write_text("old")

    assert shard_sweep.gather(shard) == (1, 2)
    assert sorted(p.name for p in (out / "runs" / "a").iterdir()) == [
        "metrics.jsonl",
        "metrics.jsonl.failed",  # the failed attempt is kept aside, as a sweep keeps it
        "result.json",
        "result.json.failed",
    ]
    assert SweepStore(out).run("a").status() == "ok"
    assert not (out / "runs" / "b").exists() and not (out / "runs" / "f").exists()
    src = out / "shards" / "shard000-a"
    assert (src / "runs" / "b" / "metrics.jsonl").is_file()  # what is not finished stays for a resume, with its log
    assert SweepStore(src).run("f").status() == "failed"  # a failed run too: the next call trains it again
    assert (out / "shards" / "shard000-a.log").is_file()


class Cut(BaseException):
    """A gather killed mid-way (as by SIGINT or a power cut between two renames)."""


@pytest.mark.parametrize("cut_at", range(5))
def test_a_gather_cut_short_at_any_rename_and_called_again_loses_nothing(tmp_path, monkeypatch, cut_at):
    out = tmp_path / "out"
    shard = shard_with_runs(out, "shard000-a", {"a": "ok"})
    write_results(out, {"a": "failed"})  # an earlier failed attempt at the destination
    (out / "runs" / "a" / "metrics.jsonl").write_text("old")
    (out / "runs" / "a" / "config.json").write_text("{}")
    replace, calls = os.replace, []

    def cut(src, dst):
        calls.append(src)
        if len(calls) > cut_at:
            raise Cut
        replace(src, dst)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(Cut):
        shard_sweep.gather(shard)
    monkeypatch.setattr(os, "replace", replace)
    assert shard_sweep.gather(shard) == (1, 0)
    run = out / "runs" / "a"
    assert sorted(p.name for p in run.iterdir()) == [
        "metrics.jsonl",
        "metrics.jsonl.failed",
        "result.json",
        "result.json.failed",
    ]
    assert (run / "metrics.jsonl").read_text() == "a" and (run / "metrics.jsonl.failed").read_text() == "old"
    assert SweepStore(out).run("a").status() == "ok" and not (out / "shards" / "shard000-a").exists()


def test_gather_removes_a_shard_whose_runs_all_finished(tmp_path):
    out = tmp_path / "out"
    kept = shard_with_runs(out, "shard001-c", {"c": None})
    shard = shard_with_runs(out, "shard000-a", {"a": "ok", "b": "diverged"})
    assert shard_sweep.gather(shard) == (2, 0)
    assert SweepStore(out).statuses(["a", "b"]) == {"a": "ok", "b": "diverged"}
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard001-c", "shard001-c.log"]  # only its own
    assert shard_sweep.gather(kept) == (0, 1)
    assert not (out / "runs" / "c").exists()


def with_pool(store: Path, rid: str, digest: str) -> None:
    """Give a run per-chunk losses on held-out pool ``digest``."""
    import numpy as np

    from loralab.lab.store import EvalChunks, SplitLosses

    z = np.zeros(2, dtype=np.float32)
    split = SplitLosses(ids=np.arange(2), pretrained=z, step0=z, final=z)
    SweepStore(store).run(rid).write_eval_chunks(EvalChunks(digest, {"test": split}))


def test_gather_keeps_a_run_evaluated_on_another_pool_in_its_shard_and_says_why(tmp_path, capsys):
    out = tmp_path / "out"
    write_results(out, {"old": "ok"})
    with_pool(out, "old", "pool-of-the-store")
    shard = shard_with_runs(out, "shard000-a", {"a": "ok", "b": "ok"})
    with_pool(out / "shards" / "shard000-a", "a", "pool-of-the-store")
    with_pool(out / "shards" / "shard000-a", "b", "another-pool")
    assert shard_sweep.gather(shard) == (1, 1)
    assert SweepStore(out).run("a").status() == "ok" and not (out / "runs" / "b").exists()
    assert SweepStore(out / "shards" / "shard000-a").run("b").status() == "ok"  # kept, not lost
    said = capsys.readouterr().out
    assert "b left in its shard" in said  # the store's runs, the one just moved included, name the pool
    assert "2 finished run(s), e.g. a, were evaluated on held-out pool pool-of-the-store" in said


# ----------------------------------------------------------------------------------------- shard_sweep: end to end


def env() -> dict:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; past ``timeout`` its whole process group is killed, so no shard's
    ``loralab sweep`` outlives the test."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd} still running after {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow  # four processes that each load torch and train: ~20 s or more on two cores
def test_a_sharded_sweep_is_gathered_into_one_finished_store(sweep_cfg, tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        [sys.executable, str(ROOT / "scripts" / "shard_sweep.py"), str(sweep_cfg), "--workers", "2"],
        tmp_path,
        timeout=900,
    )
    logs = {p.name: p.read_text() for p in (out / "shards").glob("*.log")}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
    assert proc.stdout.splitlines()[0] == "4 shards, 4 runs, 2 at a time"
    assert "done in" in proc.stdout and "4 of 4 runs gathered" in proc.stdout

    ids = planned(sweep_cfg)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(ids)
    for rid in ids:
        result = json.loads((out / "runs" / rid / "result.json").read_text())
        assert result["status"] == "ok" and result["run_id"] == rid
    assert json.loads((out / "sweep.json").read_text())["run_ids"] == ids
    assert not (out / "shards").exists()  # every shard gathered: no dir, no log, and shards/ itself removed
    assert shard_sweep.shards_of(str(sweep_cfg), []) == []  # a second shard_sweep would have nothing to do

    dry = run_script([sys.executable, "-m", "loralab", "sweep", str(sweep_cfg), "--dry-run"], tmp_path, timeout=300)
    assert dry.returncode == 0, (dry.stdout, dry.stderr)
    assert "ok: 0 runs to train, 4 already finished" in dry.stdout
    assert dry.stdout.count("  done ") == 4


# ---------------------------------------------------------------------------------------------------------- same_runs

N_CHUNKS = 40


def store_with(root: Path, runs: dict[str, tuple[str, float]], *, pool: str = "pool", where=("cpu", "float32")) -> None:
    """Runs ``run_id -> (status, shift)``: per-chunk losses ``hard + shift`` at the final stage, ``hard`` before."""
    import numpy as np

    from loralab.lab.store import EvalChunks, SplitLosses

    hard = np.random.default_rng(0).normal(3.0, 0.5, N_CHUNKS).astype(np.float32)
    store = SweepStore(root)
    for rid, (status, shift) in runs.items():
        run = store.run(rid)
        if status in ("ok", "diverged"):
            split = SplitLosses(ids=np.arange(N_CHUNKS), pretrained=hard, step0=hard, final=hard + np.float32(shift))
            run.write_eval_chunks(EvalChunks(pool, {"val": split, "test": split}))
        if status != "pending":
            run.write_result(RunResult(run_id=rid, status=status, device=where[0], dtype=where[1]))


def test_same_runs_finds_a_planted_difference_and_none_where_there_is_none(tmp_path):
    import numpy as np

    store_with(tmp_path / "a", {"r1": ("ok", 0.0), "r2": ("ok", 0.0), "only-a": ("ok", 0.0)}, where=("cuda:0", "bf16"))
    store_with(tmp_path / "b", {"r1": ("ok", 0.01), "r2": ("ok", 0.01), "only-b": ("ok", 0.0)})
    c = same_runs.compare(SweepStore(tmp_path / "a"), SweepStore(tmp_path / "b"))
    assert c.split == "test" and [r for r, _, _ in c.runs] == ["r1", "r2"]
    assert c.runs[0][1:] == ("cuda bf16", "cpu float32")
    final, before = c.overall("final"), c.overall("pretrained")
    assert final.mean == pytest.approx(0.01, abs=1e-6) and final.excludes_zero
    assert before.mean == 0 and not before.excludes_zero  # the same base losses on both: no difference
    assert all(np.isclose(e.mean, 0.01, atol=1e-6) for e in c.per_run("final"))
    assert c.only == (["only-a"], ["only-b"]) and c.left_out == []
    text = same_runs.markdown(c, "a", "b")
    assert "| all 2 runs |" in text and "+0.0100" in text and "Run ids in one store only: 1 in A, 1 in B" in text


def test_same_runs_names_unfinished_runs_and_refuses_what_does_not_pair(tmp_path):
    store_with(tmp_path / "a", {"r1": ("ok", 0.0), "r2": ("ok", 0.0)})
    store_with(tmp_path / "b", {"r1": ("failed", 0.0), "r2": ("pending", 0.0)})
    with pytest.raises(ValueError, match="no run is finished, with per-chunk losses, in both"):
        same_runs.compare(SweepStore(tmp_path / "a"), SweepStore(tmp_path / "b"))
    store_with(tmp_path / "c", {"r1": ("ok", 0.0), "r2": ("ok", 0.0)}, pool="another")
    other = "runs `r1` and `r1` were evaluated on different chunks .held-out pools pool and another"
    with pytest.raises(ValueError, match=other):
        same_runs.compare(SweepStore(tmp_path / "a"), SweepStore(tmp_path / "c"))
    store_with(tmp_path / "d", {"r1": ("ok", 0.0), "r2": ("failed", 0.0)})
    c = same_runs.compare(SweepStore(tmp_path / "a"), SweepStore(tmp_path / "d"))
    assert [r for r, _, _ in c.runs] == ["r1"] and c.left_out == ["r2 (ok in A, failed in B)"]
