"""Adapters on disk: PEFT round trips both ways with equal logits, portable pissa/olora, and bad directories."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from core_helpers import perturb, tiny_gpt2, tiny_llama
from loralab import (
    AdapterError,
    AdapterFormatWarning,
    LoraConfig,
    init_schemes,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
)

peft = pytest.importorskip("peft")
X = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def logits(model):
    with torch.no_grad():
        return model(X).logits


def adapted(factory=tiny_llama, targets=LLAMA_TARGETS, **kw):
    base = factory()
    model = inject(copy.deepcopy(base), LoraConfig(rank=4, alpha=8, targets=targets, **kw), seed=7)
    perturb(model, std=0.1)
    return base, model


@pytest.mark.parametrize("factory, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_fc", "wte"])])
@pytest.mark.parametrize("rslora", [False, True])
def test_loralab_to_peft_and_back(tmp_path, factory, targets, rslora):
    base, model = adapted(factory, targets, rslora=rslora)
    want = logits(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] == rslora
    assert cfg["fan_in_fan_out"] == (factory is tiny_gpt2)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.allclose(logits(in_peft), want, atol=1e-5)
    back = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(back), want, atol=1e-6)
    assert back.lora_config.rslora == rslora


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_peft_to_loralab(tmp_path, init):
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=init,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(ours), logits(pm), atol=1e-5)
    assert lora_layers(ours)["model.layers.0.mlp.down_proj"].rank == 2


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("portable", [False, True])
def test_base_modifying_schemes(tmp_path, init, portable):
    """Non-portable: PEFT recomputes the residual on load. Portable (rank 2r): loads on the unmodified base."""
    base, model = adapted(targets=["q_proj", "v_proj", "down_proj"], init=init)
    want = logits(model)
    save_adapter(model, tmp_path, portable=portable)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == ((8, 16.0, True) if portable else (4, 8, init))
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.allclose(logits(in_peft), want, atol=1e-4)
    back = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(back), want, atol=1e-4)
    if portable:  # a plain adapter: merging it into the untouched base gives the fine-tuned model
        merge(back)
        assert torch.allclose(logits(back), want, atol=1e-4)


MOVES = sorted(n for n, s in init_schemes().items() if s.modifies_base)


@pytest.mark.parametrize("init", MOVES)
def test_every_base_moving_scheme_exports_portably_and_round_trips(tmp_path, init):
    """Any scheme that rewrites the base (registry-wide): the portable file loads on the unmodified base, in PEFT and
    in loralab; saved as-is, loralab reloads it exactly (in PEFT's format when PEFT redoes the scheme, else its own)."""
    base, model = adapted(targets=["q_proj", "v_proj", "down_proj"], init=init)
    want = logits(model)
    save_adapter(model, tmp_path / "portable", portable=True)
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "portable").eval()),
                          want, atol=1e-4)
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "portable")), want, atol=1e-4)
    save_adapter(model, tmp_path / "as-is")
    assert (tmp_path / "as-is" / "adapter_config.json").exists() == (init in ("pissa", "olora"))
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "as-is")), want, atol=1e-4)


def test_portable_rslora_scales_alpha_by_sqrt2(tmp_path):
    base, model = adapted(targets=["q_proj"], init="pissa", rslora=True)
    save_adapter(model, tmp_path, portable=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(8 * 2**0.5)
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path)), logits(model), atol=1e-4)


def test_pissa_leaves_an_embedding_base_alone_as_peft_does(tmp_path):
    """On an embedding, init='pissa' means PEFT's embedding init (its base untouched), so the non-portable file
    loads in PEFT, which recomputes the residual of q_proj only."""
    base, model = adapted(targets=["q_proj", "embed_tokens"], init="pissa")
    emb = lora_layers(model)["model.embed_tokens"]
    assert emb.init == "reversed-normal" and emb.lora_A0 is None
    assert torch.equal(emb.base_layer.weight, base.model.embed_tokens.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterFormatWarning)
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()),
                          logits(model), atol=1e-4)


@pytest.mark.parametrize("factory, targets, cfg", [
    (tiny_llama, ["q_proj", "embed_tokens"], {"init": "pissa", "init_pattern": {"embed_tokens": "pissa"}}),
    (tiny_gpt2, ["c_attn", "c_fc"], {"init": "olora"}),   # PEFT's OLoRA ignores Conv1D's transposed weight
])
def test_a_base_move_peft_cannot_redo_is_saved_in_loralabs_form(tmp_path, factory, targets, cfg):
    """Non-portable pissa/olora whose residual PEFT would not rebuild (pissa on an embedding, olora on GPT-2 Conv1D):
    loralab's own form, which loralab reloads exactly and PEFT refuses; portable=True gives a file PEFT loads."""
    base, model = adapted(factory, targets, **cfg)
    want = logits(model)
    with pytest.warns(AdapterFormatWarning, match="PEFT cannot load.*portable=True"):
        save_adapter(model, tmp_path / "own")
    assert not (tmp_path / "own" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "own")
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "own")), want, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterFormatWarning)
        save_adapter(model, tmp_path / "portable", portable=True)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "portable").eval()
    assert torch.allclose(logits(in_peft), want, atol=1e-4)


class ConvNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, **kw)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


CONV_X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))


def test_conv_round_trip_with_peft(tmp_path):
    model = inject(ConvNet(), LoraConfig(rank=4, targets=["conv", "head"]))
    perturb(model)
    save_adapter(model, tmp_path)
    in_peft = peft.PeftModel.from_pretrained(ConvNet(), tmp_path).eval()
    assert torch.allclose(in_peft(CONV_X), model(CONV_X), atol=1e-5)
    assert torch.allclose(load_adapter(ConvNet(), tmp_path)(CONV_X), model(CONV_X), atol=1e-6)


@pytest.mark.parametrize("kw", [{"groups": 4}, {"dilation": 2}, {"padding_mode": "reflect"}])
def test_a_conv_peft_cannot_represent_is_saved_in_loralabs_form(tmp_path, kw):
    """A grouped (depthwise-like), dilated or reflect-padded conv: PEFT's conv LoRA would be another function, so
    save_adapter writes loralab's own form (it used to crash on groups), says PEFT cannot load it, and loralab
    reloads it exactly, modules_to_save included."""
    model = inject(ConvNet(**kw), LoraConfig(rank=4, targets=["conv"], modules_to_save=["head"]))
    perturb(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.warns(AdapterFormatWarning, match=r"PEFT cannot load.*conv 'conv' has \{'" + next(iter(kw))):
        save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loralab_adapter.json", "loralab_adapter.safetensors"]
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftModel.from_pretrained(ConvNet(**kw), tmp_path)
    back = load_adapter(ConvNet(**kw), tmp_path)
    assert torch.allclose(back(CONV_X), model(CONV_X), atol=1e-6)
    assert back.head.weight.requires_grad and back.lora_config.modules_to_save == ("head",)


def test_a_peft_grouped_conv_adapter_is_refused_as_peft_meaning_not_as_another_model(tmp_path):
    pm = peft.get_peft_model(ConvNet(groups=4), peft.LoraConfig(r=4, target_modules=["conv"]))
    pm.save_pretrained(tmp_path)
    target = ConvNet(groups=4)
    with pytest.raises(AdapterError, match=r"PEFT weights for conv 'conv', which has \{'groups': 4\}.*"
                                           r"load this adapter with PEFT") as e:
        load_adapter(target, tmp_path)
    assert "different model" not in str(e.value) and not lora_layers(target)


def test_load_into_an_adapted_model_replaces_weights(tmp_path):
    base, model = adapted()
    save_adapter(model, tmp_path)
    other = inject(copy.deepcopy(base), LoraConfig(rank=4, alpha=8, targets=LLAMA_TARGETS), seed=1)
    load_adapter(other, tmp_path)
    assert torch.allclose(logits(other), logits(model), atol=1e-6)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def corrupt(path, how):
    if how == "missing-dir":
        return path / "nope"
    if how == "no-config":
        (path / "adapter_config.json").unlink()
    if how == "bad-json":
        (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    if how == "truncated":
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    if how == "no-weights":
        (path / "adapter_model.safetensors").unlink()
    if how in ("dora", "not-lora"):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update({"use_dora": True} if how == "dora" else {"peft_type": "IA3"})
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("how, match", [
    ("missing-dir", "does not exist"), ("no-config", "adapter_config.json is missing"),
    ("bad-json", "not valid JSON"), ("truncated", "corrupt or truncated"),
    ("no-weights", "adapter_model.safetensors is missing"), ("dora", "use_dora=True.*Load it with PEFT"),
    ("not-lora", "peft_type is 'IA3'"),
])
def test_bad_adapter_dirs_raise_and_change_nothing(tmp_path, how, match):
    base, model = adapted()
    save_adapter(model, tmp_path)
    target = copy.deepcopy(base)
    before = state(target)
    with pytest.raises(AdapterError, match=match):
        load_adapter(target, corrupt(tmp_path, how))
    after = state(target)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


def test_adapter_from_another_model_raises_and_changes_nothing(tmp_path):
    _, model = adapted(factory=lambda: tiny_llama(vocab=80))
    save_adapter(model, tmp_path)
    target = tiny_llama()
    before = state(target)
    with pytest.raises(AdapterError, match=r"shapes for 'model.embed_tokens' are A\(4, 80\).*needs A\(4, 64\)"):
        load_adapter(target, tmp_path)
    assert state(target)[1] == before[1]
    # an adapted model whose layers do not match is left with its own weights
    _, other = adapted(targets=["q_proj"])
    mine = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterError, match="no weights for module|different model"):
        load_adapter(other, tmp_path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in mine.items())


def test_save_needs_an_unmerged_adapter(tmp_path):
    with pytest.raises(AdapterError, match="inject"):
        save_adapter(tiny_llama(), tmp_path)
    _, model = adapted()
    merge(model)
    with pytest.raises(AdapterError, match="unmerge"):
        save_adapter(model, tmp_path)


def test_save_to_a_file_path_says_an_adapter_is_a_directory(tmp_path):
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=["q_proj"]))
    (tmp_path / "taken").write_text("x")
    with pytest.raises(AdapterError, match=r"'.*taken': it is a file, and an adapter is a directory"):
        save_adapter(model, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "x"


def test_a_broad_peft_target_list_loads(tmp_path):
    """PEFT loads an adapter whose target_modules name modules this model lacks (a list meant for several
    architectures); so does loralab, adapting the ones present."""
    base, model = adapted(targets=["q_proj", "v_proj"])
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"]) + ["c_attn", "query_key_value"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert set(lora_layers(loaded)) == set(lora_layers(model))
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
    assert torch.allclose(logits(in_peft), logits(model), atol=1e-5)


# ---- modules_to_save, selection keys, ranks PEFT allows -------------------------------------------------------------

def head_changed(model, by=0.05):
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        model.lm_head.weight.add_(by * torch.randn(model.lm_head.weight.shape, generator=g))
    return model


def test_modules_to_save_round_trip_both_ways(tmp_path):
    base, model = adapted(targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    head_changed(model)
    want = logits(model)
    save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.allclose(logits(in_peft), want, atol=1e-5)
    back = load_adapter(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(logits(back), want, atol=1e-6) and back.lm_head.weight.requires_grad
    in_peft.save_pretrained(tmp_path / "peft")   # and PEFT's own file, written from its wrapper copy, back to loralab
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path / "peft")), want, atol=1e-5)


def test_a_head_unfrozen_by_hand_is_saved_with_a_warning_not_dropped(tmp_path):
    base, model = adapted(targets=["q_proj", "v_proj"])
    model.lm_head.requires_grad_(True)
    head_changed(model)
    want = logits(model)
    with pytest.warns(UserWarning, match=r"\['lm_head'\] have trainable parameters but are not in "
                                         r"LoraConfig.modules_to_save; they are saved whole"):
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert torch.allclose(logits(load_adapter(copy.deepcopy(base), tmp_path)), want, atol=1e-6)
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()), want, atol=1e-5)


def test_a_trainable_tensor_inside_a_lora_layer_is_refused_with_a_fix_that_works(tmp_path):
    _, model = adapted(factory=tiny_gpt2, targets=["c_attn"])
    name = "transformer.h.0.attn.c_attn.base_layer.bias"
    model.get_parameter(name).requires_grad_(True)
    with pytest.raises(AdapterError, match=rf"'{name}' is trainable.*model.get_parameter\('{name}'\)"
                                           r".requires_grad_\(False\)"):
        save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())
    model.get_parameter(name).requires_grad_(False)
    save_adapter(model, tmp_path)


@pytest.mark.parametrize("selection", [
    {"target_modules": ["q_proj", "v_proj", "o_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["layers.0.mlp.down_proj"]},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj"], "r": 40},   # r above k_proj's min(d_in, d_out) = 16: PEFT allows it
])
def test_peft_adapters_with_selection_keys_and_large_ranks_load(tmp_path, selection):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 4, **selection}))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    pm.eval().save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(lora_layers(ours)) == sorted(pm.targeted_module_names)
    assert torch.allclose(logits(ours), logits(pm), atol=1e-5)


def test_all_linear_is_saved_as_the_modules_it_selected(tmp_path):
    base, model = adapted(targets="all-linear", exclude=["down_proj"])
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(lora_layers(model)) and cfg["exclude_modules"] == ["down_proj"]
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()), logits(model),
                          atol=1e-5)


def test_task_type_is_the_models_auto_class_or_none(tmp_path):
    """It was CAUSAL_LM for anything with generate (T5, Whisper: then PEFT's loader wraps them wrongly)."""
    from transformers import (
        T5Config,
        T5ForConditionalGeneration,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    from loralab.io import task_type

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                             decoder_start_token_id=0))
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    assert [task_type(m) for m in (tiny_llama(), tiny_gpt2(), t5, whisper, ConvNet())] == [
        "CAUSAL_LM", "CAUSAL_LM", "SEQ_2_SEQ_LM", None, None]
    assert hasattr(whisper, "generate") and hasattr(t5, "generate")
    save_adapter(inject(whisper, LoraConfig(rank=2, targets=["q_proj"])), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None






def test_a_stale_sidecar_left_by_peft_is_ignored_with_a_warning(tmp_path):
    """loralab saves pissa, then PEFT saves a plain adapter into the same directory and leaves loralab.json there:
    the sidecar must not make loralab rewrite the base weights as pissa does (issue 22, item 2)."""
    base, model = adapted(targets=["q_proj", "v_proj"], init="pissa")
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # its own sidecar: followed, silently
        assert load_adapter(copy.deepcopy(base), tmp_path).lora_config.init == "pissa"
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    pm.eval().save_pretrained(tmp_path)
    assert (tmp_path / "loralab.json").exists()   # PEFT leaves it
    with pytest.warns(UserWarning, match="loralab.json does not describe this adapter"):
        ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert ours.lora_config.init == "standard"
    q = lora_layers(ours)["model.layers.0.self_attn.q_proj"].base_layer.weight
    assert torch.equal(q, base.model.layers[0].self_attn.q_proj.weight)   # the base is left alone
    assert torch.allclose(logits(ours), logits(pm), atol=1e-5)
