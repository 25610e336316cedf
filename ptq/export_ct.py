"""Export to compressed-tensors (a directory `transformers` and vLLM load without ptq), and load it back into ptq.

Layouts (read from compressed-tensors 0.20.1, the version this was tested with):

- NVFP4 weights -> ``nvfp4-pack-quantized``: ``weight_packed`` (uint8 [out, in/2], E2M1 codes, element 2i in the
  low nibble: ptq's own nibble layout), ``weight_scale`` (float8_e4m3fn [out, in/16]) and ``weight_global_scale``
  (fp32 [1]) holding the *reciprocal* 1/g of ptq's global scale g (compressed-tensors divides by it). NVFP4 input
  activations add ``input_global_scale`` (fp32 [1], 1/g of the calibration inputs; static, where ptq's is per
  tensor at run time).
- MXFP4 weights (E2M1, blocks of 32) -> ``mxfp4-pack-quantized``: ``weight_packed`` as above and ``weight_scale``
  uint8 E8M0 (biased exponent, ptq's own scale codes).
- MXINT-k and symmetric INT-k weights (k in 2, 4, 8) -> ``pack-quantized``: ``weight_packed`` (int32, 32/k codes per
  word, code + 2^(k-1) at bit offset k*i), ``weight_scale`` ([out, in/block], the model dtype; MXINT's power-of-two
  scales 2^(e-(k-2)) are exact there), ``weight_shape``.
- everything else (mx6 / mx9 / other minifloats, in_features not a multiple of the group, rotated layers) is stored
  dense: the weight ptq multiplies by (already on its grid, rotations folded in), in the model dtype.

compressed-tensors 0.20.1 decompresses FP4 weights to bfloat16, so an export holding FP4 layers is a bfloat16 model.
What the format cannot express (activation formats it has no scheme for, ptq's attention quantizers, online
rotations, a different scale rule) is listed as an issue: a warning at export time, a section of the directory's
README.md, and an error with ``strict=True``.

ptq's extras live in ``ptq_ct.json`` (per-module configs, exact NVFP4 global scales, attention configs) and, for
layers whose exact ptq state the compressed-tensors tensors do not hold (rotated layers), ``ptq_extra.safetensors``;
`load_compressed_tensors` rebuilds the ptq model from them, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.errors import CheckpointError, ModelError, PtqError
from ptq.formats import QuantSpec

SIDE_FILE = "ptq_ct.json"
EXTRA_TENSORS = "ptq_extra.safetensors"
SIDE_FORMAT_VERSION = 1
CT_TESTED_VERSION = "0.20.1"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INT_PACK_BITS = (2, 4, 8)  # widths whose codes tile an int32 word exactly


class ExportIssue(UserWarning):
    """Something the compressed-tensors export cannot express exactly."""


# ---- planning: which layer goes where ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "nvfp4" | "mxfp4" | "int" | "dense"
    weights: dict | None = None  # compressed-tensors QuantizationArgs (JSON)
    inputs: dict | None = None
    issues: tuple[str, ...] = ()

    @property
    def ct_format(self) -> str | None:
        return {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized", "int": "pack-quantized"}.get(
            self.kind)


@dataclass
class Plan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)


def _is_e2m1(spec: QuantSpec) -> bool:
    return spec.family == "mxfp" and (spec.exp_bits, spec.man_bits) == (2, 1)


def _weight_args(spec: QuantSpec, in_features: int) -> tuple[str, dict | None, str | None]:
    """(kind, QuantizationArgs, why-dense) for a weight spec; rounding modes do not matter (the codes are stored).
    A quantized bias is stored as its quantized values, which is exact."""
    if spec.family == "nvfp4":
        if in_features % 16:
            return "dense", None, f"in_features {in_features} is not a multiple of NVFP4's 16"
        return "nvfp4", dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                             dynamic=False, scale_dtype="torch.float8_e4m3fn"), None
    if _is_e2m1(spec):
        if spec.block_size != 32:
            return "dense", None, f"compressed-tensors' MXFP4 has blocks of 32, this weight {spec.block_size}"
        if in_features % 32:
            return "dense", None, f"in_features {in_features} is not a multiple of MXFP4's 32"
        return "mxfp4", dict(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                             dynamic=False, scale_dtype="torch.uint8"), None
    if spec.family in ("mxint", "int") and spec.symmetric:
        if spec.width not in INT_PACK_BITS:
            return "dense", None, f"{spec.width}-bit integers do not tile an int32 word (packed: {INT_PACK_BITS})"
        if in_features % spec.block_size:
            return "dense", None, f"in_features {in_features} is not a multiple of the group {spec.block_size}"
        return "int", dict(num_bits=spec.width, type="int", symmetric=True, strategy="group",
                           group_size=spec.block_size, dynamic=False), None
    return "dense", None, f"{spec} has no compressed-tensors layout"


def _input_args(spec: QuantSpec) -> tuple[dict | None, str | None]:
    """(QuantizationArgs, issue) for an input-activation spec."""
    if spec.family == "nvfp4":
        return (dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                     dynamic="local", scale_dtype="torch.float8_e4m3fn"),
                "NVFP4 input global scale is static in compressed-tensors (1/g of the calibration inputs), per "
                "tensor at run time in ptq; compressed-tensors also rounds amax/6 to the activation dtype before "
                "the E4M3 block scale (double rounding: a few % of blocks one scale step apart)")
    if _is_e2m1(spec) and spec.block_size == 32:
        return (dict(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, dynamic=True,
                     scale_dtype="torch.uint8"),
                f"MXFP4 input scales: compressed-tensors rounds the block amax to the nearest power of two "
                f"(up from 1.75 x 2^k), ptq uses scale_rule={spec.scale_rule!r}")
    return None, f"input activations {spec} have no compressed-tensors scheme: dropped"


def plan_export(model: nn.Module) -> Plan:
    """Decide, for every ptq module of ``model``, how compressed-tensors stores it and what it loses."""
    from ptq.modules.attention import AttentionMX
    from ptq.modules.experts import ExpertsMX
    from ptq.modules.linear import LinearMX
    from ptq.modules.packed import PackedLinear

    plan = Plan()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            raise ModelError(f"{name}: a PackedLinear (a model loaded from a ptq export); export the fake-quant "
                             f"model that produced it instead")
        if isinstance(m, AttentionMX):
            for f in ("kv_cache", "qk_matmul", "av_matmul", "softmax", "rope"):
                if getattr(m.cfg, f) is not None:
                    plan.issues.append(f"{name}: {f} quantizer {getattr(m.cfg, f)} has no compressed-tensors "
                                       f"equivalent that transformers applies: dropped (kept in {SIDE_FILE})")
            for f in ("qk_rotation", "v_rotation"):
                if getattr(m, f, None) is not None:
                    plan.issues.append(f"{name}: {f} is an online rotation without a compressed-tensors transform "
                                       f"that transformers applies: dropped (exact without the quantizers above)")
            continue
        if isinstance(m, ExpertsMX) and not m.cfg.bypassed:
            plan.issues.append(f"{name}: fused MoE experts have no compressed-tensors writer in ptq yet: their "
                               f"original (unquantized) weights are written and {m.cfg} is dropped; use --format ptq "
                               f"to keep it")
            continue
        if not isinstance(m, LinearMX):
            continue
        if m.weight_transposed:
            raise ModelError(f"{name}: a GPT-2 style Conv1D layer; compressed-tensors compresses nn.Linear layers "
                             f"only, so this model cannot be exported in that format: use --format ptq")
        cfg, issues = m.cfg, []
        if m.rotation is not None:
            kind, wargs = "dense", None
            issues.append(f"online {type(m.rotation).__name__} rotation ({m.rotation_mode}) has no transform "
                          f"transformers applies: stored dense with the rotation folded into the weight")
            if cfg.data_in is not None:
                issues.append(f"input activations {cfg.data_in} (rotated) dropped")
        elif cfg.weight is None:
            kind, wargs = "dense", None
        else:
            kind, wargs, why = _weight_args(cfg.weight, m.in_features)
            if why:
                issues.append(f"weight stored dense (dequantized, not compressed): {why}")
        iargs = None
        if m.rotation is None and cfg.data_in is not None:
            if kind == "dense":
                issues.append(f"input activations {cfg.data_in} dropped (the weight is stored dense)")
            else:
                iargs, why = _input_args(cfg.data_in)
                if why:
                    issues.append(why)
                if iargs is not None and kind == "int":
                    issues.append("float input activations with integer weights have no compressed-tensors "
                                  "compressor: dropped")
                    iargs = None
        lp = LayerPlan(name, kind, wargs, iargs, tuple(issues))
        plan.layers[name] = lp
        plan.issues.extend(f"{name}: {i}" for i in issues)
    if not plan.layers:
        raise ModelError("the model has no LinearMX layers: run the ptq passes (a recipe) before exporting")
    return plan


# ---- numerics: ptq codes -> compressed-tensors tensors --------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense int packing for ``bits`` dividing 32: signed codes [rows, cols] (|code| <
    2^(bits-1)) -> int32 [rows, ceil(cols * bits / 32)], code + 2^(bits-1) at bit offset bits * i of each word."""
    if bits not in INT_PACK_BITS:
        raise PtqError(f"pack_int32 packs {INT_PACK_BITS}-bit codes, got {bits}")
    per = 32 // bits
    rows, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1)))
    pad = -cols % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (u << shifts).sum(-1)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int8 codes [rows, cols]."""
    per = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def _source_weight(m) -> tuple[torch.Tensor, bool]:
    gptq = bool(m.has_gptq_weight)
    return (m.effective_weight().detach().to(torch.float32) if gptq else m.weight_to_quantize()), gptq


def _ct_dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, inv_global: torch.Tensor | None) -> torch.Tensor:
    """What compressed-tensors 0.20.1 decompresses an FP4 weight to (bfloat16), replicated for the exactness check:
    bf16(q * (bf16(scale) / inv_global)) with the division in fp32 (no global scale for MXFP4, whose uint8 scale
    codes decode to 2^(code - 127))."""
    from ptq.quantizers import unpack_nibbles
    from ptq.quantizers.codes import decode_minifloat

    from ptq.quantizers.codes import e8m0_decode

    q = decode_minifloat(unpack_nibbles(packed), QuantSpec.mxfp("e2m1"))
    s = (e8m0_decode(scale) if scale.dtype == torch.uint8 else scale.to(torch.float32)).to(torch.bfloat16)
    block = q.shape[-1] // s.shape[-1]
    eff = s.to(torch.float32) / inv_global if inv_global is not None else s.to(torch.float32)
    return (q.view(*s.shape, block) * eff.unsqueeze(-1)).reshape(q.shape).to(torch.bfloat16)


def layer_tensors(m, lp: LayerPlan, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The compressed-tensors tensors of one LinearMX (local names) and its side-file entry."""
    from ptq.quantizers import dequantize, pack_nibbles, quantize

    side: dict[str, Any] = {"kind": lp.kind}
    out: dict[str, torch.Tensor] = {}
    eff = m.effective_weight().detach()
    if lp.kind == "dense":
        w = eff
        if m.rotation is not None and m.rotation_mode == "matched":
            # y = Wq rot(x) = (Wq H) x: fold the rotation (its matrix rot(I)) into the weight, in float64
            eye = torch.eye(m.in_features, dtype=torch.float64, device=eff.device)
            h = m.rotation(eye.to(torch.float32)).to(torch.float64)
            w = (h @ eff.to(torch.float64).T).T
            side["exact_in_extra"] = True
        out["weight"] = w.to(dtype)
    else:
        spec = m.cfg.weight.with_(axis=-1)
        src, gptq = _source_weight(m)
        q = quantize(src, spec)
        back = dequantize(q, eff.dtype)
        if not torch.equal(back.view(torch.int16 if back.element_size() == 2 else torch.int32),
                           eff.contiguous().view(torch.int16 if eff.element_size() == 2 else torch.int32)):
            msg = f"{lp.name}: re-quantizing the {'GPTQ' if gptq else 'RTN'} weight with {spec} does not reproduce it"
            if not gptq:
                raise ModelError(msg + "; this is a bug: please report it")
            warnings.warn(msg, ExportIssue, stacklevel=3)
        if lp.kind in ("nvfp4", "mxfp4"):
            out["weight_packed"] = pack_nibbles(q.codes)
            if lp.kind == "mxfp4":
                out["weight_scale"] = q.scales.to(torch.uint8)
                inv = None
            else:
                out["weight_scale"] = q.scales.to(torch.float8_e4m3fn)
                g = q.global_scale.to(torch.float32).reshape(1)
                inv = (1.0 / g).to(torch.float32)
                out["weight_global_scale"] = inv
                side["global_scale"] = float(g.item()).hex()
            ct_w = _ct_dequant_fp4(out["weight_packed"], out["weight_scale"], inv)
            want = eff.to(torch.bfloat16)
            diff = ct_w.float() != want.float()
            side["ct_weight_mismatches"] = int(diff.sum())
            if side["ct_weight_mismatches"] and eff.dtype == torch.bfloat16:
                side["ct_weight_max_abs_diff"] = float((ct_w.float() - want.float()).abs().max())
        else:  # int group packing
            k = spec.width
            if spec.family == "mxint":
                codes = q.codes.to(torch.int8)  # m, value m / 2^(k-2) * 2^e
                scale = torch.ldexp(torch.ones_like(q.scales, dtype=torch.float32),
                                    q.scales.to(torch.int32) - 127 - (k - 2))
            else:
                codes, scale = q.codes.to(torch.int8), q.scales.to(torch.float32)
            out["weight_packed"] = pack_int32(codes, k)
            out["weight_scale"] = scale.to(dtype)
            if spec.family == "mxint":
                # powers of two in 2^-9 .. 2^8 are exact in E4M3: 8-bit scales on disk (loaders cast them to the
                # scale parameter's dtype); otherwise the model dtype (exact for bf16 / fp32)
                f8 = scale.to(torch.float8_e4m3fn)
                if torch.equal(f8.to(torch.float32), scale):
                    out["weight_scale"] = f8
            out["weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
            if not torch.equal(out["weight_scale"].to(torch.float32), scale):
                side["scale_rounded_to"] = str(dtype).replace("torch.", "")
    if m.bias is not None:
        out["bias"] = m.effective_bias().detach().to(dtype)
    return out, side


# ---- calibration of static input global scales (NVFP4 activations) -------------------------------------------------
@torch.no_grad()
def calibrate_input_amax(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """amax of every named linear's input over ``calibration`` (a LongTensor [n, t] of token ids or an iterable of
    them), as fp32 scalars."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_mod, args):
            a = args[0].detach().abs().float()
            a = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
        dev = next(model.parameters()).device
        for ids in batches:
            model(ids.to(dev))
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in amax]
    if missing:
        raise ModelError(f"calibration never reached {missing[:3]}: pass token ids the model runs through")
    return amax


# ---- writing --------------------------------------------------------------------------------------------------------
def _ct_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:
        return None


def _groups(plan: Plan) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    keyed: dict[str, str] = {}
    for name, lp in plan.layers.items():
        if lp.kind == "dense":
            continue
        key = json.dumps([lp.weights, lp.inputs, lp.ct_format], sort_keys=True)
        if key not in keyed:
            keyed[key] = f"group_{len(keyed)}"
            g = {"targets": [], "weights": lp.weights, "format": lp.ct_format}
            if lp.inputs is not None:
                g["input_activations"] = lp.inputs
            groups[keyed[key]] = g
        groups[keyed[key]]["targets"].append(name)
    return groups


def _quantization_config(plan: Plan, model: nn.Module) -> dict:
    groups = _groups(plan)
    formats = {g["format"] for g in groups.values()}
    linear_names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [n for n in linear_names if n not in plan.layers or plan.layers[n].kind == "dense"],
        "kv_cache_scheme": None,
        "version": _ct_version() or CT_TESTED_VERSION,
    }


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    return shards


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int) -> list[str]:
    from ptq.io import atomic_save_safetensors, atomic_write_json

    shards = _shard(tensors, max_bytes)
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        atomic_save_safetensors(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _readme(plan: Plan, qcfg: dict, summary: dict, dtype: str) -> str:
    lines = ["# ptq export (compressed-tensors)", "",
             f"Written by ptq; compressed-tensors format `{qcfg['format']}` (tested with compressed-tensors "
             f"{CT_TESTED_VERSION}), stored dtype {dtype}. Loads with "
             "`AutoModelForCausalLM.from_pretrained(dir)` when `compressed-tensors` is installed, and with "
             "`ptq.load_model(dir)` as the exact ptq model.", "",
             f"- compressed linears: {len(summary['packed'])} ({summary['bits_per_weight'] or 0:.3f} bits per "
             f"weight, codes + scales)",
             f"- dense linears: {len(summary['kept'])}", ""]
    lines.append("## What compressed-tensors does not express")
    lines.append("")
    if plan.issues:
        lines += [f"- {i}" for i in plan.issues]
    else:
        lines.append("Nothing: the compressed-tensors model computes what the ptq model computes.")
    return "\n".join(lines) + "\n"


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                              overwrite: bool = False, strict: bool = False, calibration: Any = None,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict:
    """Write ``model`` (after the ptq passes) as a compressed-tensors Hugging Face directory; see the module
    docstring. ``calibration``: token ids for the static input global scales of NVFP4 activations (required when
    the model has some). ``strict``: raise instead of warning when something cannot be expressed.

    Returns a summary: ``packed`` (compressed layer names), ``kept`` (dense layer names), ``issues``,
    ``packed_weights`` / ``packed_weight_bytes`` (codes + scales) / ``bits_per_weight``, ``files``."""
    from tqdm.auto import tqdm

    from ptq import __version__
    from ptq.export import _attn_cfg_to_dict, _linear_cfg_to_dict, _model_dtype, _replace_dir, check_export_target
    from ptq.io import TMP_PREFIX, atomic_save_safetensors, atomic_write_json, atomic_write_text
    from ptq.modules.attention import AttentionMX
    from ptq.modules.packed import rotation_to_dict

    out, config = check_export_target(model, out_dir, overwrite)
    plan = plan_export(model)
    src_dtype = getattr(torch, _model_dtype(model))
    fp4 = any(lp.kind in ("nvfp4", "mxfp4") for lp in plan.layers.values())
    dtype = torch.bfloat16 if fp4 else src_dtype
    if fp4 and src_dtype != torch.bfloat16:
        plan.issues.append(f"compressed-tensors {CT_TESTED_VERSION} decompresses FP4 weights to bfloat16, so the "
                           f"model is stored in bfloat16 (its {src_dtype} tensors rounded)")
    nvfp4_inputs = [n for n, lp in plan.layers.items() if lp.inputs is not None and lp.inputs["strategy"] ==
                    "tensor_group"]
    input_amax = {}
    if nvfp4_inputs:
        if calibration is None:
            raise PtqError(f"{len(nvfp4_inputs)} layers quantize inputs to NVFP4, whose compressed-tensors form "
                           f"needs a static input global scale: pass calibration= (token ids; CLI: --calib-samples)")
        input_amax = calibrate_input_amax(model, nvfp4_inputs, calibration)

    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    side_linears: dict[str, dict] = {}
    packed_bytes = packed_weights = 0
    with torch.no_grad():
        mods = dict(model.named_modules())
        for name, lp in tqdm(plan.layers.items(), desc="compressing", disable=not progress, leave=False):
            m = mods[name]
            t, side = layer_tensors(m, lp, dtype)
            if name in input_amax:
                from ptq.quantizers.nvfp4 import nvfp4_global_scale

                g_in = nvfp4_global_scale(input_amax[name]).reshape(1)
                t["input_global_scale"] = (1.0 / g_in).to(torch.float32)
                side["input_global_scale"] = float(g_in.item()).hex()
            if side.pop("exact_in_extra", False):
                extra[f"{name}.weight"] = (m.effective_weight() if m.has_gptq_weight else m.weight).detach().clone()
                side["extra"] = "gptq_weight" if m.has_gptq_weight else "weight"
            side.update(config=_linear_cfg_to_dict(m.cfg), rotation=rotation_to_dict(m.rotation),
                        rotation_mode=m.rotation_mode)
            side_linears[name] = side
            for k, v in t.items():
                tensors[f"{name}.{k}"] = v.contiguous()
            if lp.kind != "dense":
                packed_weights += m.in_features * m.out_features
                packed_bytes += sum(v.numel() * v.element_size() for k, v in t.items()
                                    if k in ("weight_packed", "weight_scale", "weight_global_scale"))
            if side.get("ct_weight_mismatches"):
                plan.issues.append(
                    f"{name}: compressed-tensors divides by the stored reciprocal 1/g of the NVFP4 global scale "
                    f"where ptq multiplies by g: {side['ct_weight_mismatches']} of {m.weight.numel()} weights "
                    f"dequantize one bfloat16 rounding step apart")
            if side.get("scale_rounded_to"):
                plan.issues.append(f"{name}: INT weight scales (fp32 in ptq) rounded to {side['scale_rounded_to']}")
        owners = set(plan.layers)
        for k, v in model.state_dict().items():
            if k.rpartition(".")[0] in owners:
                continue
            tensors[k] = (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
    tied = _drop_tied(model, tensors)
    if plan.issues:
        text = "compressed-tensors cannot express all of this model:\n  " + "\n  ".join(plan.issues)
        if strict:
            raise PtqError(text + "\n(--strict) export with --format ptq, or drop --strict to export anyway")
        warnings.warn(text, ExportIssue, stacklevel=2)

    attention = {n: {"config": _attn_cfg_to_dict(m.cfg), "qk_rotation": rotation_to_dict(m.qk_rotation),
                     "v_rotation": rotation_to_dict(m.v_rotation)}
                 for n, m in model.named_modules() if isinstance(m, AttentionMX)}
    qcfg = _quantization_config(plan, model)
    cfg_dict = config.to_dict()
    cfg_dict["quantization_config"] = qcfg
    cfg_dict["dtype"] = str(dtype).replace("torch.", "")
    cfg_dict.pop("torch_dtype", None)
    summary = {
        "out_dir": str(out), "format": "compressed-tensors",
        "packed": sorted(n for n, lp in plan.layers.items() if lp.kind != "dense"),
        "kept": sorted(n for n, lp in plan.layers.items() if lp.kind == "dense"),
        "issues": list(plan.issues), "packed_weights": packed_weights, "packed_weight_bytes": packed_bytes,
        "bits_per_weight": 8.0 * packed_bytes / packed_weights if packed_weights else None,
    }
    side = {"format_version": SIDE_FORMAT_VERSION, "ptq_version": __version__, "dtype": cfg_dict["dtype"],
            "model_class": type(model).__name__, "linears": side_linears, "attention": attention, "tied": tied,
            "issues": plan.issues}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    try:
        summary["files"] = _write_safetensors(tensors, tmp, max_shard_bytes)
        if extra:
            atomic_save_safetensors(extra, tmp / EXTRA_TENSORS, metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SIDE_FILE, side)
        atomic_write_text(tmp / "README.md", _readme(plan, qcfg, summary, cfg_dict["dtype"]))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["bytes"] = sum((out / f).stat().st_size for f in summary["files"])
    return summary


def _drop_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Drop the copies of tied parameters (Hugging Face re-ties them from the config); {dropped: kept}."""
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in tensors:
            continue
        key = (p.data_ptr(), tuple(p.shape))
        if key in seen:
            tied[name] = seen[key]
            del tensors[name]
        else:
            seen[key] = name
    return tied


# ---- loading back into ptq ------------------------------------------------------------------------------------------
def is_ct_export(path: str | os.PathLike) -> bool:
    return (Path(path) / SIDE_FILE).is_file()


def _read_side(path: Path) -> dict:
    p = path / SIDE_FILE
    try:
        side = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: unreadable ({exc}); re-export the model") from None
    if side.get("format_version") != SIDE_FORMAT_VERSION:
        raise CheckpointError(f"{p}: format_version {side.get('format_version')!r} is not supported by this ptq "
                              f"(reads {SIDE_FORMAT_VERSION}); re-export the model with this version")
    return side


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(f"{path}: {f} is missing; the export is incomplete, export again")
        tensors.update(load_file(str(path / f), device="cpu"))
    return tensors


def _packed_state(kind: str, t: dict[str, torch.Tensor], spec: QuantSpec, entry: dict) -> dict[str, torch.Tensor]:
    """PackedLinear buffers from a layer's compressed-tensors tensors."""
    from ptq.quantizers import pack_nibbles

    if kind == "mxfp4":
        return {"qweight": t["weight_packed"], "scales": t["weight_scale"]}
    if kind == "nvfp4":
        g = torch.tensor(float.fromhex(entry["global_scale"]), dtype=torch.float32)
        return {"qweight": t["weight_packed"], "scales": t["weight_scale"], "global_scale": g}
    k = spec.width
    cols = int(t["weight_shape"][1])
    codes = unpack_int32(t["weight_packed"], k, cols)
    e = torch.log2(t["weight_scale"].to(torch.float32)).round().to(torch.int32) + (k - 2) + 127
    return {"qweight": pack_nibbles(codes) if k <= 4 else codes, "scales": e.to(torch.uint8)}


def load_compressed_tensors(path: str | os.PathLike, device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None, backend: str | None = None) -> nn.Module:
    """Rebuild the ptq model of a directory written by `export_compressed_tensors` (eval mode): compressed MXFP4 /
    NVFP4 / MXINT layers as `PackedLinear`, the others as `LinearMX` holding their exact weight, `AttentionMX` from
    the side file."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ptq.export import _attn_cfg_from_dict, _linear_cfg_from_dict, _parameters_on_meta, _set_module, placed
    from ptq.modules.packed import PACKABLE_FAMILIES, PackedLinear, rotation_from_dict
    from ptq.passes.swap import swap_modules

    path = Path(path)
    side = _read_side(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored = getattr(torch, side["dtype"])
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored)
    linears, attention = side["linears"], side.get("attention", {})
    mapping = {n: _linear_cfg_from_dict(e["config"]) for n, e in linears.items()}
    mapping.update({n: _attn_cfg_from_dict(e["config"]) for n, e in attention.items()})
    swap_modules(model, mapping)
    for n, e in attention.items():
        qk, v = rotation_from_dict(e.get("qk_rotation")), rotation_from_dict(e.get("v_rotation"))
        if qk is not None or v is not None:
            model.get_submodule(n).set_rotations(qk=qk, v=v)

    tensors = _read_tensors(path)
    extra = {}
    if (path / EXTRA_TENSORS).is_file():
        from safetensors.torch import load_file

        extra = load_file(str(path / EXTRA_TENSORS), device="cpu")
    for dropped, kept in side.get("tied", {}).items():
        if kept not in tensors:
            raise CheckpointError(f"{path}: tied key {dropped!r} refers to {kept!r}, which the files lack")
        tensors[dropped] = tensors[kept]
    exact_weights: dict[str, torch.Tensor] = {}
    for name, e in linears.items():
        local = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.rpartition(".")[0] == name]}
        cfg = mapping[name]
        kind = e["kind"]
        lin = model.get_submodule(name)
        rot = rotation_from_dict(e.get("rotation"))
        if kind != "dense" and cfg.weight.family in PACKABLE_FAMILIES and cfg.weight.width in (4, 8):
            pl = PackedLinear(lin.in_features, lin.out_features, cfg.weight, bias="bias" in local,
                              data_in=cfg.data_in, bias_spec=cfg.bias, rotation=rot,
                              rotation_mode=e.get("rotation_mode", "matched"), backend=backend, device="meta",
                              dtype=stored)
            state = _packed_state(kind, local, cfg.weight.with_(axis=-1), e)
            if "bias" in local:
                state["bias"] = local["bias"]
            _set_module(model, name, pl)
            pl.load_state_dict(state, strict=True, assign=True)
            continue
        if rot is not None:
            lin.set_rotation(rot, e.get("rotation_mode", "matched"))
        if e.get("extra"):
            w = extra.get(f"{name}.weight")
            if w is None:
                raise CheckpointError(f"{path / EXTRA_TENSORS}: lacks {name}.weight; the export is incomplete")
            if e["extra"] == "gptq_weight":
                exact_weights[name] = w
                w = torch.zeros_like(w)
        elif kind == "dense":
            w = local["weight"]
            if cfg.weight is not None:
                exact_weights[name] = w  # already the quantized values the matmul uses
        else:  # int weights ptq keeps as LinearMX: the dequantized values, exact
            codes = unpack_int32(local["weight_packed"], cfg.weight.width, int(local["weight_shape"][1]))
            s = local["weight_scale"].to(torch.float32)
            w = (codes.to(torch.float32).view(*s.shape, -1) * s.unsqueeze(-1)).reshape(codes.shape).to(stored)
            exact_weights[name] = w
        lin.weight = nn.Parameter(w, requires_grad=False)
        if "bias" in local:
            lin.bias = nn.Parameter(local["bias"], requires_grad=False)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if result.unexpected_keys or still_meta:
        raise CheckpointError(f"{path}: the files do not match the model built from config.json (unexpected "
                              f"{result.unexpected_keys[:5]}, missing {still_meta[:5]}); the export is corrupt")
    for name, w in exact_weights.items():
        model.get_submodule(name).set_quantized_weight(w)
    if hasattr(model, "tie_weights") and side.get("tied"):
        model.tie_weights()
    return placed(model, dtype, device)
