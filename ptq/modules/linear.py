"""`LinearMX`: a drop-in for `nn.Linear` with fake-quantized weight, input and bias.

Forward (``Q_*`` = `fake_quantize` with the config's spec; a ``None`` spec is an exact pass-through):

- no rotation:      ``y = Q_in(x) @ Q_w(W)^T + Q_b(b)``
- matched rotation: ``y = Q_in(rot(x)) @ Q_w(rot(W))^T + Q_b(b)``; exact in full precision because ``rot`` is
  orthogonal (``rot(x) @ rot(W)^T = x H^T H W^T``), and realisable by a real low-precision GEMM.
- activation_only:  ``y = rot.inverse(Q_in(rot(x))) @ Q_w(W)^T + Q_b(b)`` (the rotation only shapes the input's
  quantization error; the weight stays in its own basis).

Weight and input are blocked along in_features (the reduction axis of the matmul), so every spec is applied along
the last dim.

GPT-2's ``Conv1D`` (``y = x @ W + b`` with ``W`` stored [in_features, out_features]) is wrapped too
(``LinearMX.from_linear(conv1d, cfg)``): the module then holds the Parameter in its stored [in, out] layout, so state
dict keys, shapes and checkpoints do not change, and ``weight_transposed`` is True. Everything that quantizes or
multiplies (`weight_to_quantize`, `effective_weight`, `set_quantized_weight`, GPTQ, packing) sees the [out, in]
matmul view ``W.T``, blocked along in_features like any linear; an unquantized Conv1D multiplies by that view of the
Parameter itself (``F.linear(x, W.T, b)`` is the ``addmm(b, x, W)`` Conv1D computes).

The effective weight (rotated, quantized, in the weight's dtype) is computed once, without autograd, and cached; the
cache is dropped when the weight's data changes (``_version`` / ``data_ptr`` / device / dtype), when the rotation or
the config changes. A weight set by GPTQ (`set_quantized_weight`) is used as is, never re-quantized.

Sibling linears that read the same input (q/k/v_proj, gate/up_proj) can share one prepared input through a
`SharedInputMemo` (installed by the swap pass, see `LinearMX.set_input_memo`): the first sibling stores
``prepare_input(x)`` and the others reuse it when they get the very same tensor object, unchanged, with the same
data_in spec, rotation and rotation mode. The result is bit-identical, since the prepared input is a pure function
of those (stochastic rounding draws its noise from ``spec.seed``).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import LinearQuantConfig
from ptq.errors import ModelError
from ptq.formats import QuantSpec

RotationMode = Literal["matched", "activation_only"]
ROTATION_MODES: tuple[str, ...] = ("matched", "activation_only")


def _fake_quantize(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """``fake_quantize`` or the identity for a bypassed (None) spec."""
    if spec is None:
        return x
    from ptq.quantizers import fake_quantize  # imported late: the quantizers package imports Triton

    return fake_quantize(x, spec)


def _along_last_dim(spec: QuantSpec | None) -> QuantSpec | None:
    return spec if spec is None or spec.axis == -1 else spec.with_(axis=-1)


def _tensor_key(t: torch.Tensor) -> tuple:
    """Changes whenever the tensor's data may have changed (in-place edits bump ``_version``; `.to` / `.data =`
    change ``data_ptr``)."""
    return (t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape))


def _input_state(x: torch.Tensor) -> tuple:
    """What must be unchanged for a prepared input of ``x`` to be reused. Inference tensors track no version
    counter, so in-place edits of one are not seen (the memo's short lifetime limits that window, see
    `SharedInputMemo`); the grad modes are included so a result made without autograd never serves a forward
    with it, nor an inference tensor a normal one."""
    version = None if x.is_inference() else x._version
    return (version, x.data_ptr(), x.device, x.dtype, x.shape, x.stride(), torch.is_grad_enabled(),
            torch.is_inference_mode_enabled())


class SharedInputMemo:
    """Holds at most one prepared input for a group of ``size`` sibling `LinearMX` modules that read one tensor.

    An entry is reused only for the same tensor object (a weak reference: ids are recycled), with unchanged
    `_input_state`, and the same key (data_in spec, rotation object, rotation mode). It is dropped as soon as
    every member has used it, when its input tensor is freed, or when a member stores another one (a miss clears
    the old entry before computing, so never more than one prepared input per group is alive). Rotations are
    treated as immutable once installed, as the weight cache does. Copies and pickles start empty.
    """

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ModelError(f"a SharedInputMemo links at least 2 linears, got size={size}")
        self.size = size
        self._entry: tuple | None = None  # (weakref to the input, _input_state, key, prepared input)
        self._users: set[int] = set()  # ids of the members that used the entry

    def clear(self) -> None:
        """Drop the stored prepared input."""
        self._entry = None
        self._users = set()

    @property
    def holds_input(self) -> bool:
        return self._entry is not None

    def lookup(self, user: nn.Module, x: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """The prepared input stored for ``x`` under ``key``, or None (and then the stale entry is dropped)."""
        entry = self._entry
        if entry is None:
            return None
        ref, state, stored_key, out = entry
        if ref() is not x or state != _input_state(x) or stored_key != key:
            self.clear()
            return None
        self._used_by(user)
        return out

    def store(self, user: nn.Module, x: torch.Tensor, key: tuple, out: torch.Tensor) -> None:
        """Remember ``out = prepare_input(x)`` for the other members."""
        self.clear()
        if out is x:  # a pass-through: nothing to save, and holding x would keep it alive
            return
        self._entry = (weakref.ref(x, self._input_freed), _input_state(x), key, out)
        self._used_by(user)

    def _used_by(self, user: nn.Module) -> None:
        self._users.add(id(user))
        if len(self._users) >= self.size:
            self.clear()

    def _input_freed(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self.clear()

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.size = state["size"]
        self.clear()

    def __repr__(self) -> str:
        return f"SharedInputMemo(size={self.size})"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2 style: ``y = x @ W + b``, W stored [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; no Conv1D then means none in the model
        return False
    return isinstance(module, Conv1D)


class LinearMX(nn.Module):
    """`nn.Linear` with MX fake quantization; build it with `LinearMX.from_linear(linear, cfg)`.

    Attributes:
        weight, bias: the original module's Parameters (shared, not copied); ``weight`` is [out, in], or [in, out]
            when ``weight_transposed`` (a wrapped Conv1D).
        cfg: the `LinearQuantConfig` (specs normalised to ``axis=-1``).
        rotation, rotation_mode: the online input rotation (see the module docstring); set with `set_rotation`.
        in_features, out_features: as on `nn.Linear`.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        cfg: LinearQuantConfig | None = None,
        *,
        weight_transposed: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            layout = "[in_features, out_features]" if weight_transposed else "[out_features, in_features]"
            raise ModelError(f"LinearMX needs a 2-D weight {layout}, got shape {tuple(weight.shape)}")
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        self.weight = weight
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self.weight_transposed = bool(weight_transposed)
        self.out_features, self.in_features = weight.shape[::-1] if weight_transposed else weight.shape
        self.rotation: nn.Module | None = None
        self.rotation_mode: RotationMode = "matched"
        self._gptq_weight: torch.Tensor | None = None
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None
        self._rotation_epoch = 0  # bumped by set_rotation: part of the weight cache key
        self._input_memo: SharedInputMemo | None = None
        self.cfg = LinearQuantConfig()
        self.set_config(cfg if cfg is not None else LinearQuantConfig())

    @classmethod
    def from_linear(cls, linear: nn.Module, cfg: LinearQuantConfig | None = None) -> "LinearMX":
        """Wrap ``linear`` (an ``nn.Linear`` or a transformers ``Conv1D``): the new module holds the same ``weight`` /
        ``bias`` Parameters (no copy)."""
        if isinstance(linear, LinearMX):
            raise ModelError("from_linear got a LinearMX; call .set_config(cfg) on it to reconfigure it instead")
        if is_conv1d(linear):
            mod = cls(linear.weight, linear.bias, cfg, weight_transposed=True)
            mod.train(linear.training)
            return mod
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"LinearMX.from_linear needs an nn.Linear or a transformers Conv1D, got "
                             f"{type(linear).__name__}")
        mod = cls(linear.weight, linear.bias, cfg)
        mod.train(linear.training)
        return mod

    # ---- configuration -------------------------------------------------------------------------------------------
    def set_config(self, cfg: LinearQuantConfig) -> None:
        """Replace the quantization config. Every spec is applied along the last dim (in_features / the input's
        reduction axis). A GPTQ weight is kept only while the weight spec is unchanged and ``cfg.gptq`` is set."""
        if not isinstance(cfg, LinearQuantConfig):
            raise ModelError(f"LinearMX needs a LinearQuantConfig, got {type(cfg).__name__}")
        cfg = LinearQuantConfig(
            weight=_along_last_dim(cfg.weight),
            data_in=_along_last_dim(cfg.data_in),
            bias=_along_last_dim(cfg.bias),
            gptq=cfg.gptq,
        )
        if self._gptq_weight is not None and (cfg.weight != self.cfg.weight or not cfg.gptq):
            warnings.warn("LinearMX: the config changed, dropping the GPTQ-quantized weight", stacklevel=2)
            self._gptq_weight = None
        self.cfg = cfg
        self._weight_cache = None
        self._bias_cache = None

    def set_rotation(self, rot: nn.Module | None, mode: RotationMode = "matched") -> None:
        """Install (or with ``None`` remove) the online input rotation. ``rot(t)`` rotates the last dim,
        ``rot.inverse(t)`` undoes it. Changing the rotation drops the cached weight and any GPTQ weight."""
        if mode not in ROTATION_MODES:
            raise ModelError(f"rotation mode must be one of {', '.join(ROTATION_MODES)}, got {mode!r}")
        if rot is not None and not isinstance(rot, nn.Module):
            raise ModelError(f"a rotation must be an nn.Module, got {type(rot).__name__}")
        if rot is not None and mode == "activation_only" and not callable(getattr(rot, "inverse", None)):
            raise ModelError(f"activation_only rotation needs rot.inverse(t); {type(rot).__name__} has none")
        changed = rot is not self.rotation or (rot is not None and mode != self.rotation_mode)
        if changed and self._gptq_weight is not None:
            warnings.warn("LinearMX: the rotation changed, dropping the GPTQ-quantized weight", stacklevel=2)
            self._gptq_weight = None
        self.rotation = rot  # registered as a submodule (moves with .to, shows in repr)
        self.rotation_mode = mode
        if changed:
            self._rotation_epoch += 1
            self._weight_cache = None

    def set_input_memo(self, memo: SharedInputMemo | None) -> None:
        """Share prepared inputs with the other linears holding ``memo`` (None: prepare every input here)."""
        if memo is not None and not isinstance(memo, SharedInputMemo):
            raise ModelError(f"set_input_memo needs a SharedInputMemo or None, got {type(memo).__name__}")
        if self._input_memo is not None:
            self._input_memo.clear()
        self._input_memo = memo

    @property
    def input_memo(self) -> SharedInputMemo | None:
        return self._input_memo

    # ---- the pieces GPTQ / export use ----------------------------------------------------------------------------
    @property
    def _rotates_weight(self) -> bool:
        return self.rotation is not None and self.rotation_mode == "matched"

    @property
    def matmul_weight(self) -> torch.Tensor:
        """The weight Parameter as the [out_features, in_features] matrix of ``F.linear`` (a view for Conv1D)."""
        return self.weight.t() if self.weight_transposed else self.weight

    @torch.no_grad()
    def weight_to_quantize(self) -> torch.Tensor:
        """The fp32 [out, in] weight the weight quantizer sees: ``rot(W)`` in matched mode, else ``W`` (a fresh,
        contiguous copy)."""
        w = self.matmul_weight.detach().to(torch.float32)
        if self._rotates_weight:
            return self.rotation(w).to(torch.float32)
        return w.clone(memory_format=torch.contiguous_format)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the matmul sees on the input side: ``Q_in(rot(x))`` (matched), ``rot.inverse(Q_in(rot(x)))``
        (activation_only) or ``Q_in(x)``; taken from the shared input memo when a sibling prepared it."""
        memo = self._input_memo
        rot = self.rotation
        if memo is None or (rot is None and self.cfg.data_in is None):
            return self._prepare_input(x)
        key = (self.cfg.data_in, rot, self.rotation_mode if rot is not None else None)
        out = memo.lookup(self, x, key)
        if out is None:
            out = self._prepare_input(x)
            memo.store(self, x, key, out)
        return out

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.rotation
        if rot is None:
            return _fake_quantize(x, self.cfg.data_in)
        xq = _fake_quantize(rot(x), self.cfg.data_in)
        return rot.inverse(xq) if self.rotation_mode == "activation_only" else xq

    @torch.no_grad()
    def set_quantized_weight(self, wq: torch.Tensor) -> None:
        """Store GPTQ's result (in the basis and [out, in] layout of `weight_to_quantize`) as the effective weight,
        used as is."""
        if tuple(wq.shape) != (self.out_features, self.in_features):
            raise ModelError(f"set_quantized_weight: shape {tuple(wq.shape)} != [out_features, in_features] "
                             f"{(self.out_features, self.in_features)}")
        self._gptq_weight = wq.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()
        self._weight_cache = None

    def clear_quantized_weight(self) -> None:
        """Forget a GPTQ weight: the weight is fake-quantized by RTN again."""
        self._gptq_weight = None
        self._weight_cache = None

    @property
    def has_gptq_weight(self) -> bool:
        return self._gptq_weight is not None

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] weight the matmul uses: the GPTQ weight if set, else ``Q_w(weight_to_quantize())`` in the
        weight's dtype; the Parameter itself (`matmul_weight`) when nothing is quantized or rotated. Cached."""
        if self._gptq_weight is not None:
            return self._gptq_weight
        if self.cfg.weight is None and not self._rotates_weight:
            return self.matmul_weight
        key = (_tensor_key(self.weight), self._rotation_epoch)
        if self._weight_cache is None or self._weight_cache[0] != key:
            # a normal tensor even when the first forward runs under inference_mode, so later forwards outside it
            # (e.g. with autograd on the input) can still use the cache
            with torch.inference_mode(False), torch.no_grad():
                wq = _fake_quantize(self.weight_to_quantize(), self.cfg.weight).to(self.weight.dtype)
            self._weight_cache = (key, wq)
        return self._weight_cache[1]

    def effective_bias(self) -> torch.Tensor | None:
        b = self.bias
        if b is None or self.cfg.bias is None:
            return b
        key = _tensor_key(b)
        if self._bias_cache is None or self._bias_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._bias_cache = (key, _fake_quantize(b.detach(), self.cfg.bias))
        return self._bias_cache[1]

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.prepare_input(x), self.effective_weight(), self.effective_bias())

    def _apply(self, fn, recurse=True):
        # .to() / .half() rebind parameter data: caches keyed on data_ptr / dtype refresh by themselves; the GPTQ
        # weight is not a buffer (not saved in state_dict), so move it here.
        out = super()._apply(fn, recurse)
        if self._gptq_weight is not None:
            self._gptq_weight = fn(self._gptq_weight)
        self._weight_cache = None
        self._bias_cache = None
        if self._input_memo is not None:
            self._input_memo.clear()
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            *(["weight_layout=[in, out] (Conv1D)"] if self.weight_transposed else []),
            f"weight={c.weight or 'bypass'}",
            f"data_in={c.data_in or 'bypass'}",
        ]
        if self.bias is not None:
            parts.append(f"bias_q={c.bias or 'bypass'}")
        if self.rotation is not None:
            parts.append(f"rotation={type(self.rotation).__name__}({self.rotation_mode})")
        if self._input_memo is not None:
            parts.append(f"shared_input={self._input_memo.size}")
        if c.gptq or self._gptq_weight is not None:
            parts.append("gptq=" + ("done" if self._gptq_weight is not None else "pending"))
        return ", ".join(parts)
