"""Tiny random decoder models of many Hugging Face families, for cross-family tests (no download, a few KB each).

``tiny_model(family)`` builds one in fp32, eval mode, with a fixed seed. Sizes are chosen so that MX blocks of 32
fit every reduction axis (hidden 64, intermediate 128, head_dim 32) and GQA is used where the family has it.
"""

from __future__ import annotations

import torch

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 128, 2, 1, 32, 2, 128

# family -> (config class name, extra config kwargs)
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, head_dim=HEAD_DIM)),
    "mistral": ("MistralConfig", dict(_COMMON, head_dim=HEAD_DIM, sliding_window=24)),
    "qwen2": ("Qwen2Config", dict(_COMMON, use_sliding_window=True, sliding_window=24, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=HEAD_DIM)),
    "gemma2": ("Gemma2Config", dict(_COMMON, head_dim=HEAD_DIM, sliding_window=24)),
    "gemma3": ("Gemma3TextConfig", dict(_COMMON, head_dim=HEAD_DIM, sliding_window=24, num_hidden_layers=3,
                                        sliding_window_pattern=2)),
    "phi3": ("Phi3Config", dict(_COMMON)),
    "olmo2": ("Olmo2Config", dict(_COMMON)),
    "granite": ("GraniteConfig", dict(_COMMON)),
    "cohere": ("CohereConfig", dict(_COMMON)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       max_position_embeddings=256, rotary_pct=1.0)),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_kv_heads=KV_HEADS, new_decoder_architecture=True,
                                    ffn_hidden_size=INTER)),
    "starcoder2": ("Starcoder2Config", dict(_COMMON, sliding_window=24)),
    "smollm3": ("SmolLM3Config", dict(_COMMON, no_rope_layer_interval=2)),
    "mixtral": ("MixtralConfig", dict(_COMMON, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_COMMON, moe_intermediate_size=INTER, shared_expert_intermediate_size=INTER,
                                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, head_dim=HEAD_DIM, moe_intermediate_size=INTER, num_experts=4,
                                         num_experts_per_tok=2, decoder_sparse_step=1)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                n_positions=256)),
}


def tiny_config(family: str):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = getattr(transformers, cls_name)(**ids, **kwargs)
    # sdpa where the family supports it (Gemma 2 lost sdpa support in transformers 5.24: eager there)
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    cfg._attn_implementation = "sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager"
    return cfg


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
    # random init leaves norms at 1 and biases at 0; perturb every parameter so bypass/identity checks can fail
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
