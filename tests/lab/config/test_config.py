"""The lab's config: one type-checked path from TOML / overrides / grid points to frozen dataclasses; stable run ids."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import LoraConfig
from loralab.lab.config.grid import expand, plan_runs, run_id
from loralab.lab.config.schema import (
    EXECUTION,
    DataConfig,
    ModelConfig,
    RunConfig,
    SweepConfig,
    TrainConfig,
    fields_with_role,
)
from loralab.lab.config.toml import load_sweep, parse_sweep
from loralab.lab.config.typecheck import ConfigError, from_dict, to_dict

EXAMPLE = Path(__file__).resolve().parents[3] / "configs" / "example.toml"
SAFE_ID = re.compile(r"^[A-Za-z0-9._+-]+-[0-9a-f]{8}$")


def sweep_dict(**extra) -> dict:
    """A minimal valid sweep as TOML would give it."""
    return {"name": "t", "out_dir": "runs/t", **extra}


# ---------------------------------------------------------------- strategies

_names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
_floats = dict(allow_nan=False, allow_infinity=False)
_lora_init = st.one_of(st.just(("standard", {})), st.just(("reversed", {})),
                       st.floats(1e-4, 1.0, **_floats).map(lambda s: ("gaussian", {"std": s})))


@st.composite
def run_configs(draw) -> RunConfig:
    init, kwargs = draw(_lora_init)
    lora = LoraConfig(
        rank=draw(st.integers(1, 64)), alpha=draw(st.floats(0.1, 128, **_floats)), init=init, init_kwargs=kwargs,
        targets=draw(st.one_of(st.lists(_names, min_size=1, max_size=3).map(tuple), st.just(r".*\.(q|v)_proj"))),
        dropout=draw(st.floats(0.0, 0.9, **_floats)), rslora=draw(st.booleans()),
        rank_pattern=draw(st.dictionaries(_names, st.integers(1, 16), max_size=2)),
        alpha_pattern=draw(st.dictionaries(_names, st.floats(0.5, 64, **_floats), max_size=2)),
        init_pattern=draw(st.dictionaries(_names, st.sampled_from(["standard", "reversed"]), max_size=2)))
    model = ModelConfig(name=draw(_names), dtype=draw(st.sampled_from(["auto", "float32", "bfloat16", "float16"])),
                        cache_dir=draw(st.text(max_size=6)))
    data = DataConfig(source=draw(_names), seq_len=draw(st.integers(2, 4096)),
                      eval_fraction=draw(st.floats(0.001, 0.999, **_floats)), max_train_chunks=draw(st.integers(0, 99)),
                      max_eval_chunks=draw(st.integers(0, 99)), split_seed=draw(st.integers(0, 2**31)),
                      joiner=draw(st.sampled_from(["\n", "\n\n"])))
    train = TrainConfig(
        lr=draw(st.floats(1e-6, 1.0, **_floats)), epochs=draw(st.floats(0.1, 10, **_floats)),
        max_steps=draw(st.integers(0, 999)), batch_size=draw(st.integers(1, 64)), grad_accum=draw(st.integers(1, 8)),
        warmup_ratio=draw(st.floats(0.0, 0.99, **_floats)), weight_decay=draw(st.floats(0.0, 1.0, **_floats)),
        grad_clip=draw(st.floats(0.0, 10.0, **_floats)), eval_every=draw(st.integers(1, 100)),
        seed=draw(st.integers(0, 2**31)), device=draw(st.sampled_from(["auto", "cpu", "cuda", "mps"])),
        diverge_factor=draw(st.floats(1.01, 100, **_floats)), on_divergence=draw(st.sampled_from(["stop", "continue"])))
    return RunConfig(model=model, data=data, lora=lora, train=train)


# ---------------------------------------------------------------- to_dict / from_dict


@settings(max_examples=60, deadline=None)
@given(run_configs())
def test_round_trip_through_json(run):
    data = to_dict(run)
    text = json.dumps(data, allow_nan=False)   # strictly JSON-able: no tuples, no mapping proxies
    assert from_dict(RunConfig, json.loads(text)) == run
    assert from_dict(RunConfig, data) == run


def test_to_dict_has_no_tuples_or_proxies():
    data = to_dict(RunConfig(lora=LoraConfig(targets=("q_proj",), rank_pattern={"q_proj": 4})))
    assert data["lora"]["targets"] == ["q_proj"] and type(data["lora"]["rank_pattern"]) is dict


def test_missing_tables_take_defaults():
    assert from_dict(RunConfig, {}) == RunConfig()
    assert from_dict(RunConfig, {"train": {"lr": 0.5}}).train == TrainConfig(lr=0.5)


@pytest.mark.parametrize("data, key, valid", [
    ({"modle": {}}, "'modle'", "model, data, lora, train"),
    ({"train": {"lrr": 1e-3}}, "'train.lrr'", "lr, epochs, max_steps"),
    ({"lora": {"rnk": 8}}, "'lora.rnk'", "rank, alpha, init, targets"),
    ({"model": {"dtyp": "auto"}}, "'model.dtyp'", "name, dtype, cache_dir"),
    ({"data": {"seqlen": 8}}, "'data.seqlen'", "source, seq_len"),
])
def test_unknown_key_names_full_key_and_lists_valid_keys(data, key, valid):
    with pytest.raises(ConfigError, match="unknown key") as e:
        from_dict(RunConfig, data)
    assert key in str(e.value) and valid in str(e.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        from_dict(RunConfig, {"lora": {"rnak": 8}})


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "lr", "fast", "expected float"),
    ("train", "batch_size", 2.5, "expected int"),
    ("train", "batch_size", "4", "expected int"),
    ("model", "name", 3, "expected str"),
    ("lora", "rslora", "yes", "expected bool"),
    ("lora", "targets", 5, "expected tuple[str, ...] | str"),
    ("lora", "targets", ["q_proj", 5], "expected tuple[str, ...] | str"),
    ("lora", "init_kwargs", ["std"], "expected Mapping[str, Any]"),
    ("data", "seq_len", None, "expected int"),
])
def test_wrong_type_names_key_type_and_value(section, key, value, expected):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg and expected in msg and repr(value) in msg


def test_wrong_type_inside_a_mapping_names_the_entry():
    with pytest.raises(ConfigError, match=r"lora\.rank_pattern\['q_proj'\]: expected int, got 'four'"):
        from_dict(RunConfig, {"lora": {"rank_pattern": {"q_proj": "four"}}})


def test_a_section_that_is_not_a_table():
    with pytest.raises(ConfigError, match="lora: expected a table of LoraConfig fields, got 5"):
        from_dict(RunConfig, {"lora": 5})


@pytest.mark.parametrize("section, key", [("train", "batch_size"), ("lora", "rank"), ("train", "lr"),
                                          ("lora", "alpha")])
def test_bool_is_not_a_number(section, key):
    with pytest.raises(ConfigError, match="not true/false"):
        from_dict(RunConfig, {section: {key: True}})


def test_int_is_not_a_bool_but_is_a_float():
    with pytest.raises(ConfigError, match="expected bool"):
        from_dict(RunConfig, {"lora": {"rslora": 1}})
    train = from_dict(RunConfig, {"train": {"lr": 1, "epochs": 2}}).train
    assert type(train.lr) is float and type(train.epochs) is float and train.lr == 1.0


def test_targets_accepts_list_or_regex_string():
    assert from_dict(RunConfig, {"lora": {"targets": ["q_proj"]}}).lora.targets == ("q_proj",)
    assert from_dict(RunConfig, {"lora": {"targets": r".*\.q_proj"}}).lora.targets == r".*\.q_proj"


# ---------------------------------------------------------------- validation in __post_init__


@pytest.mark.parametrize("section, key, value, field", [
    ("train", "lr", 0.0, "TrainConfig.lr"), ("train", "lr", -1e-3, "TrainConfig.lr"),
    ("train", "lr", float("inf"), "TrainConfig.lr"), ("train", "batch_size", 0, "TrainConfig.batch_size"),
    ("train", "grad_accum", 0, "TrainConfig.grad_accum"), ("train", "warmup_ratio", 1.0, "TrainConfig.warmup_ratio"),
    ("train", "warmup_ratio", -0.1, "TrainConfig.warmup_ratio"), ("train", "eval_every", 0, "TrainConfig.eval_every"),
    ("train", "diverge_factor", 1.0, "TrainConfig.diverge_factor"), ("train", "device", "tpu", "TrainConfig.device"),
    ("train", "epochs", -1.0, "TrainConfig.epochs"), ("train", "max_steps", -1, "TrainConfig.max_steps"),
    ("data", "seq_len", 1, "DataConfig.seq_len"), ("data", "eval_fraction", 0.0, "DataConfig.eval_fraction"),
    ("data", "eval_fraction", 1.0, "DataConfig.eval_fraction"), ("model", "dtype", "fp8", "ModelConfig.dtype"),
    ("model", "name", "", "ModelConfig.name"), ("data", "max_train_chunks", -1, "DataConfig.max_train_chunks"),
])
def test_nonsense_values_name_the_section_and_field(section, key, value, field):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {section: {key: value}})
    assert str(e.value).startswith(f"{section}: {field}")


def test_training_nothing_is_an_error_but_steps_alone_are_fine():
    with pytest.raises(ConfigError, match="train nothing"):
        from_dict(RunConfig, {"train": {"epochs": 0, "max_steps": 0}})
    assert from_dict(RunConfig, {"train": {"epochs": 0, "max_steps": 5}}).train.max_steps == 5


@pytest.mark.parametrize("lora, fragment", [
    ({"init": "no-such-scheme"}, "LoraConfig.init"),
    ({"init": "orthogonal-eye", "rank": 7}, "even rank"),
    ({"rank": 0}, "LoraConfig.rank"),
    ({"init": "standard", "init_kwargs": {"std": 0.1}}, "not options of 'standard'"),
])
def test_library_errors_surface_with_section_prefix(lora, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {"lora": lora})
    assert str(e.value).startswith("lora: ") and fragment in str(e.value)


def test_configs_are_frozen():
    run = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train = TrainConfig()  # type: ignore[misc]
    sweep = parse_sweep(sweep_dict(grid={"train.lr": [1e-3]}))
    with pytest.raises(TypeError):
        sweep.grid["train.lr"] = (1.0,)  # type: ignore[index]


# ---------------------------------------------------------------- sweeps and overrides


def test_sweep_needs_name_and_out_dir_and_a_known_executor():
    with pytest.raises(ConfigError, match="missing key 'name'"):
        parse_sweep({"out_dir": "x"})
    with pytest.raises(ConfigError, match="SweepConfig.executor"):
        parse_sweep(sweep_dict(executor="slurm"))
    assert parse_sweep(sweep_dict(executor="ray")).executor == "ray"


def test_unknown_top_level_key_lists_tables_and_grid():
    with pytest.raises(ConfigError, match="did you mean 'train'") as e:
        parse_sweep(sweep_dict(trian={"lr": 1e-3}))
    assert "name, out_dir, executor, pack, resources, tracking, model, data, lora, train, grid" in str(e.value)


def test_parse_does_not_mutate_its_input():
    data = sweep_dict(lora={"rank": 4}, grid={"train": {"lr": [1e-3]}})
    before = json.dumps(data)
    parse_sweep(data, ["lora.rank=8", "grid.train.seed=[0,1]"])
    assert json.dumps(data) == before


@pytest.mark.parametrize("override, path, expected", [
    ("lora.init=reversed", ("lora", "init"), "reversed"),            # bare string: no quotes needed
    ('lora.init="reversed"', ("lora", "init"), "reversed"),
    ("train.lr=1e-3", ("train", "lr"), 1e-3),
    ("train.lr = 2", ("train", "lr"), 2.0),                          # int -> float, spaces around '='
    ("train.batch_size=16", ("train", "batch_size"), 16),
    ('lora.targets=["q_proj","v_proj"]', ("lora", "targets"), ("q_proj", "v_proj")),
    ("lora.targets=.*proj", ("lora", "targets"), ".*proj"),
    ("lora.rslora=true", ("lora", "rslora"), True),
    ("lora.rank_pattern.q_proj=4", ("lora", "rank_pattern"), {"q_proj": 4}),
    ("data.source=HuggingFaceH4/no_robots", ("data", "source"), "HuggingFaceH4/no_robots"),
])
def test_override_sets_a_run_field(override, path, expected):
    sweep = parse_sweep(sweep_dict(), [override])
    assert getattr(getattr(sweep.base, path[0]), path[1]) == expected


def test_overrides_of_top_level_fields():
    sweep = parse_sweep(sweep_dict(), ["name=my sweep", "out_dir=runs/other", 'name="2024"'])
    assert sweep.name == "2024" and sweep.out_dir == "runs/other"


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-9, 10.0, **_floats))
def test_float_override_is_exact(lr):
    assert parse_sweep(sweep_dict(), [f"train.lr={lr!r}"]).base.train.lr == lr


def test_grid_override_adds_or_replaces_an_axis_in_place():
    data = sweep_dict(grid={"lora.init": ["standard", "reversed"], "train": {"lr": [1e-4, 1e-3]}})
    sweep = parse_sweep(data, ["grid.lora.init=[\"reversed\"]", "grid.train.seed=[0,1,2]"])
    assert list(sweep.grid) == ["lora.init", "train.lr", "train.seed"]
    assert sweep.grid["lora.init"] == ("reversed",) and len(expand(sweep)) == 1 * 2 * 3


@pytest.mark.parametrize("override, fragment", [
    ("train.lr", "is not key=value"),
    ("=3", "is not key=value"),
    ("trian.lr=1", "valid keys of the top level: name, out_dir, executor, pack, resources, tracking, model, data, "
                   "lora, train"),
    ("train.lrr=1", "valid keys of [train]: lr, epochs"),
    ("lora={rank=4}", "whole table"),
    ("train.lr.x=1", "not a table"),
    ("train.epochs=fast", "train.epochs: expected float, got 'fast'"),
    ("train.seed=1.5", "train.seed: expected int"),
    ("grid.train.lr=1e-3", "must be a non-empty list"),
    ("grid.train.lrr=[1]", "valid keys of [train]"),
    ("train.lr=1e-3", "override the axis instead: grid.train.lr"),   # the file's grid varies train.lr
])
def test_bad_override(override, fragment):
    with pytest.raises(ConfigError) as e:
        parse_sweep(sweep_dict(grid={"train.lr": [1e-4]}), [override])
    assert fragment in str(e.value)


def test_not_key_value_override_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys: name, out_dir, executor, pack, resources\.<field>, tracking\."):
        parse_sweep(sweep_dict(), ["oops"])


# ---------------------------------------------------------------- grids


def test_nested_and_dotted_grid_forms_are_equivalent():
    dotted = parse_sweep(sweep_dict(grid={"lora.init": ["standard", "reversed"], "train.lr": [1e-4, 1e-3]}))
    nested = parse_sweep(sweep_dict(grid={"lora": {"init": ["standard", "reversed"]}, "train": {"lr": [1e-4, 1e-3]}}))
    assert dotted == nested


def test_grid_expands_first_axis_outermost():
    sweep = parse_sweep(sweep_dict(grid={"lora.init": ["standard", "reversed"], "train": {"lr": [1e-4, 1e-3],
                                                                                          "seed": [0, 1, 2]}}))
    points = expand(sweep)
    assert len(points) == 2 * 2 * 3
    assert [tuple(a.values()) for a, _ in points[:4]] == [("standard", 1e-4, 0), ("standard", 1e-4, 1),
                                                          ("standard", 1e-4, 2), ("standard", 1e-3, 0)]
    assert points[6][0] == {"lora.init": "reversed", "train.lr": 1e-4, "train.seed": 0}
    for axes, run in points:   # each point is the base with exactly its axes changed
        assert (run.lora.init, run.train.lr, run.train.seed) == tuple(axes.values())
        assert dataclasses.replace(run.train, lr=sweep.base.train.lr, seed=sweep.base.train.seed) == sweep.base.train


def test_no_grid_is_one_run_of_the_base():
    sweep = parse_sweep(sweep_dict(train={"lr": 0.01}))
    assert expand(sweep) == [({}, sweep.base)]
    assert run_id(sweep.base, {}).startswith("run-")


def test_grid_values_are_checked_and_normalized():
    sweep = parse_sweep(sweep_dict(grid={"train.lr": [1, 2], "lora.targets": [["q_proj"], "all"]}))
    assert sweep.grid["train.lr"] == (1.0, 2.0) and all(type(v) is float for v in sweep.grid["train.lr"])
    assert sweep.grid["lora.targets"] == (["q_proj"], "all")   # JSON form, as written to the store
    assert [run.lora.targets for _, run in expand(sweep)][:2] == [("q_proj",), "all"]


def test_grid_axis_into_a_mapping_field():
    sweep = parse_sweep(sweep_dict(lora={"init": "gaussian"}, grid={"lora.init_kwargs.std": [0.01, 0.02]}))
    assert [run.lora.init_kwargs["std"] for _, run in expand(sweep)] == [0.01, 0.02]


@pytest.mark.parametrize("grid, fragment", [
    ({"train.lrr": [1]}, "grid axis 'train.lrr': unknown key 'train.lrr'"),
    ({"train.lrr": [1]}, "valid keys of [train]: lr, epochs, max_steps"),
    ({"lorra.init": ["standard"]}, "valid keys of the top level: model, data, lora, train"),
    ({"train.lr": []}, "non-empty list"),
    ({"train.lr": 1e-3}, "non-empty list"),
    ({"train": {"lr": "1e-3"}}, "non-empty list"),
    ({"lora": ["x"]}, "names a whole table"),
    ({"train.lr": [1e-3, "fast"]}, "grid.train.lr[1]: expected float, got 'fast'"),
    ({"train.lr": [1e-3, 0.001]}, "lists a value twice"),
    ({"train.lr": [1e-3], "train": {"lr": [1e-4]}}, "given twice"),
    ({"train.lr": [1e-3, -1.0]}, "grid point {'train.lr': -1.0}: train: TrainConfig.lr"),
    ({"lora.rank": [8, 7], "lora.init": ["standard", "orthogonal-eye"]},
     "grid point {'lora.rank': 7, 'lora.init': 'orthogonal-eye'}: lora: "),
])
def test_bad_grid_fails_at_parse_time(grid, fragment):
    with pytest.raises(ConfigError) as e:
        parse_sweep(sweep_dict(grid=grid))
    assert fragment in str(e.value)


def test_overlapping_axes_giving_the_same_runs_are_rejected():
    grid = {"lora.init_kwargs": [{"std": 0.1}, {"std": 0.2}], "lora.init_kwargs.std": [0.3]}   # later axis wins
    with pytest.raises(ConfigError, match="same run config"):
        parse_sweep(sweep_dict(lora={"init": "gaussian"}, grid=grid))


# ---------------------------------------------------------------- run ids

# one other valid value per field: every field must change the id
_CHANGES = {
    "model": {"name": "other", "dtype": "bfloat16", "cache_dir": "/c", "quantize": "nf4"},
    "data": {"source": "x.jsonl", "seq_len": 128, "eval_fraction": 0.1, "max_train_chunks": 5,
             "max_eval_chunks": 5, "split_seed": 1, "cache_dir": "/c", "val_chunks": 9, "test_chunks": 9,
             "curve_chunks": 2, "joiner": "\n\n"},
    "lora": {"rank": 4, "alpha": 8.0, "init": "reversed", "targets": ("q_proj",), "dropout": 0.1, "rslora": True,
             "init_kwargs": {"std": 0.1}, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 4.0},
             "init_pattern": {"q_proj": "reversed"}, "exclude": ("v_proj",), "layers_to_transform": (0,),
             "modules_to_save": ("lm_head",)},
    "train": {"lr": 1e-4, "epochs": 2.0, "max_steps": 5, "batch_size": 8, "grad_accum": 2, "warmup_ratio": 0.0,
              "weight_decay": 0.0, "grad_clip": 0.0, "eval_every": 5, "seed": 1, "device": "cpu",
              "diverge_factor": 2.5, "on_divergence": "continue"},
}
_BASE = RunConfig(lora=LoraConfig(init="gaussian"))   # so both init and init_kwargs can change alone
# val/test sizes are set together, and curve_chunks needs them: those change from a base with a split
_SPLIT = dataclasses.replace(_BASE, data=DataConfig(val_chunks=8, test_chunks=8))
_BASE_FOR = {("data", "val_chunks"): _SPLIT, ("data", "test_chunks"): _SPLIT, ("data", "curve_chunks"): _SPLIT}


_TOGETHER = {"layers_pattern": {"layers_to_transform": (0,)}}   # a field only valid beside another: changed with it


def test_every_field_is_covered_by_the_change_table():
    covered = {s: set(c) | {f for sec, f in fields_with_role(EXECUTION) if sec == s} for s, c in _CHANGES.items()}
    covered["lora"] |= set(_TOGETHER)
    assert covered == {s: set(to_dict(_BASE)[s]) for s in to_dict(_BASE)}


def test_a_4bit_base_is_another_run_and_a_float_base_keeps_its_id():
    """``model.quantize`` came after stores existed: at "none" the id is the one computed without the field."""
    d = to_dict(_BASE)
    d["model"].pop("quantize")
    assert from_dict(RunConfig, d) == _BASE and run_id(_BASE, {}) == run_id(from_dict(RunConfig, d), {})
    ids = {q: run_id(dataclasses.replace(_BASE, model=ModelConfig(quantize=q)), {}) for q in ("none", "nf4", "fp4")}
    assert ids["none"] == run_id(_BASE, {}) and len(set(ids.values())) == 3
    with pytest.raises(ConfigError, match=r"ModelConfig.quantize must be one of none, nf4, fp4; got 'int4'"):
        parse_sweep(sweep_dict(model={"quantize": "int4"}))


def test_a_field_added_later_changes_the_id_only_away_from_its_default():
    """``layers_pattern`` needs ``layers_to_transform``: the pair differs from ``layers_to_transform`` alone."""
    alone = dataclasses.replace(_BASE, lora=dataclasses.replace(_BASE.lora, layers_to_transform=(0,)))
    pair = dataclasses.replace(_BASE, lora=dataclasses.replace(alone.lora, layers_pattern="layers"))
    assert len({run_id(_BASE, {}), run_id(alone, {}), run_id(pair, {})}) == 3


@pytest.mark.parametrize("section, key", fields_with_role(EXECUTION))
def test_execution_only_fields_keep_the_id(section, key):
    flipped = not getattr(getattr(_BASE, section), key)   # compile = true, save_adapter = false
    changed = dataclasses.replace(_BASE, **{section: dataclasses.replace(getattr(_BASE, section), **{key: flipped})})
    assert changed != _BASE and to_dict(changed)[section][key] is flipped   # recorded in config.json all the same
    assert run_id(changed, {}) == run_id(_BASE, {})


@pytest.mark.parametrize("section, key, value", [(s, k, v) for s, c in _CHANGES.items() for k, v in c.items()])
def test_any_field_change_changes_the_id(section, key, value):
    base = _BASE_FOR.get((section, key), _BASE)
    changed = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: value})})
    assert changed != base
    assert run_id(changed, {}) != run_id(base, {})


def test_a_split_changes_the_id_of_the_old_single_eval_set():
    assert run_id(_SPLIT, {}) != run_id(_BASE, {})


@settings(max_examples=40, deadline=None)
@given(run_configs())
def test_id_depends_only_on_the_config(run):
    axes = {"lora.init": run.lora.init, "train.lr": run.train.lr}
    rebuilt = from_dict(RunConfig, json.loads(json.dumps(to_dict(run))))
    assert run_id(rebuilt, axes) == run_id(run, axes)
    assert SAFE_ID.match(run_id(run, axes))


def test_id_prefix_is_readable_and_safe():
    run = RunConfig()
    assert run_id(run, {"lora.init": "standard", "train.lr": 0.001, "train.seed": 0}).startswith(
        "standard_lr0.001_seed0-")
    weird = {"lora.targets": r".*\.(q|v)_proj", "lora.init_kwargs": {"std": 0.1}, "lora.rslora": False,
             "data.source": "../../etc/passwd", "model.cache_dir": "a b/c"}
    rid = run_id(run, weird)
    assert SAFE_ID.match(rid) and "/" not in rid and not rid.startswith(".") and len(rid) <= 60 + 9


def test_example_ids_are_distinct_and_safe():
    ids = [run_id(run, axes) for axes, run in expand(load_sweep(EXAMPLE))]
    assert len(set(ids)) == len(ids) == 12
    assert all(SAFE_ID.match(i) for i in ids)


def test_ids_are_stable_across_processes():
    code = ("from loralab.lab.config.toml import load_sweep; from loralab.lab.config.grid import expand, run_id; "
            "import sys; "
            "print('\\n'.join(run_id(r, a) for a, r in expand(load_sweep(sys.argv[1]))))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}   # str/dict hashing differs from this process's
    out = subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.split() == [run_id(r, a) for a, r in expand(load_sweep(EXAMPLE))]


# ---------------------------------------------------------------- files


def test_load_example():
    sweep = load_sweep(EXAMPLE)
    assert isinstance(sweep, SweepConfig) and sweep.name == "example"
    assert list(sweep.grid) == ["lora.init", "train.lr", "train.seed"]
    assert sweep.base.lora.targets == ("q_proj", "v_proj") and sweep.base.data.seq_len == 128
    assert load_sweep(EXAMPLE, ["grid.train.seed=[0]", "data.seq_len=64"]).base.data.seq_len == 64


def test_broken_toml_names_path_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nout_dir = \n')
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_sweep(tmp_path / "nope.toml")


def test_config_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nout_dir = "y"\n[lora]\nrank = 7\ninit = "orthogonal-eye"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: lora: .*even rank"):
        load_sweep(path)


def test_pack_and_resources_are_sweep_settings():
    sweep = parse_sweep(sweep_dict(pack=3, resources={"gpus": 0.5}), ["resources.max_retries=4"])
    assert (sweep.pack, sweep.resources.gpus, sweep.resources.max_retries, sweep.resources.cpus) == (3, 0.5, 4, 1.0)
    with pytest.raises(ConfigError, match="SweepConfig.pack must be >= 0"):
        parse_sweep(sweep_dict(pack=-1))
    with pytest.raises(ConfigError, match="resources.gpus must be >= 0"):
        parse_sweep(sweep_dict(resources={"gpus": -1}))
    with pytest.raises(ConfigError, match="did you mean 'gpus'"):
        parse_sweep(sweep_dict(resources={"gpu": 1}))


def test_tracking_is_a_sweep_setting_from_the_file_or_set():
    sweep = parse_sweep(sweep_dict(tracking={"backend": "mlflow", "project": "p"}), ["tracking.wandb_mode=online"])
    t = sweep.tracking
    assert (t.backend, t.project, t.dir, t.wandb_mode, t.uri) == ("mlflow", "p", "", "online", "")
    assert parse_sweep(sweep_dict()).tracking.backend == "none"
    assert parse_sweep(sweep_dict(), ["tracking.backend=wandb"]).tracking.backend == "wandb"   # no quotes needed
    with pytest.raises(ConfigError, match="tracking.backend must be one of none, tensorboard, wandb, mlflow; got"):
        parse_sweep(sweep_dict(), ["tracking.backend=comet"])
    with pytest.raises(ConfigError, match="tracking.wandb_mode must be one of offline, online"):
        parse_sweep(sweep_dict(tracking={"wandb_mode": "cloud"}))
    with pytest.raises(ConfigError, match="did you mean 'backend'"):
        parse_sweep(sweep_dict(tracking={"backnd": "wandb"}))


@pytest.mark.parametrize("tracking", [{"backend": "wandb"}, {"backend": "mlflow", "dir": "/tmp/x", "project": "q"}])
def test_tracking_changes_no_run_id_and_no_manifest(tracking):
    """A tracker is a window onto the store: switching it on resumes the same store with the same runs."""
    from loralab.lab.sweep.plan import SweepPlan

    grid = {"lora.init": ["standard", "reversed"], "train.lr": [1e-4, 1e-3]}
    off = SweepPlan.build(parse_sweep(sweep_dict(grid=grid)))
    on = SweepPlan.build(parse_sweep(sweep_dict(grid=grid, tracking=tracking)))
    assert on.run_ids == off.run_ids and on.manifest() == off.manifest()


def test_the_committed_study_store_resumes_with_todays_run_ids():
    """Run ids are the store's keys: the committed SmolLM2 study's manifest lists exactly the ids that the config it
    recorded (base and grid in sweep.json, written before fields such as data.val_chunks existed) plans today."""
    root = Path(__file__).resolve().parents[3]
    manifest = json.loads((root / "docs/results/study-smollm2/store/sweep.json").read_text())
    sweep = parse_sweep({"name": manifest["name"], "out_dir": "runs/x", **manifest["base"], "grid": manifest["grid"]})
    assert [r.run_id for r in plan_runs(sweep)] == manifest["run_ids"]


@pytest.mark.parametrize("command", ["sweep", "width"])
@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b'name = "x"\nout_dir = "\xff\xfe"\n'],
                         ids=["binary", "one bad byte"])
def test_a_config_that_is_not_utf8_text_is_named(tmp_path, capsys, command, content):
    """A binary or mis-encoded config file (issue 22, item 10): exit 2, one line naming the file."""
    from loralab.cli import main

    path = tmp_path / "config.toml"
    path.write_bytes(content)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loralab {command}: error: {path}: cannot load the config") and err.count("\n") == 1


# ---------------------------------------------------------------- an axis over a whole table

VARIANTS = [{"init": "standard"}, {"init": "random-both"}, {"init": "random-both", "init_kwargs": {"dist": "xavier"}}]


def test_a_table_axis_sets_its_fields_together_and_keeps_the_rest():
    """Inits with their own options next to inits without: a product of two axes could not hold them."""
    sweep = parse_sweep(sweep_dict(lora={"rank": 4, "alpha": 8.0}, grid={"lora": VARIANTS, "train.seed": [0, 1]}))
    runs = plan_runs(sweep)
    assert [(r.run.lora.init, dict(r.run.lora.init_kwargs), r.run.train.seed) for r in runs] == [
        (v["init"], v.get("init_kwargs", {}), s) for v in VARIANTS for s in (0, 1)]
    assert all((r.run.lora.rank, r.run.lora.alpha) == (4, 8.0) for r in runs)
    assert [r.run_id.split("-")[0] for r in runs[::2]] == ["standard_seed0", "random", "random"]
    assert runs[4].run_id.startswith("random-both+xavier_seed0-") and len({r.run_id for r in runs}) == 6
    # the same run through a plain axis has the same config, so the same hash
    plain = plan_runs(parse_sweep(sweep_dict(lora={"rank": 4, "alpha": 8.0}, grid={"lora.init": ["random-both"]})))
    assert plain[0].run_id[-8:] == runs[2].run_id[-8:]


@pytest.mark.parametrize("grid, fragment", [
    ({"lora": [{"init": "standard", "init_kwargs": {"dist": "xavier"}}]}, "are not options of 'standard'"),
    ({"lora": [{"inti": "standard"}]}, "grid axis 'lora': unknown key 'lora.inti'"),
    ({"lora": [{}]}, "names a whole table: list tables of its fields"),
    ({"lora": [{"rank": "eight"}]}, "grid.lora[0].rank: expected int"),
    ({"lora": [{"init": "standard"}, {"init": "standard"}]}, "lists a value twice"),
])
def test_a_bad_table_axis_is_named(grid, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_sweep(sweep_dict(grid=grid))


def test_an_override_conflicts_only_with_the_fields_a_table_axis_sets():
    data = sweep_dict(grid={"lora": VARIANTS})
    assert parse_sweep(data, ["lora.rank=2"]).base.lora.rank == 2
    for key in ("lora.init=reversed", "lora.init_kwargs.dist=xavier"):
        with pytest.raises(ConfigError, match="sets what grid axis 'lora' varies"):
            parse_sweep(data, [key])


def test_report_labels_a_table_axis_by_its_fields():
    from loralab.lab.report.cells import fmt_value

    assert [fmt_value(v) for v in VARIANTS] == ["standard", "random-both", "random-both, dist=xavier"]
    assert fmt_value({"rank": 8, "alpha": 16.0}) == "rank=8, alpha=16"
