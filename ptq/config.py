"""Typed, frozen per-module configuration produced by the recipe (ptq/recipe.py) and consumed by passes and modules.

A module never reads the recipe: the swap pass hands each swapped module one of these objects. ``None`` for a spec
means "bypass": that tensor passes through exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ptq.formats import QuantSpec


@dataclass(frozen=True)
class LinearQuantConfig:
    """Quantization of one ``nn.Linear``: weight blocked along in_features (axis -1), input along its last dim."""

    weight: QuantSpec | None = None
    data_in: QuantSpec | None = None
    bias: QuantSpec | None = None
    gptq: bool = False  # the GPTQ pass owns this module's weight quantization

    @property
    def bypassed(self) -> bool:
        return self.weight is None and self.data_in is None and self.bias is None


@dataclass(frozen=True)
class AttentionQuantConfig:
    """Quantization inside one attention module (Llama family).

    kv_cache: K (after RoPE) and V where they are written to the cache, both blocked along head_dim (the reduction
        axis of Q K^T for K; for V, per token, so a decode step can quantize what it writes without waiting for a
        block of future tokens). Attention in the same forward reads the quantized values.
    qk_matmul: both operands of Q K^T, along head_dim. av_matmul: both operands of A V, along the key axis.
    softmax: the attention probabilities (softmax output), along the key axis. rope: Q and K after RoPE, along head_dim.
    """

    kv_cache: QuantSpec | None = None
    qk_matmul: QuantSpec | None = None
    av_matmul: QuantSpec | None = None
    softmax: QuantSpec | None = None
    rope: QuantSpec | None = None

    @property
    def bypassed(self) -> bool:
        return all(s is None for s in (self.kv_cache, self.qk_matmul, self.av_matmul, self.softmax, self.rope))

    @property
    def needs_eager(self) -> bool:
        """qk / av / softmax quantization needs the probabilities materialised; kv_cache and rope do not."""
        return any(s is not None for s in (self.qk_matmul, self.av_matmul, self.softmax))


ModuleQuantConfig = Union[LinearQuantConfig, AttentionQuantConfig]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPTQWeightConfig(_Strict):
    """``[gptq.weight_config]``: must agree with the selectors that set ``gptq = true``."""

    weight_width: int | None = None
    weight_block_size: int | None = None
    weight_exponent_width: int | None = None
    weight_frac_width: int | None = None


class GPTQConfig(_Strict):
    """``[gptq]`` table."""

    model_name: str | None = None  # informational / tokenizer fallback when no tokenizer is passed
    format: str | None = None  # family of the weights GPTQ quantizes; must agree with the selectors
    dataset: str | list[str] = "wikitext2"  # "wikitext2", "tinystories", a text file path, or a list of strings
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=8)
    cali_batch_size: int = Field(8, ge=1)
    percdamp: float = Field(0.01, ge=0.0, le=1.0)
    act_order: bool = False
    quantile_search: bool = False
    clip_search_y: bool = False
    # how far GPTQ's target moves from W X_q toward the unquantized model's W X (GPTAQ-style asymmetric calibration,
    # see ptq.gptq.asymmetric): 0 = plain GPTQ, 1 = the least-squares fit to W X
    asymmetric: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    checkpoint_dir: str | None = None
    weight_config: GPTQWeightConfig | None = None
    # MoE experts routed fewer calibration tokens than this use the Hessian pooled over all experts of the
    # projection in their layer (None: the projection's in_features); see ptq.gptq.experts
    experts_min_tokens: int | None = Field(None, ge=1)


RotationType = Literal["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "kv_cache", "qk_matmul",
                       "av_matmul"]
ROTATION_TYPES: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "kv_cache", "qk_matmul",
                                   "av_matmul")


class RotationSearchConfig(_Strict):
    """``[rotation_search]`` table."""

    calib_nsamples: int = Field(32, ge=1)
    calib_seqlen: int = Field(512, ge=8)
    dataset: str | list[str] = "wikitext2"
    seed: int = 0
    improvement_eps: float = Field(0.0, ge=0.0)
    cache_path: str | None = None
    # One kind, or several: the search then also picks, per type, which of the variants (full, and block-diagonal
    # with each block size) to use.
    kind: Literal["full", "block"] | list[Literal["full", "block"]] = "full"
    # kind "block": Hadamard block (default: the MX block size); a list tries each size
    block_size: int | list[int] | None = None
    mode: Literal["matched", "activation_only"] = "matched"
    candidates: list[RotationType] | None = None  # default: every type the recipe quantizes

    @field_validator("kind", "block_size")
    @classmethod
    def _distinct_nonempty(cls, v, info):
        if isinstance(v, list):
            if not v:
                raise ValueError(f"{info.field_name} must not be an empty list")
            if len(set(v)) != len(v):
                raise ValueError(f"{info.field_name} lists a value twice: {v}")
        for b in (v if isinstance(v, list) else [v]) if info.field_name == "block_size" else []:
            if b is not None and b < 2:
                raise ValueError(f"block_size must be >= 2, got {b}")
        return v

    def variants(self) -> list[str]:
        """The rotation variants the search tries per type: "full", "block<N>", or "block" (the MX block size)."""
        kinds = self.kind if isinstance(self.kind, list) else [self.kind]
        sizes = self.block_size if isinstance(self.block_size, list) else [self.block_size]
        out = []
        for k in kinds:
            out += ["full"] if k == "full" else [f"block{b}" if b is not None else "block" for b in sizes]
        return out


LearnedRotation = Literal["r1", "r2"]
SmoothSite = Literal["qkv", "gate_up", "down"]


class RotationLearnConfig(_Strict):
    """``[rotation_learn]`` table: rotations trained on calibration data through the fake-quantized model.

    ``rotations``: "r1" rotates the residual stream (fused into the embedding, every linear reading or writing the
    residual, and lm_head; RMSNorm weights folded into the linears that read them); "r2" rotates each attention
    layer's values per head (fused into v_proj's rows and o_proj's columns). ``r1_block_size`` / ``r2_block_size``
    pick the Hadamard they start from: None = the whole dimension, N = block-diagonal with blocks of N, 1 = the
    identity (use it on top of ``[rotation_search]``, whose online block Hadamards a start of the same block undoes).
    ``smooth``: per-channel scales learned with the rotations and fused offline (SmoothQuant's equivalence, trained):
    "qkv" / "gate_up" divide the input RMSNorm / post-attention RMSNorm output by ``s`` and multiply the columns of
    q, k, v / gate, up by ``s``; "down" divides up_proj's rows by ``s`` and multiplies down_proj's columns by it.
    ``smooth_lr``: their learning rate (log-scale; left out = ``lr``).
    """

    rotations: list[LearnedRotation] = ["r1", "r2"]
    smooth: list[SmoothSite] = []
    smooth_lr: float | None = Field(None, gt=0.0)
    steps: int = Field(100, ge=0)
    batch_size: int = Field(4, ge=1)  # calibration windows per step
    lr: float = Field(1e-3, gt=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    loss: Literal["ce", "kl"] = "kl"  # next-token CE of the quantized model, or KL to the unquantized model
    quantize_weights: bool = True  # false: only activations / KV are quantized while learning (GPTQ comes after)
    keep_best: bool = True  # evaluate the loss on all calibration windows every eval_every steps (and at the end)
    eval_every: int = Field(25, ge=1)  # and keep the best rotations seen, the start included; false: keep the last
    r1_block_size: int | None = None
    r2_block_size: int | None = None
    random_signs: bool = True  # randomised Hadamard (H times a random +-1 diagonal) as the start
    untie_embeddings: bool = False  # tied embeddings must be untied to fuse r1 (adds a vocab x hidden matrix)
    calib_nsamples: int = Field(64, ge=1)
    calib_seqlen: int = Field(512, ge=8)
    dataset: str | list[str] = "wikitext2"
    seed: int = 0
    checkpoint_path: str | None = None
    checkpoint_every: int = Field(25, ge=1)

    @field_validator("rotations", "smooth")
    @classmethod
    def _no_repeats(cls, v, info):
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} lists a value twice: {v}")
        return v

    @model_validator(mode="after")
    def _learns_something(self):
        if not self.rotations and not self.smooth:
            raise ValueError("rotations must name at least one of 'r1', 'r2' (or smooth one of 'qkv', 'gate_up', "
                             "'down'): there is nothing to learn")
        return self

    @field_validator("r1_block_size", "r2_block_size")
    @classmethod
    def _block(cls, v, info):
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1 (1 = the identity; left out = the whole dimension), "
                             f"got {v}")
        return v
