"""The experiment schema: frozen dataclasses for one run (``RunConfig``) and for a sweep (``SweepConfig``).

A new config field goes here, with a commented default and its check in ``__post_init__``; if it changes only how
fast a run trains, or may differ between runs trained together in one pack, say so with its role (:data:`EXECUTION`,
:data:`PER_RUN`) in the field's metadata: run ids (``grid.py``) and packing (``run/pack.py``) read the roles, so no
other list needs editing. A field added after stores existed is marked ``added`` (:func:`added`): run ids leave it
out while it holds its default, so every store made before it keeps its ids. Files and overrides (``toml.py``) and
grids (``grid.py``) all build these through ``typecheck.from_dict``.

``RunConfig``'s sections default to their defaults, so a TOML file may omit any table. ``SweepConfig.grid`` holds the
*checked* values in JSON form (``train.lr = [1, 2]`` becomes ``(1.0, 2.0)``), so axes in the store and in run ids are
what the runs really used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loralab.config import FrozenMap, LoraConfig
from loralab.inits import get_scheme

__all__ = [
    "EXECUTION",
    "ON_DIVERGENCE",
    "PER_RUN",
    "DataConfig",
    "ModelConfig",
    "ResourcesConfig",
    "RunConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "added",
    "added_fields",
    "fields_with_role",
    "require",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "nf4", "fp4")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXECUTORS = ("local", "ray")
ON_DIVERGENCE = ("stop", "continue")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
WANDB_MODES = ("offline", "online")


EXECUTION = "execution"  # changes how fast a run trains or what it keeps on disk, not what it computes: left out
#                           of run ids
PER_RUN = "per_run"  # may differ between runs trained together in one pack (one shared frozen base)

# The library's LoraConfig carries no lab metadata: its fields' roles are declared here.
LORA_ROLES = {
    "init": PER_RUN,
    "alpha": PER_RUN,
    "init_kwargs": PER_RUN,
    "init_pattern": PER_RUN,
    "alpha_pattern": PER_RUN,
}
LORA_ADDED = ("exclude", "layers_to_transform", "layers_pattern", "modules_to_save")  # after the first stores


def _role(role: str, added: bool = False) -> dict[str, Any]:
    return {"role": role, "added": added}


def added() -> dict[str, Any]:
    """Metadata of a field added after stores existed: left out of run ids while it holds its default."""
    return {"added": True}


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: every config check, here and in the width sweep's configs."""
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # "smollm2-135m" = the offline default; else a HF hub id or a local directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 ; auto = bfloat16 on cuda, float32 otherwise
    #                              (float16 trains without loss scaling: prefer bfloat16)
    cache_dir: str = ""  # "" -> $LORALAB_CACHE or ~/.cache/loralab
    # none | nf4 | fp4: the frozen base's linear layers in 4 bits (bitsandbytes, `pip install loralab[bnb]`; QLoRA),
    # double-quantized, computing in `dtype`; nf4 is Unsloth's default. A base of its own: never packed with a float one
    quantize: str = field(default="none", metadata=added())

    def __post_init__(self):
        require(bool(self.name), "ModelConfig.name is empty: use 'smollm2-135m', a hub id or a local directory")
        require(self.dtype in DTYPES, f"ModelConfig.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        require(
            self.quantize in QUANTIZE,
            f"ModelConfig.quantize must be one of {', '.join(QUANTIZE)}; got {self.quantize!r} "
            "(nf4 is QLoRA's and Unsloth's 4-bit base)",
        )


@dataclass(frozen=True)
class DataConfig:
    source: str = "chitchat"  # "chitchat" (offline) | "HuggingFaceH4/no_robots" | .jsonl/.parquet file or dir
    seq_len: int = 256  # packed chunk length in tokens
    eval_fraction: float = 0.05  # used when the source has no test split
    max_train_chunks: int = 0  # 0 = all
    max_eval_chunks: int = 0  # the old single eval set (no val/test split): 0 = all held-out chunks
    split_seed: int = 0  # seeds the train/eval split when the source has none, and the val/test draw
    cache_dir: str = ""  # "" -> $LORALAB_CACHE or ~/.cache/loralab
    # Held-out chunks for a comparison (docs/evaluation.md): val (selects learning rates) and test (reports), disjoint,
    # drawn once from the held-out pool, the same for every run on this data. 0 and 0 = the old single eval set.
    val_chunks: int = field(default=0, metadata=added())
    test_chunks: int = field(default=0, metadata=added())
    # periodic evals during training (curves, divergence checks) use the first curve_chunks val chunks; 0 = all
    curve_chunks: int = field(default=0, metadata=added())
    joiner: str = field(default="\n", metadata=added())  # between a conversation's "Role: content" messages

    def __post_init__(self):
        require(bool(self.source), "DataConfig.source is empty: use 'chitchat', a hub dataset id or a file path")
        require(
            self.seq_len >= 2,
            f"DataConfig.seq_len must be >= 2 (an input and its next token); got {self.seq_len}; try 256",
        )
        require(
            0.0 < self.eval_fraction < 1.0,
            f"DataConfig.eval_fraction must be in (0, 1); got {self.eval_fraction!r}; try 0.05",
        )
        for name in ("max_train_chunks", "max_eval_chunks", "val_chunks", "test_chunks", "curve_chunks"):
            value = getattr(self, name)
            require(value >= 0, f"DataConfig.{name} must be >= 0; got {value}")
        split = self.val_chunks > 0 or self.test_chunks > 0
        require(
            not split or (self.val_chunks > 0 and self.test_chunks > 0),
            f"DataConfig: val_chunks={self.val_chunks} and test_chunks={self.test_chunks}: set both (e.g. 256 "
            "and 256: learning rates are chosen on val and reported on test), or neither",
        )
        require(
            not (split and self.max_eval_chunks),
            f"DataConfig: max_eval_chunks={self.max_eval_chunks} sizes the "
            "old single eval set, val_chunks/test_chunks replace it: set max_eval_chunks = 0",
        )
        require(
            self.curve_chunks <= self.val_chunks or not split,
            f"DataConfig.curve_chunks={self.curve_chunks} is more than val_chunks={self.val_chunks}: the curves "
            "are evaluated on val chunks; lower it (0 = all val chunks)",
        )
        require(
            split or not self.curve_chunks,
            f"DataConfig.curve_chunks={self.curve_chunks} needs val_chunks and "
            "test_chunks (without them every eval uses the whole eval set): set them, or curve_chunks = 0",
        )
        require(
            bool(self.joiner),
            'DataConfig.joiner is empty: messages would run together; use "\\n" '
            "(the lab's default) or \"\\n\\n\" (the published study's)",
        )

    @property
    def split(self) -> bool:
        """Whether evaluation has a val/test split (else the old single eval set)."""
        return self.val_chunks > 0


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=1e-3, metadata=_role(PER_RUN))  # peak learning rate (AdamW), reached after warmup
    epochs: float = 1.0  # passes over the train chunks; fractions allowed
    max_steps: int = 0  # optimizer steps; 0 = from epochs
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # fraction of steps warming up linearly, then linear decay to 0
    warmup_ratio: float = field(default=0.1, metadata=_role(PER_RUN))
    weight_decay: float = field(default=0.01, metadata=_role(PER_RUN))  # AdamW's decoupled weight decay
    grad_clip: float = field(default=1.0, metadata=_role(PER_RUN))  # max global grad norm; 0 = off
    eval_every: int = 10  # optimizer steps
    seed: int = field(default=0, metadata=_role(PER_RUN))  # adapter init, dropout and batch order
    device: str = "auto"  # auto | cpu | cuda | mps
    # loss > factor * initial loss (or NaN/inf) -> diverged; ln(vocab) caps a blow-up
    diverge_factor: float = field(default=2.0, metadata=_role(PER_RUN))
    # torch.compile the backbone: faster steps after minutes of compiling; long runs only
    compile: bool = field(default=False, metadata=_role(EXECUTION))
    # keep the trained adapter in <run dir>/adapter/ (PEFT format); false for huge sweeps: results only
    save_adapter: bool = field(default=True, metadata=_role(EXECUTION))
    # after divergence: "stop" the run there (its final loss is measured then), or "continue" to the last step as the
    # published study did (its final loss is the blown-up one); either way the run's status is "diverged"
    on_divergence: str = field(default="stop", metadata=_role(PER_RUN, added=True))
    # sequences per eval forward; 0 = batch_size. Larger is faster on a CPU (fewer passes over the weights)
    eval_batch_size: int = field(default=0, metadata=_role(EXECUTION))

    def __post_init__(self):
        require(
            self.lr > 0 and math.isfinite(self.lr),
            f"TrainConfig.lr must be a positive number; got {self.lr!r}; try 1e-4 to 1e-3",
        )
        require(self.max_steps >= 0, f"TrainConfig.max_steps must be >= 0 (0 = from epochs); got {self.max_steps}")
        require(self.epochs >= 0, f"TrainConfig.epochs must be >= 0; got {self.epochs!r}")
        require(
            self.epochs > 0 or self.max_steps > 0,
            f"TrainConfig: epochs={self.epochs!r} and max_steps=0 "
            "train nothing: set epochs > 0 (e.g. 1.0) or max_steps > 0",
        )
        for name, value in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_every", self.eval_every),
        ]:
            require(value >= 1, f"TrainConfig.{name} must be >= 1; got {value}")
        require(
            0.0 <= self.warmup_ratio < 1.0,
            f"TrainConfig.warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}; try 0.1",
        )
        for name, value in [("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip)]:
            require(value >= 0, f"TrainConfig.{name} must be >= 0 (0 = off); got {value!r}")
        require(
            self.diverge_factor > 1,
            f"TrainConfig.diverge_factor must be > 1 (a loss above factor x the "
            f"initial loss is divergence); got {self.diverge_factor!r}; try 2.0",
        )
        require(self.device in DEVICES, f"TrainConfig.device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        require(
            self.on_divergence in ON_DIVERGENCE,
            f"TrainConfig.on_divergence must be one of {', '.join(ON_DIVERGENCE)}; got {self.on_divergence!r}",
        )
        require(
            self.eval_batch_size >= 0,
            f"TrainConfig.eval_batch_size must be >= 0 (0 = batch_size); got {self.eval_batch_size}",
        )


@dataclass(frozen=True)
class RunConfig:
    """One training run, fully resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # the library's own: rank, alpha, init, targets, ...
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        require(
            self.model.quantize == "none" or not self.rewrites_base,
            f"lora.init / lora.init_pattern use {', '.join(self._base_rewriters())}, which rewrites the base weight: "
            f"a 4-bit base (model.quantize = {self.model.quantize!r}) would round the rewrite away (loralab refuses "
            'it); use an init that leaves the base alone (e.g. "standard"), or model.quantize = "none"',
        )

    def _base_rewriters(self) -> list[str]:
        return sorted(i for i in {self.lora.init, *self.lora.init_pattern.values()} if get_scheme(i).modifies_base)

    @property
    def rewrites_base(self) -> bool:
        """Whether an init of this run (``lora.init`` or one in ``init_pattern``) rewrites the base weight."""
        return bool(self._base_rewriters())


@dataclass(frozen=True)
class ResourcesConfig:
    """What each run (or pack of runs) asks a distributed executor for; the local executor ignores it."""

    cpus: float = 1.0  # CPU cores per task
    gpus: float = 0.0  # GPUs per task; a fraction shares one GPU between tasks
    max_retries: int = 2  # a task whose worker dies is retried this often, then recorded as failed

    def __post_init__(self):
        require(self.cpus > 0, f"resources.cpus must be > 0; got {self.cpus!r}; try 1")
        require(self.gpus >= 0, f"resources.gpus must be >= 0; got {self.gpus!r}; try 0 (CPU) or 1")
        require(self.max_retries >= 0, f"resources.max_retries must be >= 0; got {self.max_retries!r}; try 2")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a sweep's runs are also logged (``lab/tracking.py``, docs/tracking.md): a window onto the store.

    A sweep-level table, not part of any ``RunConfig``: switching a tracker on or off changes no run id, no pack and
    no manifest, so a store resumes with it either way.
    """

    backend: str = "none"  # none | tensorboard | wandb | mlflow (each an extra: pip install 'loralab[wandb]')
    project: str = ""  # W&B project / MLflow experiment / TensorBoard folder; "" = the sweep's name
    dir: str = ""  # the trackers' local files; "" = <out_dir>/tracking
    wandb_mode: str = "offline"  # offline: files only, no account or network (`wandb sync` uploads later) | online
    uri: str = ""  # MLflow tracking URI; "" = a file store in dir (no server), else e.g. http://host:5000

    def __post_init__(self):
        require(
            self.backend in TRACKERS,
            f"tracking.backend must be one of {', '.join(TRACKERS)}; got {self.backend!r}",
        )
        require(
            self.wandb_mode in WANDB_MODES,
            f"tracking.wandb_mode must be one of {', '.join(WANDB_MODES)}; got {self.wandb_mode!r}",
        )


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs: ``base`` with each combination of the ``grid`` axes' values (see :func:`expand`)."""

    name: str  # shown in reports and recorded in sweep.json
    out_dir: str  # where the store goes, e.g. "runs/quick"
    base: RunConfig = field(default_factory=RunConfig)
    grid: Mapping[str, tuple] = field(default_factory=dict)  # "lora.init" -> values; first axis outermost
    executor: str = "local"  # local | ray
    pack: int = 0  # runs trained together in one process on one shared base; 0 = auto, 1 = off
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # also log the runs to W&B, MLflow, ...

    def __post_init__(self):
        require(bool(self.name), 'SweepConfig.name is empty: set name = "..." at the top of the file')
        require(bool(self.out_dir), 'SweepConfig.out_dir is empty: set out_dir = "runs/<name>"')
        require(self.executor in EXECUTORS, f"SweepConfig.executor must be one of {EXECUTORS}; got {self.executor!r}")
        require(self.pack >= 0, f"SweepConfig.pack must be >= 0 (0 = auto, 1 = one run at a time); got {self.pack}")
        object.__setattr__(self, "grid", FrozenMap({k: tuple(v) for k, v in self.grid.items()}))


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}


def fields_with_role(role: str) -> list[tuple[str, str]]:
    """``[(section, field), ...]`` of ``RunConfig`` whose declared role is ``role``."""
    out = [("lora", name) for name, r in LORA_ROLES.items() if r == role]
    for section, cls in _SECTIONS.items():
        out += [(section, f.name) for f in dataclasses.fields(cls) if f.metadata.get("role") == role]
    return out


def added_fields() -> list[tuple[str, str, Any]]:
    """``[(section, field, default), ...]`` of the fields added after stores existed (see the module docstring)."""
    out = []
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("added") or (cls is LoraConfig and f.name in LORA_ADDED):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                out.append((section, f.name, default))
    return out
