"""Initialization schemes for LoRA factors: a registry of small pure functions.

Every scheme sees the frozen weight as a float32 CPU ``(d_out, d_in)`` matrix ``w`` (never mutated; a ``meta``
tensor of that shape for schemes registered with ``reads_weight=False``) and returns
``Factors(a, b)`` with ``a: (r, d_in)`` and ``b: (d_out, r)``; a scheme that moves part of the weight into the
adapter also returns ``base``, the new ``(d_out, d_in)`` residual weight. Randomness comes only from ``g``, a CPU
generator, so the same seed gives bit-identical factors on any device. The maths of each scheme is in the
docstrings; notation: ``KU(f) = U(-1/sqrt(f), 1/sqrt(f))`` (``kaiming_uniform_(a=sqrt(5))`` with fan-in ``f``).

Adding a scheme is one decorated function here; tests are parametrized over :func:`init_schemes`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Factors:
    """The initial adapter: ``a (r, d_in)``, ``b (d_out, r)``, and the new base weight if the scheme moves one."""

    a: Tensor
    b: Tensor
    base: Tensor | None = None


SchemeFn = Callable[..., Factors]


@dataclass(frozen=True)
class InitScheme:
    """A registered scheme and what it promises.

    Attributes:
        name: registry key (``LoraConfig.init``).
        fn: ``fn(w, rank, *, scale, g, **init_kwargs) -> Factors``.
        preserves_output: ``s·B·A`` (plus any base change) leaves the layer's output unchanged at init.
        modifies_base: the scheme rewrites the frozen weight (``Factors.base`` is set).
        even_rank: the scheme needs an even rank.
        reads_weight: the factors depend on the weight's values (not only its shape); the others get a ``meta``
            tensor of the right shape, so a large model on a GPU is not copied to the CPU to init them.
        one_hot: the scheme used instead on a layer whose input is one-hot (an embedding), or None to use this one
            there too. Schemes that PEFT has declare what PEFT does on an embedding (``reversed-normal``): under
            ``standard``, A ~ KU(d_in = vocabulary size) would make the adapter near-dead (REFERENCE.md).
        summary: one line for tables (``loralab inits``).
    """

    name: str
    fn: SchemeFn
    preserves_output: bool
    modifies_base: bool
    even_rank: bool
    reads_weight: bool
    one_hot: str | None
    summary: str

    def __call__(self, w: Tensor, rank: int, *, scale: float, g: torch.Generator, **kwargs) -> Factors:
        return self.fn(w, rank, scale=scale, g=g, **kwargs)


_REGISTRY: dict[str, InitScheme] = {}


def register(
    name: str,
    *,
    preserves_output: bool = True,
    modifies_base: bool = False,
    even_rank: bool = False,
    reads_weight: bool = True,
    one_hot: str | None = None,
):
    """Decorator that adds a scheme to the registry under ``name`` (the keywords are :class:`InitScheme`'s)."""

    def deco(fn: SchemeFn) -> SchemeFn:
        if name in _REGISTRY:
            raise ValueError(f"init scheme {name!r} is already registered")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = InitScheme(
            name, fn, preserves_output, modifies_base, even_rank, reads_weight, one_hot, summary
        )
        return fn

    return deco


def init_schemes() -> Mapping[str, InitScheme]:
    """The registry, name → :class:`InitScheme` (read-only)."""
    return MappingProxyType(_REGISTRY)


def get_scheme(name: str) -> InitScheme:
    """Look up a scheme; an unknown name raises a ``ValueError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown init scheme {name!r}; valid schemes: {valid}") from None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (joined by ``:``); stable across runs, machines and Python versions (unlike
    ``hash``). Every seed loralab derives (per module, per split, per width cell) comes from here."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _ku(rows: int, cols: int, fan_in: int, g: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=g)


@register("standard", reads_weight=False, one_hot="reversed-normal")
def standard(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """A ~ KU(d_in), B = 0 (Hu et al. 2021; loralib; PEFT ``True``): Init[A] of Hayou et al. 2024."""
    d_out, d_in = w.shape
    return Factors(a=_ku(rank, d_in, d_in, g), b=torch.zeros(d_out, rank))


@register("gaussian", reads_weight=False, one_hot="reversed-normal")
def gaussian(w: Tensor, rank: int, *, scale: float, g: torch.Generator, std: float | None = None) -> Factors:
    """A ~ N(0, std²) with std = 1/r unless given, B = 0 (the LoRA paper's text; PEFT ``"gaussian"``)."""
    d_out, d_in = w.shape
    std = 1.0 / rank if std is None else float(std)
    return Factors(a=torch.randn(rank, d_in, generator=g) * std, b=torch.zeros(d_out, rank))


@register("reversed", reads_weight=False)
def reversed_(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """A = 0, B ~ KU(r): Init[B] of Hayou et al. 2024 (Var(B) = 1/(3r), independent of width)."""
    d_out, d_in = w.shape
    return Factors(a=torch.zeros(rank, d_in), b=_ku(d_out, rank, rank, g))


def _orthogonal(w: Tensor, rank: int, g: torch.Generator, *, eye: bool, ca: float, cb: float) -> Factors:
    """Datta 2024: Q orthogonal (r×r); A = (G_A Q[0::2])ᵀ·ca, B = (G_Bᵀ Q[1::2])·cb, so B·A ∝ Q_e Q_oᵀ = 0."""
    d_out, d_in = w.shape
    q = torch.eye(rank) if eye else torch.linalg.qr(torch.randn(rank, rank, generator=g)).Q
    g_a = torch.randn(d_in, rank // 2, generator=g)  # (d_in, r/2)
    g_b = torch.randn(rank // 2, d_out, generator=g)  # (r/2, d_out)
    a = (g_a @ q[0::2]).T * ca  # (r, d_in), rank r/2
    b = (g_b.T @ q[1::2]) * cb  # (d_out, r), rank r/2
    return Factors(a=a.contiguous(), b=b.contiguous())


@register("orthogonal-qr-match", even_rank=True, reads_weight=False)
def orthogonal_qr_match(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """Orthogonal (QR) pairs scaled like the standard init: A·d_in^-1/2, B·r^-1/2 (the study's "QR (Match)")."""
    d_in = w.shape[1]
    return _orthogonal(w, rank, g, eye=False, ca=d_in**-0.5, cb=rank**-0.5)


@register("orthogonal-qr-const", even_rank=True, reads_weight=False, one_hot="reversed-normal")
def orthogonal_qr_const(w: Tensor, rank: int, *, scale: float, g: torch.Generator, const: float = 0.1) -> Factors:
    """Orthogonal (QR) pairs scaled by a constant 0.1 (the study's "QR (Const)"; PEFT ``"orthogonal"``)."""
    return _orthogonal(w, rank, g, eye=False, ca=const, cb=const)


@register("orthogonal-eye", even_rank=True, reads_weight=False)
def orthogonal_eye(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """As qr-match with Q = I: r/2 standard pairs (B col 0) plus r/2 reversed pairs (A row 0); the study's "Eye"."""
    d_in = w.shape[1]
    return _orthogonal(w, rank, g, eye=True, ca=d_in**-0.5, cb=rank**-0.5)


RANDOM_DISTS = ("kaiming", "xavier")  # the options of random-both's ``dist``


def _random_pair(w: Tensor, rank: int, g: torch.Generator, dist: str) -> tuple[Tensor, Tensor]:
    """Both factors random: ``kaiming`` draws A ~ KU(d_in), B ~ KU(r) (REFERENCE.md); ``xavier`` draws both from
    Glorot uniform, U(±√(6/(fan_in + fan_out))), Var = 2/(fan_in + fan_out) with the factor's own fans (A: d_in and
    r; B: r and d_out). A is drawn first, then B, either way."""
    d_out, d_in = w.shape
    if dist == "kaiming":
        return _ku(rank, d_in, d_in, g), _ku(d_out, rank, rank, g)
    if dist == "xavier":
        a = torch.empty(rank, d_in).uniform_(-1.0, 1.0, generator=g) * math.sqrt(6.0 / (d_in + rank))
        return a, torch.empty(d_out, rank).uniform_(-1.0, 1.0, generator=g) * math.sqrt(6.0 / (rank + d_out))
    raise ValueError(f"init_kwargs dist={dist!r} is not one of {', '.join(map(repr, RANDOM_DISTS))}")


@register("random-both", preserves_output=False, reads_weight=False)
def random_both(
    w: Tensor, rank: int, *, scale: float, g: torch.Generator, dist: Literal["kaiming", "xavier"] = "kaiming"
) -> Factors:
    """A ~ KU(d_in), B ~ KU(r) (``dist="xavier"``: Glorot uniform): the anti-pattern; s·B·A ≠ 0 adds noise to W."""
    a, b = _random_pair(w, rank, g, dist)
    return Factors(a=a, b=b)


@register("random-both-subtracted", modifies_base=True)
def random_both_subtracted(
    w: Tensor, rank: int, *, scale: float, g: torch.Generator, dist: Literal["kaiming", "xavier"] = "kaiming"
) -> Factors:
    """As random-both, with W ← W − s·B·A: the output is preserved, yet both factors start non-zero (a control).

    It separates the two things random-both changes at step 0: noise in the output (which this removes) and two
    non-zero factors (which it keeps, so both get a gradient at once). Same seed, same factors as random-both.
    """
    a, b = _random_pair(w, rank, g, dist)
    return Factors(a=a, b=b, base=w - scale * (b @ a))


@register("pissa", modifies_base=True, one_hot="reversed-normal")
def pissa(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """PiSSA (Meng et al. 2024): W = U S Vᵀ; A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)), W ← W − s·B·A."""
    u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s_vals[:rank] / scale)
    a = root[:, None] * vh[:rank]  # (r, d_in)
    b = u[:, :rank] * root[None, :]  # (d_out, r)
    return Factors(a=a.contiguous(), b=b.contiguous(), base=w - scale * (b @ a))


@register("olora", modifies_base=True, one_hot="reversed-normal")
def olora(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """OLoRA (Büyükakyüz 2024): W = Q R; A = R[:r], B = Q[:, :r], W ← W − s·B·A."""
    q, r = torch.linalg.qr(w)
    a, b = r[:rank].contiguous(), q[:, :rank].contiguous()
    return Factors(a=a, b=b, base=w - scale * (b @ a))


@register("reversed-normal", reads_weight=False)
def reversed_normal(w: Tensor, rank: int, *, scale: float, g: torch.Generator) -> Factors:
    """A = 0, B ~ N(0, 1): loralib's and PEFT's init of an embedding's adapter (one-hot input: fan-in 1)."""
    d_out, d_in = w.shape
    return Factors(a=torch.zeros(rank, d_in), b=torch.randn(d_out, rank, generator=g))
