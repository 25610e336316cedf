"""What a swapped model really quantizes: the coverage report of `ptq validate --model` and `ptq quantize`.

Counts every matmul weight inside the decoder layers (linears, GPT-2 ``Conv1D``, fused 3-D MoE expert weights), by
role (`ptq.architectures`), and every attention module's quantization points. A recipe that quantizes nothing, or
only part of a kind it touches (some decoder matmuls but not others, some attention modules but not others), is
reported as a problem: a loud warning, or an error with ``strict``. MoE routers are listed apart: recipes keep them
as configured, and they are too small to matter for the fraction.
"""

from __future__ import annotations

import warnings
from collections import Counter

from torch import nn

from ptq.architectures import MATMUL_ROLES, architecture
from ptq.errors import ModelError

ATTENTION_POINTS = ("kv_cache", "qk_matmul", "av_matmul", "softmax", "rope")
_LIST_AT_MOST = 8


def _is_matmul_module(m: nn.Module) -> bool:
    """A module whose own parameters are a matmul weight: a linear (also once swapped), Conv1D, fused experts."""
    if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
        return True
    cfg = getattr(m, "cfg", None)
    if cfg is not None and hasattr(cfg, "weight") and any(True for _ in m.parameters(recurse=False)):
        return True
    return any(p.dim() == 3 for p in m.parameters(recurse=False))


def _weight_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)


def _spec(m: nn.Module, field: str):
    return getattr(getattr(m, "cfg", None), field, None)


def _names(names: list[str]) -> str:
    more = len(names) - _LIST_AT_MOST
    return ", ".join(names[:_LIST_AT_MOST]) + (f" (+{more} more)" if more > 0 else "")


def coverage_report(model: nn.Module) -> dict:
    """A JSON-friendly summary of what is quantized in ``model``'s decoder layers (see the module docstring).

    Keys: ``weight_params`` (decoder matmul weights, routers excluded), ``weight_quantized_params``,
    ``weight_fraction``, ``input_quantized_params`` / ``input_fraction`` (weights whose matmul input is quantized),
    ``roles`` (role -> modules / weight_quantized / input_quantized), ``attention`` (modules and, per point, how many
    quantize it), ``routers``, ``not_quantized`` and ``unrecognized`` (matmul modules with no role) name lists, and
    ``problems`` (empty when coverage is all-or-nothing per kind and something is quantized).
    """
    arch = architecture(model)
    layers = model.get_submodule(arch.layers_path)
    roles: dict[str, Counter] = {}
    attention = Counter()
    total = quantized = inputs = 0
    not_quantized: list[str] = []
    unrecognized: list[str] = []
    routers: list[str] = []
    for i, layer in enumerate(layers):
        for sub, m in layer.named_modules():
            name = f"{arch.layers_path}.{i}.{sub}" if sub else f"{arch.layers_path}.{i}"
            role = arch.role_of(name)
            if role == "attention":
                attention["modules"] += 1
                for point in ATTENTION_POINTS:
                    attention[point] += _spec(m, point) is not None
                continue
            if not _is_matmul_module(m):
                continue
            if role == "router":
                routers.append(name)
                continue
            if role not in MATMUL_ROLES:
                unrecognized.append(name)
            n = _weight_params(m)
            total += n
            has_w, has_x = _spec(m, "weight") is not None, _spec(m, "data_in") is not None
            quantized += n * has_w
            inputs += n * has_x
            c = roles.setdefault(role or "unrecognized", Counter())
            c["modules"] += 1
            c["weight_quantized"] += has_w
            c["input_quantized"] += has_x
            if not has_w:
                not_quantized.append(name)
    report = {
        "model_type": arch.model_type, "roles_known": arch.known,
        "weight_params": total, "weight_quantized_params": quantized,
        "weight_fraction": quantized / total if total else 0.0,
        "input_quantized_params": inputs, "input_fraction": inputs / total if total else 0.0,
        "roles": {r: dict(c) for r, c in roles.items()},
        "attention": dict(attention), "routers": routers,
        "not_quantized": not_quantized, "unrecognized": unrecognized,
    }
    report["problems"] = _problems(report)
    return report


def _problems(r: dict) -> list[str]:
    problems = []
    att = r["attention"]
    att_points = sum(att.get(p, 0) for p in ATTENTION_POINTS)
    if r["weight_quantized_params"] == 0 and r["input_quantized_params"] == 0 and att_points == 0:
        problems.append(f"nothing is quantized: no selector reached a decoder matmul or attention module of this "
                        f"{r['model_type']} model. Check the selectors against `ptq validate --model` (by = \"role\" "
                        f"works across families)")
        return problems
    for kind, done in (("weight", r["weight_quantized_params"]), ("input", r["input_quantized_params"])):
        if 0 < done < r["weight_params"]:
            missing = {role: c["modules"] - c[f"{kind}_quantized"] for role, c in r["roles"].items()
                       if c["modules"] > c[f"{kind}_quantized"]}
            detail = ", ".join(f"{role}: {n}" for role, n in missing.items())
            problems.append(f"only {done / r['weight_params']:.0%} of the decoder's matmul weights have their {kind} "
                            f"quantized; modules left out by role: {detail}"
                            + (f" ({_names(r['not_quantized'])})" if kind == "weight" else "")
                            + ". Extend the selectors (e.g. fused qkv / gate_up projections, experts) or bypass "
                            "them explicitly")
    if r["unrecognized"]:
        problems.append(f"{len(r['unrecognized'])} matmul module(s) have no known role and are selectable by "
                        f"regex_name only: {_names(r['unrecognized'])}")
    for point in ATTENTION_POINTS:
        if 0 < att.get(point, 0) < att.get("modules", 0):
            problems.append(f"{point} is quantized in {att[point]} of {att['modules']} attention modules")
    return problems


def check_coverage(report: dict, strict: bool = False, where: str = "") -> None:
    """Warn loudly about every problem of ``report``; with ``strict`` raise `ModelError` instead."""
    if not report["problems"]:
        return
    text = f"{where}coverage: " + " | ".join(report["problems"])
    if strict:
        raise ModelError(text + " (strict mode: fix the recipe, or drop --strict to accept this)")
    warnings.warn(text, stacklevel=2)


def format_coverage(report: dict) -> str:
    """A few human lines for the CLI."""
    lines = [f"coverage: {report['weight_fraction']:.1%} of the decoder's matmul weights quantized "
             f"({report['weight_quantized_params']:,} of {report['weight_params']:,}), inputs of "
             f"{report['input_fraction']:.1%}"]
    for role, c in sorted(report["roles"].items()):
        lines.append(f"  {role}: {c.get('weight_quantized', 0)}/{c['modules']} weights, "
                     f"{c.get('input_quantized', 0)}/{c['modules']} inputs")
    att = report["attention"]
    if att.get("modules"):
        points = ", ".join(f"{p} {att.get(p, 0)}/{att['modules']}" for p in ATTENTION_POINTS if att.get(p, 0))
        lines.append(f"  attention: {att['modules']} modules; quantized points: {points or 'none'}")
    if report["routers"]:
        lines.append(f"  routers kept as configured: {len(report['routers'])}")
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
