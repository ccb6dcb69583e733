"""Experiment config: frozen dataclasses for one run and for a sweep; TOML files; dotted overrides; grids (run ids: runid.py).

Every way in — a TOML file, a ``--set key=value`` override, a grid point — is first a plain dict and then goes
through :func:`from_dict` (``typecheck.py``), so all of them are checked, and fail, the same way, naming the key.

Decisions beyond the shared spec:
    * ``RunConfig``'s sections default to their defaults, so a TOML file may omit any table.
    * ``SweepConfig.grid`` holds the *checked* values in JSON form (``train.lr = [1, 2]`` becomes ``(1.0, 2.0)``,
      a tuple of targets becomes a list), so axes in the store and in run ids are what the runs really used.
    * An override of a field that a grid axis also sets is an error: the axis would silently win in every run.
    * A grid axis or override may name one key inside a mapping field, e.g. ``lora.init_kwargs.std``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from loralab.config import FrozenMap
from typing import Any, Mapping, Sequence

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the same parser, as a package
    import tomli as tomllib

from loralab.config import LoraConfig

from .runid import EXECUTION_ONLY, run_id
from .typecheck import ConfigError, convert, field_type, fields_of, from_dict, set_path, to_dict, type_name, unknown_key

__all__ = ["EXECUTION_ONLY", "ConfigError", "DataConfig", "ModelConfig", "RunConfig", "SweepConfig", "TrainConfig", "expand",
           "from_dict", "load_sweep", "parse_sweep", "run_id", "to_dict"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXECUTORS = ("local", "ray")


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: every config check, here and in the width sweep's configs."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"   # "smollm2-135m" = the offline default; else a HF hub id or a local directory
    dtype: str = "auto"          # auto | float32 | bfloat16 | float16 ; auto = bfloat16 on cuda, float32 otherwise
    #                              (float16 trains without loss scaling: prefer bfloat16)
    cache_dir: str = ""          # "" -> $LORALAB_CACHE or ~/.cache/loralab

    def __post_init__(self):
        require(bool(self.name), "ModelConfig.name is empty: use 'smollm2-135m', a hub id or a local directory")
        require(self.dtype in DTYPES, f"ModelConfig.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "chitchat"     # "chitchat" (offline) | "HuggingFaceH4/no_robots" | .jsonl/.parquet file or dir
    seq_len: int = 256           # packed chunk length in tokens
    eval_fraction: float = 0.05  # used when the source has no test split
    max_train_chunks: int = 0    # 0 = all
    max_eval_chunks: int = 0     # 0 = all
    split_seed: int = 0          # seeds the train/eval split when the source has none
    cache_dir: str = ""          # "" -> $LORALAB_CACHE or ~/.cache/loralab

    def __post_init__(self):
        require(bool(self.source), "DataConfig.source is empty: use 'chitchat', a hub dataset id or a file path")
        require(self.seq_len >= 2, f"DataConfig.seq_len must be >= 2 (an input and its next token); got "
                                    f"{self.seq_len}; try 256")
        require(0.0 < self.eval_fraction < 1.0, f"DataConfig.eval_fraction must be in (0, 1); got "
                                                 f"{self.eval_fraction!r}; try 0.05")
        for name, value in [("max_train_chunks", self.max_train_chunks), ("max_eval_chunks", self.max_eval_chunks)]:
            require(value >= 0, f"DataConfig.{name} must be >= 0 (0 = all); got {value}")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3             # peak learning rate (AdamW), reached after warmup
    epochs: float = 1.0          # passes over the train chunks; fractions allowed
    max_steps: int = 0           # optimizer steps; 0 = from epochs
    batch_size: int = 4          # sequences per micro-batch
    grad_accum: int = 1          # micro-batches per optimizer step
    warmup_ratio: float = 0.1    # fraction of steps warming up linearly, then linear decay to 0
    weight_decay: float = 0.01   # AdamW's decoupled weight decay
    grad_clip: float = 1.0       # max global grad norm; 0 = off
    eval_every: int = 10         # optimizer steps
    seed: int = 0                # adapter init, dropout and batch order
    device: str = "auto"         # auto | cpu | cuda | mps
    diverge_factor: float = 2.0  # loss > factor * initial loss (or NaN/inf) -> diverged; ln(vocab) caps a blow-up
    compile: bool = False        # torch.compile the backbone: faster steps after minutes of compiling; long runs only

    def __post_init__(self):
        require(self.lr > 0 and math.isfinite(self.lr), f"TrainConfig.lr must be a positive number; got "
                                                         f"{self.lr!r}; try 1e-4 to 1e-3")
        require(self.max_steps >= 0, f"TrainConfig.max_steps must be >= 0 (0 = from epochs); got {self.max_steps}")
        require(self.epochs >= 0, f"TrainConfig.epochs must be >= 0; got {self.epochs!r}")
        require(self.epochs > 0 or self.max_steps > 0, f"TrainConfig: epochs={self.epochs!r} and max_steps=0 "
                                                         "train nothing: set epochs > 0 (e.g. 1.0) or max_steps > 0")
        for name, value in [("batch_size", self.batch_size), ("grad_accum", self.grad_accum),
                            ("eval_every", self.eval_every)]:
            require(value >= 1, f"TrainConfig.{name} must be >= 1; got {value}")
        require(0.0 <= self.warmup_ratio < 1.0, f"TrainConfig.warmup_ratio must be in [0, 1); got "
                                                 f"{self.warmup_ratio!r}; try 0.1")
        for name, value in [("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip)]:
            require(value >= 0, f"TrainConfig.{name} must be >= 0 (0 = off); got {value!r}")
        require(self.diverge_factor > 1, f"TrainConfig.diverge_factor must be > 1 (a loss above factor x the "
                                          f"initial loss is divergence); got {self.diverge_factor!r}; try 2.0")
        require(self.device in DEVICES, f"TrainConfig.device must be one of {', '.join(DEVICES)}; got {self.device!r}")


@dataclass(frozen=True)
class RunConfig:
    """One training run, fully resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)   # the library's own: rank, alpha, init, targets, ...
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class ResourcesConfig:
    """What each run (or pack of runs) asks a distributed executor for; the local executor ignores it."""

    cpus: float = 1.0            # CPU cores per task
    gpus: float = 0.0            # GPUs per task; a fraction shares one GPU between tasks
    max_retries: int = 2         # a task whose worker dies is retried this often, then recorded as failed

    def __post_init__(self):
        require(self.cpus > 0, f"resources.cpus must be > 0; got {self.cpus!r}; try 1")
        require(self.gpus >= 0, f"resources.gpus must be >= 0; got {self.gpus!r}; try 0 (CPU) or 1")
        require(self.max_retries >= 0, f"resources.max_retries must be >= 0; got {self.max_retries!r}; try 2")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs: ``base`` with each combination of the ``grid`` axes' values (see :func:`expand`)."""

    name: str                    # shown in reports and recorded in sweep.json
    out_dir: str                 # where the store goes, e.g. "runs/quick"
    base: RunConfig = field(default_factory=RunConfig)
    grid: Mapping[str, tuple] = field(default_factory=dict)   # "lora.init" -> values; first axis outermost
    executor: str = "local"      # local | ray
    pack: int = 0                # runs trained together in one process on one shared base; 0 = auto, 1 = off
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        require(bool(self.name), "SweepConfig.name is empty: set name = \"...\" at the top of the file")
        require(bool(self.out_dir), "SweepConfig.out_dir is empty: set out_dir = \"runs/<name>\"")
        require(self.executor in EXECUTORS, f"SweepConfig.executor must be one of {EXECUTORS}; got {self.executor!r}")
        require(self.pack >= 0, f"SweepConfig.pack must be >= 0 (0 = auto, 1 = one run at a time); got {self.pack}")
        object.__setattr__(self, "grid", FrozenMap({k: tuple(v) for k, v in self.grid.items()}))


_TOP = {"name": str, "out_dir": str, "executor": str, "pack": int, "resources": ResourcesConfig}          # top-level TOML keys besides the tables and [grid]
_TOP_KEYS = {**_TOP, **fields_of(RunConfig)}                    # what a non-grid override may name


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep TOML file (see :func:`parse_sweep`); every error is a ``ConfigError`` naming ``path``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:   # the decode error says "(at line 3, column 7)"
        raise ConfigError(f"{path}: cannot load the sweep config: {e}") from e
    try:
        return parse_sweep(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def parse_sweep(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> SweepConfig:
    """Build and fully check a sweep from TOML's dict and ``key.sub=value`` overrides (applied first, to the dict).

    Every grid point is built, so a bad value in any point fails here (``--dry-run``), not hours into a sweep.

    Raises:
        ConfigError: naming the key (or override, or grid point) and how to fix it.
    """
    raw = copy.deepcopy(dict(data))
    grid = _flatten_grid(raw.pop("grid", {}))
    set_keys = []
    for item in overrides:
        key, value = _parse_override(item)
        if key.startswith("grid."):
            grid[key[len("grid."):]] = value   # replaces an axis in place, or adds one after the others
        else:
            set_path(raw, key, value)
            set_keys.append(key)
    for key, axis in itertools.product(set_keys, grid):
        if key == axis or key.startswith(axis + ".") or axis.startswith(key + "."):
            raise ConfigError(f"override {key!r} sets what grid axis {axis!r} varies, so it would be ignored; "
                              f"override the axis instead: grid.{axis}=[...]")
    top = {key: raw.pop(key) for key in _TOP if key in raw}
    for key in raw:
        if key not in _TOP_KEYS:
            raise unknown_key("", key, [*_TOP_KEYS, "grid"])
    base = from_dict(RunConfig, raw)   # TOML keeps the run's tables at the top, so errors say "lora.rank"
    sweep = from_dict(SweepConfig, {**top, "base": base, "grid": _check_grid(grid)})
    configs = [json.dumps(to_dict(run), sort_keys=True) for _, run in expand(sweep)]
    if len(set(configs)) != len(configs):
        raise ConfigError("two grid points give the same run config; remove the repeated axis or value")
    return sweep


def _parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``: the value as TOML, else as a bare string."""
    key, eq, text = item.partition("=")
    key, text = key.strip(), text.strip()
    valid = ", ".join([*(f"{k}.<field>" if dataclasses.is_dataclass(t) else k for k, t in _TOP_KEYS.items()),
                       "grid.<section>.<field>"])
    if not eq or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3, lora.init=reversed, "
                          f"grid.train.lr=[1e-4,1e-3]); valid keys: {valid}")
    try:
        parsed = tomllib.loads(f"v = {text}")
        value = parsed["v"] if parsed.keys() == {"v"} else text
    except tomllib.TOMLDecodeError:
        value = text   # `lora.init=reversed` needs no quotes
    try:
        if not key.startswith("grid.") and dataclasses.is_dataclass(field_type(_TOP_KEYS, key)):
            raise ConfigError(f"{key!r} is a whole table; set one of its fields, e.g. {key}.<field>=...")
    except ConfigError as e:
        raise ConfigError(f"override {item!r}: {e}") from e
    return key, value


def _flatten_grid(table: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": [..]}, "lora.init": [..]}`` -> ``{"train.lr": [..], "lora.init": [..]}``, in order."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"grid{'.' + prefix if prefix else ''} must be a table of axes, e.g. "
                          f"[grid] \"train.lr\" = [1e-4, 1e-3]; got {table!r}")
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        for axis, values in (_flatten_grid(value, dotted) if isinstance(value, dict) else {dotted: value}).items():
            if axis in flat:
                raise ConfigError(f"grid axis {axis!r} is given twice; keep one")
            flat[axis] = values
    return flat


def _check_grid(grid: Mapping[str, Any]) -> dict[str, tuple]:
    """Each axis names a run field and lists values of its type; returns the values checked, in JSON form."""
    checked = {}
    for axis, values in grid.items():
        try:
            tp = field_type(RunConfig, axis)
        except ConfigError as e:
            raise ConfigError(f"grid axis {axis!r}: {e}") from e
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"grid axis {axis!r} names a whole table; name one of its fields, e.g. "
                              f"{axis}.{next(iter(fields_of(tp)))}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid axis {axis!r} must be a non-empty list of {type_name(tp)} values, e.g. "
                              f"\"{axis}\" = [a, b]; got {values!r}")
        checked[axis] = tuple(to_dict(convert(tp, v, f"grid.{axis}[{i}]")) for i, v in enumerate(values))
        seen = [json.dumps(v, sort_keys=True) for v in checked[axis]]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid axis {axis!r} lists a value twice: {list(checked[axis])}")
    return checked


def expand(sweep: SweepConfig) -> list[tuple[dict[str, Any], RunConfig]]:
    """All grid points, first axis outermost: ``[({"lora.init": "standard", "train.lr": 1e-4}, run), ...]``.

    Each point is ``sweep.base`` as a dict with the axes' values set, built by :func:`from_dict` like any file.

    Raises:
        ConfigError: a point is not a valid run (e.g. an orthogonal init with an odd rank), naming the point.
    """
    base = to_dict(sweep.base)
    points = []
    for values in itertools.product(*sweep.grid.values()):
        axes = dict(zip(sweep.grid, values))
        data = copy.deepcopy(base)
        for axis, value in axes.items():
            set_path(data, axis, copy.deepcopy(value))
        try:
            points.append((axes, from_dict(RunConfig, data)))
        except ConfigError as e:
            raise ConfigError(f"grid point {axes}: {e}") from e
    return points
