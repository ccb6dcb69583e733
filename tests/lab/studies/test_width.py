"""The width sweep: the cliff search, the spike rule, the slope fit, the config, the probe's fast forward, resume,
and the command line end to end. Properties, not magic numbers; tiny widths keep everything to seconds."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import init_schemes
from loralab.cli import main
from loralab.lab.config.typecheck import ConfigError
from loralab.lab.studies.width import probe as P
from loralab.lab.studies.width import study as W
from loralab.lab.studies.width.report import fit, ols, summarize

CPU = torch.device("cpu")
TINY = """\
name = "tiny"
widths = [8, 16, 32]
inits = ["standard", "reversed", "orthogonal-eye"]
seeds = [0, 1]
device = "cpu"
fit_largest = 2

[family]
d_in = 4
pretrain_steps = 5
samples = 64

[probe]
rank = 2
alpha = 4.0
steps = 6
batch_size = 16
lr_min = 0.0009765625
per_octave = 2
"""


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: extra threads only add overhead


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def small_features(tmp_path, width=16, **family):
    fam = P.FamilyConfig(**{"d_in": 4, "pretrain_steps": 3, "samples": 64, **family})
    return W.features(fam, width, 0, CPU, tmp_path / "cache")


# ---- the search ------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(threshold=st.integers(-12, 12), start=st.integers(-20, 20), step=st.integers(1, 5), confirm=st.integers(1, 3))
def test_search_returns_the_largest_stable_point_of_a_monotone_cliff(threshold, start, step, confirm):
    calls = []

    def stable(k):
        calls.append(k)
        return k <= threshold

    found = P.max_stable(stable, -10, 10, start, step, confirm)
    assert found == (None if threshold < -10 else min(threshold, 10))
    assert len(calls) == len(set(calls)) and all(-10 <= k <= 10 for k in calls)   # each grid point run at most once


@settings(max_examples=200, deadline=None)
@given(stable_set=st.sets(st.integers(0, 30)), start=st.integers(0, 30), confirm=st.integers(1, 3))
def test_search_answer_is_stable_and_confirmed_for_any_cliff(stable_set, start, confirm):
    found = P.max_stable(lambda k: k in stable_set, 0, 30, start, 4, confirm)
    if found is None:
        assert 0 not in stable_set
    else:
        assert found in stable_set
        assert not any(j in stable_set for j in range(found + 1, min(found + confirm, 30) + 1))


def test_search_finds_a_stable_island_just_above_the_bisection():
    stable = {k for k in range(10)} | {11}   # the walk (0, 4, 8, 12) and bisection see 9; confirming sees 11
    assert P.max_stable(lambda k: k in stable, 0, 30, 0, 4, confirm=2) == 11
    assert P.max_stable(lambda k: k in stable, 0, 30, 0, 4, confirm=1) == 9   # documented: a narrower check misses it


# ---- the spike rule --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("losses, expected", [
    ([1.0, 0.5, 12.0, 0.1, 0.05], 2),        # a spike that recovers is still unstable
    ([1.0, 9.9, 5.0, 0.1], None),            # below the factor everywhere: stable, however bumpy
    ([1.0, 0.5, float("nan")], 2),
    ([2.0, float("inf")], 1),
    ([1.0, 0.01, 0.2], None),                # a final loss far below the start says nothing either way
])
def test_spike_rule(losses, expected):
    assert P.spike_step(losses, 10.0) == expected


def test_a_probe_that_spikes_then_recovers_is_unstable(tmp_path, monkeypatch):
    feats = small_features(tmp_path)
    real = P.F.mse_loss
    calls = iter(range(10 ** 6))

    def spiking(out, y):   # the real loss, times 50 at step 3 only: the run recovers at once
        loss = real(out, y)
        return loss * 50 if next(calls) == 3 else loss
    monkeypatch.setattr(P.F, "mse_loss", spiking)
    probe = P.run_probe(feats, "standard", 1e-4, P.ProbeConfig(rank=2, steps=8, batch_size=16), seed=0)
    assert probe["spike_step"] == 3 and not probe["stable"]
    assert probe["final_loss"] < 2 * probe["losses"][0]


# ---- slope fit -------------------------------------------------------------------------------------------------------

def test_ols_recovers_a_known_slope_and_its_standard_error():
    rng = random.Random(0)
    x = [math.log2(n) for n in (64, 128, 256, 512, 1024) for _ in range(3)]
    sigma, slopes, ses = 0.3, [], []
    for _ in range(2000):
        y = [1.0 - 0.75 * xi + rng.gauss(0, sigma) for xi in x]
        slope, se, intercept = ols(x, y)
        slopes.append(slope)
        ses.append(se)
    mean = sum(slopes) / len(slopes)
    spread = math.sqrt(sum((s - mean) ** 2 for s in slopes) / (len(slopes) - 1))
    sxx = sum((xi - sum(x) / len(x)) ** 2 for xi in x)
    assert abs(mean + 0.75) < 0.01
    assert spread == pytest.approx(sigma / math.sqrt(sxx), rel=0.06)   # the textbook s.e. is the real spread
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.06)      # and the estimate of it is unbiased enough


def test_fit_exact_line_and_bootstrap_interval():
    exact = fit({n: [2.0 - math.log2(n)] * 3 for n in (16, 32, 64, 128)})
    assert exact.slope == pytest.approx(-1.0) and exact.se == pytest.approx(0.0, abs=1e-12)
    assert exact.ci == pytest.approx((-1.0, -1.0))
    rng = random.Random(1)
    noisy = fit({n: [-0.5 * math.log2(n) + rng.gauss(0, 0.2) for _ in range(4)] for n in (16, 32, 64, 128, 256)})
    assert noisy.ci[0] < noisy.slope < noisy.ci[1] and noisy.points == 20
    assert fit({16: [1.0, 2.0]}) is None


# ---- config ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, names", [
    ("widht=[8,16]", ["widht", "did you mean 'widths'"]),
    ("probe.stpes=3", ["probe.stpes", "did you mean 'steps'"]),
    ("widths=[32,16]", ["widths", "increasing"]),
    ("widths=[1,16]", ["widths", "probe.rank"]),
    ("inits=[\"nope\"]", ["inits", "unknown init scheme 'nope'", "reversed"]),
    ("probe.rank=3", ["inits", "even rank"]),
    ("probe.spike_factor=1.0", ["probe", "spike_factor"]),
    ("probe.steps=0", ["probe", "steps"]),
    ("family.depth=0", ["family", "depth"]),
    ("probe.lr_max=1e-9", ["lr_min < lr_max"]),
    ("fit_largest=9", ["fit_largest"]),
    ("device=tpu", ["device"]),
    ("probe.steps=\"ten\"", ["probe.steps", "expected int"]),
    ("probe.steps", ["not key=value"]),
])
def test_config_rejects_bad_keys_and_values_naming_them(tiny, override, names):
    with pytest.raises(ConfigError) as err:
        W.load_width(tiny, [override])
    for name in names:
        assert name in str(err.value)


def test_config_overrides_and_defaults(tiny):
    cfg = W.load_width(tiny, ["probe.steps=9", "widths=[8,32]", "device=cpu"])
    assert cfg.probe.steps == 9 and cfg.widths == (8, 32) and cfg.family.d_in == 4
    default = W.WidthConfig()
    assert default.widths[-1] / default.widths[0] >= 32 and len(default.seeds) >= 3 and default.probe.per_octave >= 4
    assert set(default.inits) == set(W.STUDY_INITS) and default.probe.warmup_steps == 0


# ---- the model, the task, the probe ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", sorted(init_schemes()))
def test_probe_forward_is_the_adapted_models_output(tmp_path, init):
    feats = small_features(tmp_path)
    probe = P.ProbeConfig(rank=4)
    layer = P.adapted_head(feats, init, probe, seed=0)["head"]
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()   # a non-zero B·A, so the branch counts
        base = layer.base_layer(feats.z) if init_schemes()[init].modifies_base else feats.base
        fast = base + layer.lora_delta(feats.z, layer.lora_A, layer.lora_B)
        torch.testing.assert_close(fast, layer(feats.z))
    assert torch.equal(feats.head.weight, W.pretrained(P.FamilyConfig(d_in=4, pretrain_steps=3, samples=64), 16, 0,
                                                       CPU, tmp_path / "cache")[0].head.weight)   # base untouched


def test_every_output_preserving_init_starts_from_the_same_loss(tmp_path):
    feats = small_features(tmp_path)
    probe = P.ProbeConfig(rank=4, steps=3, batch_size=16)
    first = {i: P.run_probe(feats, i, 1e-3, probe, seed=0)["losses"][0] for i, s in init_schemes().items()
             if s.preserves_output}
    assert max(first.values()) - min(first.values()) < 1e-5 * max(first.values()), first


def test_target_and_shift_sizes_do_not_grow_with_width(tmp_path):
    infos = [small_features(tmp_path, n, pretrain_steps=0).info for n in (16, 128, 512)]
    for info in infos:
        assert info["shift_rms"] == pytest.approx(1.0, rel=1e-5)   # exactly the configured per-coordinate size
    targets = [info["target_rms"] for info in infos]
    assert max(targets) / min(targets) < 1.5, targets


def test_pretraining_is_cached_per_width_and_seed(tmp_path, monkeypatch):
    fam = P.FamilyConfig(d_in=4, pretrain_steps=3)
    first, _ = W.pretrained(fam, 16, 0, CPU, tmp_path)
    monkeypatch.setattr(W, "_pretrain", lambda *a: pytest.fail("retrained a cached student"))
    again, _ = W.pretrained(fam, 16, 0, CPU, tmp_path)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / ".gitignore").read_text().strip().endswith("*")


# ---- the sweep: resume, store, command line --------------------------------------------------------------------------

def counting(monkeypatch):
    calls, real = [], W.run_probe

    def probe(feats, init, lr, cfg, seed):
        calls.append((init, feats.z.shape[1], seed))
        return real(feats, init, lr, cfg, seed)
    monkeypatch.setattr(W, "run_probe", probe)
    return calls


def test_resume_redoes_nothing_finished(tiny, tmp_path, monkeypatch):
    cfg = W.load_width(tiny)
    calls = counting(monkeypatch)
    first = W.run_width(cfg, tmp_path / "out", log=lambda s: None)
    assert len(first["cells"]) == 3 * 3 * 2 and calls
    calls.clear()
    monkeypatch.setattr(W, "_pretrain", lambda *a: pytest.fail("retrained a cached student"))
    again = W.run_width(cfg, tmp_path / "out", log=lambda s: None)
    assert calls == [] and again["cells"] == first["cells"]
    path = tmp_path / "out" / W.RESULTS
    data = json.loads(path.read_text())
    del data["cells"]["reversed|n16|seed1"]   # as if the run had died during this cell
    path.write_text(json.dumps(data))
    third = W.run_width(cfg, tmp_path / "out", log=lambda s: None)
    assert set(calls) == {("reversed", 16, 1)}
    assert third["cells"]["reversed|n16|seed1"]["k"] == first["cells"]["reversed|n16|seed1"]["k"]   # deterministic
    assert [s["cells"] for s in third["sessions"]] == [3 * 3 * 2, 1]   # the rerun that trained nothing left no entry


def test_a_rerun_that_trains_nothing_leaves_results_json_byte_identical(tiny, tmp_path):
    cfg = W.load_width(tiny, ["widths=[8,16]", "seeds=[0]"])
    W.run_width(cfg, tmp_path, log=lambda s: None)
    before = (tmp_path / W.RESULTS).read_bytes()
    W.run_width(cfg, tmp_path, log=lambda s: None)
    assert (tmp_path / W.RESULTS).read_bytes() == before


def test_resume_refuses_other_settings(tiny, tmp_path):
    W.run_width(W.load_width(tiny, ["widths=[8,16]", "seeds=[0]"]), tmp_path, log=lambda s: None)
    with pytest.raises(ConfigError, match="probe.*another --out"):
        W.run_width(W.load_width(tiny, ["widths=[8,16]", "seeds=[0]", "probe.steps=7"]), tmp_path, log=lambda s: None)


def test_dry_run_counts_cells_checks_the_store_and_trains_nothing(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(W, "search_cell", lambda *a: pytest.fail("a dry run searched"))
    assert main(["width", str(tiny), "--set", "seeds=[0]", "--out", str(out), "--dry-run"]) == 0
    assert "3 widths [8, 16, 32] x 1 seeds x 3 inits" in capsys.readouterr().out and not out.exists()
    monkeypatch.undo()
    W.run_width(W.load_width(tiny, ["widths=[8,16]", "seeds=[0]"]), out, log=lambda s: None)
    assert main(["width", str(tiny), "--set", "seeds=[0,1]", "--out", str(out), "--dry-run"]) == 0
    assert "= 18 cells, 6 already done, 12 to search on cpu" in capsys.readouterr().out
    before = (out / W.RESULTS).read_bytes()
    assert main(["width", str(tiny), "--set", "probe.steps=7", "--out", str(out), "--dry-run"]) == 2
    assert "another --out" in capsys.readouterr().err and (out / W.RESULTS).read_bytes() == before
    if not torch.cuda.is_available():
        assert main(["width", str(tiny), "--set", "device=cuda", "--out", str(out), "--dry-run"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_cli_end_to_end_writes_table_and_figures(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["width", str(tiny), "--set", "seeds=[0]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "table.md", "cells.csv", "slopes.json", "max_stable_lr.png", "cliff_curves.png"):
        assert (out / name).exists() and str(out / name) in printed
    for png in ("max_stable_lr.png", "cliff_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for token in ("standard", "reversed", "orthogonal-eye", "| 8 |", "| 32 |", "−1/2 (Init[A])", "−1 (Init[B])"):
        assert token in table
    assert len((out / "cells.csv").read_text().strip().splitlines()) == 1 + 3 * 3
    slopes = json.loads((out / "slopes.json").read_text())
    assert set(slopes) == {"standard", "reversed", "orthogonal-eye"}
    assert (out / "results.json").stat().st_size < 1_000_000
    assert main(["width", str(tiny), "--set", "probe.stpes=1", "--out", str(out)]) == 2   # bad input: exit 2
    assert "probe.stpes" in capsys.readouterr().err


@pytest.mark.slow
def test_reversed_cliff_falls_faster_with_width_than_standard(tmp_path):
    """The physics at small scale (~1 min): the n^-1 vs n^-1/2 ordering shows from 64 to 512 already."""
    cfg = W.WidthConfig(widths=(64, 128, 256, 512), inits=("standard", "reversed"), seeds=(0, 1), device="cpu",
                        probe=P.ProbeConfig(steps=60))
    results = W.run_width(cfg, tmp_path, log=lambda s: None)
    results["config"] = json.loads(json.dumps(results["config"]))
    s = summarize(results)
    assert s["reversed"]["all"].slope < s["standard"]["all"].slope - 0.2
    assert -1.3 < s["reversed"]["all"].slope < -0.6 and -0.8 < s["standard"]["all"].slope < -0.2


# ---- a careless config (issue 22, item 13): nothing starts without saying what and where ----------------------------

@pytest.mark.parametrize("text, fragment", [("", "is empty"), ("# nothing here yet\n", "is empty"),
                                            ('name = "w"\n', "sets no out_dir")], ids=["empty", "comments", "minimal"])
def test_an_empty_or_minimal_config_starts_nothing(tmp_path, capsys, monkeypatch, text, fragment):
    monkeypatch.chdir(tmp_path)   # where the old default out_dir (docs/results/width) would have been created
    monkeypatch.setattr(W, "search_cell", lambda *a: pytest.fail("a cell was searched"))
    (tmp_path / "w.toml").write_text(text)
    assert main(["width", str(tmp_path / "w.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab width: error: ") and err.count("\n") == 1 and fragment in err
    assert list(tmp_path.iterdir()) == [tmp_path / "w.toml"]


def test_a_run_says_what_it_will_do_and_where_before_it_starts(tiny, tmp_path, capsys, monkeypatch):
    out, seen = tmp_path / "out", []
    monkeypatch.setattr(W, "search_cell", lambda *a: seen.append(capsys.readouterr().out) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception, match="stop"):
        main(["width", str(tiny), "--set", "seeds=[0]", "--out", str(out)])
    assert seen[0].startswith(f"width sweep 'tiny' -> {out / W.RESULTS}: 3 widths [8, 16, 32] x 1 seeds x 3 inits")
    assert "= 9 cells, 0 already done, 9 to search on cpu" in seen[0]
