"""Each scheme's factors match REFERENCE.md's maths; parametrized over the registry where a property is universal."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import LoraConfig, get_scheme, init_schemes, register
from loralab.inits import _REGISTRY, Factors

SCHEMES = sorted(init_schemes())
D_OUT, D_IN, R = 384, 512, 8


def run(name, w=None, rank=R, seed=0, scale=2.0, **kw):
    w = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(99)) if w is None else w
    return get_scheme(name)(w, rank, scale=scale, g=torch.Generator().manual_seed(seed), **kw)


def test_all_nine_schemes_exist_with_metadata():
    assert set(SCHEMES) >= {"standard", "gaussian", "reversed", "orthogonal-eye", "orthogonal-qr-const",
                            "orthogonal-qr-match", "random-both", "pissa", "olora"}
    s = init_schemes()
    assert not s["random-both"].preserves_output
    assert {n for n in SCHEMES if s[n].modifies_base} == {"pissa", "olora", "random-both-subtracted"}
    assert {n for n in SCHEMES if s[n].even_rank} == {"orthogonal-eye", "orthogonal-qr-const", "orthogonal-qr-match"}
    assert all(s[n].summary for n in SCHEMES)


@pytest.mark.parametrize("name", SCHEMES)
def test_shapes_dtype_and_input_untouched(name):
    w = torch.randn(D_OUT, D_IN)
    before = w.clone()
    f = run(name, w)
    assert f.a.shape == (R, D_IN) and f.b.shape == (D_OUT, R)
    assert f.a.dtype == f.b.dtype == torch.float32
    assert torch.equal(w, before)
    assert (f.base is not None) == init_schemes()[name].modifies_base


@pytest.mark.parametrize("name", SCHEMES)
def test_declared_output_preservation_holds(name):
    """preserves_output ⇔ base' + s·B·A == W (base' = W when the base is untouched)."""
    w, scale = torch.randn(D_OUT, D_IN), 2.0
    f = run(name, w, scale=scale)
    effective = (w if f.base is None else f.base) + scale * f.b @ f.a
    preserved = torch.allclose(effective, w, atol=1e-4)
    assert preserved == init_schemes()[name].preserves_output


@pytest.mark.parametrize("name", SCHEMES)
def test_seeded_and_deterministic(name):
    f1, f2, f3 = run(name, seed=1), run(name, seed=1), run(name, seed=2)
    assert torch.equal(f1.a, f2.a) and torch.equal(f1.b, f2.b)
    random_scheme = name not in ("pissa", "olora")
    assert (not torch.equal(f1.a, f3.a) or not torch.equal(f1.b, f3.b)) == random_scheme


def test_standard_is_kaiming_uniform_of_d_in():
    f = run("standard")
    bound = 1 / math.sqrt(D_IN)
    assert f.a.abs().max() <= bound and f.a.abs().max() > 0.95 * bound
    assert f.a.var().item() == pytest.approx(1 / (3 * D_IN), rel=0.05)
    assert torch.count_nonzero(f.b) == 0


def test_gaussian_std_default_and_option():
    assert run("gaussian").a.std().item() == pytest.approx(1 / R, rel=0.05)
    assert run("gaussian", std=0.02).a.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(run("gaussian").b) == 0


def test_reversed_is_kaiming_uniform_of_r():
    f = run("reversed")
    assert torch.count_nonzero(f.a) == 0
    assert f.b.abs().max() <= 1 / math.sqrt(R)
    assert f.b.var().item() == pytest.approx(1 / (3 * R), rel=0.05)


@pytest.mark.parametrize("name, var_a, var_b", [
    ("orthogonal-qr-match", 1 / (2 * D_IN), 1 / (2 * R)),
    ("orthogonal-qr-const", 0.01 / 2, 0.01 / 2),
    ("orthogonal-eye", 1 / (2 * D_IN), 1 / (2 * R)),
])
def test_orthogonal_family(name, var_a, var_b):
    """B·A = 0 exactly in theory; each factor has rank r/2; entries' mean variance is half the pair's scale²."""
    f = run(name)
    assert (f.b @ f.a).abs().max() < 1e-5 * f.b.abs().max() * f.a.abs().max() * D_IN
    assert torch.linalg.matrix_rank(f.a).item() == R // 2
    assert torch.linalg.matrix_rank(f.b).item() == R // 2
    assert f.a.pow(2).mean().item() == pytest.approx(var_a, rel=0.1)
    assert f.b.pow(2).mean().item() == pytest.approx(var_b, rel=0.1)


def test_orthogonal_eye_structure():
    """Q = I: odd rows of A and even columns of B are exactly zero (r/2 standard + r/2 reversed pairs)."""
    f = run("orthogonal-eye")
    assert torch.count_nonzero(f.a[1::2]) == 0 and torch.count_nonzero(f.a[0::2].abs() > 0) == (R // 2) * D_IN
    assert torch.count_nonzero(f.b[:, 0::2]) == 0 and torch.all(f.b[:, 1::2] != 0)


def test_random_both_adds_noise():
    f = run("random-both")
    assert f.a.abs().max() <= 1 / math.sqrt(D_IN) and f.b.abs().max() <= 1 / math.sqrt(R)
    assert (f.b @ f.a).abs().max() > 0


@pytest.mark.parametrize("dist, var_a, var_b", [
    ("kaiming", 1 / (3 * D_IN), 1 / (3 * R)),
    ("xavier", 2 / (D_IN + R), 2 / (R + D_OUT)),
])
def test_random_both_distributions(dist, var_a, var_b):
    """kaiming: KU(d_in), KU(r) (REFERENCE.md); xavier: Glorot uniform with each factor's fans, Var = 2/(in + out)."""
    f = run("random-both", dist=dist)
    assert f.a.var().item() == pytest.approx(var_a, rel=0.05)
    assert f.b.var().item() == pytest.approx(var_b, rel=0.1)
    assert f.a.abs().max() <= (3 * var_a) ** 0.5 and f.b.abs().max() <= (3 * var_b) ** 0.5


def test_random_both_default_is_kaiming_and_an_unknown_dist_is_refused():
    assert all(torch.equal(x, y) for x, y in zip(vars(run("random-both")).values(),
                                                 vars(run("random-both", dist="kaiming")).values()) if x is not None)
    with pytest.raises(ValueError, match="dist='glorot' is not an option of 'random-both'; use one of 'kaiming'"):
        LoraConfig(init="random-both", init_kwargs={"dist": "glorot"})
    with pytest.raises(ValueError, match="dist='glorot' is not one of"):
        run("random-both", dist="glorot")


@pytest.mark.parametrize("dist", ["kaiming", "xavier"])
def test_subtracted_control_is_random_both_moved_into_the_base(dist):
    """The control: random-both's factors (same seed), with s·B·A taken out of the base: output kept, both non-zero."""
    w, scale = torch.randn(D_OUT, D_IN), 2.0
    rb, ctl = run("random-both", w, scale=scale, dist=dist), run("random-both-subtracted", w, scale=scale, dist=dist)
    assert torch.equal(rb.a, ctl.a) and torch.equal(rb.b, ctl.b)
    assert torch.count_nonzero(ctl.a) == ctl.a.numel() and torch.count_nonzero(ctl.b) == ctl.b.numel()
    assert torch.allclose(ctl.base, w - scale * rb.b @ rb.a)


def test_pissa_takes_the_top_singular_part():
    w, scale = torch.randn(64, 48), 2.0
    f = run("pissa", w, scale=scale)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    assert torch.allclose(scale * f.b @ f.a, top, atol=1e-4)
    assert torch.allclose(f.base, w - top, atol=1e-4)
    assert torch.allclose(f.a @ f.a.T, torch.diag(s[:R] / scale), atol=1e-4)  # A = diag(√(S/s)) Vᵀ


def test_olora_uses_qr():
    w, scale = torch.randn(64, 48), 0.5
    f = run("olora", w, scale=scale)
    assert torch.allclose(f.b.T @ f.b, torch.eye(R), atol=1e-5)  # orthonormal columns
    assert torch.allclose(torch.triu(f.a), f.a)  # rows of the upper-triangular R
    assert torch.allclose(f.base + scale * f.b @ f.a, w, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(2, 40), d_in=st.integers(2, 40), data=st.data())
def test_property_every_scheme_any_shape(d_out, d_in, data):
    name = data.draw(st.sampled_from(SCHEMES))
    even = init_schemes()[name].even_rank
    top = min(d_out, d_in)
    if even and top < 2:
        return
    rank = data.draw(st.integers(1, top).map(lambda r: max(2, r - r % 2) if even else r))
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out * 100 + d_in))
    f = get_scheme(name)(w, rank, scale=1.5, g=torch.Generator().manual_seed(0))
    assert f.a.shape == (rank, d_in) and f.b.shape == (d_out, rank)
    assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()
    if init_schemes()[name].preserves_output:
        base = w if f.base is None else f.base
        assert torch.allclose(base + 1.5 * f.b @ f.a, w, atol=1e-4)


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match="valid schemes: .*orthogonal-eye.*standard"):
        get_scheme("kaiming")
    with pytest.raises(ValueError, match="LoraConfig.init.*unknown init scheme 'kaiming'"):
        LoraConfig(init="kaiming")


@pytest.mark.parametrize("name", ["orthogonal-eye", "orthogonal-qr-const", "orthogonal-qr-match"])
def test_odd_rank_rejected_for_orthogonal(name):
    with pytest.raises(ValueError, match="even rank.*got rank 7: use 8 or 6"):
        LoraConfig(rank=7, init=name)
    with pytest.raises(ValueError, match="even rank"):
        LoraConfig(rank=8, init=name, rank_pattern={"q_proj": 3})


def test_init_kwargs_checked_against_the_scheme():
    with pytest.raises(ValueError, match=r"\['sigma'\] are not options of 'gaussian'; its options: \['std'\]"):
        LoraConfig(init="gaussian", init_kwargs={"sigma": 0.1})
    LoraConfig(init="gaussian", init_kwargs={"std": 0.1})


def test_a_new_scheme_is_one_decorated_function():
    @register("test-half-standard")
    def half(w, rank, *, scale, g):
        """A ~ U(±0.5/√d_in), B = 0."""
        return Factors(a=torch.empty(rank, w.shape[1]).uniform_(-0.5, 0.5, generator=g) / w.shape[1] ** 0.5,
                       b=torch.zeros(w.shape[0], rank))

    try:
        assert init_schemes()["test-half-standard"].preserves_output
        LoraConfig(init="test-half-standard")
        with pytest.raises(ValueError, match="already registered"):
            register("test-half-standard")(half)
    finally:
        _REGISTRY.pop("test-half-standard")


@pytest.mark.parametrize("name", SCHEMES)
def test_reads_weight_is_honest(name):
    """A scheme that says it needs only the shape gets the same factors from a meta placeholder; one that reads the
    weight gives other factors for another weight."""
    w = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1))
    f = run(name, w)
    if init_schemes()[name].reads_weight:   # the factors, or the new base beyond the weight's own change
        w2 = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(2))
        other = run(name, w2)
        assert not torch.allclose(f.a, other.a) or not torch.allclose(f.base - w, other.base - w2)
    else:
        g = run(name, torch.empty(D_OUT, D_IN, device="meta"))
        assert torch.equal(f.a, g.a) and torch.equal(f.b, g.b) and g.a.device.type == "cpu"
