"""LoRA on a 4-bit base (bitsandbytes' ``Linear4bit``, nf4 and fp4), on the CPU: bitsandbytes runs 4-bit there
through torch ops. The base comes from transformers' ``BitsAndBytesConfig`` as a user (and the lab) would load it.

Skipped where bitsandbytes is not installed (it is the optional extra ``loralab[bnb]``; CI installs it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import perturb, tiny_llama
from loralab import (
    LoraConfig,
    LoraStateError,
    check_identity,
    init_schemes,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    trainable_parameters,
    unload,
)
from loralab.layers import Linear4bit, layer_type_for, weight_of

bnb = pytest.importorskip("bitsandbytes")

QUANT = ["nf4", "fp4"]
SCHEMES = init_schemes()
KEEPS = sorted(n for n, s in SCHEMES.items() if s.preserves_output and not s.modifies_base)
MOVES = sorted(n for n, s in SCHEMES.items() if s.modifies_base)
TARGETS = ["q_proj", "v_proj", "down_proj"]
HALF_STEP = 0.17  # the widest gap between neighbouring nf4/fp4 levels is < 0.34 of the block's absmax

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-4bit")
    tiny_llama().save_pretrained(path)
    return path


def quantized(path, quant: str = "nf4", compute=torch.float32) -> nn.Module:
    """The tiny Llama loaded 4-bit on the CPU, as transformers does it (its head and embeddings stay float)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32, device_map="cpu")
    return model.eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def config(init: str = "standard", **kw) -> LoraConfig:
    return LoraConfig(rank=4, alpha=8, init=init, targets=TARGETS, **kw)


def linear4bit(d_in: int, d_out: int, quant: str, seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    """A ``Linear4bit`` quantized from a seeded float ``nn.Linear`` (returned too, as the float original)."""
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    q = bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.float32, quant_type=quant)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant)
    q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return q.to("cpu"), dense


# ---- the layer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANT)
def test_the_weight_reads_as_its_dequantized_float_matrix(llama_dir, quant):
    model, dense = quantized(llama_dir, quant), tiny_llama()
    q, w = model.model.layers[0].self_attn.q_proj, dense.model.layers[0].self_attn.q_proj.weight
    assert layer_type_for(q) is Linear4bit
    got = weight_of(q)
    assert got.shape == w.shape and got.dtype == torch.float32
    assert (got - w).abs().max() <= HALF_STEP * w.abs().max()  # the 4-bit rounding, no more
    assert not torch.equal(got, w)  # and it is the quantized weight, not a float copy kept somewhere


@settings(max_examples=12, deadline=None)
@given(
    d_in=st.sampled_from([16, 48, 64]),
    d_out=st.sampled_from([8, 32, 40]),
    rank=st.integers(1, 6),
    quant=st.sampled_from(QUANT),
    seed=st.integers(0, 2**16),
)
def test_the_adapted_output_is_the_dequantized_linear_plus_the_update(d_in, d_out, rank, quant, seed):
    q, _ = linear4bit(d_in, d_out, quant, seed)
    layer = Linear4bit(q, rank, 2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    x = torch.randn(3, 5, d_in, generator=g)
    want = F.linear(x, weight_of(q), q.bias) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", QUANT)
def test_packed_runs_on_one_4bit_base_each_get_their_own_update(quant):
    q, _ = linear4bit(32, 24, quant)
    runs = [Linear4bit(q, 4, 8.0), Linear4bit(q, 4, 8.0)]
    for k, run in enumerate(runs):
        with torch.no_grad():
            run.lora_A.normal_(generator=torch.Generator().manual_seed(k))
            run.lora_B.normal_(generator=torch.Generator().manual_seed(10 + k))
    x = torch.randn(2, 6, 32)
    got = Linear4bit.packed_forward(runs, x)
    torch.testing.assert_close(got, torch.cat([runs[0](x[:1]), runs[1](x[1:])]), atol=1e-5, rtol=1e-5)


# ---- inject on a quantized model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", KEEPS)
@pytest.mark.parametrize("quant", QUANT)
def test_every_output_preserving_init_starts_at_the_4bit_models_output(llama_dir, quant, init):
    model = quantized(llama_dir, quant)
    with torch.no_grad():
        before = model(ids()).logits
    inject(model, config(init), seed=1)
    assert {type(m) for m in lora_layers(model).values()} == {Linear4bit}
    with torch.no_grad():
        after = model(ids()).logits
    if all(not m.lora_A.any() or not m.lora_B.any() for m in lora_layers(model).values()):
        assert torch.equal(after, before)  # a zero factor: the update is exactly 0 and the base forward untouched
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert check_identity(model, ids()) <= 1e-6


def test_standard_is_exactly_the_4bit_model_at_step_0(llama_dir):
    model = quantized(llama_dir, "nf4", compute=torch.bfloat16)
    with torch.no_grad():
        before = model(ids()).logits
    inject(model, config(), seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, before)


def test_only_the_factors_train_and_gradients_reach_every_one(llama_dir):
    model = quantized(llama_dir)
    inject(model, config("orthogonal-qr-match"), seed=1)  # both factors non-zero: both get a gradient at step 0
    layers = lora_layers(model)
    factors = {id(p) for m in layers.values() for p in (m.lora_A, m.lora_B)}
    assert {id(p) for p in trainable_parameters(model)} == factors
    model(ids(), labels=ids()).loss.backward()
    for name, layer in layers.items():
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0, name
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if id(p) not in factors)


@pytest.mark.parametrize("init", MOVES)
def test_an_init_that_rewrites_the_base_is_refused_with_the_fix(llama_dir, init):
    model = quantized(llama_dir)
    with pytest.raises(ValueError, match=rf"init '{init}' rewrites the base weight.*4 bits.*'standard'"):
        inject(model, config(init))
    assert not lora_layers(model)  # all-or-nothing: the model is as it was


def test_merging_into_a_4bit_base_is_refused_and_changes_nothing(llama_dir):
    model = quantized(llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject(model, LoraConfig(rank=4, alpha=8, targets=["lm_head", *TARGETS]), seed=1)  # a float layer first
    perturb(model)
    with torch.no_grad():
        before = model(ids()).logits
    for refused in (lambda: merge(model), lambda: unload(model)):
        with pytest.raises(LoraStateError, match="cannot merge into its Linear4bit base.*merge_weights=False"):
            refused()
        assert not any(layer.merged for layer in lora_layers(model).values())  # not even the float head
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, before, atol=0, rtol=0)
    plain = unload(model, merge_weights=False)
    assert not lora_layers(plain) and type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()).logits, quantized(llama_dir)(ids()).logits, atol=0, rtol=0)


# ---- adapters ------------------------------------------------------------------------------------------------------


def test_an_adapter_from_a_4bit_base_loads_back_in_loralab_and_in_peft(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = inject(quantized(llama_dir), config(dropout=0.1), seed=1)
    perturb(model)
    with torch.no_grad():
        want = model.eval()(ids()).logits
    save_adapter(model, tmp_path)
    ours = load_adapter(quantized(llama_dir), tmp_path).eval()
    in_peft = peft.PeftModel.from_pretrained(quantized(llama_dir), tmp_path).eval()
    assert any("Linear4bit" in type(m).__name__ for m in in_peft.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(in_peft(ids()).logits, want, atol=1e-5, rtol=1e-4)


def test_init_peft_on_a_4bit_peft_model_draws_the_factors_loralab_draws(llama_dir):
    peft = pytest.importorskip("peft")
    from loralab import init_peft

    pm = peft.get_peft_model(quantized(llama_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    init_peft(pm, "orthogonal-qr-match", seed=1)
    ours = lora_layers(inject(quantized(llama_dir), config("orthogonal-qr-match"), seed=1))
    theirs = {n: m for n, m in pm.get_base_model().named_modules() if n in ours}
    assert set(theirs) == set(ours)
    for name, layer in ours.items():
        torch.testing.assert_close(theirs[name].lora_A["default"].weight, layer.lora_A, atol=0, rtol=0)
        torch.testing.assert_close(theirs[name].lora_B["default"].weight, layer.lora_B, atol=0, rtol=0)
