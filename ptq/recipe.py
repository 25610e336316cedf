"""The TOML recipe language: load, validate, merge (`extends`), save, and resolve against a model.

A recipe is the ``pass_args`` of :func:`ptq.quantize_module_transform_pass`. Top level:

- ``by``: ``"regex_name"`` (default; Mase's ``"name"`` is an alias) matches selector patterns against module names
  from ``model.named_modules()``; ``"type"`` matches them against module class names (``"Linear"``); ``"role"``
  matches them against role paths (``layers.3.q``, ``layers.3.attention``, ``layers.0.gate_up``, ``lm_head``; see
  :mod:`ptq.architectures`), so one recipe serves every decoder family.
- ``extends = "base.toml"``: load that file first (path relative to the including file) and deep-merge this one on
  top of it, the child winning key by key. Selector tables keep the base's order; new ones are appended.
- ``[gptq]`` (:class:`ptq.config.GPTQConfig`), ``[rotation_search]`` (:class:`ptq.config.RotationSearchConfig`)
  and ``[rotation_learn]`` (:class:`ptq.config.RotationLearnConfig`): turn on those passes.
- Every other table is a *selector*: its key is a regular expression, matched with ``re.fullmatch``.
  **The first selector in file order that matches a module wins**; later selectors never see that module.

Selector keys (flat, as users already write them):

- ``name``: the format family (``mxint``, ``mxfp``, ``mx6``, ``mx9``, ``nvfp4``, ``int``).
- ``bypass = true``: leave the matched modules unquantized (the table's other keys are still validated).
- Per tensor prefix ``weight_``, ``data_in_`` and ``bias_``: ``_width`` (turns that tensor's quantization on),
  ``_block_size`` (defaults: mxint/mxfp 32, nvfp4/mx6/mx9 16, int 128), ``_rounding``, ``_seed`` (stochastic
  rounding), ``_scale_rule`` (mxint/mxfp), ``_symmetric`` (int), and for ``mxfp`` the element format, either
  ``_format = "e2m1"`` or ``_exponent_width`` + ``_frac_width`` (either one also turns quantization on).
- ``gptq = true``: the GPTQ pass quantizes this selector's weights (needs ``[gptq]``).
- Attention sub-tables ``qk_matmul``, ``av_matmul``, ``kv_cache``, ``softmax``, ``rope``: keys ``bypass``, ``name``
  (overrides the parent's family) and the ``data_in_`` keys. A selector with sub-tables configures an attention
  module; one with ``weight_`` / ``data_in_`` / ``bias_`` keys configures a linear layer; mixing both is an error.

A plain dict in Mase's pass_args shape is accepted too: ``{"by": "name", "<regex>": {"config": {...}}, "gptq":
{...}}``; a ``"default"`` entry whose ``config.name`` is ``None`` means "no default" and is dropped; any other
``default`` is refused (write an explicit selector such as ``'.*'`` instead). The key ``default`` is reserved.

Every problem raises :class:`ptq.errors.RecipeError` with the message ``"<file>: [<key path>] <problem>. <fix>"``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ptq.config import (
    AttentionQuantConfig,
    GPTQConfig,
    GPTQWeightConfig,
    LinearQuantConfig,
    ModuleQuantConfig,
    RotationLearnConfig,
    RotationSearchConfig,
)
from ptq.errors import QuantSpecError, RecipeError
from ptq.formats import FAMILIES, MINIFLOATS, ROUNDINGS, SCALE_RULES, QuantSpec, parse_minifloat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Recipe", "Selector", "load_recipe", "save_recipe", "spec_summary", "config_summary"]

TEXT_SOURCE = "<recipe text>"
DICT_SOURCE = "<recipe dict>"

TOP_LEVEL_KEYS = ("by", "extends", "gptq", "rotation_search", "rotation_learn")
BY_VALUES = ("regex_name", "type", "role")
BY_ALIASES = {"name": "regex_name"}
TENSOR_PREFIXES = ("weight", "data_in", "bias")
TENSOR_KNOBS = ("width", "block_size", "exponent_width", "frac_width", "format", "rounding", "seed", "scale_rule",
                "symmetric")
ATTENTION_SUBTABLES = ("qk_matmul", "av_matmul", "kv_cache", "softmax", "rope")
LINEAR_KEYS = ("name", "bypass", "gptq") + tuple(f"{p}_{k}" for p in TENSOR_PREFIXES for k in TENSOR_KNOBS)
SUBTABLE_KEYS = ("name", "bypass") + tuple(f"data_in_{k}" for k in TENSOR_KNOBS)
ATTENTION_KEYS = ("name", "bypass") + ATTENTION_SUBTABLES
DEFAULT_BLOCK = {"mxint": 32, "mxfp": 32, "nvfp4": 16, "mx6": 16, "mx9": 16, "int": 128}
FIXED_WIDTH = {"nvfp4": 4, "mx6": 5, "mx9": 8}
MINIFLOAT_KNOBS = ("exponent_width", "frac_width", "format")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# ---- key paths and errors ---------------------------------------------------------------------------------------

def key_path(*parts: str) -> str:
    """A TOML dotted key path; parts that are not bare keys are single-quoted (``'model\\.layers'.weight_width``)."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else f"'{p}'" for p in parts)


def _fail(source: str | None, path: str, problem: str, fix: str = "") -> RecipeError:
    msg = f"{source or TEXT_SOURCE}: [{path}] {problem.rstrip('.')}."
    if fix:
        msg += f" {fix.rstrip('.')}."
    return RecipeError(msg)


def _did_you_mean(key: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    allowed = ", ".join(choices)
    return (f"Did you mean '{close[0]}'? " if close else "") + f"Allowed keys here: {allowed}"


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", dict: "table", list: "array"}.get(
        type(v), type(v).__name__)


# ---- selectors ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Selector:
    """One selector table: ``pattern`` (compiled regex), its typed ``config`` (``None`` = bypass the whole module)
    and ``raw``, the table as written (what :func:`save_recipe` writes back).

    Two selectors are equal when their pattern text and config are equal (``raw`` may spell the same thing
    differently, e.g. ``weight_format = "e2m1"`` vs exponent/frac widths).
    """

    pattern: re.Pattern
    config: ModuleQuantConfig | None
    raw: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.pattern.pattern

    @property
    def bypass(self) -> bool:
        return self.config is None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return self.key == other.key and self.config == other.config

    def __hash__(self) -> int:
        return hash((self.key, self.config))

    def __repr__(self) -> str:
        return f"Selector({self.key!r}: {config_summary(self.config)})"


def spec_summary(spec: QuantSpec | None) -> str:
    """``MXINT4(block=32, axis=-1)`` or ``-`` for a bypassed tensor."""
    return "-" if spec is None else str(spec)


def config_summary(config: ModuleQuantConfig | None) -> str:
    """A one-line human summary of a module config."""
    if config is None:
        return "bypass"
    if isinstance(config, LinearQuantConfig):
        if config.bypassed:
            return "bypass"
        parts = [f"{k}={spec_summary(getattr(config, k))}" for k in ("weight", "data_in", "bias")
                 if getattr(config, k) is not None]
        if config.gptq:
            parts.append("gptq")
        return "linear: " + " ".join(parts)
    if config.bypassed:
        return "bypass"
    parts = [f"{k}={spec_summary(getattr(config, k))}" for k in ATTENTION_SUBTABLES if getattr(config, k) is not None]
    return "attention: " + " ".join(parts)


# ---- the recipe --------------------------------------------------------------------------------------------------

class Recipe(BaseModel):
    """A validated recipe: the pass_args of :func:`ptq.quantize_module_transform_pass`.

    ``selectors`` are in file order (first match wins). ``source`` names the file the recipe came from (for
    messages only: it takes no part in equality).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    by: Literal["regex_name", "type", "role"] = "regex_name"
    gptq: GPTQConfig | None = None
    rotation_search: RotationSearchConfig | None = None
    rotation_learn: RotationLearnConfig | None = None
    selectors: tuple[Selector, ...] = ()
    source: str | None = None

    @field_validator("by", mode="before")
    @classmethod
    def _alias_by(cls, v: Any) -> Any:
        return BY_ALIASES.get(v, v) if isinstance(v, str) else v

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return (self.by, self.gptq, self.rotation_search, self.rotation_learn, self.selectors) == (
            other.by, other.gptq, other.rotation_search, other.rotation_learn, other.selectors)

    def __hash__(self) -> int:
        return hash((self.by, self.selectors))

    # -- matching --
    def selector_for(self, name: str, type_name: str | None = None, role: str | None = None) -> Selector | None:
        """The first selector matching a module: by name, by ``type_name`` when ``by = "type"``, by its role path
        (``role``, e.g. ``"layers.3.q"``; None = the module has no role) when ``by = "role"``."""
        if self.by == "role":
            if role is None:
                return None
            subject = role
        else:
            subject = name if self.by == "regex_name" else type_name
        if subject is None:
            raise RecipeError(f"{self.source or TEXT_SOURCE}: [by] is 'type': selector_for needs the module's "
                              f"class name (type_name=...)")
        for sel in self.selectors:
            if sel.pattern.fullmatch(subject):
                return sel
        return None

    def resolve(self, model: "torch.nn.Module", strict: bool = False) -> dict[str, ModuleQuantConfig]:
        """Map every module of ``model`` that a selector matches to its config (first matching selector wins).

        A bypass selector resolves to ``LinearQuantConfig()`` for ``nn.Linear`` modules and
        ``AttentionQuantConfig()`` otherwise (both mean "leave as is"). A selector that matches no module, or whose
        modules were all claimed by earlier selectors, gives a warning naming the closest module names; with
        ``strict=True`` it is a :class:`RecipeError`. The root module (name ``""``) is never matched.
        """
        import torch.nn as nn

        out: dict[str, ModuleQuantConfig] = {}
        matched = [0] * len(self.selectors)
        won = [0] * len(self.selectors)
        names: list[str] = []
        roles = self._roles(model) if self.by == "role" else {}
        for name, module in model.named_modules():
            if not name:
                continue
            if self.by == "role":
                subject = roles.get(name)
                if subject is None:
                    continue
            else:
                subject = name if self.by == "regex_name" else type(module).__name__
            names.append(subject)
            first = None
            for i, sel in enumerate(self.selectors):
                if sel.pattern.fullmatch(subject):
                    matched[i] += 1
                    if first is None:
                        first = i
            if first is None:
                continue
            won[first] += 1
            cfg = self.selectors[first].config
            if cfg is None:
                cfg = LinearQuantConfig() if isinstance(module, nn.Linear) else AttentionQuantConfig()
            out[name] = cfg
        what = {"regex_name": "module name", "type": "module class name", "role": "role path"}[self.by]
        for i, sel in enumerate(self.selectors):
            if won[i]:
                continue
            if matched[i]:
                problem = (f"selector matches {matched[i]} module(s), but earlier selectors claim all of them "
                           f"(the first matching selector wins)")
                fix = "Move it above the selector that shadows it, or delete it"
            else:
                close = difflib.get_close_matches(sel.key.replace("\\", ""), sorted(set(names)), n=3, cutoff=0.0)
                problem = f"selector matches no {what} of this {type(model).__name__}"
                fix = f"Closest {what}s: {', '.join(close) or '(none)'}"
            err = _fail(self.source, key_path(sel.key), problem, fix)
            if strict:
                raise err
            warnings.warn(str(err), stacklevel=2)
        return out

    def _roles(self, model: "torch.nn.Module") -> dict[str, str]:
        from ptq.architectures import architecture

        arch = architecture(model)
        if not arch.known:
            warnings.warn(f"{self.source or TEXT_SOURCE}: [by] = 'role', but model type {arch.model_type!r} is not in "
                          f"ptq's role table: roles were guessed from module names ({len(arch.roles)} modules got one). "
                          f"Check them with `ptq validate --model`, or select by regex_name", stacklevel=3)
        return dict(arch.roles)

    @property
    def gptq_selectors(self) -> tuple[Selector, ...]:
        return tuple(s for s in self.selectors if isinstance(s.config, LinearQuantConfig) and s.config.gptq)


# ---- building specs from selector tables -------------------------------------------------------------------------

class _Ctx:
    """Where we are while validating: the file and the key path prefix, for messages."""

    def __init__(self, source: str | None, *prefix: str):
        self.source = source
        self.prefix = prefix

    def sub(self, *parts: str) -> _Ctx:
        return _Ctx(self.source, *self.prefix, *parts)

    def path(self, *parts: str) -> str:
        return key_path(*self.prefix, *parts)

    def fail(self, key: str | None, problem: str, fix: str = "") -> RecipeError:
        return _fail(self.source, self.path(*([key] if key else [])), problem, fix)


def _check_type(ctx: _Ctx, table: Mapping, key: str, kind: type | tuple[type, ...], hint: str) -> None:
    if key not in table:
        return
    v = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        raise ctx.fail(key, f"expected {hint}, got {_type_name(v)} {v!r}", f"Write e.g. {key} = {_example(key)}")


def _example(key: str) -> str:
    for suffix, ex in (("_width", "4"), ("_block_size", "32"), ("_format", '"e2m1"'), ("_rounding", '"even"'),
                       ("_scale_rule", '"floor"'), ("_seed", "0"), ("_symmetric", "true"), ("bypass", "true"),
                       ("gptq", "true"), ("name", '"mxint"')):
        if key.endswith(suffix):
            return ex
    return "..."


_KEY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "width": ((int,), "an integer"),
    "block_size": ((int,), "an integer"),
    "exponent_width": ((int,), "an integer"),
    "frac_width": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "format": ((str,), "a string such as \"e2m1\""),
    "rounding": ((str,), f"a string, one of {', '.join(ROUNDINGS)}"),
    "scale_rule": ((str,), f"a string, one of {', '.join(SCALE_RULES)}"),
    "symmetric": ((bool,), "true or false"),
}


def _family(ctx: _Ctx, table: Mapping, inherited: str | None) -> str | None:
    if "name" not in table:
        return inherited
    name = table["name"]
    if not isinstance(name, str):
        raise ctx.fail("name", f"expected a string, got {_type_name(name)} {name!r}", f'Write e.g. name = "mxint"')
    if name not in FAMILIES:
        close = difflib.get_close_matches(name.lower(), FAMILIES, n=1, cutoff=0.5)
        raise ctx.fail("name", f"unknown format family {name!r}",
                       (f"Did you mean '{close[0]}'? " if close else "") + f"Choose one of {', '.join(FAMILIES)}")
    return name


def _tensor_spec(ctx: _Ctx, table: Mapping, prefix: str, family: str | None) -> QuantSpec | None:
    """Build the QuantSpec of one tensor prefix (``weight`` / ``data_in`` / ``bias``), or None when it is off."""
    keys = {k: f"{prefix}_{k}" for k in TENSOR_KNOBS}
    present = {k for k, full in keys.items() if full in table}
    if not present:
        return None
    for k in present:
        kinds, hint = _KEY_TYPES[k]
        _check_type(ctx, table, keys[k], kinds, hint)
    on = bool(present & {"width", "format", "exponent_width", "frac_width"})
    if not on:
        stray = keys[sorted(present)[0]]
        raise ctx.fail(stray, f"sets {', '.join(keys[k] for k in sorted(present))} but not {keys['width']}, so "
                       f"this tensor would not be quantized", f"Add {keys['width']} = N to quantize it, or remove "
                       f"these keys")
    if family is None:
        raise ctx.fail(keys["width"] if "width" in present else keys[sorted(present)[0]],
                       "no format family for this tensor", 'Add name = "mxint" (or mxfp, mx6, mx9, nvfp4, int) to '
                       "the table")
    # Knobs that belong to other families.
    if family != "mxfp":
        for k in MINIFLOAT_KNOBS:
            if k in present:
                raise ctx.fail(keys[k], f"{keys[k]} does not apply to family {family!r} (only to 'mxfp')",
                               f"Remove it, or set name = \"mxfp\"")
    if family != "int" and "symmetric" in present:
        raise ctx.fail(keys["symmetric"], f"{keys['symmetric']} applies to family 'int' only, not {family!r}",
                       "Remove it")
    if family not in ("mxint", "mxfp") and "scale_rule" in present:
        raise ctx.fail(keys["scale_rule"], f"{keys['scale_rule']} applies to the power-of-two scales of mxint / "
                       f"mxfp only, not {family!r}", "Remove it")
    if family in FIXED_WIDTH and "width" not in present:
        raise ctx.fail(keys["width"], f"family {family!r} needs {keys['width']} = {FIXED_WIDTH[family]} to turn "
                       f"quantization on", f"Add {keys['width']} = {FIXED_WIDTH[family]}")
    if family in ("mxint", "int") and "width" not in present:
        raise ctx.fail(keys["width"], f"missing {keys['width']}", f"Add {keys['width']} = 4 (or another width)")

    kw: dict[str, Any] = {}
    for k in ("rounding", "scale_rule", "seed"):
        if k in present:
            kw[k] = table[keys[k]]
    if "symmetric" in present:
        kw["symmetric"] = table[keys["symmetric"]]
    block = table.get(keys["block_size"], DEFAULT_BLOCK[family])
    width = table.get(keys["width"])

    def culprit(msg: str) -> str:
        """The key a QuantSpecError is about (QuantSpec validates the values together)."""
        m = msg.lower()
        for needle, k in (("block", "block_size"), ("rounding", "rounding"), ("seed", "rounding"),
                          ("scale_rule", "scale_rule"), ("asymmetric", "symmetric"), ("exponent", "exponent_width"),
                          ("mantissa", "frac_width"), ("minifloat", "format")):
            if needle in m and k in present:
                return keys[k]
        return keys["width"] if "width" in present else keys[sorted(present)[0]]

    try:
        if family == "mxfp":
            if "format" in present:
                if "exponent_width" in present or "frac_width" in present:
                    raise ctx.fail(keys["format"], f"{keys['format']} and {keys['exponent_width']} / "
                                   f"{keys['frac_width']} both set", "Keep one of the two spellings")
                try:
                    e, m = parse_minifloat(table[keys["format"]])
                except QuantSpecError as err:
                    raise ctx.fail(keys["format"], str(err), "") from None
            elif "exponent_width" in present and "frac_width" in present:
                e, m = table[keys["exponent_width"]], table[keys["frac_width"]]
            else:
                missing = keys["frac_width"] if "exponent_width" in present else keys["exponent_width"]
                raise ctx.fail(missing, "mxfp needs the element format", f"Set {keys['format']} (one of "
                               f"{', '.join(MINIFLOATS)}) or both {keys['exponent_width']} and {keys['frac_width']}")
            spec = QuantSpec.mxfp((e, m), block_size=block, **kw)
            if width is not None and width != spec.width:
                raise ctx.fail(keys["width"], f"{keys['width']} = {width} disagrees with E{e}M{m} "
                               f"(1 + {e} + {m} = {spec.width} bits)", f"Set {keys['width']} = {spec.width} or "
                               "remove it")
            return spec
        if family == "mxint":
            return QuantSpec.mxint(width, block_size=block, **kw)
        if family == "int":
            return QuantSpec.int_(width, block_size=block, **kw)
        if width != FIXED_WIDTH[family]:
            raise ctx.fail(keys["width"], f"family {family!r} has {FIXED_WIDTH[family]}-bit elements, got "
                           f"{keys['width']} = {width}", f"Set {keys['width']} = {FIXED_WIDTH[family]}")
        if family == "nvfp4":
            if block != 16:
                raise ctx.fail(keys["block_size"], f"nvfp4 uses blocks of 16, got {block}",
                               f"Set {keys['block_size']} = 16 or remove it (use name = \"mxfp\" for other sizes)")
            return QuantSpec.nvfp4(**kw)
        return (QuantSpec.mx6 if family == "mx6" else QuantSpec.mx9)(block_size=block, **kw)
    except QuantSpecError as err:
        raise ctx.fail(culprit(str(err)), str(err), "Fix the value (see the format rules in ptq/formats.py)") from None


def _check_keys(ctx: _Ctx, table: Mapping, allowed: tuple[str, ...], near_reserved: str | None = None) -> None:
    for key in table:
        if key not in allowed:
            hint = _did_you_mean(key, allowed)
            if near_reserved:
                hint = f"Was the table meant to be [{near_reserved}]? " + hint
            raise ctx.fail(key, f"unknown key {key!r}", hint)


def _check_bool(ctx: _Ctx, table: Mapping, key: str) -> bool:
    _check_type(ctx, table, key, (bool,), "true or false")
    return bool(table.get(key, False))


def _linear_config(ctx: _Ctx, table: Mapping, near_reserved: str | None) -> LinearQuantConfig | None:
    _check_keys(ctx, table, LINEAR_KEYS, near_reserved)
    bypass = _check_bool(ctx, table, "bypass")
    gptq = _check_bool(ctx, table, "gptq")
    family = _family(ctx, table, None)
    specs = {p: _tensor_spec(ctx, table, p, family) for p in TENSOR_PREFIXES}
    if bypass:
        return None
    if all(s is None for s in specs.values()):
        raise ctx.fail(None, "selector quantizes nothing (no weight_width / data_in_width / bias_width and no "
                       "attention sub-table)", "Add weight_width / data_in_width, or bypass = true to leave the "
                       "matched modules unquantized")
    if gptq and specs["weight"] is None:
        raise ctx.fail("gptq", "gptq = true but the weights are not quantized", "Add weight_width, or remove gptq")
    return LinearQuantConfig(weight=specs["weight"], data_in=specs["data_in"], bias=specs["bias"], gptq=gptq)


def _attention_config(ctx: _Ctx, table: Mapping) -> AttentionQuantConfig | None:
    linear_keys = [k for k in table if k not in ATTENTION_KEYS and k in LINEAR_KEYS]
    if linear_keys:
        raise ctx.fail(linear_keys[0], f"{linear_keys[0]!r} is a linear-layer key, but this table also has "
                       f"attention sub-tables ({', '.join(k for k in table if k in ATTENTION_SUBTABLES)})",
                       "Split it: one selector for the attention module, another for its q/k/v/o projections")
    _check_keys(ctx, table, ATTENTION_KEYS)
    bypass = _check_bool(ctx, table, "bypass")
    family = _family(ctx, table, None)
    specs: dict[str, QuantSpec | None] = {}
    for sub in ATTENTION_SUBTABLES:
        if sub not in table:
            specs[sub] = None
            continue
        st = table[sub]
        sctx = ctx.sub(sub)
        if not isinstance(st, Mapping):
            raise ctx.fail(sub, f"expected a table, got {_type_name(st)} {st!r}", f"Write [<selector>.{sub}] "
                           f"with bypass = true or data_in_width = N")
        _check_keys(sctx, st, SUBTABLE_KEYS)
        sub_bypass = _check_bool(sctx, st, "bypass")
        sub_family = _family(sctx, st, family)
        spec = _tensor_spec(sctx, st, "data_in", sub_family)
        if spec is None and not sub_bypass:
            raise sctx.fail(None, "sub-table quantizes nothing", "Add data_in_width = N, or bypass = true")
        specs[sub] = None if sub_bypass else spec
    if bypass:
        return None
    return AttentionQuantConfig(**specs)


def _selector(source: str | None, pattern: str, table: Any, reserved_hint: str | None) -> Selector:
    ctx = _Ctx(source, pattern)
    if not isinstance(table, Mapping):
        raise _fail(source, key_path(pattern), f"expected a selector table, got {_type_name(table)} {table!r}",
                    f"Top-level keys are {', '.join(TOP_LEVEL_KEYS)}; anything else must be a [table] whose key is "
                    "a module-name regex")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise _fail(source, key_path(pattern), f"invalid regular expression: {err}",
                    "Fix the pattern (TOML literal strings in single quotes keep backslashes as written)") from None
    if any(k in table for k in ATTENTION_SUBTABLES):
        config: ModuleQuantConfig | None = _attention_config(ctx, table)
    else:
        config = _linear_config(ctx, table, reserved_hint)
    return Selector(compiled, config, copy.deepcopy(dict(table)))


# ---- whole-recipe validation -------------------------------------------------------------------------------------

def _pydantic(source: str | None, table_name: str, model: type[BaseModel], value: Any) -> BaseModel:
    if not isinstance(value, Mapping):
        raise _fail(source, table_name, f"expected a table, got {_type_name(value)} {value!r}",
                    f"Write [{table_name}] followed by its keys")
    fields = tuple(model.model_fields)
    for key, v in value.items():
        if key not in fields:
            raise _fail(source, key_path(table_name, key), f"unknown key {key!r}", _did_you_mean(key, fields))
    if table_name == "gptq" and isinstance(value.get("weight_config"), Mapping):
        wfields = tuple(GPTQWeightConfig.model_fields)
        for key in value["weight_config"]:
            if key not in wfields:
                raise _fail(source, key_path("gptq", "weight_config", key), f"unknown key {key!r}",
                            _did_you_mean(key, wfields))
    try:
        return model.model_validate(dict(value), strict=True)
    except ValidationError as err:
        errors = err.errors()
        loc = _field_loc(errors[0]["loc"])
        # a union field reports one error per alternative: say them all, under the field's own key
        msgs = list(dict.fromkeys(e["msg"] for e in errors if _field_loc(e["loc"]) == loc))
        path = key_path(table_name, *(str(p) for p in loc))
        got = errors[0].get("input")
        raise _fail(source, path, f"{'; or '.join(msgs)} (got {got!r})", "Fix the value") from None


def _field_loc(loc: tuple) -> tuple:
    """A pydantic error location without the union-member tags it inserts (``'literal[...]'``, ``'list[int]'``,
    ``'int'``), i.e. the recipe key path."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("int", "str", "float", "bool",
                                                                                    "none")))


def _validate_dict(data: Mapping, source: str | None) -> Recipe:
    data = dict(data)
    data.pop("extends", None)
    by = data.get("by", "regex_name")
    if not isinstance(by, str) or BY_ALIASES.get(by, by) not in BY_VALUES:
        raise _fail(source, "by", f"unknown value {by!r}", 'Use by = "regex_name" (match module names), '
                    'by = "type" (match module class names) or by = "role" (match role paths such as layers.0.q)')
    gptq = _pydantic(source, "gptq", GPTQConfig, data["gptq"]) if "gptq" in data else None
    rot = (_pydantic(source, "rotation_search", RotationSearchConfig, data["rotation_search"])
           if "rotation_search" in data else None)
    learn = (_pydantic(source, "rotation_learn", RotationLearnConfig, data["rotation_learn"])
             if "rotation_learn" in data else None)
    selectors = []
    for key, table in data.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key == "default":
            raise _fail(source, "default", "a 'default' selector is not supported (only Mase's "
                        "default = {config = {name = None}}, meaning no default, is accepted)",
                        "Write an explicit selector such as ['.*'] as the LAST table instead")
        if not isinstance(table, Mapping):
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1, cutoff=0.6)
            raise _fail(source, key_path(key), f"unknown top-level key {key!r}",
                        (f"Did you mean '{close[0]}'? " if close else "") + f"Top-level keys are "
                        f"{', '.join(TOP_LEVEL_KEYS)}; selectors are [tables] keyed by a regex")
        reserved = difflib.get_close_matches(key, ("gptq", "rotation_search", "rotation_learn"), n=1, cutoff=0.7)
        selectors.append(_selector(source, key, table, reserved[0] if reserved else None))
    recipe = Recipe(by=BY_ALIASES.get(by, by), gptq=gptq, rotation_search=rot, rotation_learn=learn,
                    selectors=tuple(selectors),
                    source=source)
    _cross_check(recipe)
    return recipe


def _cross_check(recipe: Recipe) -> None:
    """Relations between tables: gptq flags vs [gptq], [gptq.weight_config] / format vs the selectors."""
    src = recipe.source
    gsel = recipe.gptq_selectors
    if recipe.gptq is None:
        if gsel:
            raise _fail(src, key_path(gsel[0].key, "gptq"), "gptq = true but the recipe has no [gptq] table",
                        "Add a [gptq] table (dataset, nsamples, seqlen ...) or remove gptq = true")
        return
    if not gsel:
        raise _fail(src, "gptq", "the table is present but no selector sets gptq = true, so GPTQ would change nothing",
                    "Add gptq = true to the selectors whose weights GPTQ should quantize, or remove [gptq]")
    g = recipe.gptq
    for sel in gsel:
        w = sel.config.weight
        if g.format is not None and g.format != w.family:
            raise _fail(src, "gptq.format", f"format = {g.format!r} but selector [{key_path(sel.key)}] quantizes "
                        f"weights as {w.family!r}", f"Set format = {w.family!r} or change the selector")
        wc = g.weight_config
        if wc is None:
            continue
        for key, have in (("weight_width", w.width), ("weight_block_size", w.block_size),
                          ("weight_exponent_width", w.exp_bits if w.is_minifloat else None),
                          ("weight_frac_width", w.man_bits if w.is_minifloat else None)):
            want = getattr(wc, key)
            if want is not None and want != have:
                raise _fail(src, key_path("gptq", "weight_config", key), f"{key} = {want} but selector "
                            f"[{key_path(sel.key)}] (gptq = true) has {key} = {have}",
                            "Make [gptq.weight_config] agree with the selectors it serves, or remove the key")


# ---- loading: files, text, dicts, extends ------------------------------------------------------------------------

def _parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line L, column C)"
        raise RecipeError(f"{source}: [<toml syntax>] {err}. Fix the TOML syntax at that line and column") from None


def _deep_merge(base: dict, child: Mapping) -> dict:
    out = dict(base)
    for k, v in child.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_file_dict(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise _fail(str(chain[-1]), "extends", f"extends cycle: {cycle}", "Remove one of the extends keys")
    if not path.is_file():
        where = f"{chain[-1]}: [extends]" if chain else f"{path}:"
        chain_s = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"{where} recipe file not found: {path} (chain: {chain_s}). Check the path (extends is "
                          f"relative to the file that contains it)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe: {err}") from None
    data = _parse_toml(text, str(path))
    return _with_extends(data, path.parent, str(path), chain + (path,))


def _with_extends(data: dict, base_dir: Path, source: str, chain: tuple[Path, ...]) -> dict:
    if "extends" not in data:
        return data
    ext = data["extends"]
    if not isinstance(ext, str) or not ext:
        raise _fail(source, "extends", f"expected a file name string, got {_type_name(ext)} {ext!r}",
                    'Write extends = "base.toml"')
    base = _load_file_dict(base_dir / ext, chain)
    merged = _deep_merge(base, {k: v for k, v in data.items() if k != "extends"})
    merged.pop("extends", None)
    return merged


def _unwrap_mase(data: Mapping, source: str) -> dict:
    """Accept Mase's pass_args shape: ``{"<regex>": {"config": {...}}}`` and a no-op ``default``."""
    out: dict[str, Any] = {}
    for key, v in data.items():
        if key in TOP_LEVEL_KEYS:
            out[key] = v
            continue
        if isinstance(v, Mapping) and set(v) == {"config"} and isinstance(v["config"], Mapping):
            v = v["config"]
        if key == "default" and isinstance(v, Mapping) and "name" in v and v["name"] is None and len(v) == 1:
            continue  # Mase's "no default"
        out[key] = v
    return out


def _looks_like_path(s: str) -> bool:
    # TOML text always has a key = value or a [table] header; one line with neither can only be a path.
    t = s.strip()
    return bool(t) and "\n" not in t and "=" not in t and not t.startswith("[")


def load_recipe(recipe: str | os.PathLike | Mapping | Recipe) -> Recipe:
    """Load and validate a recipe from a TOML file path, TOML text, a (Mase-style) dict, or a Recipe (returned as is).

    A one-line string without ``=`` or ``[`` is a path; anything else is TOML text. ``extends`` inside a file is
    relative to that file, inside text or a dict relative to the working directory. Raises :class:`RecipeError`
    naming the file, the key path and the fix for anything wrong.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        data = _unwrap_mase(recipe, DICT_SOURCE)
        data = _with_extends(data, Path.cwd(), DICT_SOURCE, ())
        return _validate_dict(data, DICT_SOURCE)
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and _looks_like_path(recipe)):
        path = Path(recipe)
        data = _load_file_dict(path, ())
        return _validate_dict(_unwrap_mase(data, str(path)), str(path.resolve()))
    if isinstance(recipe, str):
        data = _parse_toml(recipe, TEXT_SOURCE)
        data = _with_extends(data, Path.cwd(), TEXT_SOURCE, ())
        return _validate_dict(_unwrap_mase(data, TEXT_SOURCE), TEXT_SOURCE)
    raise RecipeError(f"load_recipe: expected a path, TOML text, a dict or a Recipe, got {type(recipe).__name__}")


def recipe_to_dict(recipe: Recipe) -> dict:
    """The merged recipe as a plain TOML-ready dict (no ``extends``; every [gptq] / [rotation_search] /
    [rotation_learn] field written out)."""
    out: dict[str, Any] = {"by": recipe.by}
    for name in ("gptq", "rotation_search", "rotation_learn"):
        table = getattr(recipe, name)
        if table is not None:
            out[name] = table.model_dump(exclude_none=True)
    for sel in recipe.selectors:
        if sel.key in out:
            raise RecipeError(f"{recipe.source or TEXT_SOURCE}: [{key_path(sel.key)}] two selectors share one "
                              f"pattern (or a pattern equals a top-level key); TOML cannot hold both")
        out[sel.key] = copy.deepcopy(sel.raw)
    return out


def save_recipe(recipe: Recipe, path: str | os.PathLike | None = None) -> str:
    """Serialise the merged recipe to TOML (tomli-w); write it atomically when ``path`` is given. Returns the text.

    ``load_recipe(save_recipe(r)) == r`` holds for every valid recipe.
    """
    import tomli_w

    text = tomli_w.dumps(recipe_to_dict(recipe))
    # A selector whose raw table no longer reproduces its config (edited in code) would be saved wrongly: refuse.
    again = load_recipe(text)
    if again != recipe:
        raise RecipeError(f"{recipe.source or TEXT_SOURCE}: the recipe does not survive a save/load round trip "
                          f"(a Selector's raw table disagrees with its config?). Build selectors with load_recipe")
    if path is not None:
        from ptq.io import atomic_write_text

        atomic_write_text(path, text)
    return text
