"""End to end, through the command line in subprocesses: a sweep killed (SIGKILL) midway, resumed to completion with
nothing finished redone and the interrupted run redone cleanly, then the report; a huge-lr run is recorded as
diverged, not dropped. The tiny offline Llama keeps it to seconds of training; interpreter start-ups dominate."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_sweep import tiny_sweep, write_toml

SMALL_LR, HUGE_LR = 1e-3, 1e3
INITS = ("standard", "reversed")
MAX_STEPS, EVAL_EVERY = 12, 3


def write_config(path: Path, out_dir: Path, model_dir: Path, data_file: Path) -> Path:
    """A 2 × 2 sweep of the tiny model. ``train.lr`` is the outer axis, so the first two runs are the long (ok)
    ones: the kill lands in a run with steps left, and the resumed sweep still has a diverging run to do."""
    cfg = tiny_sweep(model_dir, data_file, out_dir, name="e2e",
                     grid={"train.lr": [SMALL_LR, HUGE_LR], "lora.init": list(INITS)},
                     **{"data.max_train_chunks": 16, "data.max_eval_chunks": 4, "lora.alpha": 8,
                        "train.max_steps": MAX_STEPS, "train.eval_every": EVAL_EVERY, "train.warmup_ratio": 0.0})
    return write_toml(path, cfg)


def loralab(*args: str) -> list[str]:
    return [sys.executable, "-m", "loralab", *args]


def env() -> dict:
    # One intra-op thread: the model is tiny, and on a shared 2-core machine spinning OpenMP workers only contend.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_dirs(out: Path) -> list[Path]:
    runs = out / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def n_train_lines(run: Path) -> int:
    try:
        text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    return text.count('"kind": "train"')


def midway(out: Path) -> bool:
    """Some run is finished and another has trained at least one step but has no result."""
    dirs = run_dirs(out)
    return any((d / "result.json").exists() for d in dirs) and \
        any(not (d / "result.json").exists() and n_train_lines(d) >= 1 for d in dirs)


def freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and wait until it is stopped, so the store cannot change while it is inspected."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    for _ in range(2000):
        if not stat.exists():   # not Linux: give the signal time to land
            time.sleep(0.2)
            return
        if stat.read_text().rpartition(")")[2].split()[0] in "tT":
            return
        time.sleep(0.001)


def kill_midway(cmd: list[str], out: Path, log: Path, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it when :func:`midway` holds. Seen → stopped → checked again → killed, so the
    check is exact however fast the runs are; if the run finished before the stop landed, it goes on."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if midway(out):
                freeze(proc)
                if midway(out):
                    proc.kill()   # SIGKILL: no handler, no cleanup, like a lost machine
                    break
                os.kill(proc.pid, signal.SIGCONT)
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended (rc {proc.returncode}) before it could be killed midway:\n"
                            + log.read_text())
            time.sleep(0.002)
        else:
            pytest.fail("timed out waiting for a finished run and a run in progress:\n" + log.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def file_identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def md_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table under the heading that starts with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("# ").startswith(heading))
    i = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    cells = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
    header, rows = cells(lines[i]), []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return header, rows


@pytest.mark.slow
def test_sweep_killed_resumed_and_reported(tiny_lm_dir, chat_jsonl, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl)
    cmd = loralab("sweep", str(cfg), "--no-progress")

    # 1. Kill the sweep midway.
    kill_midway(cmd, out, tmp_path / "first.log")
    finished = {d.name: d for d in run_dirs(out) if (d / "result.json").exists()}
    interrupted = {d.name: d for d in run_dirs(out) if not (d / "result.json").exists()}
    assert finished and len(interrupted) == 1, (finished, interrupted)   # one run at a time: one was cut short
    (cut,) = interrupted.values()
    # killed between writes (it was stopped first), so every line is whole; a torn last line would fail here
    partial = read_jsonl(cut / "metrics.jsonl")
    assert any(m["kind"] == "train" for m in partial)   # it had trained: a resume that appends would duplicate
    before = {name: {f: file_identity(d / f) for f in ("result.json", "metrics.jsonl", "config.json")}
              for name, d in finished.items()}
    manifest = (out / "sweep.json").read_bytes()
    assert (out / "sweep.lock").exists()   # SIGKILL: no chance to release it

    # 2. Rerun the same command to completion.
    second = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    assert f"4 runs, {len(finished)} already finished, {4 - len(finished)} to run" in second.stdout
    assert "note: taking over the stale lock" in second.stdout   # the killed sweep's lock: its pid is gone
    assert not (out / "sweep.lock").exists()   # released at the end
    for name in finished:   # not redone: not even listed as a job
        assert name not in second.stdout
    assert cut.name in second.stdout
    assert (out / "sweep.json").read_bytes() == manifest

    # finished runs untouched, byte for byte, same inode and mtime
    for name, files in before.items():
        for f, identity in files.items():
            assert file_identity(out / "runs" / name / f) == identity, f"{name}/{f} was rewritten"

    # every run finished, with the status its lr implies, and a clean metrics stream (the interrupted one redone)
    runs = run_dirs(out)
    manifest_ids = json.loads(manifest)["run_ids"]
    assert sorted(manifest_ids) == [d.name for d in runs] and len(runs) == 4
    statuses = {}
    for d in runs:
        result = json.loads((d / "result.json").read_text())
        axes = result["axes"]
        assert axes["lora.init"] in INITS and axes["train.lr"] in (SMALL_LR, HUGE_LR)
        statuses[d.name] = result["status"]
        assert result["status"] == ("ok" if axes["train.lr"] == SMALL_LR else "diverged"), (d.name, result)
        metrics = read_jsonl(d / "metrics.jsonl")
        train = [m["step"] for m in metrics if m["kind"] == "train"]
        evals = [m["step"] for m in metrics if m["kind"] == "eval"]
        assert train == list(range(1, result["steps"] + 1)), d.name   # each step once, from 1
        assert evals[0] == 0 and evals.count(0) == 1 and evals == sorted(set(evals)), d.name
        assert evals[-1] == result["steps"]
        if result["status"] == "ok":
            assert result["steps"] == MAX_STEPS
            assert evals == list(range(0, MAX_STEPS + 1, EVAL_EVERY))
        else:
            assert result["steps"] < MAX_STEPS   # stopped early, and recorded
        assert (d / "diagnostics.json").exists()
    assert sorted(statuses.values()) == ["diverged", "diverged", "ok", "ok"]
    assert len(read_jsonl(cut / "metrics.jsonl")) >= len(partial)

    # 3. The report lists every run with its status, and marks the diverged ones.
    rep = subprocess.run(loralab("report", str(out)), capture_output=True, text=True, env=env(), timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "**4 runs**: 2 ok · 2 diverged" in md
    header, rows = md_table(md, "All runs")
    listed = {row[0].strip("`"): row[header.index("status")] for row in rows}
    assert listed == statuses
    _, loss_rows = md_table(md, "Final eval loss")
    for row in loss_rows:   # row = init; columns = lrs in grid order: the huge lr's cell says diverged
        assert row[0].strip("`") in INITS
        assert re.match(r"\**diverged \(1/1\)", row[2]) and re.match(r"\**\d+\.\d+", row[1]), row
