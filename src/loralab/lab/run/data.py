"""Chat datasets -> packed token chunks for causal-LM training, as the study prepares them.

A conversation's text is one ``"Role: content"`` per message, joined with ``joiner`` (``"\n"``; the published study
used ``"\n\n"``); texts are tokenized in one batch, EOS follows each, and the stream is cut into ``seq_len`` chunks
(remainder dropped; labels = inputs, the trainer shifts). Without a test split, a seeded share of whole
*conversations* is held out before packing, so none straddles train and eval. Packed tensors are cached in
``<cache>/data/<key>.pt``, keyed by all they depend on (source files' paths, sizes, mtimes; the tokenizer's vocabulary
and a probe's ids; ``seq_len``; the joiner; split parameters); a corrupt file is rebuilt.

Evaluation (docs/evaluation.md): the held-out chunks are a *pool*. With ``val_chunks``/``test_chunks`` the final eval
uses two disjoint draws from it, made once per dataset from a seed that depends only on ``split_seed``: validation
takes the first ``val_chunks`` of one seeded permutation of the pool and test the last ``test_chunks``, so every run
on this data sees the same chunks (paired comparisons), and a larger eval contains a smaller one's val and test sets.
Chunk ids are positions in the pool; the pool's digest tells whether two runs' ids name the same chunks.

Decisions beyond the shared spec:
    * Tokenized with ``add_special_tokens=False``: EOS is the only separator (no BOS inside every chunk).
    * ``max_train_chunks``/``max_eval_chunks`` (and the val/test draw) take a seeded random subset of chunks, not the
      first ones, so a quick run still sees the whole dataset's variety; applied after the cache, so changing them
      reuses it.
    * Chitchat's 3,150 one-turn conversations (one person talking, no reply) are kept as one user message.
    * Directories (and hub datasets in the local HF cache) are searched recursively for ``train*``/``test*`` files,
      as the hub lays them out (``data/train-00000-of-00001.parquet``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loralab.inits import stable_seed
from loralab.io import atomic_write

from ..config.schema import DataConfig
from ..runtime import cache_root
from .models import is_hub_id

__all__ = [
    "DataError",
    "PackedData",
    "check_data",
    "chitchat_conversation",
    "format_conversation",
    "held_out_ids",
    "iterate_batches",
    "load_data",
]

ROLES = ("user", "assistant", "system")
_EXTS = (".jsonl", ".parquet")
_PROBE = "User: Hello there! How's it going?\nAssistant: Fine, thanks. ünïcödé 12345 \t end"
_CACHE_VERSION = 1
_FORMAT = '{"messages": [{"role": "user", "content": "..."}, ...]}'
_SOURCES = (
    "'chitchat', a .jsonl/.parquet file, a directory with train*/test* files, or a hub dataset id "
    "(e.g. HuggingFaceH4/no_robots) in the local HF cache"
)


class DataError(ValueError):
    """The data cannot be read or packed as configured; the message says what to do about it."""


@dataclass(frozen=True)
class PackedData:
    """Token chunks for training and evaluation (labels = inputs).

    ``eval`` holds the final eval's chunks split after split (``"val"`` then ``"test"``, or the single ``"eval"``
    split of a config without val/test sizes); ``splits`` names them with their ids in the held-out pool, in row
    order. Periodic evals during training use ``eval[:curve_rows]`` (a prefix of the validation chunks).
    """

    train: Tensor  # (N, seq_len) int64
    eval: Tensor  # (M, seq_len) int64
    info: dict  # {train,eval}_{conversations,tokens,chunks}, source, eval_split, seq_len, cache, cache_hit
    splits: Mapping[str, Tensor]  # split name -> (n,) int64 ids into the held-out pool; the n sum to M
    curve_rows: int  # rows of ``eval`` used by periodic evals
    pool_digest: str  # identifies the held-out pool the ids index

    def rows(self) -> dict[str, slice]:
        """Split name -> its rows of ``eval``."""
        out, start = {}, 0
        for name, ids in self.splits.items():
            out[name] = slice(start, start + len(ids))
            start += len(ids)
        return out


class _Source(NamedTuple):
    kind: str  # "chitchat" | "files"
    train: tuple[Path, ...]
    test: tuple[Path, ...]  # empty: hold out eval_fraction of the train conversations
    label: str


def format_conversation(messages: list[dict], joiner: str = "\n") -> str:
    """The study's text for one conversation: ``"Role: content"`` per message, joined with ``joiner``."""
    return joiner.join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def chitchat_conversation(record: dict) -> list[dict]:
    """A chitchat record -> messages. Turns alternate speakers (checked over the whole dataset), so even turns are
    the user's and odd ones the assistant's; a turn's texts are joined with newlines."""
    return [
        {"role": ("user", "assistant")[i % 2], "content": "\n".join(u["text"] for u in turn)}
        for i, turn in enumerate(record["messages"])
    ]


def check_data(cfg: DataConfig) -> str:
    """Validate ``cfg.source`` without tokenizing (``--dry-run``, and the sweep before training): a one-line
    description, or DataError with a fix. Files are read and parsed (a bad byte or line, named with its line, would
    fail every run); the chitchat package's own data is not."""
    src = _resolve(cfg.source)
    if any(p.suffix == ".parquet" for p in src.train + src.test) and importlib.util.find_spec("pyarrow") is None:
        raise DataError(f"data.source={cfg.source!r} has parquet files, which need pyarrow: pip install pyarrow")
    held = "its test split" if src.test else f"{cfg.eval_fraction * 100:g}% of the conversations held out"
    sizes = f"{cfg.val_chunks} val + {cfg.test_chunks} test chunks of " if cfg.split else ""
    read = f" ({len(_read(src, src.train + src.test)):,} conversations read)" if src.kind == "files" else ""
    return f"{src.label}{read}; eval on {sizes}{held}; packed into {cfg.seq_len}-token chunks"


def load_data(cfg: DataConfig, tokenizer) -> PackedData:
    """Read, split, tokenize and pack ``cfg.source`` (cached); DataError says what is wrong and how to fix it."""
    src = _resolve(cfg.source)
    path = _cache_path(cfg, src, tokenizer)
    blob = _load_cache(path, cfg.seq_len)
    hit = blob is not None
    if blob is None:
        blob = _build(cfg, src, tokenizer)
        _save_cache(path, blob)
    train = blob["train"].long()
    train = train[_subset(len(train), cfg.max_train_chunks, cfg.split_seed, "train")]
    pool = blob["eval"]
    splits = held_out_ids(len(pool), cfg)
    ids = torch.cat(list(splits.values()))
    curve = (cfg.curve_chunks or cfg.val_chunks) if cfg.split else len(ids)
    info = {**blob["info"], "train_chunks": len(train), "eval_chunks": len(ids), "cache": str(path), "cache_hit": hit}
    return PackedData(
        train=train,
        eval=pool[ids].long(),
        info=info,
        splits=splits,
        curve_rows=curve,
        pool_digest=hashlib.sha256(pool.to(torch.int32).numpy().tobytes()).hexdigest()[:16],
    )


def held_out_ids(n_pool: int, cfg: DataConfig) -> dict[str, Tensor]:
    """The final eval's chunks as ids into a held-out pool of ``n_pool`` chunks: ``{"val": ..., "test": ...}``
    (disjoint; see the module docstring), or ``{"eval": ...}`` (the old single set, ``max_eval_chunks`` of them).

    Raises:
        DataError: the pool holds fewer chunks than ``val_chunks + test_chunks``.
    """
    if not cfg.split:
        return {"eval": _subset(n_pool, cfg.max_eval_chunks, cfg.split_seed, "eval")}
    if cfg.val_chunks + cfg.test_chunks > n_pool:
        raise DataError(
            f"data.val_chunks={cfg.val_chunks} + data.test_chunks={cfg.test_chunks} is more than the "
            f"{n_pool} held-out chunks of {cfg.seq_len} tokens: lower them, or hold out more (a larger "
            "data.eval_fraction, a shorter data.seq_len)"
        )
    g = torch.Generator().manual_seed(stable_seed("held-out", cfg.split_seed))
    perm = torch.randperm(n_pool, generator=g)
    return {"val": perm[: cfg.val_chunks], "test": perm[n_pool - cfg.test_chunks :]}


def iterate_batches(chunks: Tensor, batch_size: int, *, seed: int, epoch: int) -> Iterator[Tensor]:
    """``(batch_size, seq_len)`` batches in an order fixed by ``(seed, epoch)`` (own generator, not the global RNG),
    last partial batch dropped. Raises at the call, not lazily, when ``chunks`` cannot fill one batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(chunks) < batch_size:
        raise DataError(
            f"{len(chunks)} chunks cannot fill one batch of {batch_size}: lower train.batch_size or "
            "data.seq_len, or raise data.max_train_chunks"
        )
    g = torch.Generator().manual_seed(stable_seed("batches", seed, epoch))
    order = torch.randperm(len(chunks), generator=g)
    return (chunks[order[i : i + batch_size]] for i in range(0, len(chunks) - batch_size + 1, batch_size))


def _resolve(source: str) -> _Source:
    if source == "chitchat":
        spec = importlib.util.find_spec("chitchat_dataset")
        if spec is None or spec.origin is None:
            raise DataError("data.source='chitchat' needs its package: pip install chitchat-dataset==0.9.0")
        path = Path(spec.origin).parent / "dataset.json"
        return _Source("chitchat", (path,), (), "chitchat (chitchat-dataset package, 7,168 conversations)")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in _EXTS:
            raise DataError(
                f"data.source={source!r} has extension {path.suffix or '(none)'!r}, which loralab "
                f"cannot read; use {_SOURCES}"
            )
        return _Source("files", (path,), (), f"file {path}")
    if path.is_dir():
        return _dir_source(path, f"directory {path}")
    if is_hub_id(source):
        return _dir_source(_hub_cached(source), f"hub dataset {source} (local HF cache)")
    raise DataError(f"data.source={source!r}: no such file or directory; use {_SOURCES}")


def _dir_source(path: Path, label: str) -> _Source:
    files = sorted(p for p in path.rglob("*") if p.suffix in _EXTS and p.is_file())
    train, test = (tuple(p for p in files if p.name.startswith(prefix)) for prefix in ("train", "test"))
    if not train:
        raise DataError(
            f"{label} holds no train*.jsonl or train*.parquet file; name the training files train* "
            "(and test files test*), or point data.source at one file"
        )
    return _Source("files", train, test, f"{label} ({len(train)} train, {len(test)} test files)")


def _hub_cached(repo_id: str) -> Path:
    """The snapshot directory of a hub dataset in the local HF cache; the hub itself is never contacted."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except OSError:  # LocalEntryNotFoundError is a FileNotFoundError
        raise DataError(
            f"data.source={repo_id!r}: not in the local HF cache, and the hub is not reachable from here. "
            f"Fix: where it is, run `hf download {repo_id} --repo-type dataset --local-dir DIR` (the "
            "train/test parquet files), copy DIR here and set data.source=DIR"
        ) from None


def _read(src: _Source, paths: tuple[Path, ...]) -> list[list[dict]]:
    if src.kind == "chitchat":
        import chitchat_dataset

        return [chitchat_conversation(record) for record in chitchat_dataset.Dataset().values()]
    read = {".jsonl": _read_jsonl, ".parquet": _read_parquet}
    return [conv for path in paths for conv in read[path.suffix](path)]


def _read_jsonl(path: Path) -> list[list[dict]]:
    convs = []
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is named with its line
        for n, raw in enumerate(f, 1):
            line = _utf8(raw, path, n)
            if not line.strip():
                continue
            try:
                convs.append(_messages(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e}); each line must be {_FORMAT}") from None
    return convs


def _utf8(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the "
            "file as UTF-8, or fix or remove that line"
        ) from None


def _read_parquet(path: Path) -> list[list[dict]]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    except Exception as e:  # pyarrow raises its own types (ArrowInvalid, ...) for a missing column or a bad file
        raise DataError(f"{path}: cannot read a 'messages' column from this parquet file: {e}") from e
    return [_messages({"messages": m}, f"{path} row {i}") for i, m in enumerate(rows)]


def _messages(record, where: str) -> list[dict]:
    msgs = record.get("messages") if isinstance(record, dict) else None
    if not (
        isinstance(msgs, list)
        and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)
    ):
        raise DataError(f"{where}: expected {_FORMAT} (role: {'/'.join(ROLES)}), got {str(record)[:200]}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _build(cfg: DataConfig, src: _Source, tokenizer) -> dict:
    convs = _read(src, src.train)
    if src.test:
        train, eval_, how = convs, _read(src, src.test), "test split"
    else:
        train, eval_ = _holdout(convs, cfg.eval_fraction, cfg.split_seed)
        how = f"{len(eval_)} of {len(convs)} conversations held out (split_seed={cfg.split_seed})"
    info = {"source": src.label, "eval_split": how, "seq_len": cfg.seq_len}
    blob: dict[str, Any] = {"version": _CACHE_VERSION}
    for name, split in (("train", train), ("eval", eval_)):
        chunks, n_tokens = _pack(split, tokenizer, cfg.seq_len, cfg.joiner)
        if len(chunks) == 0:
            raise DataError(
                f"the {name} split has {n_tokens:,} tokens in {len(split):,} conversations, fewer than "
                f"one chunk of data.seq_len={cfg.seq_len}: lower data.seq_len"
                + (" or raise data.eval_fraction" if name == "eval" and not src.test else "")
            )
        blob[name] = chunks.to(torch.int32)  # half the file; token ids fit
        info |= {f"{name}_conversations": len(split), f"{name}_tokens": n_tokens, f"{name}_chunks_all": len(chunks)}
    blob["info"] = info
    return blob


def _holdout(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Split whole conversations, keeping source order within each side."""
    n_eval = max(1, round(len(convs) * fraction))
    if n_eval >= len(convs):
        raise DataError(
            f"{len(convs)} conversations are too few to hold out eval_fraction={fraction:g} and keep "
            "some for training; add data or give the source a test split"
        )
    g = torch.Generator().manual_seed(stable_seed("holdout", seed))
    held = set(torch.randperm(len(convs), generator=g)[:n_eval].tolist())
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def _pack(convs: list, tokenizer, seq_len: int, joiner: str) -> tuple[Tensor, int]:
    """Tokenize in one batch (a fast tokenizer parallelises it), EOS after each conversation, cut into chunks.
    ``verbose=False``: the "longer than model_max_length" warning does not apply; we pack, not truncate."""
    texts = [format_conversation(c, joiner) for c in convs]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    stream = [t for seq in ids for t in (*seq, tokenizer.eos_token_id)]
    n_chunks = len(stream) // seq_len
    chunks = torch.tensor(stream[: n_chunks * seq_len], dtype=torch.int64).view(n_chunks, seq_len)  # (N, T)
    return chunks, len(stream)


def _subset(n: int, k: int, seed: int, split: str) -> Tensor:
    """Ids of a seeded random subset of ``k`` of ``n`` chunks, in stream order (all of them when ``k`` is 0)."""
    if k == 0 or k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(stable_seed("limit", split, seed))
    return torch.randperm(n, generator=g)[:k].sort().values


def _cache_path(cfg: DataConfig, src: _Source, tokenizer) -> Path:
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in src.train + src.test]
    key = {
        "version": _CACHE_VERSION,
        "kind": src.kind,
        "files": files,
        "tokenizer": _tokenizer_identity(tokenizer),
        "seq_len": cfg.seq_len,
    }
    if cfg.joiner != "\n":  # the default's key is left as it was, so existing caches stay valid
        key["joiner"] = cfg.joiner
    if not src.test:  # with a test split these do not change the data, so leave them out and share the cache
        key.update(eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root(cfg.cache_dir) / "data" / f"{digest}.pt"


def _tokenizer_identity(tokenizer) -> dict:
    """What the ids depend on: vocabulary, EOS, and a probe's ids (normalizers, pre-tokenizers); not
    ``name_or_path``, since the same tokenizer saved in two places gives the same ids."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "vocab": vocab,
        "probe": tokenizer(_PROBE, add_special_tokens=False)["input_ids"],
    }


def _load_cache(path: Path, seq_len: int) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if (
            blob["version"] == _CACHE_VERSION
            and all(blob[k].dim() == 2 and blob[k].shape[1] == seq_len for k in ("train", "eval"))
            and isinstance(blob["info"], dict)
        ):
            return blob
        why = "unexpected contents"
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a truncated or foreign file; all mean "rebuild"
        why = f"{type(e).__name__}: {e}"
    warnings.warn(f"data cache {path} is unreadable ({why}); rebuilding it", stacklevel=3)
    return None


def _save_cache(path: Path, blob: dict) -> None:
    """Atomic write: a crash leaves the old file or none, never half of one."""
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except OSError as e:  # a read-only or full cache costs speed, not correctness
        warnings.warn(f"cannot write the data cache {path}: {e}", stacklevel=3)
