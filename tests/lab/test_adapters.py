"""Trained adapters out of the lab (issue 15), through the command line on the tiny offline Llama.

One module-scoped sweep (standard and pissa, each at a sane and at a huge learning rate: two ``ok`` runs, two
``diverged``) is read by most tests. Losses are recomputed here with plain transformers / PEFT and a cross-entropy
written in the test, on the run's own eval chunks; float32 on the CPU, so agreement is to rounding: ``REL_TOL``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loralab
from loralab.cli import main
from loralab.lab.adapters import RUN_MARKER, best_run, prompt_text
from loralab.lab.config.grid import plan_runs
from loralab.lab.config.schema import DataConfig
from loralab.lab.config.toml import load_sweep
from loralab.lab.run.data import load_data
from loralab.lab.store import RunResult, SweepStore
from tiny_sweep import tiny_sweep, write_toml

REL_TOL = 1e-5   # float32 on the CPU: the same maths in another order (PEFT's LoRA forward, a merged weight)
SANE_LR, HUGE_LR = 1e-2, 1e3


def sweep_config(path: Path, out: Path, model: Path, data: Path, grid: dict, pack: int = 0) -> Path:
    """A sweep of the tiny model, 4 steps per run, no warmup (so a huge lr blows up at once)."""
    return write_toml(path, tiny_sweep(model, data, out, name="adapters", grid=grid, **{
        "pack": pack, "data.max_eval_chunks": 3, "lora.alpha": 8, "train.max_steps": 4, "train.warmup_ratio": 0.0}))


ONE_RUN = {"lora.init": ["standard"], "train.lr": [SANE_LR]}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def swept(tiny_lm_dir, chat_jsonl, tmp_path_factory, one_thread_module) -> Path:
    """The sweep's out_dir: standard and pissa × a sane and a huge lr."""
    root = tmp_path_factory.mktemp("swept")
    cfg = sweep_config(root / "sweep.toml", root / "out", tiny_lm_dir, chat_jsonl,
                       {"lora.init": ["standard", "pissa"], "train.lr": [SANE_LR, HUGE_LR]})
    assert main(["sweep", str(cfg), "--no-progress"]) == 0
    return root / "out"


def results(out: Path) -> dict[str, dict]:
    """run id -> result.json, read here without the lab."""
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}


def run_of(out: Path, init: str, lr: float) -> str:
    (rid,) = [r for r, res in results(out).items() if res["axes"] == {"lora.init": init, "train.lr": lr}]
    return rid


def eval_chunks(out: Path, run_id: str, tokenizer) -> torch.Tensor:
    """The run's eval chunks, from the data settings in its own config.json."""
    data = json.loads((out / "runs" / run_id / "config.json").read_text())["config"]["data"]
    return load_data(DataConfig(**data), tokenizer).eval


@torch.no_grad()
def lm_loss(model, chunks: torch.Tensor) -> float:
    """Mean over chunks of each chunk's mean next-token cross-entropy: the lab's eval loss, written out here."""
    model.eval()
    logits = model(input_ids=chunks).logits.float()                                  # (N, T, V)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), chunks[:, 1:].flatten(), reduction="none")
    return ce.view(len(chunks), -1).mean(1).double().mean().item()


def base_model(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir), AutoTokenizer.from_pretrained(tiny_lm_dir)


# ---- every finished run saves its adapter ----------------------------------------------------------------------------

def test_every_finished_run_saves_its_adapter_ok_and_diverged_marked(swept):
    found = results(swept)
    assert sorted(r["status"] for r in found.values()) == ["diverged", "diverged", "ok", "ok"]
    for run_id, result in found.items():
        adapter = swept / "runs" / run_id / "adapter"
        assert result["adapter"] is True, run_id
        assert {"adapter_config.json", "adapter_model.safetensors", RUN_MARKER} <= {p.name for p in adapter.iterdir()}
        marker = json.loads((adapter / RUN_MARKER).read_text())
        assert (marker["run_id"], marker["status"]) == (run_id, result["status"])
        assert ("warning" in marker) == (result["status"] == "diverged")   # a diverged run's adapter says so
        config = json.loads((adapter / "adapter_config.json").read_text())
        # pissa rewrote its copy of the base: saved in the portable rank-2r form that loads on the plain base
        assert config["r"] == (8 if result["axes"]["lora.init"] == "pissa" else 4), run_id
        assert config["init_lora_weights"] is True
    assert not list(swept.rglob(".adapter.*"))   # no temp directory left


@pytest.mark.parametrize("init", ["standard", "pissa"])
def test_peft_loads_the_exported_adapter_and_reproduces_the_stored_eval_loss(swept, tiny_lm_dir, tmp_path, capsys,
                                                                             init):
    from peft import PeftModel

    run_id = run_of(swept, init, SANE_LR)
    rc, out, err = cli(capsys, "export", swept, "--run", run_id, "--out", tmp_path / "exported")
    assert rc == 0, err
    assert str(tmp_path / "exported") in out
    base, tokenizer = base_model(tiny_lm_dir)
    chunks = eval_chunks(swept, run_id, tokenizer)
    plain = lm_loss(base, chunks)
    model = PeftModel.from_pretrained(base, tmp_path / "exported")
    stored = results(swept)[run_id]["final_eval_loss"]
    assert lm_loss(model, chunks) == pytest.approx(stored, rel=REL_TOL)
    assert abs(plain - stored) > 100 * REL_TOL * stored   # the adapter changed the loss: the check has teeth


def test_a_merged_export_loads_with_from_pretrained_and_gives_the_same_loss(swept, tiny_lm_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_id = run_of(swept, "pissa", SANE_LR)   # base-rewriting: the merge must land on the unmodified base
    rc, _, err = cli(capsys, "export", swept, "--run", run_id, "--out", tmp_path / "merged", "--merged")
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors") if "lora" in k]   # a plain model
    stored = results(swept)[run_id]["final_eval_loss"]
    assert lm_loss(model, eval_chunks(swept, run_id, tokenizer)) == pytest.approx(stored, rel=REL_TOL)


def test_evaluate_recomputes_the_stored_eval_loss(swept, capsys):
    run_id = run_of(swept, "standard", SANE_LR)
    rc, out, err = cli(capsys, "evaluate", swept, "--run", run_id, "--device", "cpu")
    assert rc == 0, err
    recomputed = float(out.split("eval loss ")[1].split()[0])
    stored = results(swept)[run_id]["final_eval_loss"]
    assert recomputed == pytest.approx(stored, rel=REL_TOL) and f"stored {stored:.6f}" in out


def test_runs_trained_in_one_pack_each_save_their_own_adapter(tiny_lm_dir, chat_jsonl, tmp_path, capsys,
                                                                one_thread):
    from loralab.lab.adapters import evaluate_run, find_run

    cfg = sweep_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl,
                       {"lora.init": ["standard", "reversed"], "train.lr": [SANE_LR]}, pack=2)
    assert cli(capsys, "sweep", cfg, "--no-progress")[0] == 0
    found = results(tmp_path / "out")
    assert [r["pack_size"] for r in found.values()] == [2, 2]   # trained together on one shared base
    for run_id, result in found.items():
        evaluation = evaluate_run(find_run(tmp_path / "out", run_id), device="cpu")
        assert evaluation.loss == pytest.approx(result["final_eval_loss"], rel=REL_TOL), run_id
    losses = [r["final_eval_loss"] for r in found.values()]
    assert abs(losses[0] - losses[1]) > 100 * REL_TOL * losses[0]   # two different adapters, each its own run's


# ---- choosing a run --------------------------------------------------------------------------------------------------

def test_best_is_the_lowest_final_eval_loss_among_ok_runs(tmp_path):
    store = SweepStore(tmp_path)
    written = {"a": ("ok", 2.5), "b": ("ok", 2.3), "c": ("diverged", 1.0), "d": ("failed", 0.5), "e": ("ok", None),
               "f": ("ok", 2.3)}
    for run_id, (status, loss) in written.items():
        store.run(run_id).write_result(RunResult(run_id, status, final_eval_loss=loss))
    (store.run("g").root).mkdir()   # unfinished: no result
    assert best_run(store) == "b"   # diverged and failed never count; a tie goes to the first
    for run_id in ("b", "f"):
        os.remove(store.run(run_id).root / "result.json")
    assert best_run(store) == "a"
    os.remove(store.run("a").root / "result.json")
    with pytest.raises(ValueError, match="no run .* finished ok"):
        best_run(store)


def test_best_chooses_on_validation_chunks_never_on_test(tmp_path):
    """With a val/test split, ``final_eval_loss`` is the test mean: ``--best`` must not read it (selection bias)."""
    import numpy as np

    from loralab.lab.store import EvalChunks, SplitLosses

    def split(ids, final):
        ids, final = np.array(ids), np.array(final, dtype=np.float32)
        return SplitLosses(ids=ids, pretrained=final + 1, step0=final + 1, final=final)

    store = SweepStore(tmp_path)
    for run_id, val, test in (("a", [2.0, 2.2], [3.0, 3.2]), ("b", [2.5, 2.7], [1.0, 1.2])):
        chunks = EvalChunks("pool", {"val": split([0, 1], val), "test": split([2, 3], test)})
        store.run(run_id).write_eval_chunks(chunks)
        store.run(run_id).write_result(RunResult(run_id, "ok", final_eval_loss=float(np.mean(test))))
    assert best_run(store) == "a"   # lower on validation, though "b" is lower on test


def test_export_best_exports_the_run_best_names(swept, tmp_path, capsys):
    ok = {r: res["final_eval_loss"] for r, res in results(swept).items() if res["status"] == "ok"}
    rc, out, err = cli(capsys, "export", swept, "--best", "--out", tmp_path / "best")
    assert rc == 0, err
    assert json.loads((tmp_path / "best" / RUN_MARKER).read_text())["run_id"] == min(ok, key=ok.get)


# ---- a run without an adapter: export says why, in one line ----------------------------------------------------------

def export_error(capsys, root: Path, *args: str, out: Path | None = None) -> str:
    rc, _, err = cli(capsys, "export", root, *args, "--out", out or root.parent / "never-written")
    assert rc == 2 and err.count("\n") == 1, err
    assert not (root.parent / "never-written").exists()
    return err


def test_save_adapter_false_keeps_run_ids_and_export_names_the_setting(tiny_lm_dir, chat_jsonl, tmp_path, capsys,
                                                                       one_thread):
    cfg = sweep_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl, ONE_RUN)
    off = ["train.save_adapter=false"]
    assert [r.run_id for r in plan_runs(load_sweep(cfg, off))] == [r.run_id for r in plan_runs(load_sweep(cfg))]
    rc, _, err = cli(capsys, "sweep", cfg, "--no-progress", "--set", *off)
    assert rc == 0, err
    ((run_id, result),) = results(tmp_path / "out").items()
    assert result["status"] == "ok" and result["adapter"] is False
    assert not (tmp_path / "out" / "runs" / run_id / "adapter").exists()
    err = export_error(capsys, tmp_path / "out", "--run", run_id)
    assert "trained with train.save_adapter=false" in err and "--set train.save_adapter=true" in err


def test_export_says_why_a_run_has_no_adapter(swept, tmp_path, capsys):
    store = tmp_path / "copy"
    shutil.copytree(swept, store)
    run_id = run_of(store, "standard", SANE_LR)
    shutil.rmtree(store / "runs" / run_id / "adapter")   # as a committed example store keeps it
    assert "saved its adapter, but" in export_error(capsys, store, "--run", run_id)

    old = store / "runs" / "old-run"   # a run finished before adapters were saved: no "adapter" in its files
    old.mkdir()
    cfg = json.loads((store / "runs" / run_id / "config.json").read_text())
    del cfg["config"]["train"]["save_adapter"]
    (old / "config.json").write_text(json.dumps(cfg))
    result = json.loads((store / "runs" / run_id / "result.json").read_text())
    del result["adapter"]
    (old / "result.json").write_text(json.dumps({**result, "run_id": "old-run"}))
    assert "finished before loralab saved adapters" in export_error(capsys, store, "--run", "old-run")

    assert "is not empty" in export_error(capsys, swept, "--best", out=swept)


def test_an_adapter_that_cannot_be_saved_fails_the_run_keeping_its_losses(tiny_lm_dir, chat_jsonl, tmp_path, capsys,
                                                                          monkeypatch, one_thread):
    def full_disk(model, path, **kwargs):
        Path(path, "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    cfg = sweep_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl, ONE_RUN)
    monkeypatch.setattr(loralab, "save_adapter", full_disk)
    assert cli(capsys, "sweep", cfg, "--no-progress")[0] == 1   # a failed run
    ((run_id, result),) = results(tmp_path / "out").items()
    assert result["status"] == "failed" and result["adapter"] is False
    assert result["error"].startswith("saving the adapter failed: OSError") and "No space" in result["error"]
    assert result["final_eval_loss"] is not None and result["steps"] == 4   # what training measured is kept
    assert not list((tmp_path / "out" / "runs" / run_id).glob("*adapter*"))
    assert "failed (saving the adapter failed" in export_error(capsys, tmp_path / "out", "--run", run_id)

    monkeypatch.undo()   # the disk has room again: the rerun redoes the run
    assert cli(capsys, "sweep", cfg, "--no-progress")[0] == 0
    assert results(tmp_path / "out")[run_id]["adapter"] is True


# ---- a run killed while saving its adapter ---------------------------------------------------------------------------

KILLERS = {
    # inside loralab.save_adapter, half an adapter written into the lab's temp directory
    "while saving the adapter": """
import loralab
def save_adapter(model, path, **kwargs):
    Path(path, "adapter_model.safetensors").write_bytes(b"half an adapter")
    os.kill(os.getpid(), signal.SIGKILL)
loralab.save_adapter = save_adapter
""",
    # the adapter is in place, result.json not yet
    "between the adapter and the result": """
from loralab.lab.store import RunStore
def write_result(self, result):
    os.kill(os.getpid(), signal.SIGKILL)
RunStore.write_result = write_result
""",
}


@pytest.mark.parametrize("when", list(KILLERS))
def test_a_run_killed_while_saving_its_adapter_is_redone(tiny_lm_dir, chat_jsonl, tmp_path, capsys, one_thread, when):
    out = tmp_path / "out"
    cfg = sweep_config(tmp_path / "sweep.toml", out, tiny_lm_dir, chat_jsonl, ONE_RUN)
    script = "import os, signal, sys\nfrom pathlib import Path\n" + KILLERS[when] + \
        "from loralab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    src = str(Path(loralab.__file__).resolve().parents[1])   # the loralab under test, in the child too
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", script, "sweep", str(cfg), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    (run_dir,) = (out / "runs").iterdir()
    assert not (run_dir / "result.json").exists()   # not finished ...
    left = {p.name for p in run_dir.iterdir()}
    assert ("adapter" in left) == (when == "between the adapter and the result")   # ... never a half adapter/
    assert "is unfinished" in export_error(capsys, out, "--run", run_dir.name)

    rc, stdout, err = cli(capsys, "sweep", cfg, "--no-progress")
    assert rc == 0, err
    assert "1 runs, 0 already finished, 1 to run" in stdout   # the killed run is redone
    assert results(out)[run_dir.name]["adapter"] is True
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter", "config.json", "diagnostics.json",
                                                         "eval_chunks.npz", "metrics.jsonl",
                                                         "result.json"]   # no temp dir left
    model, _ = base_model(tiny_lm_dir)
    loralab.load_adapter(model, run_dir / "adapter")   # whole: it loads


# ---- trying it -------------------------------------------------------------------------------------------------------

def test_generate_is_the_adapted_models_greedy_answer(swept, tiny_lm_dir, capsys):
    from peft import PeftModel

    run_id = run_of(swept, "standard", SANE_LR)
    rc, out, err = cli(capsys, "generate", swept, "--run", run_id, "Hello, how are you?", "--max-new-tokens", "6",
                       "--base", "--device", "cpu")
    assert rc == 0, err
    answers = dict(part.split(":\n", 1) for part in out.split("--- ")[1:])
    base, tokenizer = base_model(tiny_lm_dir)
    text = prompt_text(tokenizer, "Hello, how are you?")   # no chat template: the lab's training text
    assert text == "User: Hello, how are you?\nAssistant:"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")

    def greedy(model) -> str:
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    assert answers["base"].strip() == greedy(base)
    assert answers["adapter"].strip() == greedy(PeftModel.from_pretrained(base, swept / "runs" / run_id / "adapter"))


def test_the_prompt_uses_the_chat_template_when_the_tokenizer_has_one(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert prompt_text(tokenizer, "hi") == "<|user|>hi\n<|assistant|>"
    assert prompt_text(tokenizer, "hi", "train") == "User: hi\nAssistant:"
    assert prompt_text(tokenizer, "hi", "raw") == "hi"


def test_a_4bit_runs_adapter_reloads_to_its_stored_loss_and_a_merged_export_is_refused(tiny_lm_dir, chat_jsonl,
                                                                                        tmp_path, capsys, one_thread):
    pytest.importorskip("bitsandbytes")
    cfg = sweep_config(tmp_path / "sweep.toml", tmp_path / "out", tiny_lm_dir, chat_jsonl,
                       {"model.quantize": ["nf4"], **ONE_RUN})
    assert cli(capsys, "sweep", cfg, "--no-progress")[0] == 0
    (run_id,) = results(tmp_path / "out")
    rc, out, err = cli(capsys, "evaluate", tmp_path / "out", "--run", run_id, "--device", "cpu")
    assert rc == 0, err
    stored = results(tmp_path / "out")[run_id]["final_eval_loss"]
    assert float(out.split(": eval loss ")[1].split()[0]) == pytest.approx(stored, rel=REL_TOL)  # on the 4-bit base
    rc, _, err = cli(capsys, "export", tmp_path / "out", "--run", run_id, "--out", tmp_path / "merged", "--merged")
    assert rc == 2 and err.count("\n") == 1
    assert "cannot merge into its Linear4bit base" in err and "without --merged" in err
    assert not (tmp_path / "merged").exists()
    rc, _, err = cli(capsys, "export", tmp_path / "out", "--run", run_id, "--out", tmp_path / "adapter")
    assert rc == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
