"""``loralab inits`` and ``loralab check``: the tables agree with the registry and with measurements on a model.

Rows are parsed, not matched as text, and checked against :func:`loralab.init_schemes`, so a new scheme is covered
without editing this file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab import init_schemes
from loralab.cli import main
from tiny_sweep import tiny_sweep, write_toml

ROOT = Path(__file__).resolve().parents[1]
NINE = {"standard", "gaussian", "reversed", "orthogonal-qr-match", "orthogonal-qr-const", "orthogonal-eye",
        "random-both", "pissa", "olora"}


def rows(text: str) -> dict[str, list[str]]:
    """Table lines after the header, keyed by their first column (a scheme name)."""
    lines = text.strip().splitlines()
    return {line.split()[0]: line.split() for line in lines[1:]}


def parse_bool(s: str) -> bool:
    assert s in ("True", "False"), s
    return s == "True"


# ---- loralab inits -------------------------------------------------------------------------------------------------

def test_inits_lists_every_scheme_with_its_properties(capsys):
    assert main(["inits"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    schemes = init_schemes()
    assert set(table) == set(schemes) >= NINE
    assert len(out.strip().splitlines()) == len(schemes) + 1   # one header, one row per scheme, nothing else
    for name, s in schemes.items():
        preserves, moves, even = (parse_bool(v) for v in table[name][1:4])
        assert (preserves, moves, even) == (s.preserves_output, s.modifies_base, s.even_rank), name
        assert table[name][4] == (s.one_hot or "same"), name   # what the scheme does on an embedding
        assert s.one_hot is None or s.one_hot in schemes, name
        assert s.summary.split()[0] == table[name][5], name   # the summary follows
    assert table["standard"][4] == "reversed-normal"   # PEFT's embedding default, not A ~ KU(vocabulary size)
    assert not parse_bool(table["random-both"][1])
    assert {n for n in table if parse_bool(table[n][2])} >= {"pissa", "olora"}


def test_inits_through_the_entry_point():
    proc = subprocess.run([sys.executable, "-m", "loralab", "inits"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert set(rows(proc.stdout)) == set(init_schemes())


# ---- loralab check --------------------------------------------------------------------------------------------------

def check_rows(capsys, tiny_lm_dir, rank: int) -> tuple[dict[str, list[str]], str]:
    assert main(["check", "--model", str(tiny_lm_dir), "--targets", "q_proj,v_proj", "--rank", str(rank)]) == 0
    out = capsys.readouterr().out
    return rows(out), out


def test_check_measures_every_scheme(capsys, tiny_lm_dir, one_thread):
    table, out = check_rows(capsys, tiny_lm_dir, rank=4)
    schemes = init_schemes()
    assert set(table) == set(schemes) >= NINE
    assert "BROKEN PROMISE" not in out
    for name, s in schemes.items():
        _, preserves, moves, _, relative, verdict = table[name]
        assert (parse_bool(preserves), parse_bool(moves)) == (s.preserves_output, s.modifies_base), name
        assert verdict == "ok", name
        if s.preserves_output:
            assert float(relative) < 1e-4, name
        else:
            assert float(relative) > 1e-4, name
    assert float(table["standard"][3]) == 0.0   # B = 0: exactly the base model, not merely close
    assert float(table["reversed"][3]) == 0.0   # A = 0
    assert float(table["random-both"][3]) > 1e-3


def test_check_skips_even_rank_schemes_at_an_odd_rank(capsys, tiny_lm_dir, one_thread):
    table, out = check_rows(capsys, tiny_lm_dir, rank=3)
    schemes = init_schemes()
    assert set(table) == set(schemes)
    assert "BROKEN PROMISE" not in out
    for name, s in schemes.items():
        line = " ".join(table[name])
        if s.even_rank:
            assert "skipped:" in line and "even rank" in line, line
        else:
            assert table[name][-1] == "ok", line


def test_check_names_a_rank_no_target_can_hold(capsys, tiny_lm_dir, one_thread):
    """Rank 64 on a 32-wide q_proj: no scheme is measured, each row says why, and the command fails (exit 2)."""
    assert main(["check", "--model", str(tiny_lm_dir), "--targets", "q_proj", "--rank", "64"]) == 2
    captured = capsys.readouterr()
    assert "no scheme could be checked" in captured.err
    table = rows(captured.out)
    assert set(table) == set(init_schemes())
    for cells in table.values():
        line = " ".join(cells)
        assert "skipped: rank 64 exceeds" in line and "q_proj" in line, line


def test_check_fails_on_a_broken_promise(capsys, tiny_lm_dir, one_thread, monkeypatch):
    """A scheme whose init changes the output while promising not to makes ``check`` exit 1 and say so."""
    import dataclasses

    from loralab import inits

    broken = dataclasses.replace(inits.get_scheme("standard"), preserves_output=False)
    monkeypatch.setitem(inits._REGISTRY, "standard", broken)
    assert main(["check", "--model", str(tiny_lm_dir), "--targets", "q_proj,v_proj", "--rank", "4"]) == 1
    table = rows(capsys.readouterr().out)
    assert " ".join(table["standard"]).endswith("BROKEN PROMISE")


def test_check_strips_spaces_around_targets(capsys, tiny_lm_dir, one_thread, monkeypatch):
    """``--targets "q_proj, v_proj"`` names two modules, not q_proj and a " v_proj" that matches nothing."""
    from loralab.lab.studies import identity as check

    seen, original = [], check.identity_table
    monkeypatch.setattr(check, "identity_table", lambda model, lora: seen.append(lora.targets) or original(model, lora))
    assert main(["check", "--model", str(tiny_lm_dir), "--targets", " q_proj, v_proj ,", "--rank", "4"]) == 0
    assert [list(t) for t in seen] == [["q_proj", "v_proj"]]


def test_ctrl_c_in_check_does_not_talk_about_resuming(capsys, monkeypatch):
    from loralab.lab.studies import identity as check

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "identity_table", interrupted)
    assert main(["check"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


def test_check_on_a_truncated_model_is_one_line_naming_the_file(capsys, tiny_lm_dir, tmp_path):
    """``loralab check --model DIR`` with a cut safetensors file: exit 2, the file and the fix, no traceback
    (issue 22, item 7)."""
    import shutil

    bad = shutil.copytree(tiny_lm_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["check", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab check: error: ") and err.count("\n") == 1, err
    assert f"{weights} is damaged" in err and "save_pretrained" in err


# ---- out paths that are files: one line naming the path, exit 2 ------------------------------------------------------

def test_report_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "lab"))
    from synthetic_store import build_grid_store

    build_grid_store(tmp_path / "s", {"train.lr": [1e-3]}, lambda a: ("ok", 2.0))
    (tmp_path / "taken").write_text("")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert main(["report", str(tmp_path / "s"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("loralab report: error: ") and err.count("\n") == 1 and str(out) in err, err


def test_width_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["width", str(ROOT / "configs" / "width.toml"), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab width: error: ") and err.count("\n") == 1
    assert f"--out {tmp_path / 'taken'} is an existing file" in err


def test_os_errors_name_the_path(tmp_path, capsys, monkeypatch):
    """Any other OSError (a full disk, a permission) is one line naming the path, not a traceback."""
    from loralab.lab.report import write as report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s" / "report"))

    monkeypatch.setattr(report, "write_report", full)
    assert main(["report", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == f"loralab report: error: cannot use {tmp_path / 's' / 'report'}: No space left on device\n"


# ---- Ctrl-C at any point of start-up (issue 22, item 8): exit 130 and one line, as during training -------------------

def _sweep_config(path: Path, tiny_lm_dir: Path, chat_jsonl: Path) -> Path:
    cfg = tiny_sweep(tiny_lm_dir, chat_jsonl, path.parent / "out", name="ctrl-c", grid={},
                     **{"train.max_steps": 100000})
    return write_toml(path, cfg)


def _loading_torch(pid: int) -> bool:
    """Whether the process has begun mapping torch's C++ libraries (its start-up is under way)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when torch starts loading")
@pytest.mark.parametrize("when", [
    "torch loading", pytest.param(0.3, marks=pytest.mark.slow), pytest.param(1.0, marks=pytest.mark.slow),
    pytest.param(2.0, marks=pytest.mark.slow), "training"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, tiny_lm_dir, chat_jsonl, when):
    """SIGINT to ``python -m loralab sweep`` while torch's C++ libraries load (once an abort in pybind11, rc -6),
    at later points of start-up (seconds after torch began loading), and during training."""
    config = _sweep_config(tmp_path / "sweep.toml", tiny_lm_dir, chat_jsonl)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "loralab", "sweep", str(config), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        ready = (lambda: _loading_torch(proc.pid)) if when != "training" else \
            (lambda: any((tmp_path / "out" / "runs").glob("*/metrics.jsonl")))
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(when if isinstance(when, float) else 0.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted: finished runs are stored; rerun the same command to resume\n", err
    assert not (tmp_path / "out" / "sweep.lock").exists()
