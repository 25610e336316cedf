"""`PackedLinear`: a linear layer whose weight is stored real-quantized (packed codes + scales).

Storage (buffers, so they move with ``.to(device)``; all of integer dtype, so ``.to(dtype)`` leaves them alone and only
the compute dtype, i.e. the input's and the bias's, changes):

- ``qweight``: the weight codes in the blocked layout of ``ptq.quantizers.quantize`` (in_features last, zero-padded to
  whole blocks): 4-bit and narrower codes two per byte (uint8, element 2i in the low nibble), wider codes one per
  byte (mxint: int8 two's complement of m; minifloats: uint8 bit patterns).
- ``scales``: one uint8 per block: E8M0 (MX) or E4M3 bits (NVFP4). Held as uint8 because torch converts float8
  buffers on ``.to(torch.bfloat16)``; the state dict shows NVFP4 scales as ``float8_e4m3fn`` (their native dtype).
- ``global_scale`` (NVFP4 only): the fp32 per-tensor scale, held as its int32 bit pattern for the same reason and
  shown as fp32 in the state dict.
- ``bias`` (optional): a floating Parameter, fake-quantized per forward with ``bias_spec`` like `LinearMX` does.
- ``rotation`` / ``rotation_mode``: the online input rotation, with `LinearMX`'s semantics (matched: the packed weight
  is ``Q_w(rot(W))`` and the input is ``Q_in(rot(x))``; activation_only: ``rot.inverse(Q_in(rot(x)))``).

Forward backends: ``"torch"`` (the reference: dequantize the weight with ``ptq.quantizers.dequantize`` once per
device/dtype, cache it, then ``F.linear``) and ``"triton"`` (``ptq.kernels.packed_matmul``: dequantization inside
the GEMM tiles, never materialising the weight). ``None`` / ``"auto"``: Triton on CUDA for the formats it supports
(MXFP4, NVFP4, MXINT4, MXINT8) when the number of input rows is at most ``AUTO_TRITON_MAX_ROWS`` (decode and small
batches, where the weight bytes dominate), torch otherwise. The module's ``backend`` attribute, then the
environment variable ``PTQ_PACKED_BACKEND`` (auto|torch|triton), override the automatic choice; a requested backend
that cannot run falls back to torch with a warning.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError, PtqError, QuantSpecError
from ptq.formats import QuantSpec

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "PTQ_PACKED_BACKEND"
AUTO_TRITON_MAX_ROWS = 64
PACKABLE_FAMILIES = ("mxint", "mxfp", "nvfp4")


# ---- specs <-> JSON -------------------------------------------------------------------------------------------------
def spec_to_dict(spec: QuantSpec | None) -> dict | None:
    """A JSON-friendly dict that `spec_from_dict` turns back into the same QuantSpec."""
    return None if spec is None else dataclasses.asdict(spec)


def spec_from_dict(d: dict | None) -> QuantSpec | None:
    if d is None:
        return None
    try:
        return QuantSpec(**d)
    except TypeError as exc:
        raise QuantSpecError(f"not a QuantSpec description: {d!r} ({exc})") from None


def check_packable(spec: QuantSpec | None, where: str = "weight") -> QuantSpec:
    """The weight spec along in_features, or a ModelError saying why it cannot be packed."""
    if spec is None:
        raise ModelError(f"{where}: the weight is not quantized (bypassed), so there is nothing to pack")
    if spec.family not in PACKABLE_FAMILIES or spec.width > 8:
        raise ModelError(
            f"{where}: {spec} cannot be stored packed; packing supports "
            f"{', '.join(PACKABLE_FAMILIES)} with at most 8-bit elements (keep this layer as LinearMX)")
    return spec if spec.axis == -1 else spec.with_(axis=-1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (same dtype, shape and bits; NaNs with equal payloads compare equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _nibble_packed(spec: QuantSpec) -> bool:
    return spec.width <= 4


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    if _nibble_packed(spec):
        return torch.uint8
    return torch.int8 if spec.family == "mxint" else torch.uint8


def _padded(in_features: int, block: int) -> int:
    return -(-in_features // block) * block


# ---- rotations <-> JSON ---------------------------------------------------------------------------------------------
def rotation_to_dict(rot: nn.Module | None) -> dict | None:
    """``{"type": "HadamardRotation", **rot.config()}``; only rotations ptq can rebuild are accepted."""
    if rot is None:
        return None
    from ptq.modules.rotation import HadamardRotation

    if type(rot) is not HadamardRotation:
        raise ModelError(
            f"cannot serialise a rotation of type {type(rot).__name__}: export supports HadamardRotation only")
    return {"type": "HadamardRotation", **rot.config()}


def rotation_from_dict(d: dict | None) -> nn.Module | None:
    if d is None:
        return None
    d = dict(d)
    kind = d.pop("type", None)
    if kind != "HadamardRotation":
        raise ModelError(f"unknown rotation type {kind!r} in the quantization config (expected HadamardRotation)")
    from ptq.modules.rotation import HadamardRotation

    return HadamardRotation(**d)


# ---- the module ------------------------------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A linear layer with a real-quantized weight; see the module docstring for storage and backends.

    Build it with `PackedLinear.from_linear_mx` (pack a fake-quant `LinearMX`), `PackedLinear.from_weight`
    (quantize a float weight), or the constructor (an empty skeleton to ``load_state_dict`` into).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: QuantSpec,
        *,
        bias: bool = False,
        data_in: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        rotation: nn.Module | None = None,
        rotation_mode: str = "matched",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        spec = check_packable(weight_spec)
        if rotation_mode not in ("matched", "activation_only"):
            raise ModelError(f"rotation_mode must be 'matched' or 'activation_only', got {rotation_mode!r}")
        if backend is not None and backend not in BACKENDS:
            raise PtqError(f"PackedLinear backend must be one of {', '.join(BACKENDS)} (or None), got {backend!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_spec = spec
        self.data_in = None if data_in is None else data_in.with_(axis=-1) if data_in.axis != -1 else data_in
        self.bias_spec = None if bias_spec is None else bias_spec.with_(axis=-1) if bias_spec.axis != -1 else bias_spec
        self.rotation = rotation
        self.rotation_mode = rotation_mode
        self.backend = backend
        kp = _padded(self.in_features, spec.block_size)
        n_code_cols = kp // 2 if _nibble_packed(spec) else kp
        self.register_buffer("qweight", torch.zeros(self.out_features, n_code_cols, dtype=_code_dtype(spec),
                                                    device=device))
        self.register_buffer("scales", torch.zeros(self.out_features, kp // spec.block_size, dtype=torch.uint8,
                                                   device=device))
        if spec.family == "nvfp4":
            self.register_buffer("global_scale", torch.zeros((), dtype=torch.int32, device=device))
        else:
            self.global_scale = None
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self._weight_cache: dict[tuple, torch.Tensor] = {}
        # the largest scale code, for the Triton kernel's MXFP4 fast path: a data-dependent value, so it is computed
        # when codes are stored or loaded (one device sync then) and never in forward (None: the general path)
        self._max_scale_code: int | None = 0 if spec.family == "mxfp" and not self.scales.is_meta else None  # zeros
        self._warned: set[str] = set()

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, weight_spec: QuantSpec, bias: torch.Tensor | None = None,
                    **kwargs) -> "PackedLinear":
        """Quantize ``weight`` ([out, in], already rotated if a matched rotation is given) and pack it."""
        from ptq.quantizers import quantize

        if weight.dim() != 2:
            raise ModelError(f"PackedLinear needs a 2-D weight [out_features, in_features], got {tuple(weight.shape)}")
        spec = check_packable(weight_spec)
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, spec, bias=bias is not None, device=weight.device,
                  dtype=bias.dtype if bias is not None else torch.float32, **kwargs)
        mod.quantize_from(weight)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @classmethod
    @torch.no_grad()
    def from_linear_mx(cls, m: nn.Module, *, check: bool = True, backend: str | None = None) -> "PackedLinear":
        """Pack exactly the weight a fake-quant `LinearMX` multiplies by, keeping its input / bias specs and rotation.

        The packed values come from ``m.weight_to_quantize()`` (the rotated fp32 weight, which is what the LinearMX
        quantizes), or from its GPTQ weight when one is set (already on the grid, so quantizing it again reproduces
        it). With ``check`` the dequantized packed weight is compared bit for bit with ``m.effective_weight()``:
        a mismatch raises ModelError for an RTN weight and warns for a GPTQ weight (formats whose scale is not a
        function of the grid values, such as NVFP4's fp32 global scale, may not reproduce a GPTQ weight exactly).
        """
        from ptq.quantizers import quantize

        cfg = m.cfg
        spec = check_packable(cfg.weight, type(m).__name__)
        gptq = bool(getattr(m, "has_gptq_weight", False))
        src = m.effective_weight() if gptq else m.weight_to_quantize()
        mod = cls(m.in_features, m.out_features, spec, bias=m.bias is not None, data_in=cfg.data_in,
                  bias_spec=cfg.bias, rotation=m.rotation, rotation_mode=m.rotation_mode, backend=backend,
                  device=m.weight.device, dtype=m.weight.dtype if m.bias is None else m.bias.dtype)
        used_triton = mod.quantize_from(src)
        if m.bias is not None:
            mod.bias.data.copy_(m.bias.detach())
        if check:
            ref = m.effective_weight()
            got = mod.dequantized_weight(ref.dtype, ref.device)
            if not same_bits(got, ref) and used_triton:
                warnings.warn(f"the Triton code emitter disagrees with the reference for {spec}; packing with the "
                              f"torch reference instead", stacklevel=2)
                mod.set_codes(quantize(src, spec))
                got = mod.dequantized_weight(ref.dtype, ref.device)
            if not same_bits(got, ref):
                diff = (got.float() - ref.float()).abs().max().item()
                msg = (f"packing {spec} does not reproduce the LinearMX weight exactly (max |diff| {diff:.3g}, "
                       f"{'GPTQ' if gptq else 'RTN'} weight)")
                if not gptq:
                    raise ModelError(msg + "; this is a bug: please report it")
                warnings.warn(msg, stacklevel=2)
        return mod

    @torch.no_grad()
    def quantize_from(self, weight: torch.Tensor) -> bool:
        """Quantize ``weight`` [out, in] with this layer's spec and store it; returns whether the Triton code emitter
        (``ptq.kernels.triton_quantize_packed``, CUDA, same bits as the reference) did it instead of the reference."""
        from ptq.quantizers import quantize

        spec = self.weight_spec
        if weight.is_cuda and spec.width in (4, 8):
            try:
                from ptq.kernels import packed_supports, triton_quantize_packed

                pq = triton_quantize_packed(weight, spec) if packed_supports(spec, weight) else None
            except QuantSpecError:
                raise  # bad input (NaN / Inf the format cannot encode): the reference would refuse it too
            except Exception as exc:  # a broken kernel must not block packing: the reference is the truth
                warnings.warn(f"Triton code emitter failed ({type(exc).__name__}: {exc}); using the reference",
                              stacklevel=2)
                pq = None
            if pq is not None and pq.codes.numel() == self.qweight.numel() and pq.scales.numel() == self.scales.numel():
                self._store(pq.codes, pq.scales, pq.global_scale)
                return True
        self.set_codes(quantize(weight, spec))
        return False

    def _store(self, codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None) -> None:
        spec = self.weight_spec
        codes = codes.reshape(self.out_features, -1)
        if tuple(codes.shape) != tuple(self.qweight.shape) or scales.numel() != self.scales.numel():
            raise ModelError(f"packed codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not fit this "
                             f"layer's buffers {tuple(self.qweight.shape)} / {tuple(self.scales.shape)} ({spec})")
        self.qweight = codes.view(self.qweight.dtype).contiguous().to(self.qweight.device)
        self.scales = scales.reshape(self.out_features, -1).view(torch.uint8).contiguous().to(self.scales.device)
        if spec.family == "nvfp4":
            self.global_scale = global_scale.to(torch.float32).reshape(()).view(torch.int32).to(self.scales.device)
        self._weight_cache.clear()
        self._refresh_scale_stats()

    def _refresh_scale_stats(self) -> None:
        """Cache what the Triton launcher needs from the scale data, so that forward never reads device values."""
        s = self.scales
        if self.weight_spec.family != "mxfp" or s.is_meta:
            self._max_scale_code = None
        else:
            self._max_scale_code = int(s.max()) if s.numel() else 0

    @torch.no_grad()
    def set_codes(self, q) -> None:
        """Store a `QTensor` (from ``ptq.quantizers.quantize`` with this module's weight spec)."""
        from ptq.quantizers import pack_nibbles

        spec = self.weight_spec
        if q.spec.with_(axis=-1) != spec or tuple(q.shape) != (self.out_features, self.in_features):
            raise ModelError(f"set_codes: got {q.spec} codes of a {tuple(q.shape)} weight, this layer holds "
                             f"{spec} for ({self.out_features}, {self.in_features})")
        codes = q.codes.reshape(self.out_features, -1)
        codes = pack_nibbles(codes) if _nibble_packed(spec) else codes.to(_code_dtype(spec))
        self._store(codes, q.scales, q.global_scale)

    # ---- the stored weight -------------------------------------------------------------------------------------------
    def qtensor(self):
        """The stored weight as a `ptq.quantizers.QTensor` (codes unpacked to the quantizer's layout)."""
        from ptq.quantizers import QTensor, unpack_nibbles

        spec = self.weight_spec
        codes = self.qweight
        if _nibble_packed(spec):
            codes = unpack_nibbles(codes, signed=spec.family == "mxint")
        scales = self.scales.view(torch.float8_e4m3fn) if spec.family == "nvfp4" else self.scales
        g = self.global_scale.view(torch.float32) if spec.family == "nvfp4" else None
        return QTensor(codes, scales, g, None, spec, (self.out_features, self.in_features), torch.float32)

    def dequantized_weight(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The weight the torch backend multiplies by (``ptq.quantizers.dequantize``), cached per device/dtype."""
        from ptq.quantizers import dequantize

        dtype = dtype or self._compute_dtype()
        device = torch.device(device) if device is not None else self.qweight.device
        key = (device, dtype)
        w = self._weight_cache.get(key)
        if w is None:
            with torch.no_grad():
                w = dequantize(self.qtensor(), dtype=dtype).to(device)
            self._weight_cache[key] = w
        return w

    def _compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the stored weight: codes + scales (+ the 4-byte NVFP4 global scale)."""
        n = self.qweight.numel() * self.qweight.element_size() + self.scales.numel()
        return n + (4 if self.global_scale is not None else 0)

    # ---- forward -------------------------------------------------------------------------------------------------
    def resolve_backend(self, x: torch.Tensor) -> str:
        """"torch" or "triton" for this input (see the module docstring)."""
        want = self.backend
        if want is None:
            want = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
            if want not in BACKENDS:
                raise PtqError(f"environment variable {BACKEND_ENV}={want!r} is not one of {', '.join(BACKENDS)}")
        if want == "torch":
            return "torch"
        ok, why = self._triton_ok(x)
        if want == "triton":
            if ok:
                return "triton"
            if why not in self._warned:
                self._warned.add(why)
                warnings.warn(f"PackedLinear: backend 'triton' was requested but {why}; using the torch backend",
                              stacklevel=3)
            return "torch"
        rows = x.numel() // max(1, x.shape[-1])
        return "triton" if ok and x.is_cuda and rows <= AUTO_TRITON_MAX_ROWS else "torch"

    def _triton_ok(self, x: torch.Tensor) -> tuple[bool, str]:
        try:
            from ptq.kernels import packed_matmul as pm
        except Exception as exc:  # a broken Triton install must not break the torch path
            return False, f"the Triton kernel cannot be imported ({type(exc).__name__}: {exc})"
        if pm.weight_format(self.weight_spec) is None:
            return False, f"the Triton kernel does not support {self.weight_spec} (MXFP4, NVFP4, MXINT4, MXINT8 only)"
        if not pm.supports(self.weight_spec, x):
            return False, f"it cannot run on a {x.dtype} tensor on {x.device} (needs CUDA, or TRITON_INTERPRET=1)"
        return True, ""

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the matmul sees on the input side (rotation and input quantization, as in `LinearMX`)."""
        from ptq.quantizers import fake_quantize

        rot = self.rotation
        xr = rot(x) if rot is not None else x
        xq = fake_quantize(xr, self.data_in) if self.data_in is not None else xr
        return rot.inverse(xq) if rot is not None and self.rotation_mode == "activation_only" else xq

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.bias_spec is None:
            return self.bias
        from ptq.quantizers import fake_quantize

        return fake_quantize(self.bias, self.bias_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ModelError(f"PackedLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        xq = self.prepare_input(x)
        bias = self.effective_bias()
        if bias is not None and bias.dtype != xq.dtype:
            bias = bias.to(xq.dtype)
        if self.resolve_backend(xq) == "triton":
            from ptq.kernels.packed_matmul import packed_matmul

            g = self.global_scale.view(torch.float32).reshape(1) if self.global_scale is not None else None
            y = packed_matmul(xq, self.qweight, self.scales, self.weight_spec, self.out_features, global_scale=g,
                              max_scale_code=self._max_scale_code)
            return y if bias is None else y + bias
        return F.linear(xq, self.dequantized_weight(xq.dtype, xq.device), bias)

    # ---- state dict: native dtypes outside, integer bits inside ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_spec.family == "nvfp4":
            destination[prefix + "scales"] = destination[prefix + "scales"].view(torch.float8_e4m3fn)
            destination[prefix + "global_scale"] = destination[prefix + "global_scale"].view(torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, raw in (("scales", torch.uint8), ("global_scale", torch.int32)):
            t = state_dict.get(prefix + key)
            if t is not None and t.dtype != raw and t.element_size() == torch.empty((), dtype=raw).element_size():
                state_dict[prefix + key] = t.view(raw)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._weight_cache.clear()
        self._refresh_scale_stats()

    def _apply(self, fn, recurse=True):
        self._weight_cache.clear()
        return super()._apply(fn, recurse)

    # ---- description ---------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-friendly description from which `from_config` builds an empty skeleton of this layer."""
        return {
            "type": "PackedLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight": spec_to_dict(self.weight_spec),
            "data_in": spec_to_dict(self.data_in),
            "bias_spec": spec_to_dict(self.bias_spec),
            "rotation": rotation_to_dict(self.rotation),
            "rotation_mode": self.rotation_mode,
        }

    @classmethod
    def from_config(cls, cfg: dict, *, device=None, dtype: torch.dtype = torch.float32,
                    backend: str | None = None) -> "PackedLinear":
        try:
            return cls(
                cfg["in_features"], cfg["out_features"], spec_from_dict(cfg["weight"]), bias=bool(cfg["bias"]),
                data_in=spec_from_dict(cfg.get("data_in")), bias_spec=spec_from_dict(cfg.get("bias_spec")),
                rotation=rotation_from_dict(cfg.get("rotation")), rotation_mode=cfg.get("rotation_mode", "matched"),
                backend=backend, device=device, dtype=dtype)
        except KeyError as exc:
            raise ModelError(f"PackedLinear config lacks the key {exc}: {cfg!r}") from None

    def linear_config(self) -> LinearQuantConfig:
        return LinearQuantConfig(weight=self.weight_spec, data_in=self.data_in, bias=self.bias_spec)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}", f"weight={self.weight_spec} (packed)",
                 f"data_in={self.data_in or 'bypass'}"]
        if self.rotation is not None:
            parts.append(f"rotation={type(self.rotation).__name__}({self.rotation_mode})")
        if self.backend:
            parts.append(f"backend={self.backend}")
        return ", ".join(parts)
