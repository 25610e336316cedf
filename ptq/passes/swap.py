"""The swap pass: replace the modules a recipe selects with `LinearMX` / `AttentionMX` / `ExpertsMX`, in place.

Kinds: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2) are "linear" (-> `LinearMX`); fused MoE experts (classes
decorated with ``@use_experts_implementation``) are "experts" (-> `ExpertsMX`) and take a linear config, whose
weight / data_in / bias specs apply to both the gate_up and the down projection of every expert. A MoE router is
neither (an ``nn.Linear`` router is a linear).

Modules are replaced with ``setattr`` on their parent; the new modules share the original parameters, so the model
is not copied and keeps its device and dtype. An already swapped module is reconfigured, never wrapped twice, so
running the pass again (e.g. with an edited recipe) is idempotent.

Afterwards, sibling `LinearMX` modules known to read one input tensor (``q/k/v_proj`` and ``gate/up_proj`` of one
parent) get a shared `SharedInputMemo`, so that input is rotated and quantized once per forward instead of once per
linear (`link_shared_inputs`); the memo checks at run time that the input, its spec and its rotation really match.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from torch import nn

from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import ModelError
from ptq.modules.experts import ExpertsMX, check_experts_layout, is_experts_module
from ptq.modules.linear import LinearMX, SharedInputMemo, is_conv1d
from ptq.passes.base import PassContext, register_pass

if TYPE_CHECKING:  # pragma: no cover
    from ptq.recipe import Recipe


def _config_label(cfg) -> str:
    """A short, stable description of a config for the report (``weight=MXINT4(...), data_in=...``)."""
    if isinstance(cfg, LinearQuantConfig):
        fields = ("weight", "data_in", "bias")
    else:
        fields = ("kv_cache", "qk_matmul", "av_matmul", "softmax", "rope")
    parts = [f"{f}={getattr(cfg, f)}" for f in fields if getattr(cfg, f) is not None]
    if isinstance(cfg, LinearQuantConfig) and cfg.gptq:
        parts.append("gptq")
    return ", ".join(parts) or "bypass"


def _kind(module: nn.Module) -> str | None:
    """"linear" / "experts" / "attention" for modules this pass can swap (or has swapped), None otherwise."""
    from ptq.modules.attention import is_attention_module

    if isinstance(module, (nn.Linear, LinearMX)) or is_conv1d(module):
        return "linear"
    if is_experts_module(module):
        return "experts"
    if is_attention_module(module):
        return "attention"
    return None


def _plan_one(model: nn.Module, name: str, cfg) -> tuple[nn.Module, LinearQuantConfig | AttentionQuantConfig, str]:
    """Check one ``name -> cfg`` entry without touching the model; returns the module, the config to give it and
    the action: ``"swap"``, ``"reconfigure"`` (swapped before) or ``"skip"`` (a bypass selector on a module of no
    swappable kind: bypass means "leave as is", so a broad bypass regex may cover norms and MLP containers)."""
    from ptq.modules.attention import TESTED_ATTENTION, AttentionMX, attention_support, check_attention_config

    if not isinstance(cfg, (LinearQuantConfig, AttentionQuantConfig)):
        raise ModelError(
            f"module {name!r}: expected a LinearQuantConfig or AttentionQuantConfig, got {type(cfg).__name__}")
    if name == "":
        raise ModelError("cannot swap the root module itself; select a submodule")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"no module named {name!r} in the model (a selector resolved to a missing name)") from None
    kind = _kind(module)
    if cfg.bypassed:
        if kind is None:
            return module, cfg, "skip"
        # a bypass carries no specs, so it fits either kind (the recipe cannot always tell which it selected)
        cfg = LinearQuantConfig() if kind in ("linear", "experts") else AttentionQuantConfig()
    cls_name = type(module).__name__
    if isinstance(cfg, LinearQuantConfig):
        if kind not in ("linear", "experts"):
            raise ModelError(
                f"module {name!r} is a {cls_name}, but a linear config (weight / data_in / bias) applies only to "
                f"nn.Linear / Conv1D (or LinearMX) modules and fused MoE experts; fix the selector so it matches "
                f"those only")
        if kind == "experts" and not isinstance(module, ExpertsMX):
            check_experts_layout(module)
        return module, cfg, "reconfigure" if isinstance(module, (LinearMX, ExpertsMX)) else "swap"
    if kind != "attention":
        raise ModelError(
            f"module {name!r} is a {cls_name}, but an attention config (kv_cache / qk_matmul / av_matmul / softmax / "
            f"rope) applies only to attention modules whose forward writes K / V through a transformers Cache "
            f"({cls_name}: {attention_support(type(module)).refusal}); fix the selector. Supported: "
            f"{TESTED_ATTENTION}")
    swapped = isinstance(module, AttentionMX)
    try:
        check_attention_config(module, cfg, rotations=swapped and module._has_rotations,
                               force_eager=swapped and module.force_eager)
    except ModelError as e:
        raise ModelError(f"module {name!r}: {e}") from None
    return module, cfg, "reconfigure" if swapped else "swap"


def _apply_one(model: nn.Module, name: str, module: nn.Module, cfg, action: str) -> nn.Module:
    """Carry out a planned entry; returns the module now in place."""
    from ptq.modules.attention import AttentionMX

    if action == "skip":
        return module
    if action == "reconfigure":
        module.set_config(cfg)
        return module
    if isinstance(cfg, LinearQuantConfig) and is_experts_module(module):
        new = ExpertsMX.from_experts(module, cfg)
    elif isinstance(cfg, LinearQuantConfig):
        new = LinearMX.from_linear(module, cfg)
    else:
        new = AttentionMX.from_attention(module, cfg)
    _move_accelerate_hook(module, new)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return new


# Llama-style child names, for models ptq.architectures cannot map (e.g. a bare test module)
_ROLE_BY_CHILD_NAME = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": "gate", "up_proj": "up"}


def _module_roles(model: nn.Module) -> dict[str, str]:
    """Full module name -> bare role, from ptq.architectures when it understands the model, else by child name."""
    from ptq.architectures import architecture

    try:
        arch = architecture(model)
    except ModelError:
        return {name: _ROLE_BY_CHILD_NAME[name.rsplit(".", 1)[-1]] for name, _ in model.named_modules()
                if name.rsplit(".", 1)[-1] in _ROLE_BY_CHILD_NAME}
    return {name: path.rsplit(".", 1)[-1] for name, path in arch.roles.items()}


def link_shared_inputs(model: nn.Module) -> list[list[str]]:
    """Give each group of sibling `LinearMX` modules whose roles read one input (`SHARED_INPUT_ROLES`: q/k/v,
    gate/up; at least two of a group under one parent, with equal in_features) one fresh `SharedInputMemo`; every
    other `LinearMX` gets none. Sharing happens only when a forward passes them the same tensor with the same data_in
    spec and rotation, so this never changes a result. Returns the linked groups (module names)."""
    from ptq.architectures import SHARED_INPUT_ROLES

    roles = _module_roles(model)
    linked: list[list[str]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = [(c, m) for c, m in parent._modules.items() if isinstance(m, LinearMX)]
        for group in SHARED_INPUT_ROLES:
            members = [(c, m) for c, m in children if roles.get(prefix + c) in group]
            if len({m.in_features for _, m in members}) > 1:
                members = []
            memo = SharedInputMemo(len(members)) if len(members) >= 2 else None
            for _, m in members:
                m.set_input_memo(memo)
            if memo is not None:
                linked.append([prefix + c for c, _ in members])
    linked_ids = {id(model.get_submodule(n)) for g in linked for n in g}
    for m in model.modules():
        if isinstance(m, LinearMX) and id(m) not in linked_ids:
            m.set_input_memo(None)
    return linked


def unlink_shared_inputs(model: nn.Module) -> None:
    """Remove every `SharedInputMemo`: each `LinearMX` prepares its own input again."""
    for m in model.modules():
        if isinstance(m, LinearMX):
            m.set_input_memo(None)


def _move_accelerate_hook(old: nn.Module, new: nn.Module) -> None:
    """Models loaded with a ``device_map`` carry accelerate hooks that move inputs to the module's device; the
    replacement gets the same hook (attached to it, so it wraps the quantized forward)."""
    hook = old.__dict__.get("_hf_hook")
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    for key in ("forward", "_old_forward", "_hf_hook"):
        new.__dict__.pop(key, None)
    add_hook_to_module(new, hook)


def swap_modules(model: nn.Module, mapping: dict[str, LinearQuantConfig | AttentionQuantConfig]) -> dict:
    """Swap every ``name -> config`` of ``mapping`` in ``model`` (in place) and report what happened.

    Returns a JSON-friendly dict: ``swapped`` (names newly replaced), ``reconfigured`` (names swapped before, given
    the new config), ``skipped`` (bypass selectors on modules of no swappable kind), ``counts``
    (``"LlamaAttention -> LlamaAttentionMX"`` / ``"LinearMX (reconfigured)"`` -> n), ``configs`` (config label -> n),
    ``eager_attention`` (attention modules that run the quantized eager path), ``shared_inputs`` (the groups of
    sibling linears that share one prepared input, see `link_shared_inputs`).
    """
    from ptq.modules.attention import AttentionMX

    # Check every entry first, so a bad selector leaves the model untouched.
    plan = [(name, *_plan_one(model, name, cfg)) for name, cfg in mapping.items()]
    # Attention modules first: the new attention module takes over the old one's children, and the linear swaps
    # that follow land in it (the other order works too; this one leaves the replaced module untouched).
    plan.sort(key=lambda entry: not isinstance(entry[2], AttentionQuantConfig))
    report: dict[str, list[str]] = {"swapped": [], "reconfigured": [], "skipped": []}
    eager: list[str] = []
    counts: Counter = Counter()
    configs: Counter = Counter()
    for name, module, cfg, action in plan:
        before = type(module).__name__
        module = _apply_one(model, name, module, cfg, action)
        if action == "skip":
            report["skipped"].append(name)
            continue
        new_cls = type(module).__name__
        if action == "swap":
            report["swapped"].append(name)
            counts[f"{before} -> {new_cls}"] += 1
        else:
            report["reconfigured"].append(name)
            counts[f"{new_cls} (reconfigured)"] += 1
        configs[_config_label(cfg)] += 1
        if isinstance(module, AttentionMX) and module.eager:
            eager.append(name)
    shared = link_shared_inputs(model)
    return {**report, "counts": dict(counts), "configs": dict(configs), "eager_attention": eager,
            "shared_inputs": shared}


@register_pass
class SwapPass:
    """Replace the modules the recipe's selectors resolve to with their quantized versions."""

    name = "swap"
    after: tuple[str, ...] = ()

    def wanted(self, recipe: "Recipe") -> bool:
        return True

    def run(self, model: nn.Module, recipe: "Recipe", ctx: PassContext) -> dict:
        from ptq.coverage import check_coverage, coverage_report

        info = swap_modules(model, recipe.resolve(model, strict=ctx.strict))
        info["coverage"] = coverage_report(model)
        check_coverage(info["coverage"], strict=ctx.strict, where=f"{recipe.source or 'recipe'}: ")
        return info
