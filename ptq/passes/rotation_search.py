"""The ``rotation_search`` pass: greedy forward selection of which matmul types get an online Hadamard rotation.

Types and what rotating them means (``HadamardRotation`` of ``ptq.modules.rotation``):

- ``q``, ``k``, ``v``, ``qkv``, ``o``, ``gate``, ``up``, ``gate_up``, ``down``: the input rotation of every
  ``LinearMX`` with that role (`ptq.architectures`: ``q_proj`` of Llama, ``query_key_value`` of GPT-NeoX / Falcon,
  ``c_attn`` of GPT-2, ``gate_up_proj`` of Phi-3, ``fc2`` of OPT ...; ``LinearMX.set_rotation(rot, mode)``; size =
  in_features). q, k and v share their input, but each linear gets its own (identical) rotation, so the three are
  independent choices. Fused MoE experts are not rotated.
- ``kv_cache``: what the cache stores, K and V, along head_dim (``AttentionMX.set_rotations(qk=..., v=...)``): Q is
  rotated with K so Q K^T is unchanged, and the attention output is de-rotated per head before o_proj.
- ``qk_matmul``: the Q/K rotation only (both operands of Q K^T).
- ``av_matmul``: its reduction axis is the key axis, and a rotation along it mixes future keys into past ones, which
  a causal decode cannot do online; it is not a default candidate and naming it is refused.

``mode`` ("matched": ``Q(W H^T) Q(H x)``; "activation_only": ``H^T Q(H x)`` with W untouched) applies to the
linears; the attention rotations are always matched pairs (Q with K; V with the de-rotated output).

Candidates (default): every type that the recipe quantizes somewhere (a linear with a quantized input or, in
"matched" mode, a quantized weight; an attention with ``kv_cache`` / ``qk_matmul`` quantization). A rotation is
installed only where its type is quantized: a module the recipe bypasses keeps its input as it is.

Loss: mean next-token cross-entropy of the quantized model (RTN weights; GPTQ runs afterwards on the rotated
weights) over the calibration windows (``calib_nsamples`` x ``calib_seqlen`` from ``dataset``). CE needs no second
model; with the greedy rule below the loss of the kept sets decreases strictly round by round.

Greedy rule: round r tries every remaining candidate on top of the set chosen so far and keeps the one with the
lowest loss if it beats the current loss by more than ``improvement_eps``; otherwise the search stops.

Cache (``cache_path``, JSON written atomically after every finished round): a fingerprint (model config + weights,
every module's quantization config + the search settings, calibration tokens, ptq version), the baseline loss, the
finished rounds (trials and losses) and, once done, the decision. A rerun with the same fingerprint applies the
decision without searching, an interrupted run resumes after its last finished round, and a cache with another
fingerprint is refused (``CheckpointError`` naming what differs).

The search runs on the device the model is on (a whole-model forward per trial).

Sizes: kind "full" rotates the whole dimension (power of two or a known Hadamard order times one, e.g.
stories260k's down_proj input 172 = the Williamson order 172 itself); kind "block" uses blocks of ``block_size``
(default: the MX block size of the quantized tensor), a block at least as large as the dimension means the full
rotation (e.g. head_dim 8 with blocks of 32).

Variants: ``kind`` and ``block_size`` may be lists (``kind = ["block", "full"]``, ``block_size = [32, 64]``); each
round then tries every remaining type with every variant ("block32", "block64", "full") and keeps the best pair, so
the search also decides, per type, how wide its Hadamard is. Trials and decisions are then labelled "type@variant";
a variant that does not fit a type's dimension is left out for that type and listed in ``info["skipped_variants"]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ptq.config import ROTATION_TYPES, RotationSearchConfig
from ptq.errors import CheckpointError, ModelError, RecipeError
from ptq.passes.base import PassContext, calibration_windows, register_pass

LINEAR_TYPES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")  # = their roles
ATTENTION_TYPES = ("kv_cache", "qk_matmul")
CACHE_FORMAT = 1


def _linear_cls():
    from ptq.modules.linear import LinearMX

    return LinearMX


def _attention_cls():
    from ptq.modules.attention import AttentionMX

    return AttentionMX


def rotation_sites(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """type -> [(module name, module)] of the swapped modules a rotation of that type touches."""
    from ptq.architectures import architecture

    linear_cls, attn_cls = _linear_cls(), _attention_cls()
    arch = architecture(model)
    sites: dict[str, list[tuple[str, nn.Module]]] = {t: [] for t in ROTATION_TYPES}
    for name, mod in model.named_modules():
        if isinstance(mod, linear_cls):
            t = arch.role_of(name)
            if t in LINEAR_TYPES:
                sites[t].append((name, mod))
        elif isinstance(mod, attn_cls):
            for t in ATTENTION_TYPES:
                sites[t].append((name, mod))
    return sites


def _quantized(t: str, mod: nn.Module, mode: str) -> bool:
    cfg = mod.cfg
    if t in LINEAR_TYPES:
        return cfg.data_in is not None or (mode == "matched" and cfg.weight is not None)
    if t == "kv_cache":
        return cfg.kv_cache is not None
    if t == "qk_matmul":
        return cfg.qk_matmul is not None
    return False


def quantized_sites(sites: dict, mode: str) -> dict[str, list[tuple[str, nn.Module]]]:
    """Only the sites whose matmul the recipe quantizes: a rotation cannot help one left in full precision, and a
    bypassed module has no MX block for a block rotation to default to (nor need its width fit the rotation)."""
    return {t: [(n, m) for n, m in s if _quantized(t, m, mode)] for t, s in sites.items()}


def candidate_types(sites: dict, cfg: RotationSearchConfig) -> list[str]:
    """The types the search tries, in ``ROTATION_TYPES`` order (see the module docstring)."""
    active = [t for t in ROTATION_TYPES if any(_quantized(t, m, cfg.mode) for _, m in sites.get(t, []))]
    if cfg.candidates is None:
        return active
    named = list(dict.fromkeys(cfg.candidates))
    if "av_matmul" in named:
        raise RecipeError(
            "[rotation_search].candidates: 'av_matmul' cannot be rotated online (its reduction axis is the key "
            "axis, which a causal decode cannot mix); remove it from the candidates")
    idle = [t for t in named if t not in active]
    if idle:
        raise RecipeError(
            f"[rotation_search].candidates: {', '.join(map(repr, idle))} name(s) no matmul the recipe quantizes "
            f"(quantized types: {', '.join(active) or 'none'}); remove them or quantize those modules")
    return [t for t in ROTATION_TYPES if t in named]


def variant_block(variant: str) -> tuple[str, int | None]:
    """``"full"`` -> ("full", None); ``"block32"`` -> ("block", 32); ``"block"`` -> ("block", None: the MX block)."""
    if variant == "full":
        return "full", None
    return "block", int(variant[5:]) if len(variant) > 5 else None


def choice_label(t: str, variant: str, variants: list[str]) -> str:
    """How a (type, variant) choice is named in trials and decisions: the type alone when there is one variant."""
    return t if len(variants) == 1 else f"{t}@{variant}"


def parse_choices(labels: list[str], variants: list[str]) -> dict[str, str]:
    """Decision labels -> {type: variant}."""
    out = {}
    for label in labels:
        t, _, v = label.partition("@")
        out[t] = v or variants[0]
    return out


class RotationBank:
    """Builds (and shares) the HadamardRotation modules and installs a chosen set of (type, variant) on the model."""

    def __init__(self, sites: dict, cfg: RotationSearchConfig):
        self.sites = sites
        self.cfg = cfg
        self._made: dict[tuple, nn.Module] = {}

    def rotation(self, size: int, default_block: int | None, where: str, variant: str) -> nn.Module:
        from ptq.modules.rotation import HadamardRotation

        kind, block = variant_block(variant)
        block = block or default_block
        if kind == "block" and block is None:
            raise RecipeError(f"[rotation_search].block_size: {where} has no MX block size to default to; set "
                              "block_size")
        full = kind == "full" or block >= size
        key = (size, None) if full else (size, block)
        if key not in self._made:
            try:
                self._made[key] = HadamardRotation(size) if full else HadamardRotation(size, "block", block)
            except ModelError as e:
                raise ModelError(f"rotation_search: cannot rotate {where} (size {size}, {variant}): {e}. "
                                 "Alternatively drop this type from [rotation_search].candidates or this variant "
                                 "from kind / block_size") from None
        return self._made[key]

    def prepare(self, types: list[str]) -> dict[str, str]:
        """Build every rotation the candidates need up front, so bad sizes fail before any search. With several
        variants, one that does not fit a type (a block size not dividing its dimension) is left out for that type
        only; returns {"type@variant": reason} for those. A type no variant fits is an error."""
        variants = self.cfg.variants()
        self.valid: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        for t in types:
            ok = []
            for variant in variants:
                try:
                    for name, mod in self.sites[t]:
                        self._for_site(t, name, mod, variant)
                except ModelError as e:
                    if len(variants) == 1:
                        raise
                    skipped[f"{t}@{variant}"] = str(e)
                    continue
                ok.append(variant)
            if not ok:
                raise ModelError(f"rotation_search: no rotation variant ({', '.join(variants)}) fits type {t!r}: "
                                 f"{'; '.join(skipped[f'{t}@{v}'] for v in variants)}")
            self.valid[t] = ok
        return skipped

    def _for_site(self, t: str, name: str, mod: nn.Module, variant: str) -> nn.Module:
        if t in ATTENTION_TYPES:
            spec = mod.cfg.kv_cache or mod.cfg.qk_matmul or mod.cfg.rope
            return self.rotation(mod.head_dim, spec.block_size if spec else None, f"{name} ({t}, head_dim)", variant)
        spec = mod.cfg.data_in or mod.cfg.weight
        return self.rotation(mod.in_features, spec.block_size if spec else None, f"{name} ({t}, in_features)",
                             variant)

    def apply(self, chosen) -> None:
        """Install exactly the rotations in ``chosen`` ({type: variant}, or types, which get the first variant);
        every other type gets none."""
        if not isinstance(chosen, dict):
            chosen = dict.fromkeys(chosen, self.cfg.variants()[0])
        for t in LINEAR_TYPES:
            for name, mod in self.sites[t]:
                rot = self._for_site(t, name, mod, chosen[t]) if t in chosen else None
                if rot is not mod.rotation or (rot is not None and mod.rotation_mode != self.cfg.mode):
                    mod.set_rotation(rot, self.cfg.mode)
        # K and V share one head_dim rotation: kv_cache's variant wins over qk_matmul's where both apply
        kv_sites = {id(m) for _, m in self.sites["kv_cache"]} if "kv_cache" in chosen else set()
        qk_sites = {id(m) for _, m in self.sites["qk_matmul"]} if "qk_matmul" in chosen else set()
        attentions = {id(m): (n, m) for t in ATTENTION_TYPES for n, m in self.sites.get(t, [])}
        for name, mod in attentions.values():
            kv, qk = id(mod) in kv_sites, id(mod) in qk_sites
            variant = chosen["kv_cache"] if kv else chosen["qk_matmul"] if qk else None
            rot = self._for_site("kv_cache", name, mod, variant) if variant else None
            mod.set_rotations(qk=rot, v=rot if kv else None)


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_tokens: int = 16384) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``windows`` [n, seqlen] (fp32 accumulation)."""
    device = next(model.parameters()).device
    n, seqlen = windows.shape
    bs = max(1, batch_tokens // seqlen)
    total, count = 0.0, 0
    for s in range(0, n, bs):
        ids = windows[s:s + bs].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        for row in range(ids.shape[0]):  # one window at a time in fp32: bounded memory for large vocabularies
            total += F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def _fingerprint(model: nn.Module, cfg: RotationSearchConfig, windows: torch.Tensor, calib: dict) -> dict:
    from ptq import __version__
    from ptq.io import digest_json, digest_tensors, model_fingerprint

    configs = {name: repr(mod.cfg) for name, mod in model.named_modules()
               if isinstance(mod, (_linear_cls(), _attention_cls()))}
    search = cfg.model_dump(mode="json", exclude={"cache_path"})
    return {
        "model": digest_json(model_fingerprint(model)),
        "recipe": digest_json({"modules": configs, "rotation_search": search}),
        "data": digest_json({**calib, "tokens": digest_tensors([("tokens", windows)])}),
        "version": __version__,
    }


_WHAT = {"model": "the model (config or weights)", "recipe": "the recipe (module quantization or "
         "[rotation_search] settings)", "data": "the calibration data", "version": "the ptq version"}


class _Cache:
    """The decisions file: load / verify / save (atomically) after each finished round."""

    def __init__(self, path: str | None, fingerprint: dict, resume: bool):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.state: dict = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "baseline_loss": None,
                            "rounds": [], "decision": None}
        self.loaded = False
        if self.path is None or not self.path.exists():
            return
        if not resume:
            raise CheckpointError(f"rotation_search: {self.path} exists and resume is off; delete it or set another "
                                  "[rotation_search].cache_path")
        import json

        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"rotation_search: cannot read the cache {self.path} ({e}); delete it to start "
                                  "over") from None
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT or "fingerprint" not in state:
            raise CheckpointError(f"rotation_search: {self.path} is not a rotation-search cache of this ptq version; "
                                  "delete it or set another [rotation_search].cache_path")
        old = state["fingerprint"]
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff:
            raise CheckpointError(
                f"rotation_search: the cache {self.path} was made for another version of "
                f"{' and '.join(_WHAT[k] for k in diff)}; delete it to search again, or point "
                "[rotation_search].cache_path at a new file")
        self.state = state
        self.loaded = True

    def save(self) -> None:
        if self.path is not None:
            from ptq.io import atomic_write_json

            atomic_write_json(self.path, self.state)


@register_pass
class RotationSearchPass:
    """Greedy rotation search (see the module docstring)."""

    name = "rotation_search"
    after = ("swap",)

    def wanted(self, recipe) -> bool:
        return recipe.rotation_search is not None

    def run(self, model: nn.Module, recipe, ctx: PassContext) -> dict:
        cfg: RotationSearchConfig = recipe.rotation_search
        t0 = time.perf_counter()
        every_site = rotation_sites(model)
        sites = quantized_sites(every_site, cfg.mode)
        types = candidate_types(sites, cfg)
        if not types:
            raise ModelError(
                f"rotation_search: no candidate: no swapped module of this {type(model).__name__} has a quantized "
                f"input or weight in a rotatable role ({', '.join(LINEAR_TYPES)}) or a quantized KV cache / Q K^T. "
                "Check the recipe's selectors with `ptq validate --model`, or remove [rotation_search]")
        bank = RotationBank(sites, cfg)
        skipped = bank.prepare(types)
        # start from no rotation, also where an earlier run on this model rotated a module the recipe now bypasses
        RotationBank(every_site, cfg).apply({})
        windows, calib = self._calibration(model, cfg, ctx)
        cache = _Cache(cfg.cache_path, _fingerprint(model, cfg, windows, calib), ctx.resume)
        state = cache.state
        info = {"candidates": types, "skipped_variants": skipped, "cache_path": cfg.cache_path,
                "cache_used": cache.loaded,
                "rounds_loaded": len(state["rounds"]) if cache.loaded else 0, "evaluations": 0}

        if state["decision"] is None:
            self._search(model, windows, types, bank, cache, info, ctx)
        variants = cfg.variants()
        decision = parse_choices(list(state["decision"]), variants)
        bank.apply(decision)
        chosen = list(decision)
        info.update({
            "chosen": chosen,
            "variants": decision,
            "searched": info["evaluations"] > 0,
            "baseline_loss": state["baseline_loss"],
            "round_losses": [r["loss"] for r in state["rounds"] if r["chosen"] is not None],
            "rounds": state["rounds"],
            "kind": cfg.kind, "block_size": cfg.block_size, "mode": cfg.mode,
            "modules_rotated": sum(len(sites[t]) for t in chosen),
            "seconds": time.perf_counter() - t0,
        })
        return info

    def _search(self, model, windows, types, bank, cache, info, ctx) -> None:
        from tqdm.auto import tqdm

        state = cache.state
        eps = float(bank.cfg.improvement_eps)
        variants = bank.cfg.variants()
        if state["baseline_loss"] is None:
            bank.apply({})
            state["baseline_loss"] = calibration_loss(model, windows)
            info["evaluations"] += 1
            cache.save()
        chosen = [r["chosen"] for r in state["rounds"] if r["chosen"] is not None]
        best = state["rounds"][-1]["loss"] if chosen else state["baseline_loss"]
        if state["rounds"] and state["rounds"][-1]["chosen"] is None:  # interrupted after the stopping round
            state["decision"] = chosen
            cache.save()
            return
        done = parse_choices(chosen, variants)
        remaining = [t for t in types if t not in done]
        per_round = [len(bank.valid[t]) for t in remaining]
        bar = tqdm(total=sum(sum(sorted(per_round)[i:]) for i in range(len(per_round))), desc="rotation_search",
                   disable=not ctx.progress)  # an upper bound: the search may stop early
        while remaining:
            trials = {}
            for t in remaining:
                for v in bank.valid[t]:
                    label = choice_label(t, v, variants)
                    bank.apply(parse_choices(chosen + [label], variants))
                    trials[label] = calibration_loss(model, windows)
                    info["evaluations"] += 1
                    bar.update(1)
                    bar.set_postfix(best=f"{best:.4f}", chosen=",".join(chosen) or "-")
            pick = min(trials, key=trials.get)
            gain = best - trials[pick]
            keep = gain > eps
            state["rounds"].append({"round": len(state["rounds"]) + 1, "base": list(chosen), "trials": trials,
                                    "chosen": pick if keep else None, "loss": trials[pick] if keep else best,
                                    "gain": gain})
            if not keep:
                break
            chosen.append(pick)
            best = trials[pick]
            remaining.remove(pick.partition("@")[0])
            cache.save()
        bar.close()
        state["decision"] = chosen
        cache.save()

    def _calibration(self, model: nn.Module, cfg: RotationSearchConfig, ctx: PassContext) -> tuple[torch.Tensor, dict]:
        return calibration_windows(ctx, "rotation_search", cfg)
