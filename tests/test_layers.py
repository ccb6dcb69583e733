"""Every layer type × every scheme: identity at init, factored ≡ generic forward, merged ≡ unmerged, gradients."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from core_helpers import LAYER_CASES, make_case, perturb
from loralab import (
    IdentityWarning,
    LoraConfig,
    LoraLayer,
    LoraStateError,
    init_schemes,
    inject,
    lora_layers,
    merge,
    unmerge,
)
from loralab.layers import Linear

SCHEMES = sorted(init_schemes())
CASES = sorted(LAYER_CASES)
RANK = 4


def adapted(case, init="standard", seed=0, **kw):
    """The case's model with LoRA injected, its untouched copy, and an input; checks the identity warning."""
    model, x = make_case(case)
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # init_pattern names the scheme literally: an embedding gets it too, not its scheme's one_hot variant
        inject(model, LoraConfig(rank=RANK, alpha=8, init=init, init_pattern={"0": init}, targets=["0"], **kw),
               seed=seed)
    warned = any(issubclass(w.category, IdentityWarning) for w in caught)
    assert warned == (not init_schemes()[init].preserves_output)
    return model, original, x


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("init", SCHEMES)
def test_output_at_init(case, init):
    model, original, x = adapted(case, init)
    diff = (model(x) - original(x)).abs().max().item()
    scale = original(x).abs().max().item()
    if init_schemes()[init].preserves_output:
        assert diff <= 1e-5 * max(scale, 1.0), f"{init} changed the output of {case} by {diff}"
    else:
        assert diff > 1e-3


BASE_ATTRS = ("weight", "bias", "in_features", "out_features", "num_embeddings", "embedding_dim", "padding_idx",
              "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
              "nf")


@pytest.mark.parametrize("case", CASES)
def test_a_lora_layer_reads_like_its_base_without_holding_its_parameters_twice(case):
    """Models read their layers' attributes (T5: ``wo.weight.dtype``, Whisper: ``conv1.stride``): the wrapper
    answers them from its base, while the base's tensors stay registered once, under ``base_layer``."""
    model, _, _ = adapted(case)
    layer = lora_layers(model)["0"]
    read = [a for a in BASE_ATTRS if hasattr(layer.base_layer, a)]
    assert "weight" in read and len(read) >= 3
    for attr in read:
        assert getattr(layer, attr) is getattr(layer.base_layer, attr), attr
    names = [n for n, _ in model.named_parameters()]
    assert "0.base_layer.weight" in names and "0.weight" not in names and len(names) == len(set(names))
    assert "0.weight" not in model.state_dict()
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = layer.no_such_thing


@pytest.mark.parametrize("case", CASES)
def test_factored_forward_equals_generic_delta_forward(case):
    model, _, x = adapted(case)
    perturb(model)
    layer = lora_layers(model)["0"]
    fast = layer.lora_delta(x, layer.lora_A, layer.lora_B)
    generic = LoraLayer.lora_delta(layer, x, layer.lora_A, layer.lora_B)  # apply_weight(x, ΔW)
    assert torch.allclose(fast, generic, atol=1e-5)
    assert fast.abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(case):
    model, _, x = adapted(case)
    perturb(model)
    layer = lora_layers(model)["0"]
    w0 = layer.base_layer.weight.detach().clone()
    y = model(x)
    merge(model)
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert torch.allclose(model(x), y, atol=1e-5)
    with pytest.raises(LoraStateError, match="already merged"):
        merge(model)
    unmerge(model)
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)
    with pytest.raises(LoraStateError, match="not merged"):
        unmerge(model)


@pytest.mark.parametrize("case", CASES)
def test_step0_gradients_standard_vs_reversed(case):
    """B = 0 ⇒ ∇A = 0 under standard; A = 0 ⇒ ∇B = 0 under reversed (REFERENCE.md, Hayou et al.)."""
    for init, zero, nonzero in [("standard", "lora_A", "lora_B"), ("reversed", "lora_B", "lora_A")]:
        model, _, x = adapted(case, init)
        model(x).float().pow(2).sum().backward()
        layer = lora_layers(model)["0"]
        assert torch.count_nonzero(getattr(layer, zero).grad) == 0
        assert getattr(layer, nonzero).grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None


def test_dropout_only_in_training():
    model, _, x = adapted("linear", dropout=0.5)
    perturb(model)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_drops_a_fraction_p_and_stays_unbiased(p):
    from loralab.layers import Dropout

    torch.manual_seed(0)
    x = torch.ones(400, 1001, requires_grad=True)   # numel not a multiple of 4: the last word is cut
    y = Dropout(p).train()(x)
    kept = y != 0
    n = x.numel()
    assert abs(1 - kept.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5   # 4 sigma
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)   # inverted: E[y] = x
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)                                          # gradient through kept entries
    assert torch.equal(Dropout(p).eval()(x), x)


def test_dropout_masks_are_independent_of_position():
    """No pattern from the 16-bit packing: neighbouring entries (same 64-bit word) are dropped independently."""
    from loralab.layers import Dropout

    torch.manual_seed(1)
    kept = (Dropout(0.5).train()(torch.ones(200_000)) != 0).float().view(-1, 4)
    pair = (kept[:, 0] * kept[:, 1]).mean().item()   # P(both kept) = 1/4 if independent
    assert abs(pair - 0.25) < 0.01
    assert all(abs(kept[:, i].mean().item() - 0.5) < 0.01 for i in range(4))


def test_embedding_ignores_dropout_and_rejects_max_norm():
    model, _, _ = adapted("embedding", dropout=0.5)
    assert lora_layers(model)["0"].dropout.p == 0.0
    m = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="max_norm"):
        inject(m, LoraConfig(rank=2, targets=["0"]))
    assert isinstance(m[0], nn.Embedding)


def test_half_precision_base_keeps_float32_adapter():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    inject(model, LoraConfig(rank=2, targets=["0"]))
    layer = lora_layers(model)["0"]
    assert layer.lora_A.dtype == torch.float32
    perturb(model)
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rslora_scale():
    model, _, _ = adapted("linear", rslora=True)
    assert lora_layers(model)["0"].scale == pytest.approx(8 / RANK**0.5)
    model, _, _ = adapted("linear")
    assert lora_layers(model)["0"].scale == pytest.approx(8 / RANK)


@settings(max_examples=30, deadline=None)
@given(d_in=st.integers(2, 24), d_out=st.integers(2, 24), batch=st.integers(1, 3), data=st.data())
def test_property_linear_identity_and_merge(d_in, d_out, batch, data):
    init = data.draw(st.sampled_from([s for s in SCHEMES if init_schemes()[s].preserves_output]))
    even = init_schemes()[init].even_rank
    if even and min(d_in, d_out) < 2:
        return
    rank = data.draw(st.integers(2 if even else 1, min(d_in, d_out)).map(lambda r: r - r % 2 if even else r))
    torch.manual_seed(d_in * 31 + d_out)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    original = copy.deepcopy(model)
    x = torch.randn(batch, d_in)
    inject(model, LoraConfig(rank=rank, alpha=2 * rank, init=init, targets=["0"]))
    assert torch.allclose(model(x), original(x), atol=1e-5)
    perturb(model)
    y = model(x)
    merge(model)
    assert torch.allclose(model(x), y, atol=1e-4)


def _linear_layer(dropout=0.0, dtype=torch.float32, bias=True, base_cls=nn.Linear):
    torch.manual_seed(0)
    base = base_cls(12, 10, bias=bias).to(dtype).requires_grad_(False)
    layer = Linear(base, 4, 8, dropout=dropout)
    perturb(nn.Sequential(layer))
    return layer


def _forward_and_grads(layer, forward, x):
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype))
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12)])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_linear_fused_forward_equals_generic_forward(shape, dropout):
    """The nn.Linear fast path (update added inside the GEMM, dropout's scale on the rank side) is the generic
    forward: same values, same gradients, same dropout masks for the same RNG state."""
    layer = _linear_layer(dropout)
    x = torch.randn(shape)
    torch.manual_seed(7)
    fast = _forward_and_grads(layer, layer, x)
    torch.manual_seed(7)
    generic = _forward_and_grads(layer, lambda t: LoraLayer.forward(layer, t), x)
    assert torch.allclose(fast[0], generic[0], atol=1e-5)
    assert all(torch.allclose(f, g, atol=1e-5) for f, g in zip(fast[1], generic[1]))
    assert fast[1][2].abs().max() > 1e-3   # B really gets a gradient


def test_linear_fused_forward_passes_gradcheck():
    layer = _linear_layer().double()
    x = torch.randn(3, 2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: layer(x), (x, layer.lora_A, layer.lora_B))


def test_linear_fused_forward_on_non_contiguous_input_and_output():
    layer = _linear_layer()
    x = torch.randn(12, 5).T          # non-contiguous input
    assert torch.allclose(layer(x), LoraLayer.forward(layer, x), atol=1e-5)


def test_base_subclass_output_is_not_modified_in_place():
    """Only a plain nn.Linear's output is known to be fresh; a subclass may keep it, so it gets the generic path."""
    class Caching(nn.Linear):
        def forward(self, x):
            self.last = super().forward(x)
            return self.last

    layer = _linear_layer(base_cls=Caching)
    x = torch.randn(4, 12)
    y = layer(x)
    assert torch.allclose(layer.base_layer.last, F.linear(x, layer.base_layer.weight, layer.base_layer.bias))
    assert (y - layer.base_layer.last).abs().max() > 1e-3


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_low_precision_paths_match_float32(autocast):
    """bf16 base with float32 adapter: without autocast the update is added out of place in float32 and cast; under
    autocast the factors take bf16 and the update goes inside the GEMM. Both stay close to the float32 result."""
    ref_layer = _linear_layer()
    layer = _linear_layer(dtype=torch.bfloat16)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(6, 12)
    ref = ref_layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x.to(torch.bfloat16))
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.lora_B.grad.dtype == torch.float32
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)


def test_a_hooked_base_output_is_not_modified_in_place():
    layer = _linear_layer()
    kept = []
    layer.base_layer.register_forward_hook(lambda m, args, out: kept.append(out))
    x = torch.randn(4, 12)
    y = layer(x)
    assert torch.allclose(kept[0], F.linear(x, layer.base_layer.weight, layer.base_layer.bias))
    assert (y - kept[0]).abs().max() > 1e-3


def _autograd_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_lora_forward_writes_no_view_in_place():
    """An in-place add into a view makes autograd replay the view by copy in backward (CopySlices): the fast path
    must avoid it for 3-D inputs and biased bases, solo and packed."""
    from loralab.lab.run.pack import PackedLayer

    layer = _linear_layer(bias=True)
    x = torch.randn(2, 3, 12, requires_grad=True)
    assert not {"CopySlices", "AsStridedBackward0"} & _autograd_nodes(layer(x))
    packed = PackedLayer([layer, Linear(layer.base_layer, 4, 8.0)])
    assert not {"CopySlices", "AsStridedBackward0"} & _autograd_nodes(packed(torch.randn(4, 3, 12, requires_grad=True)))
