"""The ``rotation_learn`` pass: orthogonal rotations trained through the fake-quantized model, then fused offline.

Rotations (``[rotation_learn].rotations``; row-vector convention, a hidden state ``h`` becomes ``h R``):

- ``r1``: the residual stream. The embedding becomes ``E R1``; every linear reading the residual (q, k, v, gate, up,
  lm_head) becomes ``W diag(g) R1`` where ``g`` is the RMSNorm weight in front of it (the norm keeps unit weight, so
  it commutes with ``R1``: ``rms(h R1) = rms(h)``); every linear writing it (o, down) becomes ``R1^T W`` (bias
  ``b R1``). Exact in full precision. A model with tied embeddings must be untied (``untie_embeddings = true``):
  after folding the final norm, the embedding and lm_head are different matrices.
- ``r2``: one rotation per attention layer on the values, per head (head_dim): ``v_proj``'s rows of each KV head
  become ``R2^T W_h`` (bias ``b_h R2``), ``o_proj``'s columns of each head ``W_h R2``. What the KV cache stores and
  o_proj's input are rotated; attention itself is unchanged (softmax weights act per head, across tokens).

Smoothing (``[rotation_learn].smooth``; per-channel scales ``s = exp(theta)``, ``theta`` trained from 0 with the
rotations, its own learning rate ``smooth_lr``): "qkv" / "gate_up" divide what a layer's input / post-attention
RMSNorm gives q, k, v / gate, up by ``s`` (fused into the norm's weight) and multiply those linears' columns by it;
"down" divides up_proj's rows (and bias) by ``s`` and multiplies down_proj's columns by it (the SwiGLU product is
linear in up's output). Exact in full precision, like the rotations; what changes is what each quantizer sees: an
activation channel that the scale shrinks moves its range into the weight.

Start: a Hadamard matrix (``ptq.hadamard``) of the whole dimension, or block-diagonal (``r1_block_size`` /
``r2_block_size``; 1 = the identity), times a seeded random +-1 diagonal (``random_signs``), so step 0 is a
(randomised) Hadamard rotation like the ones ``rotation_search`` installs online. A start that an installed online
rotation undoes (a block-32 start under the search's block-32 Hadamards: the product is a +-1 permutation, and
neither spreads anything) is refused before any work (`refuse_cancelling_starts`); on top of the search, start
from the identity.

Parameterisation: ``R = R0 cayley(A)``, ``A = P - P^T`` skew, ``cayley(A) = (I - A)^-1 (I + A)``, all in float64,
so ``R`` is orthogonal to float64 precision whatever ``P`` is; ``P`` starts at zero and is trained with Adam (or
SGD with momentum). The forward uses ``R`` in float32.

Training: while training, the affected modules' forwards are replaced (instance attributes, removed afterwards) by
ones that compute their rotated weights from the current ``R``s: nothing in the model is written until the end, when
the final rotations are fused into the Parameters in float64 and cast to their dtype. Quantizers pass gradients
straight through (``ptq.quantizers.fake_quantize``). Each step draws ``batch_size`` calibration windows (a pure
function of the seed and the step, so a resumed run sees the same batches) and minimises either the next-token
cross-entropy of the quantized model (``loss = "ce"``) or the KL divergence from the unquantized model (``"kl"``;
its logits come from the same model with every quantizer bypassed, which the rotations leave unchanged).

``keep_best``: every ``eval_every`` steps and at the end, the loss is measured on all calibration windows, and the
rotations with the lowest such loss (the start included) are the ones fused, so a too-large learning rate or noisy
steps cannot leave the model worse on its calibration data than the Hadamard start. ``quantize_weights = false``
trains with the weights unquantized (only activations and the KV cache), as SpinQuant does when GPTQ follows.

Before training, a probe checks on a short window that the rotated model with quantization bypassed reproduces the
unrotated one; an architecture where that fails (post-norms, mean-subtracting LayerNorm, scaled norms) is refused
with ``ModelError`` and left untouched.

Checkpoint (``checkpoint_path``, written atomically every ``checkpoint_every`` steps and at the end): the fingerprint
(model, module configs + installed online rotations + these settings, calibration tokens, ptq version), the step,
the rotation parameters and the optimiser state. A rerun with a matching fingerprint resumes from it (or, when it is
finished, fuses its rotations without training); ``steps`` is not part of the fingerprint, so a finished run can be
extended. A checkpoint of another run is refused (``CheckpointError``). GPTQ runs after this pass and quantizes the
rotated weights (``LinearMX.weight_to_quantize``).
"""

from __future__ import annotations

import io
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import RotationLearnConfig
from ptq.errors import CheckpointError, ModelError, PtqError, RecipeError
from ptq.passes.base import PassContext, calibration_windows, register_pass

CHECKPOINT_FORMAT = 1
READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES = ("o_proj", "down_proj")
_LAYER_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "qk_rotation", "v_rotation"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


# ---- the model's residual structure ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderLayer:
    index: int
    input_norm: nn.Module
    post_attn_norm: nn.Module
    linears: dict  # name (q_proj ... down_proj) -> module
    head_dim: int


@dataclass(frozen=True)
class ResidualLayout:
    """Where the residual stream is read and written (Llama-family decoders)."""

    embed: nn.Embedding
    layers: tuple[DecoderLayer, ...]
    final_norm: nn.Module
    lm_head: nn.Module
    hidden: int
    tied: bool
    config: object = None  # the model's config (untying edits tie_word_embeddings)


def _is_linear(m: nn.Module) -> bool:
    from ptq.modules.linear import LinearMX

    return isinstance(m, (nn.Linear, LinearMX))


def _unexpected(mod: nn.Module, allowed: set, where: str) -> None:
    extra = [n for n, c in mod.named_children() if n not in allowed and any(True for _ in c.parameters())]
    if extra:
        raise ModelError(f"rotation_learn: {where} has modules {extra} that a residual rotation does not know how to "
                         f"rotate (supported: Llama-family decoders with {sorted(allowed)}); remove [rotation_learn] "
                         "for this model")


def norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(norm, attr, None)
        if isinstance(v, float):
            return v
    raise ModelError(f"rotation_learn: {type(norm).__name__} has no variance_epsilon / eps: not an RMSNorm")


def unit_rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The RMSNorm with its weight taken out (what the norm computes once its weight is folded into the linears)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
    return h.to(x.dtype)


@torch.no_grad()
def _check_rms_norm(norm: nn.Module, where: str, hidden: int) -> None:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hidden,) or getattr(norm, "bias", None) is not None:
        raise ModelError(f"rotation_learn: {where} ({type(norm).__name__}) is not an RMSNorm with a weight of "
                         f"{hidden} elements and no bias; its weight cannot be folded into the linears after it")
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) * 3
    want = w * unit_rms_norm(norm, x)
    if not torch.allclose(norm(x).float(), want.float(), rtol=1e-2, atol=1e-3):
        raise ModelError(f"rotation_learn: {where} ({type(norm).__name__}) does not compute weight * x / rms(x) "
                         "(e.g. Gemma's (1 + weight) or a mean-subtracting LayerNorm); r1 cannot be fused into it")


def discover_layout(model: nn.Module) -> ResidualLayout:
    """The embedding, decoder layers, final norm and lm_head of a Llama-family causal LM; ModelError otherwise."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    final_norm = getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(embed, nn.Embedding) or lm_head is None \
            or final_norm is None or not _is_linear(lm_head):
        raise ModelError(f"rotation_learn: {type(model).__name__} is not a Llama-family causal LM (model.embed_tokens, "
                         "model.layers, model.norm, lm_head); remove [rotation_learn] for this model")
    if embed.max_norm is not None:
        raise ModelError("rotation_learn: the embedding renormalises rows (max_norm), which a rotation would change")
    hidden = embed.embedding_dim
    out = []
    for i, layer in enumerate(layers):
        where = f"model.layers.{i}"
        _unexpected(layer, _LAYER_CHILDREN, where)
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(layer, n) for n in ("input_layernorm",
                                                                            "post_attention_layernorm")):
            raise ModelError(f"rotation_learn: {where} lacks self_attn / mlp / input_layernorm / "
                             "post_attention_layernorm: not a pre-norm Llama-family layer")
        _unexpected(attn, _ATTN_CHILDREN, f"{where}.self_attn")
        _unexpected(mlp, _MLP_CHILDREN, f"{where}.mlp")
        linears = {}
        for name in READS + WRITES:
            parent = attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
            m = getattr(parent, name, None)
            if m is None or not _is_linear(m):
                raise ModelError(f"rotation_learn: {where} has no linear {name} (fused projections such as qkv_proj "
                                 "are not supported)")
            linears[name] = m
        for name in READS:
            if linears[name].in_features != hidden:
                raise ModelError(f"rotation_learn: {where}.{name} reads {linears[name].in_features} features, the "
                                 f"residual has {hidden}")
        head_dim = getattr(attn, "head_dim", None)
        v, o = linears["v_proj"], linears["o_proj"]
        if not isinstance(head_dim, int) or v.out_features % head_dim or o.in_features % head_dim:
            raise ModelError(f"rotation_learn: {where}.self_attn: head_dim {head_dim!r} does not divide v_proj's "
                             f"{v.out_features} outputs and o_proj's {o.in_features} inputs")
        for name in ("input_layernorm", "post_attention_layernorm"):
            _check_rms_norm(getattr(layer, name), f"{where}.{name}", hidden)
        out.append(DecoderLayer(i, layer.input_layernorm, layer.post_attention_layernorm, linears, head_dim))
    _check_rms_norm(final_norm, "model.norm", hidden)
    if lm_head.in_features != hidden:
        raise ModelError(f"rotation_learn: lm_head reads {lm_head.in_features} features, the residual has {hidden}")
    return ResidualLayout(embed, tuple(out), final_norm, lm_head, hidden, lm_head.weight is embed.weight,
                          getattr(model, "config", None))


# ---- orthogonal parameterisation ------------------------------------------------------------------------------

def hadamard_start(n: int, block: int | None, signs: torch.Generator | None) -> torch.Tensor:
    """``D H^T`` in float64: the (block-diagonal) normalised Hadamard ``H`` of ``ptq.hadamard`` (the identity for
    ``block = 1``) and a random +-1 diagonal ``D`` (identity without ``signs``); ``h @ (D H^T)`` is the rotation
    ``HadamardRotation`` applies to ``h * diag(D)``."""
    from ptq import hadamard

    b = n if block is None or block >= n else block
    if b == 1:  # blocks of one: the identity (start from the model as it is)
        h = torch.eye(n, dtype=torch.float64)
    else:
        hadamard.block_of(n, "block", b) if b != n else hadamard.factor_size(n)  # validates, names alternatives
        hb = hadamard.hadamard_matrix(b, dtype=torch.float64)
        h = hb if b == n else torch.block_diag(*([hb] * (n // b)))
    d = torch.ones(n, dtype=torch.float64)
    if signs is not None:
        d = torch.randint(0, 2, (n,), generator=signs).to(torch.float64) * 2 - 1
    return d[:, None] * h.T


class CayleyRotation(nn.Module):
    """``R = base @ cayley(P - P^T)``, orthogonal to float64 precision for every ``P`` (trained, starts at 0)."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base.to(torch.float64).clone())
        self.param = nn.Parameter(torch.zeros_like(self.base))

    def matrix(self) -> torch.Tensor:
        a = self.param - self.param.T
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return self.base @ torch.linalg.solve(eye - a, eye + a)


# ---- rotated weights ------------------------------------------------------------------------------------------

def _per_head_rows(w: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Rows of each head block ``W_h`` -> ``R2^T W_h`` (w: [heads * hd, in] or a bias [heads * hd])."""
    hd = r2.shape[0]
    if w.dim() == 1:
        return (w.view(-1, hd) @ r2).reshape(-1)
    return torch.einsum("ji,hjd->hid", r2, w.view(-1, hd, w.shape[1])).reshape(w.shape)


def _per_head_cols(w: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Columns of each head block ``W_h`` -> ``W_h R2`` (w: [out, heads * hd])."""
    hd = r2.shape[0]
    return (w.view(w.shape[0], -1, hd) @ r2).reshape(w.shape)


def rotated_linear(role: str, w: torch.Tensor, b: torch.Tensor | None, r1: torch.Tensor | None,
                   r2: torch.Tensor | None, gain: torch.Tensor | None, cols: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a linear once the rotations and smoothing scales are fused (in their dtype).

    ``role``: a name of ``READS`` / ``WRITES`` or "lm_head"; ``gain``: the folded norm weight (readers with r1);
    ``cols``: a smoothing scale multiplying the columns; ``rows``: one dividing the rows (and the bias)."""
    dt = next(t.dtype for t in (r1, r2, cols, rows) if t is not None)
    w = w.to(dt)
    b = b.to(dt) if b is not None else None
    if rows is not None:
        w = w / rows[:, None]
        b = b / rows if b is not None else None
    if role in WRITES:
        if r1 is not None:
            w = r1.T @ w
            b = b @ r1 if b is not None else None
        if role == "o_proj" and r2 is not None:
            w = _per_head_cols(w, r2)
        return (w * cols if cols is not None else w), b
    if r1 is not None:
        w = (w * gain.to(dt)) @ r1
    if cols is not None:
        w = w * cols
    if role == "v_proj" and r2 is not None:
        w = _per_head_rows(w, r2)
        b = _per_head_rows(b, r2) if b is not None else None
    return w, b


def _linear_forward(mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                    quantize_weight: bool = True) -> torch.Tensor:
    """``mod``'s forward with weight ``w`` / bias ``b`` (float, differentiable) in place of its Parameters; for a
    `LinearMX` the same computation as its own forward (online rotation, quantizers; the weight quantizer only with
    ``quantize_weight``)."""
    from ptq.modules.linear import LinearMX, _fake_quantize

    if not isinstance(mod, LinearMX):
        return F.linear(x, w.to(mod.weight.dtype), b.to(mod.weight.dtype) if b is not None else None)
    w = w.to(mod.weight.dtype).to(torch.float32)  # what weight_to_quantize will see once fused
    if mod.rotation is not None and mod.rotation_mode == "matched":
        w = mod.rotation(w).to(torch.float32)
    wq = _fake_quantize(w, mod.cfg.weight if quantize_weight else None).to(mod.weight.dtype)
    bq = _fake_quantize(b.to(mod.weight.dtype), mod.cfg.bias) if b is not None else None
    return F.linear(mod.prepare_input(x), wq, bq)


@dataclass(frozen=True)
class Transforms:
    """The current rotation matrices and smoothing scales (``scales[site][layer]``), in one dtype."""

    r1: torch.Tensor | None
    r2: list
    scales: dict
    dtype: torch.dtype


_READER_SITE = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
_COLUMN_SITE = {**_READER_SITE, "down_proj": "down"}  # the scale multiplying a linear's columns
_ROW_SITE = {"up_proj": "down"}  # the scale dividing its rows


def _smooth_width(layer: DecoderLayer, site: str) -> int:
    return layer.linears["down_proj"].in_features if site == "down" else layer.linears["q_proj"].in_features


def _norm_weight(norm: nn.Module, t: Transforms, site: str, i: int) -> torch.Tensor:
    """An RMSNorm's weight once fused: 1 when r1 folded it into the readers (else its own), divided by the scale."""
    w = torch.ones_like(norm.weight, dtype=t.dtype) if t.r1 is not None else norm.weight.to(t.dtype)
    return w / t.scales[site][i] if site in t.scales else w


class LearnedRotations(nn.Module):
    """The trained transforms of one model: rotations ``r1`` (hidden) and ``r2.<layer>`` (head_dim), smoothing
    log-scales ``smooth.<site>.<layer>``, and how to use them."""

    def __init__(self, layout: ResidualLayout, cfg: RotationLearnConfig, device: torch.device):
        super().__init__()
        self.layout = layout
        signs = torch.Generator().manual_seed(cfg.seed) if cfg.random_signs else None
        self.r1 = None
        if "r1" in cfg.rotations:
            self.r1 = CayleyRotation(_start(layout.hidden, cfg.r1_block_size, signs, "r1_block_size", "hidden size"))
        self.r2 = None
        if "r2" in cfg.rotations:
            self.r2 = nn.ModuleList(
                CayleyRotation(_start(layer.head_dim, cfg.r2_block_size, signs, "r2_block_size", "head_dim"))
                for layer in layout.layers)
        # log-scales, float64 like the Cayley parameters; site -> one vector per layer
        self.smooth = nn.ModuleDict({site: nn.ParameterList(
            nn.Parameter(torch.zeros(_smooth_width(layer, site), dtype=torch.float64)) for layer in layout.layers)
            for site in cfg.smooth})
        self.to(device)

    def matrices(self, dtype: torch.dtype) -> Transforms:
        n = len(self.layout.layers)
        r1 = self.r1.matrix().to(dtype) if self.r1 is not None else None
        r2 = [r.matrix().to(dtype) for r in self.r2] if self.r2 is not None else [None] * n
        scales = {site: [t.exp().to(dtype) for t in ps] for site, ps in self.smooth.items()}
        return Transforms(r1, r2, scales, dtype)

    # -- what each module computes, given the rotation matrices --
    def plan(self) -> list[tuple[nn.Module, str, Callable]]:
        """(module, kind, fn) for every module the rotations or scales change; ``fn(t)`` (``t``: `Transforms`) gives
        its new weight: kind "embedding", "linear" (weight and bias) or "norm" (the RMSNorm's weight)."""
        lay = self.layout
        r1_on = self.r1 is not None
        out: list[tuple[nn.Module, str, Callable]] = []
        if r1_on:
            out.append((lay.embed, "embedding", lambda t: lay.embed.weight.to(t.dtype) @ t.r1))
            out.append((lay.final_norm, "norm", lambda t: torch.ones_like(lay.final_norm.weight, dtype=t.dtype)))
            out.append((lay.lm_head, "linear", lambda t: rotated_linear(
                "lm_head", lay.lm_head.weight, lay.lm_head.bias, t.r1, None, lay.final_norm.weight)))
        for layer in lay.layers:
            i = layer.index
            for norm, site in ((layer.input_norm, "qkv"), (layer.post_attn_norm, "gate_up")):
                if r1_on or site in self.smooth:  # r1 folds the weight into the readers; a scale divides it
                    out.append((norm, "norm", lambda t, norm=norm, site=site, i=i: _norm_weight(norm, t, site, i)))
            for name, mod in layer.linears.items():
                site = _READER_SITE.get(name)
                cols = _COLUMN_SITE.get(name) if _COLUMN_SITE.get(name) in self.smooth else None
                rows = _ROW_SITE.get(name) if _ROW_SITE.get(name) in self.smooth else None
                r2_here = self.r2 is not None and name in ("v_proj", "o_proj")
                if not (r1_on or r2_here or cols or rows):
                    continue
                gain = {"qkv": layer.input_norm.weight, "gate_up": layer.post_attn_norm.weight}.get(site)
                out.append((mod, "linear", lambda t, name=name, mod=mod, gain=gain, i=i, cols=cols, rows=rows:
                            rotated_linear(name, mod.weight, mod.bias, t.r1, t.r2[i], gain,
                                           t.scales[cols][i] if cols else None,
                                           t.scales[rows][i] if rows else None)))
        return out

    @contextmanager
    def installed(self, model: nn.Module, quantize_weights: bool = True):
        """Replace the affected modules' forwards by ones using the current rotations (float32, differentiable).
        The rotation matrices are computed once per model forward (a pre-hook on ``model`` drops them)."""
        cache: dict[str, tuple | None] = {"mats": None}

        def mats():
            if cache["mats"] is None:
                cache["mats"] = self.matrices(torch.float32)
            return cache["mats"]

        def make(mod, kind, fn):
            if kind == "norm":  # the weight in the norm's dtype, as it will be stored once fused
                return lambda x: unit_rms_norm(mod, x) * fn(mats()).to(mod.weight.dtype)
            if kind == "embedding":
                return lambda ids: F.embedding(ids, fn(mats()).to(mod.weight.dtype), mod.padding_idx)
            return lambda x: _linear_forward(mod, x, *fn(mats()), quantize_weights)

        saved = []
        hook = model.register_forward_pre_hook(lambda *_: cache.update(mats=None))
        try:
            for mod, kind, fn in self.plan():
                if "forward" in mod.__dict__:
                    raise ModelError(f"rotation_learn: {type(mod).__name__} already has an instance-level forward "
                                     "(an accelerate hook?); load the model without device_map to learn rotations")
                mod.forward = make(mod, kind, fn)
                saved.append(mod)
            yield
        finally:
            hook.remove()
            for mod in saved:
                del mod.forward

    @torch.no_grad()
    def fuse(self) -> dict:
        """Write the rotations and scales into the model's Parameters (float64 math, cast to each Parameter's
        dtype)."""
        lay = self.layout
        t = self.matrices(torch.float64)
        updates = [(mod, fn(t)) for mod, kind, fn in self.plan()]
        untied = False
        # in place through the Parameters (not .data), so their version counters move and LinearMX drops the
        # quantized weights it cached from the old values (e.g. during rotation_search)
        for mod, new in updates:
            if isinstance(new, torch.Tensor):  # an embedding or a norm
                mod.weight.copy_(new)
                continue
            w, b = new
            if mod is lay.lm_head and lay.tied:
                mod.weight = nn.Parameter(w.to(mod.weight.dtype), requires_grad=mod.weight.requires_grad)
                untied = True
            else:
                mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        if untied and lay.config is not None:  # so that saving and reloading the model does not tie them again
            text = lay.config.get_text_config() if hasattr(lay.config, "get_text_config") else lay.config
            for c in (lay.config, text):
                c.tie_word_embeddings = False
        return {"untied_embeddings": untied}


def undoes(start: torch.Tensor, rot: nn.Module) -> bool:
    """Whether the online rotation ``rot`` (applied after ``start``: ``t -> (t @ start) @ rot.matrix().T``) undoes the
    start's Hadamard: the product is a signed permutation, which spreads nothing."""
    matrix = getattr(rot, "matrix", None)
    if matrix is None or start.shape[0] != getattr(rot, "size", None):
        return False
    p = start @ matrix(torch.float64).to(start.device).T
    return bool(((p.abs() > 1e-6).sum(1) == 1).all())


def refuse_cancelling_starts(model: nn.Module, layout: ResidualLayout, cfg: RotationLearnConfig) -> None:
    """A Hadamard start of the block size an online rotation already uses (``[rotation_search]`` installs block-32
    Hadamards) composes with it to a +-1 permutation: both would silently stop spreading outliers. Refuse that before
    any work; block size 1 (the identity) or another block size composes."""
    parents = {id(c): m for m in model.modules() for c in m.children()}
    seen: dict[tuple, bool] = {}

    def check(key: str, start_n: int, block, site: str, rot, expand: int = 1) -> None:
        if rot is None:
            return
        ident = (key, start_n, block, expand, repr(rot.config()) if hasattr(rot, "config") else id(rot))
        if ident not in seen:
            start = hadamard_start(start_n, block, None)
            seen[ident] = undoes(torch.block_diag(*([start] * expand)) if expand > 1 else start, rot)
        if seen[ident]:
            raise RecipeError(
                f"[rotation_learn].{key} = {block}: the start is the block-{block or start_n} Hadamard, and {site} "
                f"already has an online rotation ({rot.extra_repr()}; from "
                f"[rotation_search] or set_rotation) that undoes it: together they are a +-1 permutation, so "
                f"neither spreads outliers any more. Set {key} = 1 (start from the identity: the online "
                f"rotations stay in effect) or a block size the online rotations do not use")

    for layer in layout.layers:
        if "r1" in cfg.rotations:
            for name in READS:
                mod = layer.linears.get(name)
                if mod is not None:
                    check("r1_block_size", layout.hidden, cfg.r1_block_size, f"layer {layer.index} {name}",
                          getattr(mod, "rotation", None))
        if "r2" in cfg.rotations:
            o = layer.linears.get("o_proj")
            if o is not None:  # o_proj's input is every head's values side by side: the start per head, repeated
                check("r2_block_size", layer.head_dim, cfg.r2_block_size, f"layer {layer.index} o_proj",
                      getattr(o, "rotation", None), expand=o.in_features // layer.head_dim)
            attention = parents.get(id(layer.linears.get("v_proj")))
            check("r2_block_size", layer.head_dim, cfg.r2_block_size, f"layer {layer.index} attention (K / V)",
                  getattr(attention, "v_rotation", None))


def _start(n: int, block: int | None, signs, key: str, what: str) -> torch.Tensor:
    try:
        return hadamard_start(n, block, signs)
    except ModelError as e:
        raise RecipeError(f"[rotation_learn].{key}: cannot start from a Hadamard rotation of the {what} {n}: {e}") \
            from None


# ---- quantization on / off, losses ----------------------------------------------------------------------------

@contextmanager
def quantization_bypassed(model: nn.Module):
    """Every LinearMX / ExpertsMX / AttentionMX passes its tensors through exactly (online rotations stay); restored
    after."""
    from ptq.modules.bypass import bypass_quantizers

    saved = []
    try:
        saved = bypass_quantizers(model)
        yield
    finally:
        for m, cfg in saved:
            m.set_config(cfg)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    return F.kl_div(F.log_softmax(logits.reshape(-1, v), -1), F.log_softmax(teacher.reshape(-1, v), -1),
                    log_target=True, reduction="batchmean")


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The calibration windows of step ``step``: a pure function of (seed, step), so a resume draws the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=g)[: min(batch, n)]


@torch.no_grad()
def quantized_ce(model: nn.Module, windows: torch.Tensor, batch: int, device) -> float:
    """Mean next-token CE (nats) of the model as it is over ``windows``."""
    return calibration_losses(model, windows, batch, device, kl=False)["ce"]


@torch.no_grad()
def calibration_losses(model: nn.Module, windows: torch.Tensor, batch: int, device, kl: bool = True) -> dict:
    """Mean next-token CE of the model as it is, and (``kl``) the mean per-token KL divergence from the same model
    with quantization bypassed, over ``windows``."""
    ce, div, count = 0.0, 0.0, 0
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch].to(device)
        logits = _logits(model, ids)
        ce += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum").item()
        count += ids[:, 1:].numel()
        if kl:
            with quantization_bypassed(model):
                teacher = _logits(model, ids)
            div += _kl(logits, teacher).item() * ids.numel()
    out = {"ce": ce / count}
    if kl:
        out["kl"] = div / windows.numel()
    return out


# ---- checkpoint -----------------------------------------------------------------------------------------------

_WHAT = {"model": "the model (config or weights)", "recipe": "the recipe (module quantization, online rotations or "
         "[rotation_learn] settings)", "data": "the calibration data", "version": "the ptq version"}


def _fingerprint(model: nn.Module, cfg: RotationLearnConfig, windows: torch.Tensor, calib: dict) -> dict:
    from ptq import __version__
    from ptq.io import digest_json, digest_tensors, model_fingerprint
    from ptq.modules.attention import AttentionMX
    from ptq.modules.linear import LinearMX

    configs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LinearMX):
            configs[name] = [repr(mod.cfg), repr(mod.rotation), mod.rotation_mode]
        elif isinstance(mod, AttentionMX):
            configs[name] = [repr(mod.cfg), repr(mod.qk_rotation), repr(mod.v_rotation)]
    learn = cfg.model_dump(mode="json", exclude={"checkpoint_path", "checkpoint_every", "steps"})
    return {
        "model": digest_json(model_fingerprint(model)),
        "recipe": digest_json({"modules": configs, "rotation_learn": learn}),
        "data": digest_json({**calib, "tokens": digest_tensors([("tokens", windows)])}),
        "version": __version__,
    }


def load_checkpoint(path: Path, fingerprint: dict, resume: bool) -> dict | None:
    if not path.exists():
        return None
    if not resume:
        raise CheckpointError(f"rotation_learn: {path} exists and resume is off; delete it or set another "
                              "[rotation_learn].checkpoint_path")
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"rotation_learn: cannot read the checkpoint {path} ({e}); delete it to start over") \
            from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "fingerprint" not in state:
        raise CheckpointError(f"rotation_learn: {path} is not a rotation_learn checkpoint of this ptq version; "
                              "delete it or set another [rotation_learn].checkpoint_path")
    diff = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
    if diff:
        raise CheckpointError(f"rotation_learn: the checkpoint {path} was made for another version of "
                              f"{' and '.join(_WHAT[k] for k in diff)}; delete it to train again, or point "
                              "[rotation_learn].checkpoint_path at a new file")
    return state


def save_checkpoint(path: Path, state: dict) -> None:
    from ptq.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _after_step(step: int) -> None:
    """Called after every finished (and checkpointed) step; tests replace it to simulate a crash."""


# ---- the pass -------------------------------------------------------------------------------------------------

@register_pass
class RotationLearnPass:
    """Learned rotations (see the module docstring)."""

    name = "rotation_learn"
    after = ("swap", "rotation_search")

    def wanted(self, recipe) -> bool:
        return recipe.rotation_learn is not None

    def run(self, model: nn.Module, recipe, ctx: PassContext) -> dict:
        cfg: RotationLearnConfig = recipe.rotation_learn
        t0 = time.perf_counter()
        layout = discover_layout(model)
        gptq_done = [n for n, m in model.named_modules() if getattr(m, "has_gptq_weight", False)]
        if gptq_done:
            raise ModelError(f"rotation_learn: {gptq_done[0]} already holds a GPTQ weight; rotations must be learned "
                             "before GPTQ (run the passes on a freshly loaded model)")
        if "r1" in cfg.rotations and layout.tied and not cfg.untie_embeddings:
            raise ModelError("rotation_learn: this model ties lm_head to the embedding, and r1 needs them different "
                             "(the final norm is folded into lm_head only); set [rotation_learn].untie_embeddings = "
                             "true (adds a vocab x hidden matrix) or drop 'r1' from rotations")
        device = layout.embed.weight.device
        windows, calib = self._calibration(cfg, ctx)
        fingerprint = _fingerprint(model, cfg, windows, calib)
        rots = LearnedRotations(layout, cfg, device)
        refuse_cancelling_starts(model, layout, cfg)
        path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
        state = load_checkpoint(path, fingerprint, ctx.resume) if path is not None else None
        if state is not None and state["step"] > cfg.steps:
            raise CheckpointError(f"rotation_learn: the checkpoint {path} has {state['step']} steps, more than the "
                                  f"{cfg.steps} asked for; raise steps or delete the checkpoint")
        self._probe(model, rots, windows[:1, :64].to(device))

        opt = self._optimizer(rots, cfg)
        history: list[float] = []
        start, before, best = 0, None, None
        if state is not None:
            rots.load_state_dict(state["rotations"])
            opt.load_state_dict(state["optimizer"])
            start, history, before, best = state["step"], list(state["history"]), state["before"], state["best"]
        info = {"rotations": list(cfg.rotations), "smooth": list(cfg.smooth), "loss": cfg.loss, "steps": cfg.steps,
                "resumed_at": start, "checkpoint_path": cfg.checkpoint_path, "checkpoint_loaded": state is not None}
        bs = cfg.batch_size
        with torch.enable_grad(), _frozen(model), rots.installed(model, cfg.quantize_weights):
            if before is None:
                before = calibration_losses(model, windows, bs, device)
                best = {"step": 0, "loss": before[cfg.loss], "losses": before, "rotations": _copy(rots.state_dict())}
            if start < cfg.steps:
                best = self._train(model, rots, opt, windows, cfg, ctx, start, history, before, best, fingerprint,
                                   path, device)
            if cfg.keep_best:  # the kept rotations were measured when they were kept
                rots.load_state_dict(best["rotations"])
                after = best["losses"]
            else:
                after = calibration_losses(model, windows, bs, device)
        info.update(rots.fuse())
        info.update({"calib_ce_start": before["ce"], "calib_ce_end": after["ce"], "calib_kl_start": before["kl"],
                     "calib_kl_end": after["kl"], "kept_step": best["step"] if cfg.keep_best else cfg.steps,
                     "evaluations": best.get("evaluations", []), "loss_history": history,
                     "trained_steps": cfg.steps - start, "seconds": time.perf_counter() - t0})
        return info

    def _train(self, model, rots, opt, windows, cfg, ctx, start, history, before, best, fingerprint, path, device):
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="rotation_learn", unit="step", disable=not ctx.progress)
        for step in range(start, cfg.steps):
            ids = windows[batch_indices(windows.shape[0], cfg.batch_size, cfg.seed, step)].to(device)
            if cfg.loss == "kl":
                with torch.no_grad(), quantization_bypassed(model):
                    teacher = _logits(model, ids)
                loss = _kl(_logits(model, ids), teacher)
            else:
                loss = _ce(_logits(model, ids), ids)
            if not torch.isfinite(loss):
                raise PtqError(f"rotation_learn: the loss is {loss.item()} at step {step}; lower "
                               "[rotation_learn].lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            done = step + 1
            if cfg.keep_best and (done % cfg.eval_every == 0 or done == cfg.steps):
                losses = calibration_losses(model, windows, cfg.batch_size, device)
                evals = best.get("evaluations", []) + [[done, losses[cfg.loss]]]
                if losses[cfg.loss] < best["loss"]:
                    best = {"step": done, "loss": losses[cfg.loss], "losses": losses,
                            "rotations": _copy(rots.state_dict())}
                best["evaluations"] = evals
            if path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": done,
                                       "rotations": rots.state_dict(), "optimizer": opt.state_dict(),
                                       "history": history, "before": before, "best": best})
            _after_step(done)
        bar.close()
        return best

    @staticmethod
    def _optimizer(rots: LearnedRotations, cfg: RotationLearnConfig) -> torch.optim.Optimizer:
        named = list(rots.named_parameters())
        groups = [{"params": [p for n, p in named if not n.startswith("smooth.")]},
                  {"params": [p for n, p in named if n.startswith("smooth.")], "lr": cfg.smooth_lr or cfg.lr}]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.Adam(groups, lr=cfg.lr)

    @staticmethod
    @torch.no_grad()
    def _probe(model: nn.Module, rots: LearnedRotations, ids: torch.Tensor) -> None:
        """Refuse (model untouched) when rotating does not preserve the unquantized function."""
        with quantization_bypassed(model):
            ref = _logits(model, ids)
            saved = {k: v.clone() for k, v in rots.state_dict().items()}
            randomise(rots, 0.3, seed=1)  # random rotations (and scales) away from the start: a strong check
            try:
                with rots.installed(model):
                    got = _logits(model, ids)
            finally:
                rots.load_state_dict(saved)
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        dtype = next(model.parameters()).dtype
        tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16 SmolLM2: 1.4e-2; a wrong architecture: ~1
        if not math.isfinite(err) or err > tol:
            raise ModelError(f"rotation_learn: rotating {type(model).__name__} changes its unquantized logits (relative "
                             f"error {err:.2e} > {tol:g}), so its layers are not the pre-RMSNorm residual structure a "
                             "fused rotation needs; remove [rotation_learn] for this model")

    @staticmethod
    def _calibration(cfg: RotationLearnConfig, ctx: PassContext) -> tuple[torch.Tensor, dict]:
        return calibration_windows(ctx, "rotation_learn", cfg)


@torch.no_grad()
def randomise(rots: LearnedRotations, scale: float, seed: int) -> None:
    """Every rotation parameter and log-scale drawn from N(0, scale^2): far from the start, for exactness checks."""
    g = torch.Generator().manual_seed(seed)
    for p in rots.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@contextmanager
def _frozen(model: nn.Module):
    """No gradient for the model's own Parameters while the rotations train (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
