"""The tutorial's CPU version (tutorials/cpu_stories260k.py) runs end to end and shows what the tutorial claims."""

import runpy
from pathlib import Path

from ptq.recipe import load_recipe
from ptq.table import resolve_recipe_path

SCRIPT = Path(__file__).resolve().parents[1] / "tutorials" / "cpu_stories260k.py"


def test_cpu_tutorial_runs_and_each_technique_helps(tmp_path, stories260k_path, data_dir, capsys):
    script = runpy.run_path(str(SCRIPT), run_name="tutorial")
    report = script["main"](["--quick", "--out", str(tmp_path), "--model", str(stories260k_path), "--no-progress"])
    base, rtn, gptq, rot = report["rows"]
    assert [r["method"].split(" (")[0] for r in report["rows"]] == ["-", "RTN", "GPTQ", "rotation"]
    assert rot["method"].startswith("rotation (") and rot["method"].endswith(") + GPTQ")
    assert rot["rotations"], "the rotation search kept no rotation"
    # W4A4KV4 costs a 260K-parameter model a lot: every quantized row is far worse than the unquantized one ...
    assert 3 < base["ppl"] < 8
    assert all(r["ppl"] > 1.5 * base["ppl"] for r in (rtn, gptq, rot))
    # ... and each technique brings it closer: perplexity and KL fall, top-1 agreement rises, row after row
    assert rtn["ppl"] > gptq["ppl"] > rot["ppl"]
    assert rtn["kl"] > gptq["kl"] > rot["kl"] > 0
    assert rtn["top1"] < gptq["top1"] < rot["top1"] < 1
    assert report["monotone"] is True
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "table.md").read_text() and "| w4a4kv4_gptq_rot |" in printed
    assert (tmp_path / "table.png").is_file() and (tmp_path / "table.json").is_file()
    # the tutorial's recipes are the shipped ones with only the calibration changed
    for stem in ("w4a4kv4", "w4a4kv4_gptq", "w4a4kv4_gptq_rot"):
        small, shipped = load_recipe(tmp_path / "recipes" / f"{stem}.toml"), load_recipe(resolve_recipe_path(stem))
        assert small.selectors == shipped.selectors
        assert (small.gptq is None) == (shipped.gptq is None)
        assert (small.rotation_search is None) == (shipped.rotation_search is None)
