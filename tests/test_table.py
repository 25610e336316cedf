"""`ptq table`: rows, ratios, reuse of finished rows, the no-text fallback, output files, the CLI command."""

import json
from pathlib import Path

import pytest

import ptq.passes.pipeline as pipeline
from ptq.errors import PtqError
from ptq.eval import evaluate_perplexity
from ptq.models import load_model
from ptq.recipe import load_recipe
from ptq.table import (
    TableSettings,
    _redirect_outputs,
    default_recipe_paths,
    describe_reuse,
    method_label,
    resolve_recipe_path,
    run_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recipe_with_width(tmp_path: Path, bits: int) -> Path:
    """The shipped W4A4KV4 RTN recipe with every width set to ``bits``."""
    text = resolve_recipe_path("w4a4kv4").read_text().replace("width = 4", f"width = {bits}")
    p = tmp_path / f"w{bits}a{bits}kv{bits}.toml"
    p.write_text(text)
    return p


def _small_text(data_dir: Path, tmp_path: Path) -> str:
    """A few TinyStories (tokenizing the whole 800 KB file would dominate these tests)."""
    p = tmp_path / "stories.txt"
    p.write_text((data_dir / "tinystories" / "validation.txt").read_text()[:8000])
    return str(p)


def _settings(out, stories260k_path, recipes, **kw):
    base = dict(out=str(out), model=str(stories260k_path), recipes=tuple(str(r) for r in recipes),
                source="tinystories", split="validation", seqlen=128, max_windows=3, bos_windows=True,
                batch_size=4, dtype="float32", device="cpu", progress=False)
    base.update(kw)
    return TableSettings(**base)


@pytest.fixture
def count_quantize(monkeypatch):
    calls = []
    real = pipeline.quantize_module_transform_pass

    def counting(model, recipe, **kw):
        calls.append(recipe)
        return real(model, recipe, **kw)

    monkeypatch.setattr(pipeline, "quantize_module_transform_pass", counting)
    return calls


def test_table_rows_files_and_reuse(tmp_path, stories260k_path, data_dir, count_quantize):
    r4, r8 = _recipe_with_width(tmp_path, 4), _recipe_with_width(tmp_path, 8)
    out = tmp_path / "out"
    text = _small_text(data_dir, tmp_path)
    report = run_table(_settings(out, stories260k_path, [r4, r8], source=text))
    base, q4, q8 = report["rows"]
    assert [r["label"] for r in report["rows"]] == ["unquantized", "w4a4kv4", "w8a8kv8"]
    assert len(count_quantize) == 2 and not any(r["cached"] for r in report["rows"])

    # the unquantized row is exactly evaluate_perplexity on the same windows
    model, tok = load_model(str(stories260k_path), dtype="float32", device="cpu")
    direct = evaluate_perplexity(model, tok, text, seqlen=128, max_windows=3, bos_id=1, progress=False)
    assert base["ppl"] == pytest.approx(direct["ppl"], rel=1e-6) and base["n_tokens"] == 3 * 127
    # quality is monotone in the bit width: 8-bit is much closer to the unquantized model than 4-bit
    assert q4["ppl"] > 1.5 * base["ppl"]
    assert q8["kl"] < q4["kl"] and q8["top1"] > q4["top1"] and q8["ppl"] < q4["ppl"]
    assert 0 < q8["kl"] and 0 < q4["top1"] < 1
    assert q4["ppl_ratio"] == pytest.approx(q4["ppl"] / base["ppl"]) and base["ppl_ratio"] == 1.0
    assert report["monotone"] is True  # w4 then w8: each row closer than the one before

    md = (out / "table.md").read_text()
    assert "| unquantized |" in md and "| w8a8kv8 | RTN |" in md and f"{q4['ppl']:.3f}" in md
    assert json.loads((out / "table.json").read_text())["rows"][1]["ppl"] == q4["ppl"]
    assert (out / "table.png").read_bytes().startswith(PNG_MAGIC)

    # rerun with one recipe changed: only that row is recomputed, the others are read back unchanged
    r6 = _recipe_with_width(tmp_path, 6)
    again = run_table(_settings(out, stories260k_path, [r4, r6], source=text))
    assert [r["cached"] for r in again["rows"]] == [True, True, False]
    assert len(count_quantize) == 3
    assert again["rows"][1]["ppl"] == q4["ppl"]
    assert q8["kl"] < again["rows"][2]["kl"] < q4["kl"]
    assert "whole row (unchanged)" in (out / "table.md").read_text()


def test_table_without_any_text_reports_kl(tmp_path, stories260k_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a hub-only source that cannot be loaded here
    settings = _settings(tmp_path / "out", stories260k_path, [_recipe_with_width(tmp_path, 4)],
                         source="hf:roneneldan/TinyStories", split="test", sample_eval_n=2, sample_seqlen=48,
                         plot=False)
    report = run_table(settings)
    assert report["mode"] == "sampled"
    base, q4 = report["rows"]
    assert "ppl" not in q4 and q4["kl"] > 0 and 0 < q4["top1"] < 1 and q4["n_windows"] == 2
    md = (tmp_path / "out" / "table.md").read_text()
    assert "No text source was available" in md and "not perplexity" in md and "perplexity |" not in md
    assert not (tmp_path / "out" / "table.png").exists()
    # the sampled sequences are stored and reused: a rerun gives the same row without recomputing
    assert run_table(settings)["rows"][1] == {**q4, "cached": True}


def test_redirected_recipe_paths_and_labels(tmp_path):
    rot = load_recipe(resolve_recipe_path("w4a4kv4_gptq_rot"))
    moved = _redirect_outputs(rot, "rot", tmp_path, "abc", None)
    assert moved.gptq.checkpoint_dir == str(tmp_path / "checkpoints" / "abc" / "rot" / "gptq")
    assert moved.rotation_search.cache_path == str(tmp_path / "checkpoints" / "abc" / "rot" / "rotation.json")
    assert moved.gptq.nsamples == rot.gptq.nsamples and moved.selectors == rot.selectors
    assert rot.gptq.checkpoint_dir != moved.gptq.checkpoint_dir  # the loaded recipe itself is untouched
    sampled = _redirect_outputs(rot, "rot", tmp_path, "abc", ["some text"])
    assert sampled.gptq.dataset == ["some text"] and sampled.rotation_search.dataset == ["some text"]
    assert [method_label(load_recipe(p)) for p in default_recipe_paths()] == ["RTN", "GPTQ", "rotation + GPTQ"]
    assert method_label(load_recipe(resolve_recipe_path("w4a4kv4_gptq_learn"))) == "rotation + learned R2 + GPTQ"


def test_describe_reuse():
    info = {"swap": {"swapped": ["a"], "seconds": 0.1},
            "rotation_search": {"cache_used": True, "searched": False, "rounds_loaded": 2},
            "gptq": {"layers": 5, "loaded": [0, 1, 2], "computed": [3, 4], "resumed_at": 3},
            "custom": {"reused_blocks": [1, 2], "seconds": 1.0}}
    assert describe_reuse(info) == ("rotation: decision from cache; GPTQ: 3/5 layers from checkpoint; "
                                    "custom: reused_blocks=2")
    fresh = {"swap": {"swapped": []}, "gptq": {"layers": 5, "loaded": [], "resumed_at": 0},
             "rotation_search": {"cache_used": False, "searched": True}}
    assert describe_reuse(fresh) == "-"


def test_bad_recipe_name_is_a_clear_error(tmp_path):
    with pytest.raises(PtqError, match="neither a file nor a shipped recipe.*w4a4kv4"):
        resolve_recipe_path("w4a4kv3")


def test_table_command(tmp_path, stories260k_path, data_dir, capsys):
    from ptq.cli import main

    rc = main(["table", "--model", str(stories260k_path), "--recipes", str(_recipe_with_width(tmp_path, 4)),
                              "--source", _small_text(data_dir, tmp_path), "--seqlen", "64",
                              "--max-windows", "2", "--bos-windows", "--dtype", "float32", "--device", "cpu",
                              "--out", str(tmp_path / "o"), "--no-plot", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| unquantized |" in printed and "| w4a4kv4 | RTN |" in printed
    assert (tmp_path / "o" / "table.md").read_text() == printed


def test_table_command_reports_user_errors(tmp_path, capsys):
    from ptq.cli import main

    assert main(["table", "--recipes", "no_such_recipe", "--out", str(tmp_path)]) == 2
    assert "neither a file nor a shipped recipe" in capsys.readouterr().err


def _no_network(monkeypatch) -> list:
    from network_guard import refuse_network

    for var in ("PTQ_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return refuse_network(monkeypatch)


def test_quick_table_is_offline_and_the_cpu_default(tmp_path, stories260k_path, monkeypatch, capsys):
    import ptq.table as table_mod
    from ptq.cli import main

    attempts = _no_network(monkeypatch)
    monkeypatch.setattr(table_mod, "QUICK_BUDGET", table_mod.Budget(4, 64, 2, 64))  # stories260k-sized
    args = ["table", "--model", str(stories260k_path), "--recipes", "w4a4kv4", "w4a4kv4_gptq", "--seqlen", "64",
            "--max-windows", "2", "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "o"), "--no-plot",
            "--no-progress"]
    assert main(args[:1] + ["--quick"] + args[1:]) == 0
    assert not attempts, attempts  # the embedded texts and a local model: nothing asks the network
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("[ptq table] quick table (--quick): GPTQ calibration 4 x 64 tokens, rotation search 2 x 64 "
                      "tokens per trial; perplexity on the first 2 windows of 64 tokens")
    md = (tmp_path / "o" / "table.md").read_text()
    assert "Budget (the quick table" in md and "GPTQ calibration 4 x 64 tokens" in md
    assert "read from the copy embedded in ptq (wiki.test.raw.xz)" in md
    rows = json.loads((tmp_path / "o" / "table.json").read_text())["rows"]
    assert [r["n_windows"] for r in rows] == [2, 2, 2] and rows[2]["ppl"] > 0

    # without --quick on a CPU the quick table is the default; it is the same table, so every row is reused
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[ptq table] quick table (no CUDA device; --full for the recipes' own budget)")
    assert sum("unchanged, reusing" in line for line in err) == 0  # --no-progress: quiet, but the table says it
    assert (tmp_path / "o" / "table.md").read_text().count("whole row (unchanged)") == 3


def test_interrupted_table_keeps_rows_and_checkpoints(tmp_path, stories260k_path, data_dir, monkeypatch, capsys):
    """Ctrl-C in the middle of GPTQ: finished rows and GPTQ layers survive, and the rerun reuses both and says so."""
    import ptq.table as table_mod
    from ptq.cli import main
    from ptq.passes.checkpoint import CheckpointStore

    monkeypatch.setattr(table_mod, "QUICK_BUDGET", table_mod.Budget(4, 64, 2, 64))
    real_save = CheckpointStore.save_layer

    def save_then_interrupt(self, index, tensors):
        real_save(self, index, tensors)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_layer", save_then_interrupt)
    out = tmp_path / "o"
    args = ["table", "--quick", "--model", str(stories260k_path), "--recipes", "w4a4kv4", "w4a4kv4_gptq",
            "--source", _small_text(data_dir, tmp_path), "--seqlen", "64", "--max-windows", "2", "--dtype", "float32",
            "--device", "cpu", "--out", str(out), "--no-plot"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"finished rows and checkpoints under {out} are kept" in err
    assert len(list((out / "rows").glob("*.json"))) == 2  # unquantized and RTN were finished

    monkeypatch.setattr(CheckpointStore, "save_layer", real_save)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[1/3] unquantized: unchanged, reusing" in err and "[2/3] w4a4kv4: unchanged, reusing" in err
    assert "[3/3] w4a4kv4_gptq: computing" in err
    md = (out / "table.md").read_text()
    assert "GPTQ: 2/5 layers from checkpoint" in md
