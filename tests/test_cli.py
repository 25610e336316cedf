"""The ptq CLI, run in-process through main([...])."""

import json
from pathlib import Path

import pytest

from ptq.cli import build_parser, main
from ptq.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_help_for_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"validate", "quantize"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as ei:
            main([name, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: ptq {name}" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize("name", ["w4a4kv4.toml", "w4a4kv4_gptq.toml", "w4a4kv4_gptq_rot.toml"])
def test_validate_prints_selectors(name, capsys):
    assert main(["validate", str(RECIPES / name)]) == 0
    out = capsys.readouterr().out
    assert r"['layers\.\d+\.attention'] -> attention: kv_cache=MXINT4(block=32, axis=-1)" in out
    assert "linear: weight=MXINT4(block=32, axis=-1) data_in=MXINT4(block=32, axis=-1)" in out
    assert ("[gptq]: off" in out) == (name == "w4a4kv4.toml")
    assert ("[rotation_search]: off" in out) == (name != "w4a4kv4_gptq_rot.toml")


def test_validate_toml_round_trips(capsys):
    assert main(["validate", str(RECIPES / "w4a4kv4_gptq_rot.toml"), "--toml"]) == 0
    text = capsys.readouterr().out
    assert load_recipe(text) == load_recipe(RECIPES / "w4a4kv4_gptq_rot.toml")


def test_validate_bad_recipe_exit_1_no_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("['x']\nname = \"mxint\"\nweight_widht = 4\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "[x.weight_widht] unknown key" in err and "Did you mean 'weight_width'" in err
    assert "Traceback" not in err


def test_validate_with_model(stories260k_path, tmp_path, capsys):
    assert main(["validate", str(RECIPES / "w4a4kv4.toml"), "--model", str(stories260k_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.4.mlp.down_proj (Linear): linear: weight=MXINT4" in out
    assert "model.layers.0.self_attn (LlamaAttention): attention: kv_cache=MXINT4" in out
    assert "passes: swap" in out
    assert "coverage: 100.0% of the decoder's matmul weights quantized" in out
    assert "attention: 5 modules; quantized points: kv_cache 5/5" in out
    partial = tmp_path / "p.toml"  # only the attention projections: the MLP weights are left out
    partial.write_text('by = "role"\n' + "['layers\\.\\d+\\.(q|k|v|o)']\nname = \"mxint\"\nweight_width = 4\n")
    assert main(["validate", str(partial), "--model", str(stories260k_path)]) == 0
    assert "modules left out by role: gate: 5, up: 5, down: 5" in capsys.readouterr().err
    assert main(["validate", str(partial), "--model", str(stories260k_path), "--strict"]) == 1
    assert "strict mode" in capsys.readouterr().err
    unmatched = tmp_path / "u.toml"
    unmatched.write_text("['model\\.layers\\.\\d+\\.mlp\\.gate']\nname = \"mxint\"\nweight_width = 4\n")
    assert main(["validate", str(unmatched), "--model", str(stories260k_path)]) == 0
    assert "warning:" in capsys.readouterr().err
    assert main(["validate", str(unmatched), "--model", str(stories260k_path), "--strict"]) == 1
    assert "matches no module name" in capsys.readouterr().err


def test_quantize_writes_outputs(stories260k_path, tmp_path, capsys):
    pytest.importorskip("ptq.passes.swap")
    from safetensors.torch import load_file

    out = tmp_path / "out"
    rc = main(["quantize", "--model", str(stories260k_path), "--recipe", str(RECIPES / "w4a4kv4.toml"),
               "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "swap:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "model.safetensors", "recipe.toml"]
    assert load_recipe(out / "recipe.toml") == load_recipe(RECIPES / "w4a4kv4.toml")
    info = json.loads((out / "info.json").read_text())
    assert "swap" in info["passes"] and info["passes"]["swap"]["seconds"] > 0
    sd = load_file(out / "model.safetensors")
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd  # tied weights saved untied


def test_user_errors_exit_2(tmp_path, capsys):
    rc = main(["quantize", "--model", str(tmp_path), "--recipe", str(RECIPES / "w4a4kv4.toml")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ptq quantize: error:") and "no config.json" in err and "Traceback" not in err
    assert main(["quantize", "--model", str(tmp_path), "--recipe", str(tmp_path / "nope.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path), "--recipe", str(RECIPES / "w4a4kv4.toml"),
                 "--dtype", "int8"]) == 2
    assert "unknown dtype" in capsys.readouterr().err


def test_import_ptq_is_light():
    """`import ptq` (and so `ptq --help`) must not pull in torch or transformers; the lazy names still resolve."""
    import subprocess
    import sys

    code = ("import sys, ptq; heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import ptq

    for name in ("fake_quantize", "evaluate_perplexity", "export_quantized", "load_quantized"):
        assert callable(getattr(ptq, name)), name
    with pytest.raises(AttributeError):
        ptq.no_such_thing


def test_python_dash_m_ptq_is_the_ptq_command(tmp_path, capsys):
    import subprocess
    import sys

    from ptq.table import resolve_recipe_path

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    recipe = str(resolve_recipe_path("w4a4kv4"))
    run = subprocess.run([sys.executable, "-m", "ptq", "validate", recipe], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert main(["validate", recipe]) == 0
    assert run.stdout == capsys.readouterr().out
    bad = subprocess.run([sys.executable, "-m", "ptq", "table", "--recipes", "no_such_recipe", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "neither a file nor a shipped recipe" in bad.stderr
