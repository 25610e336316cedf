"""Model-family knowledge in one place: which module of a decoder plays which role.

A *role* names what a module does, whatever a family calls it: ``attention``; the projections ``q``, ``k``, ``v``,
``qkv`` (fused), ``o``; the MLP's ``gate``, ``up``, ``gate_up`` (fused), ``down``; MoE ``experts`` (fused 3-D expert
weights) and ``router``. A module inside decoder layer N has the *role path* ``layers.N.<role>``; the output head is
``lm_head``. Recipes select by role (``by = "role"``), the rotation search and the coverage report group by role, and
GPTQ finds the decoder layers here.

``ROLE_TABLE`` lists the families we know, as names relative to a decoder layer. A family missing from it falls back
to structure discovery: the decoder layers are the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks of one
class, and roles come from the union of the known relative names; `architecture` says which way it went
(``Architecture.known``) so callers can warn.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import nn

from ptq.errors import ModelError

ROLES = ("attention", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "experts", "router")
# roles whose weights take part in the decoder's matmuls (the coverage report's denominator)
MATMUL_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "experts")
# sibling roles that read one input tensor (their quantized input can be prepared once)
SHARED_INPUT_ROLES = (("q", "k", "v"), ("gate", "up"))

_ATTN_QKVO = {"self_attn": "attention", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
              "self_attn.o_proj": "o"}
_GATED_MLP = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
_LLAMA = {**_ATTN_QKVO, **_GATED_MLP}
_MOE = {**_ATTN_QKVO, "mlp.experts": "experts", "mlp.gate": "router",
        "mlp.shared_expert.gate_proj": "gate", "mlp.shared_expert.up_proj": "up",
        "mlp.shared_expert.down_proj": "down", "mlp.shared_expert_gate": "router"}
_PHI3 = {"self_attn": "attention", "self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
         "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"}
_STARCODER2 = {**_ATTN_QKVO, "mlp.c_fc": "up", "mlp.c_proj": "down"}
_NEOX_MLP = {"mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"}
_GPT_NEOX = {"attention": "attention", "attention.query_key_value": "qkv", "attention.dense": "o", **_NEOX_MLP}
_FALCON = {"self_attention": "attention", "self_attention.query_key_value": "qkv", "self_attention.dense": "o",
           **_NEOX_MLP}
_OPT = {"self_attn": "attention", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
        "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"}
_GPT2 = {"attn": "attention", "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}

# model_type -> (decoder-layer list path, {name relative to a decoder layer: role})
ROLE_TABLE: Mapping[str, tuple[str, Mapping[str, str]]] = MappingProxyType({
    **{t: ("model.layers", _LLAMA) for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "cohere",
        "cohere2", "smollm3", "glm", "helium", "ministral", "exaone4", "arcee", "apertus", "seed_oss")},
    **{t: ("model.layers", _MOE) for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")},
    "phi3": ("model.layers", _PHI3),
    "starcoder2": ("model.layers", _STARCODER2),
    "gpt_neox": ("gpt_neox.layers", _GPT_NEOX),
    "falcon": ("transformer.h", _FALCON),
    "opt": ("model.decoder.layers", _OPT),
    "gpt2": ("transformer.h", _GPT2),
})

# every relative name a known family uses: the role guesses for an unknown family (no two families disagree)
_ANY_FAMILY: dict[str, str] = {}
for _path, _roles in ROLE_TABLE.values():
    _ANY_FAMILY.update(_roles)


@dataclass(frozen=True)
class Architecture:
    """Where a model's decoder layers are and which module of each plays which role.

    ``roles`` maps full module names to role paths (``model.layers.3.self_attn.q_proj -> layers.3.q``).
    ``known``: the model type is in ``ROLE_TABLE`` (False: found by structure; roles are best guesses).
    """

    model_type: str
    layers_path: str
    num_layers: int
    roles: Mapping[str, str]
    known: bool

    def role_of(self, name: str) -> str | None:
        """The bare role (``"q"``) of a module name, or None."""
        path = self.roles.get(name)
        return None if path is None else path.rsplit(".", 1)[-1]

    def layer_of(self, name: str) -> int | None:
        prefix = self.layers_path + "."
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None)
        if isinstance(n, int):
            return n
    return None


def _discover_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: one class, ``num_hidden_layers`` long (the longest such list otherwise)."""
    want = _num_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    exact = [(n, m) for n, m in found if want is not None and len(m) == want]
    pick = exact or sorted(found, key=lambda nm: -len(nm[1]))
    if not pick:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of identical "
                         f"blocks in it. ptq supports Hugging Face decoder-only causal LMs")
    if len(exact) > 1:
        names = ", ".join(n for n, _ in exact)
        raise ModelError(f"{type(model).__name__} has several lists of {want} identical blocks ({names}); cannot "
                         f"tell which are the decoder layers. Add the model type to ptq.architectures.ROLE_TABLE")
    return pick[0]


def architecture(model: nn.Module) -> Architecture:
    """The `Architecture` of a Hugging Face causal LM (table lookup by ``config.model_type``, else discovery)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    entry = ROLE_TABLE.get(model_type)
    layers = _get(model, entry[0]) if entry else None
    if entry is not None and isinstance(layers, nn.ModuleList):
        path, rel = entry[0], entry[1]
        known = True
    else:
        path, layers = _discover_layers(model)
        rel, known = _ANY_FAMILY, False
    roles: dict[str, str] = {}
    for i, layer in enumerate(layers):
        for sub, _ in layer.named_modules():
            role = rel.get(sub)
            if role is not None:
                roles[f"{path}.{i}.{sub}"] = f"layers.{i}.{role}"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        for name, m in model.named_modules():
            if m is head:
                roles[name] = "lm_head"
                break
    return Architecture(model_type or type(model).__name__, path, len(layers), MappingProxyType(roles), known)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the model's decoder-layer list."""
    arch = architecture(model)
    return arch.layers_path, model.get_submodule(arch.layers_path)
