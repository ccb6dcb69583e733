"""``LoraConfig``: what to adapt and how, validated when built so bad input fails before a model is touched."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .inits import get_scheme

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear-like layer but the output head (inject.py selects them)
try:  # the parser behind the re module (private, but the same tree since Python 3.0; renamed in 3.11)
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000  # module-name regexes are short; a longer one is a mistake (or an attack)
MAX_VARIABLE_REPEATS = 4  # .*.*.*.*z over ~400 module names takes ~0.05 s; each more multiplies it by ~8


class FrozenMap(Mapping):
    """A read-only, hashable, picklable mapping (configs cross process boundaries; MappingProxyType cannot)."""

    __slots__ = ("_d",)
    _d: dict

    def __init__(self, data: Mapping | None = None):
        object.__setattr__(self, "_d", dict(data or {}))

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._d.items())))

    def __reduce__(self):
        return FrozenMap, (self._d,)

    def __repr__(self) -> str:
        return repr(self._d)


def _frozen_map(m: Mapping | None) -> Mapping:
    return FrozenMap(m)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (frozen). Field names follow the paper; PEFT's names are given where they differ.

    Attributes:
        rank: r, the adapter's rank (PEFT ``r``).
        alpha: α; the update is scaled by s = α/r, or α/√r with ``rslora`` (PEFT ``lora_alpha``).
        init: init scheme name, a key of :func:`loralab.init_schemes` (PEFT ``init_lora_weights``).
        targets: module-name suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``), one regex
            string matched against the whole module name, or ``"all-linear"``: every ``nn.Linear`` and GPT-2
            ``Conv1D`` except the output head (PEFT ``target_modules``; see :func:`name_matches`).
        dropout: dropout on the LoRA branch's input (PEFT ``lora_dropout``).
        rslora: scale by α/√r (Kalajdzievski 2023) instead of α/r.
        init_kwargs: options of the init scheme, e.g. ``{"std": 0.02}`` for ``gaussian``.
        rank_pattern: per-module rank overrides, ``{suffix-or-regex: rank}`` (as PEFT's).
        alpha_pattern: per-module α overrides, ``{suffix-or-regex: alpha}`` (as PEFT's).
        init_pattern: per-module init scheme overrides, ``{suffix-or-regex: scheme}``, applied as written (``init``
            itself becomes its scheme's ``one_hot`` variant on an embedding, e.g. PEFT's A = 0, B ~ N(0, 1) for
            ``standard``; an ``init_pattern`` entry is never replaced).
        exclude: modules never adapted even if ``targets`` matches them: suffixes or one regex, like ``targets``
            (PEFT ``exclude_modules``).
        layers_to_transform: adapt only modules in these layer indices (an int or a list), the index being the
            number after the first ``<layers_pattern>.`` in the module name, or after the first ``name.`` when no
            pattern is given (as PEFT's). Needs suffix targets or ``"all-linear"``.
        layers_pattern: the name(s) of the layer list for ``layers_to_transform``, e.g. ``"layers"`` or ``"h"``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new classifier head), matched
            like ``targets`` entries; they are never adapted themselves (as PEFT's).
    """

    rank: int = 8
    alpha: float = 16.0
    init: str = "standard"
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    init_pattern: Mapping[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] | str = ()
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, (str, list, tuple)) or not all(isinstance(t, str) for t in value):
                raise ValueError(
                    f"LoraConfig.{name} must be a list of module-name suffixes or one regex string, got "
                    f"{value!r}; e.g. {name}=['q_proj', 'v_proj']"
                )
            if not isinstance(value, str):
                set_(self, name, tuple(t.strip() for t in value))
        if isinstance(self.targets, str) and self.targets.lower() == ALL_LINEAR:
            set_(self, "targets", ALL_LINEAR)
        self._check_selection()
        if not isinstance(self.rslora, bool):  # a ValueError, as every config error (the lab names the key)
            raise ValueError(f"LoraConfig.rslora must be True or False, got {self.rslora!r}")  # noqa: TRY004
        for name in ("init_kwargs", "rank_pattern", "alpha_pattern", "init_pattern"):
            set_(self, name, _frozen_map(getattr(self, name)))
        if not self.targets:
            raise ValueError(
                "LoraConfig.targets is empty: name the modules to adapt, e.g. targets=['q_proj', "
                "'v_proj'] (module-name suffixes) or a regex string such as r'.*\\.(q|v)_proj'"
            )
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            _compile(self.targets, "targets")
        if isinstance(self.exclude, str):
            _compile(self.exclude, "exclude")
        for where, rank in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.{where} must be a positive integer, got {rank!r}; try 8 or 16")
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for where, alpha in alphas:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
                raise ValueError(f"LoraConfig.{where} must be a positive number, got {alpha!r}; α = 2·rank is common")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for key in (*self.rank_pattern, *self.alpha_pattern, *self.init_pattern):
            _compile(key, "a pattern key")
        for where, init in [("init", self.init), *((f"init_pattern[{k!r}]", v) for k, v in self.init_pattern.items())]:
            self._check_scheme(where, init)

    def _check_selection(self) -> None:
        set_ = object.__setattr__
        saved = self.modules_to_save
        if isinstance(saved, str) or not isinstance(saved, (list, tuple)) or not all(isinstance(m, str) for m in saved):
            raise ValueError(
                f"LoraConfig.modules_to_save must be a list of module-name suffixes, got {saved!r}; "
                f"e.g. modules_to_save=['classifier']"
            )
        set_(self, "modules_to_save", tuple(m.strip() for m in saved))
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ValueError(
                    f"LoraConfig.layers_to_transform must be a layer index or a list of them (ints "
                    f">= 0), got {layers!r}; e.g. layers_to_transform=[0, 1]"
                )
            set_(self, "layers_to_transform", layers if isinstance(layers, int) else tuple(layers))
        pattern = self.layers_pattern
        if pattern is not None:
            if not isinstance(pattern, (str, list, tuple)) or not all(isinstance(p, str) for p in pattern):
                raise ValueError(
                    f"LoraConfig.layers_pattern must be a name or a list of names, got {pattern!r}; "
                    f"e.g. layers_pattern='layers'"
                )
            if not isinstance(pattern, str):
                set_(self, "layers_pattern", tuple(pattern))
            if self.layers_to_transform is None:
                raise ValueError(
                    "LoraConfig.layers_pattern only says where layer indices are; give "
                    "layers_to_transform too, e.g. layers_to_transform=[0], or drop layers_pattern"
                )
        if self.layers_to_transform is not None and isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            raise ValueError(
                "LoraConfig.layers_to_transform needs targets as a list of suffixes (or 'all-linear'), "
                "as in PEFT; with a regex target, put the layer numbers in the regex instead, e.g. "
                "r'.*\\.layers\\.(0|1)\\..*q_proj'"
            )

    def _check_scheme(self, where: str, init: str) -> None:
        try:
            scheme = get_scheme(init)
        except ValueError as e:
            raise ValueError(f"LoraConfig.{where}: {e}") from None
        ranks = {self.rank, *self.rank_pattern.values()}
        odd = sorted(r for r in ranks if r % 2)
        if scheme.even_rank and odd:
            raise ValueError(
                f"LoraConfig.{where}={init!r} pairs the rank's directions, so it needs an even rank; "
                f"got rank {odd[0]}: use {odd[0] + 1} or {max(odd[0] - 1, 2)}"
            )
        if init == self.init:
            params = inspect.signature(scheme.fn).parameters
            opts = sorted(set(params) - {"w", "rank", "scale", "g"})
            extra = sorted(set(self.init_kwargs) - set(opts))
            if extra:
                raise ValueError(
                    f"LoraConfig.init_kwargs {extra} are not options of {init!r}; its options: {opts or 'none'}"
                )
            for key, choices in _choices(scheme.fn).items():
                if key in self.init_kwargs and self.init_kwargs[key] not in choices:
                    raise ValueError(
                        f"LoraConfig.init_kwargs {key}={self.init_kwargs[key]!r} is not an option of {init!r}; "
                        f"use one of {', '.join(map(repr, choices))}"
                    )

    @property
    def scale(self) -> float:
        """s for the default rank and α."""
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)

    def for_module(self, name: str, *, one_hot: bool = False) -> tuple[int, float, str]:
        """``(rank, alpha, init)`` for module ``name`` after the patterns.

        ``one_hot``: the module's input is one-hot (an embedding); ``init`` then becomes its scheme's declared
        ``one_hot`` variant, unless an ``init_pattern`` entry names the module's scheme explicitly.
        """
        init = _lookup(self.init_pattern, name, None)
        if init is None:
            init = (get_scheme(self.init).one_hot or self.init) if one_hot else self.init
        return _lookup(self.rank_pattern, name, self.rank), float(_lookup(self.alpha_pattern, name, self.alpha)), init


def _choices(fn: Any) -> dict[str, tuple]:
    """``{option: allowed values}`` for a scheme's options annotated ``Literal[...]`` (checked when a config is
    built, so a misspelt value fails before a model is touched)."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # annotations that do not resolve: nothing to check
        return {}
    return {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is typing.Literal}


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """Whether module ``name`` is matched by ``patterns``: PEFT's rule for ``target_modules``, used for every name list.

    A string is one regex that must match the whole name; a list matches a name equal to one of its entries or
    ending in ``"." + entry`` (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``, not ``"xq_proj"``).
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def within(name: str, outer: str) -> bool:
    """Whether module ``name`` is ``outer`` or inside it (``"a.b.c"`` is within ``"a.b"``, not within ``"a.bc"``)."""
    return name == outer or name.startswith(outer + ".")


def layer_index(name: str, layers_pattern: str | Iterable[str] | None) -> int | None:
    """The layer index in module ``name`` as PEFT's ``layers_to_transform`` reads it, or None if it has none.

    It is the number after the first ``<pattern>.`` (any of ``layers_pattern``), or after the first ``<name>.`` when
    no pattern is given; ``"model.layers.3.mlp.experts.0.up"`` is in layer 3.
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(match.group(1)) if match else None


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to about ``limit`` characters, head and tail kept, for user input quoted in an error message (a
    1 MB regex must not make a 1 MB message)."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}...[{len(text) - 2 * keep:,} more characters]...{text[-keep:]}"


def _compile(pattern: str, what: str) -> re.Pattern:
    """Compile a module-name regex, refusing one whose matching could run for ever.

    Python's regex engine backtracks: a part of variable length repeated inside a repetition (``(a+)+``,
    ``(.*.*)*z``, ``(a|ab)*``) takes exponential time on a name it does not match, and every extra ``.*`` in a row
    multiplies the time by the name's length. Matching cannot be interrupted, so such patterns are refused before
    any name is matched.
    """
    where = f"LoraConfig: {what} {clip(repr(pattern))}"
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"{where} is {len(pattern):,} characters long, more than a module-name pattern needs "
            f"(at most {MAX_PATTERN_CHARS}); shorten it, or give a list of module-name suffixes"
        )
    try:
        compiled = re.compile(pattern)
        repeats, nested = _repeats(_sre_parse.parse(pattern), in_loop=False)
    except re.error as e:
        raise ValueError(f"{where} is not a valid regex ({e})") from None
    if nested:
        raise ValueError(
            f"{where} repeats a part that itself varies in length (as in (a+)+, (.*.*)*z or (a|ab)*): "
            "matching it can take exponential time. Write it without nested repetition, e.g. "
            r"'.*\.(q_proj|v_proj)', or give a list of module-name suffixes"
        )
    if repeats > MAX_VARIABLE_REPEATS:
        raise ValueError(
            f"{where} has {repeats} variable-length repeats (.*, +, {{m,n}}); with more than "
            f"{MAX_VARIABLE_REPEATS} matching can take minutes (the time grows as the name's length to "
            r"that power): use fewer, e.g. one leading '.*' as in '.*\.(q_proj|v_proj)'"
        )
    return compiled


def _repeats(items: Any, in_loop: bool) -> tuple[int, bool]:
    """``(variable-length repeats, whether one sits inside a repetition)`` of a parsed regex."""
    count, nested = 0, False
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            lo, hi, body = av
            count, nested = count + (hi != lo), nested or (in_loop and hi != lo)
            subs, loop = [body], in_loop or hi > 1
        elif op is _sre.BRANCH:  # alternatives inside a repetition: as ambiguous as a nested repeat
            subs, loop, nested = av[1], in_loop, nested or in_loop
        elif op is _sre.SUBPATTERN:
            subs, loop = [av[3]], in_loop
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            subs, loop = [av[1]], in_loop
        elif op is _sre.GROUPREF_EXISTS:
            subs, loop = [b for b in av[1:] if b is not None], in_loop
        else:  # single characters, classes, anchors; possessive repeats and atomic groups never backtrack
            continue
        for sub in subs:
            c, n = _repeats(sub, loop)
            count, nested = count + c, nested or n
    return count, nested


def _lookup(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern rule: a key matches a module whose name ends with it at a ``.`` boundary (regex allowed)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default
