"""inject / unload / check_identity on whole models; seeds; bad input leaves the model unchanged."""

import copy
import warnings

import pytest
import torch
from torch import nn

from core_helpers import perturb, tiny_gpt2, tiny_llama
from loralab import (IdentityWarning, LoraConfig, LoraLayer, LoraStateError, check_identity, init_schemes, inject,
                     lora_layers, lora_param_groups, merge, trainable_parameters, unload)
from loralab.inject import module_seed

QV = ["q_proj", "v_proj"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not lora_layers(model)


def test_inject_targets_suffixes_and_freezes():
    model = tiny_llama()
    n_params = sum(p.numel() for p in model.parameters())
    assert inject(model, LoraConfig(rank=4, targets=QV)) is model
    names = sorted(lora_layers(model))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = trainable_parameters(model)
    assert len(trainable) == 8 and all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in trainable) == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert sum(p.numel() for p in model.parameters()) == n_params + sum(p.numel() for p in trainable)


def test_inject_regex_targets():
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, targets=r"model\.layers\.1\..*_proj"))
    assert len(lora_layers(model)) == 7 and all(".layers.1." in n for n in lora_layers(model))


def test_patterns_override_rank_alpha_and_init():
    model = tiny_llama()
    cfg = LoraConfig(rank=4, alpha=8, targets=["q_proj", "embed_tokens"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"q_proj": 3.0}, init_pattern={"embed_tokens": "reversed"})
    layers = lora_layers(inject(model, cfg))
    assert layers["model.layers.1.self_attn.q_proj"].rank == 2 and layers["model.layers.0.self_attn.q_proj"].rank == 4
    assert layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(3.0 / 4)
    emb = layers["model.embed_tokens"]
    assert torch.count_nonzero(emb.lora_A) == 0 and torch.count_nonzero(emb.lora_B) > 0


def test_same_seed_bit_identical_other_seed_differs():
    def factors(seed, targets=QV):
        m = inject(tiny_llama(), LoraConfig(rank=4, init="orthogonal-qr-match", targets=targets), seed=seed)
        return {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in lora_layers(m).items()}

    a, b, c = factors(0), factors(0), factors(1)
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert all(not torch.equal(a[n][0], c[n][0]) for n in a)
    # A module's factors do not depend on which other modules are targeted.
    only_q = factors(0, ["q_proj"])
    assert all(torch.equal(only_q[n][0], a[n][0]) for n in only_q)
    assert module_seed(0, "a") != module_seed(0, "b") and module_seed(0, "a") == module_seed(0, "a")


def test_inject_does_not_consume_global_rng():
    model = tiny_llama()
    before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject(model, LoraConfig(rank=4, init="random-both", targets=QV), seed=5)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("init", sorted(init_schemes()))
def test_check_identity_on_a_transformer(init):
    model = tiny_llama()
    original = copy.deepcopy(model)
    x = torch.randint(0, 64, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentityWarning)
        inject(model, LoraConfig(rank=4, init=init, targets=["q_proj", "v_proj", "o_proj", "down_proj"]))
    delta = check_identity(model, x)
    truth = (model(x).logits - original(x).logits).abs().max().item()
    if init_schemes()[init].preserves_output:
        assert delta < 1e-4 and truth < 1e-4
    else:
        assert delta > 1e-2 and delta == pytest.approx(truth, rel=1e-3)
    assert not any(layer.disabled for layer in lora_layers(model).values())


def test_random_both_warns_standard_does_not():
    with pytest.warns(IdentityWarning, match="random-both"):
        inject(tiny_llama(), LoraConfig(rank=4, init="random-both", targets=QV))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityWarning)
        inject(tiny_llama(), LoraConfig(rank=4, targets=QV))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_unload_returns_plain_model_with_merged_weights(factory):
    model = factory()
    x = torch.randint(0, 64, (2, 7))
    targets = QV if factory is tiny_llama else ["c_attn", "c_proj"]
    inject(model, LoraConfig(rank=4, targets=targets))
    perturb(model)
    y = model(x).logits
    plain = unload(model)
    assert plain is model and not lora_layers(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not hasattr(model, "lora_config")
    assert torch.allclose(model(x).logits, y, atol=1e-5)
    assert set(model.state_dict()) == set(factory().state_dict())


def test_unload_without_merge_gives_back_the_base():
    model = tiny_llama()
    original = copy.deepcopy(model)
    inject(model, LoraConfig(rank=4, targets=QV))
    perturb(model)
    unload(model, merge_weights=False)
    x = torch.randint(0, 64, (2, 7))
    assert torch.equal(model(x).logits, original(x).logits)


def test_loraplus_param_groups():
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=QV))
    groups = lora_param_groups(model, 1e-3, loraplus_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in trainable_parameters(model)}


@pytest.mark.parametrize("cfg, err, match", [
    (dict(rank=0), ValueError, "rank must be a positive integer"),
    (dict(rank=-2), ValueError, "rank must be a positive integer"),
    (dict(alpha=0), ValueError, "alpha must be a positive number"),
    (dict(dropout=1.0), ValueError, "dropout must be in"),
    (dict(targets=[]), ValueError, "targets is empty"),
    (dict(targets=None), ValueError, r"targets must be a list of module-name suffixes or one regex string, got None"),
    (dict(targets=[0]), ValueError, r"targets must be a list .* got \[0\]"),
    (dict(rslora="no"), ValueError, r"rslora must be True or False, got 'no'"),
    (dict(dropout="0.1"), ValueError, r"dropout must be in \[0, 1\), got '0.1'"),
    (dict(targets="([bad"), ValueError, "not a valid regex"),
    (dict(targets="(.*.*)*z"), ValueError, "itself varies in length .* exponential time"),
    (dict(targets="(a|ab)*c"), ValueError, "exponential time"),
    (dict(rank_pattern={r"(\w+)+\.q_proj": 4}), ValueError, r"pattern key .*exponential time"),
    (dict(targets=".*.*.*.*.*z"), ValueError, "5 variable-length repeats"),
    (dict(targets="q" * 5000), ValueError, r"^LoraConfig: targets 'q{59}\.\.\.\[4,882 more characters\]\.\.\.q{59}' is 5,000 "),
])
def test_config_errors(cfg, err, match):
    with pytest.raises(err, match=match):
        LoraConfig(**cfg)


@pytest.mark.parametrize("cfg, err, match", [
    (dict(targets=["nonexistent"]), ValueError, r"targets entries matched no module: 'nonexistent'; .*embed_tokens"),
    (dict(targets=["q_proj", "v_porj"]), ValueError, r"matched no module: 'v_porj' \(did you mean 'v_proj'\?\)"),
    (dict(targets="q_proj"), ValueError, r"a string is one regex .*whole module name.*targets=\['q_proj'\]"),
    (dict(targets=["input_layernorm"]), TypeError, r"LlamaRMSNorm, which loralab cannot adapt \(supported: nn.Linear"),
    (dict(rank=40, targets=["q_proj", "k_proj"]), ValueError, r"rank 40 exceeds min\(d_in, d_out\) = 32"),
    (dict(rank=20, init="pissa", targets=["q_proj", "k_proj"]), ValueError, r"k_proj.*rank_pattern=\{'k_proj': 16\}"),
])
def test_bad_targets_raise_and_change_nothing(cfg, err, match):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(err, match=match):
        inject(model, LoraConfig(**cfg))
    assert_unchanged(model, snap)


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        inject(model, LoraConfig(rank=2, targets=["out_proj"]))


def test_double_inject_and_state_errors():
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=QV))
    with pytest.raises(LoraStateError, match="already has LoRA layers; call unload"):
        inject(model, LoraConfig(rank=4, targets=QV))
    plain = tiny_llama()
    for fn in (unload, lambda m: lora_param_groups(m, 1e-3)):
        with pytest.raises(LoraStateError, match="no LoRA layers; call inject"):
            fn(plain)
    from loralab import merge

    merge(model)
    with pytest.raises(LoraStateError, match="unmerge"):
        check_identity(model, torch.randint(0, 64, (1, 4)))


def test_tied_weights_refuse_base_rewriting_inits_and_merging():
    """GPT-2 ties lm_head to wte: pissa/olora there would rewrite the head too, and so would merging any adapter."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'pissa' rewrites the weight of 'transformer.wte'.*shared with 'lm_head'"):
        inject(model, LoraConfig(rank=4, init="pissa", targets=["wte", "c_attn"]))
    assert_unchanged(model, snap)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    inject(model, LoraConfig(rank=4, init="reversed", targets=["wte", "c_attn"]))
    perturb(model)
    y = model(ids).logits
    for op in (merge, unload):
        with pytest.raises(LoraStateError, match=r"merging 'transformer.wte'.*shared with 'lm_head'.*untie"):
            op(model)
        assert not any(layer.merged for layer in lora_layers(model).values())
    assert torch.equal(model(ids).logits, y)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())   # untied: merging is exact again
    merge(model)
    assert torch.allclose(model(ids).logits, y, atol=1e-4)


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
                                     r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r".*\.(?:q|v)*_proj"])
def test_ordinary_regexes_pass_the_backtracking_check(pattern):
    assert LoraConfig(targets=pattern, rank_pattern={pattern: 2}).targets == pattern
