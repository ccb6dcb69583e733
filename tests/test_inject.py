"""inject / unload / check_identity on whole models; seeds; bad input leaves the model unchanged."""

import copy
import warnings

import pytest
import torch
from torch import nn

from core_helpers import perturb, tiny_gpt2, tiny_llama
from loralab import (
    IdentityWarning,
    LoraConfig,
    LoraLayer,
    LoraStateError,
    check_identity,
    init_schemes,
    inject,
    lora_layers,
    lora_param_groups,
    merge,
    trainable_parameters,
    trainable_summary,
    unload,
)
from loralab.config import name_matches
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
        return {n: (ly.lora_A.detach().clone(), ly.lora_B.detach().clone()) for n, ly in lora_layers(m).items()}

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
    ({"rank": 0}, ValueError, "rank must be a positive integer"),
    ({"rank": -2}, ValueError, "rank must be a positive integer"),
    ({"alpha": 0}, ValueError, "alpha must be a positive number"),
    ({"dropout": 1.0}, ValueError, "dropout must be in"),
    ({"targets": []}, ValueError, "targets is empty"),
    ({"targets": None}, ValueError, r"targets must be a list of module-name suffixes or one regex string, got None"),
    ({"targets": [0]}, ValueError, r"targets must be a list .* got \[0\]"),
    ({"rslora": "no"}, ValueError, r"rslora must be True or False, got 'no'"),
    ({"dropout": "0.1"}, ValueError, r"dropout must be in \[0, 1\), got '0.1'"),
    ({"targets": "([bad"}, ValueError, "not a valid regex"),
    ({"targets": "(.*.*)*z"}, ValueError, "itself varies in length .* exponential time"),
    ({"targets": "(a|ab)*c"}, ValueError, "exponential time"),
    ({"rank_pattern": {r"(\w+)+\.q_proj": 4}}, ValueError, r"pattern key .*exponential time"),
    ({"targets": ".*.*.*.*.*z"}, ValueError, "5 variable-length repeats"),
    ({"targets": "q" * 5000}, ValueError,
     r"^LoraConfig: targets 'q{59}\.\.\.\[4,882 more characters\]\.\.\.q{59}' is 5,000 "),
])
def test_config_errors(cfg, err, match):
    with pytest.raises(err, match=match):
        LoraConfig(**cfg)


@pytest.mark.parametrize("cfg, err, match", [
    ({"targets": ["nonexistent"]}, ValueError, r"targets entries matched no module: 'nonexistent'; .*embed_tokens"),
    ({"targets": ["q_proj", "v_porj"]}, ValueError, r"matched no module: 'v_porj' \(did you mean 'v_proj'\?\)"),
    ({"targets": "q_proj"}, ValueError, r"a string is one regex .*whole module name.*targets=\['q_proj'\]"),
    ({"targets": ["input_layernorm"]}, TypeError, r"LlamaRMSNorm, which loralab cannot adapt \(supported: nn.Linear"),
    ({"rank": 20, "init": "pissa", "targets": ["q_proj", "k_proj"]}, ValueError,
     r"k_proj.*rank_pattern=\{'k_proj': 16\}"),
])
def test_bad_targets_raise_and_change_nothing(cfg, err, match):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(err, match=match):
        inject(model, LoraConfig(**cfg))
    assert_unchanged(model, snap)


def test_a_rank_above_a_layers_size_is_refused_for_a_new_adapter_with_a_fix_that_works():
    """B·A cannot have a rank above min(d_in, d_out), so inject refuses it, naming the rank_pattern that fixes it
    (loading a PEFT adapter made so works: test_io, test_interop)."""
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"rank 40 exceeds min\(d_in, d_out\) = 32 of 'model.layers.0.self_attn.q_proj'"
                                         r".*train nothing.*rank_pattern=\{'q_proj': 32\}"):
        inject(model, LoraConfig(rank=40, targets=["q_proj", "k_proj"]))
    assert_unchanged(model, snap)
    for init in ("standard", "pissa"):
        fixed = LoraConfig(rank=40, init=init, targets=["q_proj", "k_proj"], rank_pattern={"k_proj": 16, "q_proj": 32})
        assert lora_layers(inject(tiny_llama(), fixed))["model.layers.1.self_attn.k_proj"].rank == 16


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
        inject(model, LoraConfig(rank=4, init_pattern={"wte": "pissa"}, targets=["wte", "c_attn"]))
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


@pytest.mark.parametrize("init", ["standard", "gaussian"])
def test_an_embedding_under_the_default_init_gets_pefts_default_and_init_pattern_wins(init):
    """standard on an embedding would draw A ~ KU(fan-in = vocabulary size) with B = 0: a near-dead adapter. It gets
    loralib's/PEFT's A = 0, B ~ N(0, 1) instead; a scheme named for the module in init_pattern is applied as written."""
    model = inject(tiny_llama(vocab=4096), LoraConfig(rank=8, init=init, targets=["embed_tokens", "q_proj"]))
    layers = lora_layers(model)
    emb, q = layers["model.embed_tokens"], layers["model.layers.0.self_attn.q_proj"]
    assert emb.init == "reversed-normal" and q.init == init
    assert torch.count_nonzero(emb.lora_A) == 0 and torch.count_nonzero(q.lora_B) == 0
    assert emb.lora_B.std().item() == pytest.approx(1.0, abs=0.1)   # (32 x 8) draws from N(0, 1)
    literal = inject(tiny_llama(vocab=4096), LoraConfig(rank=8, init=init, targets=["embed_tokens"],
                                                        init_pattern={"embed_tokens": init}))
    emb = lora_layers(literal)["model.embed_tokens"]
    assert emb.init == init and torch.count_nonzero(emb.lora_B) == 0 and torch.count_nonzero(emb.lora_A) > 0


# ---- which modules: PEFT's rules, one name rule ---------------------------------------------------------------------

def test_name_matches_is_peft_rule_for_every_name_list():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"]) and name_matches("q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert name_matches("model.layers.0.q_proj", r".*\.(q|k)_proj") and not name_matches("model.q_proj.x", r".*q_proj")


SELECTIONS = [   # loralab config (PEFT's config: the same keys under PEFT's names)
    {"targets": "all-linear"},
    {"targets": ["q_proj", "v_proj", "down_proj"], "exclude": ["layers.1.self_attn.v_proj"]},
    {"targets": ["q_proj", "v_proj", "o_proj"], "exclude": r".*\.layers\.0\..*"},
    {"targets": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    {"targets": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"targets": r".*\.(q|k)_proj"},
    {"targets": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},   # a module to save is never adapted
]
PEFT_NAMES = {"targets": "target_modules", "exclude": "exclude_modules"}


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_selection_and_trainable_count_equal_pefts(selection):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, **{PEFT_NAMES.get(k, k): v
                                                                        for k, v in selection.items()}))
    model = inject(tiny_llama(), LoraConfig(rank=4, **selection))
    assert sorted(lora_layers(model)) == sorted(pm.targeted_module_names)
    assert trainable_summary(model).trainable == pm.get_nb_trainable_parameters()[0]


def test_all_linear_is_every_linear_layer_but_the_head_and_takes_a_layer_filter():
    model = inject(tiny_llama(), LoraConfig(rank=4, targets="ALL-LINEAR", layers_to_transform=[1]))   # PEFT's case rule
    names = sorted(lora_layers(model))
    assert len(names) == 7 and all(".layers.1." in n for n in names) and "lm_head" not in names
    assert model.lora_config.targets == "all-linear"


@pytest.mark.parametrize("targets, match, fixed", [
    (["all-linear"], r"for every linear layer write targets='all-linear'", "all-linear"),
    ("q_proj", r"for suffix matching give a list, e.g. targets=\['q_proj'\]", ["q_proj"]),
    ("qproj", r"or targets='all-linear' for every linear layer", "all-linear"),
])
def test_target_errors_give_a_fix_that_works(targets, match, fixed):
    with pytest.raises(ValueError, match=match):
        inject(tiny_llama(), LoraConfig(rank=4, targets=targets))
    assert lora_layers(inject(tiny_llama(), LoraConfig(rank=4, targets=fixed)))


def test_all_linear_refuses_a_multihead_attention_out_proj_with_a_fix_that_works():
    """PEFT's all-linear includes nn.MultiheadAttention's out_proj, whose weight the attention reads directly, so an
    adapter there would be ignored; loralab says so, and its hint leaves it out."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))

    with pytest.raises(TypeError, match=r"'0.out_proj' is a NonDynamicallyQuantizableLinear.*exclude=\['out_proj'\]"):
        inject(model(), LoraConfig(rank=2, targets="all-linear"))
    assert sorted(lora_layers(inject(model(), LoraConfig(rank=2, targets="all-linear", exclude=["out_proj"])))) == ["1"]


@pytest.mark.parametrize("cfg, match", [
    ({"layers_to_transform": [0], "targets": "q_proj"}, "layers_to_transform needs targets as a list"),
    ({"layers_pattern": "layers"}, "give layers_to_transform too"),
    ({"layers_to_transform": [-1]}, "ints >= 0"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    ({"exclude": "([bad"}, "exclude '\\(\\[bad' is not a valid regex"),
])
def test_selection_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**cfg)


def test_selection_that_leaves_nothing_raises_and_an_unused_exclude_warns():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"matched 2 modules, but .* left none.*'model.layers.0.self_attn.q_proj' "
                                         r"is in layer 0"):
        inject(model, LoraConfig(rank=4, targets=["q_proj"], layers_to_transform=[5]))
    assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match=r"exclude=\('vproj',\) excluded no module"):
        inject(model, LoraConfig(rank=4, targets=["q_proj"], exclude=["vproj"]))


# ---- modules_to_save ------------------------------------------------------------------------------------------------

def test_modules_to_save_train_in_full_and_reach_the_optimizer():
    model = inject(tiny_llama(), LoraConfig(rank=4, targets=QV, modules_to_save=["lm_head", "norm"]))
    head = model.lm_head
    assert head.weight.requires_grad and model.model.norm.weight.requires_grad and "lm_head" not in lora_layers(model)
    assert not model.model.layers[0].input_layernorm.weight.requires_grad   # "norm" is a name, not a substring
    grouped = {id(p) for g in lora_param_groups(model, 1e-3) for p in g["params"]}
    assert grouped == {id(p) for p in trainable_parameters(model)} and id(head.weight) in grouped
    summary = trainable_summary(model)
    assert summary.by_type["modules_to_save"] == (2, 64 * 32 + 32)
    assert summary.trainable == sum(p.numel() for p in trainable_parameters(model))
    assert str(summary).startswith(f"trainable params: {summary.trainable:,d} || all params: {summary.total:,d}")


def test_modules_to_save_typos_and_tied_modules_are_refused_and_change_nothing():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save entries matched no module: 'lm_haed' \(did you mean "
                                         r"'lm_head'\?\)"):
        inject(model, LoraConfig(rank=4, targets=QV, modules_to_save=["lm_haed"]))
    assert_unchanged(model, snap)
    gpt2 = tiny_gpt2()   # lm_head is tied to wte: training it would train the embedding too
    with pytest.raises(ValueError, match=r"training 'lm_head', whose weight is shared with 'transformer.wte'"):
        inject(gpt2, LoraConfig(rank=4, targets=["c_attn"], modules_to_save=["lm_head"]))


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
                                     r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r".*\.(?:q|v)*_proj"])
def test_ordinary_regexes_pass_the_backtracking_check(pattern):
    assert LoraConfig(targets=pattern, rank_pattern={pattern: 2}).targets == pattern
