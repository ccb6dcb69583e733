"""Trained adapters out of the lab: every finished run keeps one; choose a run, export it, re-evaluate it, try it.

**Saving** (:func:`save_run_adapter`) is part of finishing a run, in :func:`.sweep.local.run_pack`, which the local
and the Ray executors both use. Run ``k``'s own injected model (``Pack.models[k]``) goes through the library's
:func:`loralab.save_adapter` with ``portable=True`` (nothing changes for schemes that leave the base alone; pissa and
olora get the rank-2r form that loads on the unmodified base, which is the base a user and PEFT have) into
``<run dir>/adapter/``, atomically as a directory (:meth:`.store.RunStore.write_adapter`), *before* ``result.json``:
a run the sweep finished has both, and a crash in between leaves an unfinished run that the next sweep redoes.
``diverged`` runs keep their adapter too, marked: ``loralab_run.json`` beside PEFT's files names the run, its status
and its final eval loss, and travels with every export. A run whose adapter cannot be saved (a full disk, a layer
PEFT's format cannot represent) is recorded ``failed`` with the reason and with its losses, so the next sweep redoes
it rather than leaving a finished run without its adapter. ``train.save_adapter = false`` keeps results only.

**Using** one reads the run's ``config.json`` (its full ``RunConfig``) to load the base model and the data the run
used (:mod:`.run.models`, :mod:`.run.data`), and loads the adapter with :func:`loralab.load_adapter`:

* :func:`export`: the adapter directory as it is, or (``merged``) the model with the update merged in
  (:func:`loralab.unload`), written by ``save_pretrained`` with its tokenizer; either loads in PEFT / transformers.
* :func:`evaluate_run`: the eval loss on the run's own eval chunks, computed by the training loop's own
  :func:`.run.train.evaluate`, next to the stored one: the way to add metrics to old runs without retraining.
* :func:`generate`: greedy decoding of a prompt. ``fmt="chat"`` (the default) applies the tokenizer's chat template
  when it has one, as a user of an instruct model would; the lab trains on ``"User: ...\\nAssistant: ..."`` text
  (:func:`.run.data.format_conversation`), so ``fmt="train"`` prompts in that form (also the fallback without a
  template), and ``fmt="raw"`` passes the prompt as it is.

``--best`` is :func:`best_run`, one function, so the rule changes in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import loralab

from .config.grid import RunSpec
from .config.schema import RunConfig
from .config.typecheck import from_dict
from .runtime import check_out_dir, pick_device
from .store import CONFIG, MANIFEST, RESULT, CorruptFileError, RunResult, RunStore, SweepStore, atomic_write_json

__all__ = [
    "RUN_MARKER",
    "Evaluation",
    "best_run",
    "evaluate_run",
    "export",
    "find_run",
    "generate",
    "load_run_model",
    "prompt_text",
    "run_config",
    "save_run_adapter",
]

RUN_MARKER = "loralab_run.json"  # in an adapter directory: which run it is and how that run ended
FORMATS = ("chat", "train", "raw")
_DIVERGED = (
    "this run diverged (its loss blew up): the adapter is what training left when it stopped, kept as a "
    "record of the run, not a model to use"
)


# ---- saving, as part of finishing a run ----------------------------------------------------------------------------


def save_run_adapter(store: RunStore, spec: RunSpec, model: nn.Module, result: RunResult) -> RunResult:
    """Save the trained adapter of a run that just ended into ``store`` (before its result); returns the result to
    write: with ``adapter=True``, unchanged when ``train.save_adapter`` is off, or ``failed`` (losses kept) when the
    adapter could not be saved."""
    if not spec.run.train.save_adapter:
        return result
    marker: dict[str, Any] = {
        "run_id": spec.run_id,
        "status": result.status,
        "axes": dict(spec.axes),
        "final_eval_loss": result.final_eval_loss,
    }
    if result.status == "diverged":
        marker["warning"] = _DIVERGED

    def fill(tmp: Path) -> None:
        loralab.save_adapter(model, tmp, portable=True)
        atomic_write_json(tmp / RUN_MARKER, marker)

    try:
        store.write_adapter(fill)
    except Exception as e:  # noqa: BLE001 - an adapter that cannot be saved fails the run (redone next time), not the sweep
        error = f"saving the adapter failed: {type(e).__name__}: {e}".splitlines()[0]
        return dataclasses.replace(
            result,
            status="failed",
            adapter=False,
            traceback=traceback.format_exc(),
            error=f"{error} (fix the cause, or set train.save_adapter=false to keep results only)",
        )
    return dataclasses.replace(result, adapter=True)


# ---- choosing a run --------------------------------------------------------------------------------------------------


def best_run(store: SweepStore) -> str:
    """The run ``--best`` picks: the lowest final validation loss among the runs that finished ``ok``.

    With a val/test split that is the mean of the run's final losses on its validation chunks (``eval_chunks.npz``),
    never the test chunks the report scores the choice on; a run without a split (or without the file) is judged
    by its one eval set (``final_eval_loss``). Diverged, failed, unfinished and unreadable runs never count; a tie
    goes to the first run in manifest order.

    Raises:
        ValueError: no run finished ``ok`` with a finite loss.
    """
    best: tuple[float, str] | None = None
    for run_id in store.run_ids():
        run = store.run(run_id)
        try:
            result = run.result()
            chunks = run.eval_chunks()
        except CorruptFileError:
            continue
        if result is None or result.status != "ok":
            continue
        val = chunks.splits.get("val") if chunks is not None else None
        loss = float(np.mean(val.final)) if val is not None else result.final_eval_loss
        if loss is None or not math.isfinite(loss):
            continue
        if best is None or loss < best[0]:
            best = (loss, run_id)
    if best is None:
        raise ValueError(
            f"no run in {store.root} finished ok, so --best has nothing to choose from; name a run with "
            f"--run ID (`loralab report {store.root}` lists them)"
        )
    return best[1]


def find_run(root: str | os.PathLike, run_id: str | None = None, best: bool = False) -> RunStore:
    """The run that ``RUN_DIR [--run ID | --best]`` names.

    Args:
        root: a sweep's ``out_dir``, or one run's directory (then ``run_id`` and ``best`` are not given).
        run_id: a run id, or a prefix of exactly one (``standard_lr0.001_seed0``).
        best: choose by :func:`best_run`.

    Raises:
        ValueError: the directory or the run does not exist, or none was named; the message says what to give.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory: give a sweep's out_dir (e.g. runs/quick) or a run's directory")
    if not (path / MANIFEST).exists() and ((path / CONFIG).exists() or (path / RESULT).exists()):
        if run_id is not None or best:
            raise ValueError(
                f"{path} is one run's directory; --run and --best choose inside a sweep's out_dir: "
                f"give {path.parent.parent} instead, or leave them out"
            )
        return RunStore(path)
    store = SweepStore(path)
    ids = store.run_ids()
    if not ids:
        raise ValueError(f"{path} holds no runs (no sweep.json, no runs/): give a sweep's out_dir, e.g. runs/quick")
    if best:
        return store.run(best_run(store))
    if run_id is None:
        raise ValueError(f"say which run: --run ID or --best ({len(ids)} runs in {path}, e.g. {ids[0]})")
    if run_id in ids:
        return store.run(run_id)
    matches = [i for i in ids if i.startswith(run_id)]
    if len(matches) == 1:
        return store.run(matches[0])
    if matches:
        listed = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
        raise ValueError(f"--run {run_id!r} is the start of {len(matches)} run ids ({listed}); give more of the id")
    close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"its runs are e.g. {', '.join(ids[:3])}"
    raise ValueError(f"no run {run_id!r} in {path}; {hint}")


def run_config(run: RunStore) -> RunConfig:
    """The ``RunConfig`` the run was trained with, from its ``config.json``."""
    data = run.config()
    if data is None or not isinstance(data.get("config"), dict):
        raise ValueError(
            f"{run.root / CONFIG} is missing or holds no config, so the model and data of run "
            f"{run.run_id} are unknown; it is not a complete run (rerun its sweep)"
        )
    return from_dict(RunConfig, data["config"], where="config")


def adapter_of(run: RunStore) -> Path:
    """The finished run's adapter directory.

    Raises:
        ValueError: the run has none, saying why (unfinished, failed, trained with ``train.save_adapter=false``,
            adapter removed, run older than adapter saving) and what to do.
    """
    name = run.run_id
    result = run.result()  # CorruptFileError (a ValueError) names the file and the fix
    if result is None:
        state = "is unfinished (killed or still running)" if run.root.exists() else "has not been trained yet"
        raise ValueError(f"run {name} {state}, so it has no adapter: run (or rerun) its sweep to finish it")
    if result.status == "failed":
        raise ValueError(
            f"run {name} failed ({result.error}), so it has no adapter; fix the cause and rerun its "
            "sweep, which redoes failed runs"
        )
    if run.has_adapter():
        return run.adapter_dir
    redo = (
        f"to get one, move {run.root} aside and rerun the sweep with --set train.save_adapter=true (run ids do "
        "not change, so only this run trains again)"
    )
    if result.adapter:
        raise ValueError(
            f"run {name} saved its adapter, but {run.adapter_dir} is gone (committed example stores "
            f"leave adapters out); copy it back from the store it was trained in, or {redo}"
        )
    trained = ((run.config() or {}).get("config") or {}).get("train") or {}
    if trained.get("save_adapter") is False:
        raise ValueError(f"run {name} was trained with train.save_adapter=false, so no adapter was kept; {redo}")
    raise ValueError(f"run {name} finished before loralab saved adapters (its result.json records none); {redo}")


def describe(run: RunStore) -> str:
    """One line on the run: id, status and final eval loss, with a warning for a diverged run."""
    result = run.result()
    if result is None:
        return f"run {run.run_id}: unfinished"
    loss = "n/a" if result.final_eval_loss is None else f"{result.final_eval_loss:.4f}"
    line = f"run {run.run_id}: {result.status}, final eval loss {loss}"
    return line + (f"\nwarning: {_DIVERGED}" if result.status == "diverged" else "")


# ---- using a run's adapter -----------------------------------------------------------------------------------------


def load_run_model(run: RunStore, device: str = "cpu") -> tuple[Any, Any, RunConfig]:
    """The run's base model (a transformers causal LM, as its config loads it, on ``device``) with its trained
    adapter, frozen, in eval mode; its tokenizer; its config."""
    from .run.models import load_model

    adapter, cfg = adapter_of(run), run_config(run)
    model, tokenizer = load_model(cfg.model, pick_device(device, "--device"))
    loralab.load_adapter(model, adapter, seed=cfg.train.seed)
    model.requires_grad_(False)  # nothing trains here; a frozen lm_head also lets the fused loss apply
    return model.eval(), tokenizer, cfg


def _fresh_dir(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(destination, temp dir beside it)`` for an export that appears whole or not at all; never overwrites."""
    dest = check_out_dir(out, "--out")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"--out {dest} is not empty; give a new directory (an export never overwrites files)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest, Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))


def export(run: RunStore, out: str | os.PathLike, *, merged: bool = False) -> Path:
    """Write the run's adapter directory to ``out`` (PEFT format: ``PeftModel.from_pretrained(base, out)``), or with
    ``merged`` the base model with the update merged in plus its tokenizer (``AutoModelForCausalLM.from_pretrained``).

    The merged model is built on the CPU in the run's ``model.dtype`` (``auto`` is float32 there).

    Raises:
        ValueError: the run has no adapter (the message says why), ``out`` is not empty, or the adapter cannot be
            merged (an adapter on weights tied to another module, or on a 4-bit base: ``model.quantize``).
    """
    adapter = adapter_of(run)
    dest, tmp = _fresh_dir(out)
    try:
        if merged:
            model, tokenizer, _ = load_run_model(run, "cpu")
            try:
                loralab.unload(model)
            except loralab.LoraStateError as e:
                raise ValueError(f"{e}; or export the adapter itself (without --merged)") from None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if (adapter / RUN_MARKER).exists():
                shutil.copy2(adapter / RUN_MARKER, tmp / RUN_MARKER)
        else:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class Evaluation:
    """A run's eval loss recomputed from its saved adapter, next to the one stored when it trained."""

    run_id: str
    loss: float
    stored: float | None
    chunks: int

    def line(self) -> str:
        stored = "n/a" if self.stored is None else f"{self.stored:.6f}"
        diff = "" if self.stored is None else f", difference {self.loss - self.stored:+.2e}"
        return f"run {self.run_id}: eval loss {self.loss:.6f} on {self.chunks} eval chunks (stored {stored}{diff})"


def evaluate_run(run: RunStore, device: str = "auto") -> Evaluation:
    """Recompute the run's final eval loss from its saved adapter, on its own eval chunks, as training computed it."""
    from .run.data import load_data
    from .run.loss import fused_loss_ok
    from .run.train import autocast_for, evaluate

    model, tokenizer, cfg = load_run_model(run, device)
    data = load_data(cfg.data, tokenizer)
    # the chunks result.json's final loss is over: the test chunks with a val/test split, else the one eval set
    chunks = data.eval[data.rows()["test" if "test" in data.splits else "eval"]]
    fused = fused_loss_ok(model, chunks[:1].to(next(model.parameters()).device))
    loss = (
        evaluate(model, chunks, cfg.train.eval_batch_size or cfg.train.batch_size, 1, autocast_for(model), fused)[0]
        .mean()
        .item()
    )
    result = run.result()
    return Evaluation(run.run_id, loss, None if result is None else result.final_eval_loss, len(chunks))


def prompt_text(tokenizer: Any, prompt: str, fmt: str = "chat") -> str:
    """The text fed to the model for a user's ``prompt`` (see the module docstring for ``fmt``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "raw":
        return prompt
    message = {"role": "user", "content": prompt}
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
    from .run.data import format_conversation

    return format_conversation([message]) + "\nAssistant:"


def generate(
    run: RunStore,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    fmt: str = "chat",
    device: str = "auto",
    with_base: bool = False,
) -> dict[str, str]:
    """Greedy completion of ``prompt`` by the run's adapted model: ``{"adapter": text}``, plus ``"base"`` (the same
    model with its adapter switched off) when ``with_base``."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    model, tokenizer, _ = load_run_model(run, device)
    text = prompt_text(tokenizer, prompt, fmt)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)

    @torch.no_grad()
    def complete() -> str:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    answers = {"adapter": complete()}
    if with_base:
        with loralab.adapters_disabled(model):
            answers["base"] = complete()
    return answers
