"""The recipe language: the users' recipe loads unchanged, shipped recipes round-trip, bad recipes are rejected
with messages naming the file and the key path."""

import warnings
from pathlib import Path

import pytest

from ptq.config import AttentionQuantConfig, LinearQuantConfig
from ptq.errors import RecipeError
from ptq.formats import QuantSpec
from ptq.recipe import Recipe, load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))

ATTN = r"model\.layers\.\d+\.self_attn$"
QKVO = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"

ISSUE_RECIPE = r"""by = "regex_name"

[gptq]
model_name = "unsloth/Llama-3.2-1B"
format = "mxint"
dataset = "wikitext2"
nsamples = 32
seqlen = 512
cali_batch_size = 8
quantile_search = true
clip_search_y = true
checkpoint_dir = "tutorial_7_output/checkpoints/config_b_gptq"

[gptq.weight_config]
weight_block_size = 32
weight_width = 4

[rotation_search]
calib_nsamples = 32
calib_seqlen = 512
improvement_eps = 0.0
cache_path = "tutorial_7_output/checkpoints/config_c_rotsearch/rotation_decisions.json"

['model\.layers\.\d+\.self_attn$']
name = "mxint"

['model\.layers\.\d+\.self_attn$'.qk_matmul]
bypass = true

['model\.layers\.\d+\.self_attn$'.av_matmul]
bypass = true

['model\.layers\.\d+\.self_attn$'.kv_cache]
data_in_block_size = 32
data_in_width = 4

['model\.layers\.\d+\.self_attn$'.softmax]
bypass = true

['model\.layers\.\d+\.self_attn$'.rope]
bypass = true

['model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = 32
data_in_width = 4
gptq = true

['model\.layers\.\d+\.mlp\.(gate|up|down)_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = 32
data_in_width = 4
gptq = true
"""

MXINT4 = QuantSpec.mxint(4, block_size=32)
W4A4_GPTQ = LinearQuantConfig(weight=MXINT4, data_in=MXINT4, gptq=True)
W4A4 = LinearQuantConfig(weight=MXINT4, data_in=MXINT4)
KV4 = AttentionQuantConfig(kv_cache=MXINT4)


def test_issue_recipe_loads_unchanged(tmp_path):
    path = tmp_path / "issue.toml"
    path.write_text(ISSUE_RECIPE)
    r = load_recipe(path)
    assert r.by == "regex_name"
    g = r.gptq
    assert (g.model_name, g.format, g.dataset, g.nsamples, g.seqlen, g.cali_batch_size) == (
        "unsloth/Llama-3.2-1B", "mxint", "wikitext2", 32, 512, 8)
    assert g.quantile_search is True and g.clip_search_y is True
    assert g.checkpoint_dir == "tutorial_7_output/checkpoints/config_b_gptq"
    assert (g.weight_config.weight_block_size, g.weight_config.weight_width) == (32, 4)
    rs = r.rotation_search
    assert (rs.calib_nsamples, rs.calib_seqlen, rs.improvement_eps) == (32, 512, 0.0)
    assert rs.cache_path == "tutorial_7_output/checkpoints/config_c_rotsearch/rotation_decisions.json"
    assert [s.key for s in r.selectors] == [ATTN, QKVO, MLP]
    assert [s.config for s in r.selectors] == [KV4, W4A4_GPTQ, W4A4_GPTQ]
    assert r.source == str(path.resolve())
    # the same text given directly (not as a path) gives an equal recipe
    assert load_recipe(ISSUE_RECIPE) == r


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_round_trip(path, tmp_path):
    r = load_recipe(path)
    text = save_recipe(r)
    assert "extends" not in text
    again = load_recipe(text)
    assert again == r
    out = tmp_path / "saved.toml"
    assert save_recipe(r, out) == text
    assert out.read_text() == text and load_recipe(out) == r
    assert not [p for p in tmp_path.iterdir() if p.name != "saved.toml"]  # no temp file left behind


def test_shipped_recipes_expected_values():
    assert len(SHIPPED) >= 3
    rtn = load_recipe(RECIPES / "w4a4kv4.toml")
    gptq = load_recipe(RECIPES / "w4a4kv4_gptq.toml")
    rot = load_recipe(RECIPES / "w4a4kv4_gptq_rot.toml")
    issue = load_recipe(ISSUE_RECIPE)
    assert rtn.gptq is None and rtn.rotation_search is None
    assert [s.config for s in rtn.selectors] == [KV4, W4A4, W4A4]
    # extends keeps the base's selector order and sets gptq = true inside the same tables; the shipped recipes select
    # by role, the issue's recipe by Llama module names: same configs in the same order
    assert rtn.by == gptq.by == rot.by == "role" and issue.by == "regex_name"
    assert [s.config for s in gptq.selectors] == [s.config for s in issue.selectors]
    assert [s.config for s in rot.selectors] == [s.config for s in issue.selectors]
    assert gptq.rotation_search is None
    g = gptq.gptq
    assert (g.dataset, g.nsamples, g.seqlen, g.cali_batch_size, g.format) == ("wikitext2", 128, 2048, 8, "mxint")
    assert g.quantile_search and g.clip_search_y and g.checkpoint_dir == "ptq_output/checkpoints/gptq"
    assert rot.gptq == gptq.gptq
    assert rot.rotation_search.cache_path == "ptq_output/checkpoints/rotation/decisions.json"
    mxfp4 = load_recipe(RECIPES / "mxfp4.toml")
    assert mxfp4.selectors[0].config == LinearQuantConfig(weight=QuantSpec.mxfp("e2m1"), data_in=QuantSpec.mxfp("e2m1"))
    nv = load_recipe(RECIPES / "nvfp4.toml")
    assert nv.selectors[0].config == LinearQuantConfig(weight=QuantSpec.nvfp4(), data_in=QuantSpec.nvfp4())


def test_role_recipes_resolve_like_name_recipes_on_llama(stories260k):
    """On a Llama the role selectors pick exactly the modules the Llama-name selectors pick, with the same configs."""
    model, _ = stories260k
    by_role = load_recipe(RECIPES / "w4a4kv4_gptq.toml").resolve(model, strict=True)
    by_name = load_recipe(ISSUE_RECIPE).resolve(model, strict=True)
    assert by_role == by_name and len(by_role) == 5 * (1 + 4 + 3)


def test_mase_dict_form_equals_toml():
    mase = {
        "by": "name",
        "default": {"config": {"name": None}},
        "gptq": {"format": "mxint", "nsamples": 32, "seqlen": 512, "weight_config": {"weight_width": 4}},
        QKVO: {"config": {"name": "mxint", "weight_width": 4, "weight_block_size": 32, "data_in_width": 4,
                          "data_in_block_size": 32, "gptq": True}},
    }
    toml = f"""
[gptq]
format = "mxint"
nsamples = 32
seqlen = 512
[gptq.weight_config]
weight_width = 4
['{QKVO}']
name = "mxint"
weight_width = 4
data_in_width = 4
gptq = true
"""
    a, b = load_recipe(mase), load_recipe(toml)
    assert a == b and a.by == "regex_name"
    assert a.selectors[0].config == W4A4_GPTQ
    assert load_recipe(save_recipe(a)) == a


def test_spellings_and_defaults():
    r = load_recipe("""
['a']
name = "mxfp"
weight_format = "e2m1"
['b']
name = "mxfp"
weight_exponent_width = 2
weight_frac_width = 1
weight_width = 4
['c']
name = "nvfp4"
weight_width = 4
['d']
name = "int"
weight_width = 8
weight_symmetric = false
['e']
name = "mx6"
data_in_width = 5
data_in_rounding = "nearest"
['f']
name = "mxint"
bias_width = 8
weight_width = 4
weight_block_size = 16
weight_scale_rule = "ceil"
weight_rounding = "stochastic"
weight_seed = 3
['g']
bypass = true
name = "mxint"
weight_width = 4
""")
    c = {s.key: s.config for s in r.selectors}
    assert c["a"] == c["b"] == LinearQuantConfig(weight=QuantSpec.mxfp("e2m1", block_size=32))
    assert c["c"].weight == QuantSpec.nvfp4()
    assert c["d"].weight == QuantSpec.int_(8, block_size=128, symmetric=False)
    assert c["e"].data_in == QuantSpec.mx6(rounding="nearest") and c["e"].data_in.block_size == 16
    assert c["f"] == LinearQuantConfig(weight=QuantSpec.mxint(4, block_size=16, scale_rule="ceil",
                                                              rounding="stochastic", seed=3),
                                       bias=QuantSpec.mxint(8, block_size=32))
    assert c["g"] is None and r.selectors[-1].bypass
    assert r.selectors[0] != r.selectors[1]  # different patterns
    assert load_recipe(save_recipe(r)) == r


def test_equality_ignores_source_and_model_copy_saves(tmp_path):
    a = load_recipe(RECIPES / "w4a4kv4_gptq.toml")
    b = load_recipe(save_recipe(a))
    assert a.source != b.source and a == b
    moved = a.model_copy(update={"gptq": a.gptq.model_copy(update={"checkpoint_dir": str(tmp_path / "ck")})})
    assert moved != a
    again = load_recipe(save_recipe(moved))
    assert again == moved and again.gptq.checkpoint_dir == str(tmp_path / "ck")


def test_extends_deep_merge_child_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.toml").write_text("""
['x']
name = "mxint"
weight_width = 4
data_in_width = 4
['y']
name = "mxint"
weight_width = 8
""")
    (tmp_path / "sub" / "child.toml").write_text("""
extends = "../base.toml"
['x']
weight_width = 6
['z']
name = "mxint"
data_in_width = 8
""")
    r = load_recipe(tmp_path / "sub" / "child.toml")
    assert [s.key for s in r.selectors] == ["x", "y", "z"]
    assert r.selectors[0].config == LinearQuantConfig(weight=QuantSpec.mxint(6), data_in=QuantSpec.mxint(4))


def _names(model):
    return [n for n, _ in model.named_modules() if n]


def test_resolve_first_match_wins(stories260k):
    model, _ = stories260k
    r = load_recipe(RECIPES / "w4a4kv4.toml")
    m = r.resolve(model)
    assert len(m) == 5 * (1 + 4 + 3)
    assert m["model.layers.3.self_attn"] == KV4
    assert m["model.layers.0.mlp.down_proj"] == W4A4
    assert "lm_head" not in m and "model.layers.0.mlp" not in m
    # an earlier bypass selector shadows the later ones for the modules it matches
    r2 = load_recipe(f"""
['model\\.layers\\.0\\..*_proj']
bypass = true
['{QKVO}']
name = "mxint"
weight_width = 4
""")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2 = r2.resolve(model)
    assert m2["model.layers.0.self_attn.q_proj"] == LinearQuantConfig()
    assert m2["model.layers.1.self_attn.q_proj"] == LinearQuantConfig(weight=MXINT4)
    assert m2["model.layers.0.mlp.up_proj"] == LinearQuantConfig()


def test_resolve_by_type(stories260k):
    model, _ = stories260k
    r = load_recipe('by = "type"\n[Linear]\nname = "mxint"\nweight_width = 4\n')
    m = r.resolve(model)
    assert set(m) == {n for n, mod in model.named_modules() if type(mod).__name__ == "Linear"}
    assert len(m) == 5 * 7 + 1  # lm_head is a Linear too


def test_resolve_unmatched_selector_warns_or_fails(stories260k):
    model, _ = stories260k
    r = load_recipe("['model\\.layers\\.\\d+\\.mlp\\.gate_projj']\nname = \"mxint\"\nweight_width = 4\n")
    with pytest.warns(UserWarning, match=r"matches no module name.*model\.layers\.\d\.mlp\.gate_proj"):
        assert r.resolve(model) == {}
    with pytest.raises(RecipeError, match=r"gate_projj'\].*Closest"):
        r.resolve(model, strict=True)
    shadowed = load_recipe("['.*proj']\nbypass = true\n['.*q_proj']\nname = \"mxint\"\nweight_width = 4\n")
    with pytest.raises(RecipeError, match=r"\['\.\*q_proj'\].*earlier selectors claim all"):
        shadowed.resolve(model, strict=True)


# ---- bad recipes: (id, recipe text, substrings the message must contain) ----------------------------------------
SEL = "['model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj']"
SELP = "'model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj'"
GOOD_LINEAR = 'name = "mxint"\nweight_width = 4\n'
GPTQ_TABLE = '[gptq]\nformat = "mxint"\n[gptq.weight_config]\nweight_width = 4\nweight_block_size = 32\n'

BAD = [
    ("toml-syntax", 'by = "regex_name"\n[gptq\nnsamples = 3\n', ["line 2", "TOML syntax"]),
    ("unknown-key", f"{SEL}\nname = \"mxint\"\nweight_widht = 4\n", [f"[{SELP}.weight_widht]", "weight_width"]),
    ("unknown-top", 'bye = "type"\n', ["[bye]", "Did you mean 'by'"]),
    ("unknown-gptq-key", f"[gptq]\nnsample = 3\n{SEL}\n{GOOD_LINEAR}gptq = true\n",
     ["[gptq.nsample]", "nsamples"]),
    ("unknown-weight-config-key", '[gptq]\n[gptq.weight_config]\nweight_bits = 4\n',
     ["[gptq.weight_config.weight_bits]", "weight_width"]),
    ("wrong-type", f"{SEL}\nname = \"mxint\"\nweight_width = \"4\"\n", [f"[{SELP}.weight_width]", "integer"]),
    ("wrong-type-bool", f"{SEL}\nname = \"mxint\"\nweight_width = 4\nweight_block_size = true\n",
     [f"[{SELP}.weight_block_size]", "integer"]),
    ("wrong-type-gptq", f"[gptq]\nnsamples = \"32\"\n{SEL}\n{GOOD_LINEAR}gptq = true\n", ["[gptq.nsamples]"]),
    ("bad-regex", "['model\\.(q']\nname = \"mxint\"\nweight_width = 4\n",
     ["['model\\.(q']", "invalid regular expression"]),
    ("width-range", f"{SEL}\nname = \"mxint\"\nweight_width = 9\n", [f"[{SELP}.weight_width]", "2..8"]),
    ("block-range", f"{SEL}\nname = \"mxint\"\nweight_width = 4\nweight_block_size = 1\n",
     [f"[{SELP}.weight_block_size]", ">= 2"]),
    ("knob-family", f"{SEL}\nname = \"mxint\"\nweight_width = 4\nweight_exponent_width = 2\n",
     [f"[{SELP}.weight_exponent_width]", "only to 'mxfp'"]),
    ("scale-rule-family", f"{SEL}\nname = \"int\"\nweight_width = 4\nweight_scale_rule = \"ceil\"\n",
     [f"[{SELP}.weight_scale_rule]"]),
    ("symmetric-family", f"{SEL}\nname = \"mxint\"\nweight_width = 4\nweight_symmetric = false\n",
     [f"[{SELP}.weight_symmetric]"]),
    ("unknown-family", f"{SEL}\nname = \"mxin\"\nweight_width = 4\n", [f"[{SELP}.name]", "Did you mean 'mxint'"]),
    ("nvfp4-width", f"{SEL}\nname = \"nvfp4\"\nweight_width = 8\n", [f"[{SELP}.weight_width]", "4-bit"]),
    ("nvfp4-block", f"{SEL}\nname = \"nvfp4\"\nweight_width = 4\nweight_block_size = 32\n",
     [f"[{SELP}.weight_block_size]"]),
    ("mxfp-no-format", f"{SEL}\nname = \"mxfp\"\nweight_width = 4\n", [f"[{SELP}.weight_exponent_width]",
                                                                       "weight_format"]),
    ("mxfp-width-mismatch", f"{SEL}\nname = \"mxfp\"\nweight_format = \"e4m3\"\nweight_width = 4\n",
     [f"[{SELP}.weight_width]", "E4M3"]),
    ("stochastic-no-seed", f"{SEL}\nname = \"mxint\"\nweight_width = 4\nweight_rounding = \"stochastic\"\n",
     [f"[{SELP}.weight_rounding]", "seed"]),
    ("no-family", f"{SEL}\nweight_width = 4\n", [f"[{SELP}.weight_width]", "name = \"mxint\""]),
    ("knob-without-width", f"{SEL}\nname = \"mxint\"\nweight_block_size = 32\n",
     [f"[{SELP}.weight_block_size]", "weight_width"]),
    ("quantizes-nothing", f"{SEL}\nname = \"mxint\"\n", [f"[{SELP}]", "quantizes nothing"]),
    ("gptq-without-table", f"{SEL}\n{GOOD_LINEAR}gptq = true\n", [f"[{SELP}.gptq]", "no [gptq] table"]),
    ("gptq-no-weights", f"{GPTQ_TABLE}{SEL}\nname = \"mxint\"\ndata_in_width = 4\ngptq = true\n",
     [f"[{SELP}.gptq]", "weights are not quantized"]),
    ("gptq-unused", f"{GPTQ_TABLE}{SEL}\n{GOOD_LINEAR}", ["[gptq] the table is present", "no selector sets gptq = true"]),
    ("gptq-weight-config", f"[gptq]\n[gptq.weight_config]\nweight_width = 8\n{SEL}\n{GOOD_LINEAR}gptq = true\n",
     ["[gptq.weight_config.weight_width]", "weight_width = 4"]),
    ("gptq-weight-config-block", f"[gptq]\n[gptq.weight_config]\nweight_block_size = 16\n{SEL}\n{GOOD_LINEAR}"
     "gptq = true\n", ["[gptq.weight_config.weight_block_size]"]),
    ("gptq-format", f"[gptq]\nformat = \"mxfp\"\n{SEL}\n{GOOD_LINEAR}gptq = true\n", ["[gptq.format]", "'mxint'"]),
    ("rotation-kind", "[rotation_search]\nkind = \"diag\"\n", ["[rotation_search.kind]"]),
    ("rotation-range", "[rotation_search]\ncalib_nsamples = 0\n", ["[rotation_search.calib_nsamples]"]),
    ("by-value", 'by = "regex"\n', ["[by]", "regex_name"]),
    ("mixed-attention-linear", "['attn']\nname = \"mxint\"\nweight_width = 4\n['attn'.kv_cache]\n"
     "data_in_width = 4\n", ["[attn.weight_width]", "Split it"]),
    ("subtable-unknown-key", "['attn']\nname = \"mxint\"\n['attn'.kv_cache]\ndata_in_widht = 4\n",
     ["[attn.kv_cache.data_in_widht]", "data_in_width"]),
    ("subtable-nothing", "['attn']\nname = \"mxint\"\n['attn'.softmax]\nname = \"mxint\"\n",
     ["[attn.softmax]", "bypass = true"]),
    ("subtable-no-family", "['attn'.kv_cache]\ndata_in_width = 4\n", ["[attn.kv_cache.data_in_width]", "name"]),
    ("typo-gptq-table", "[gtpq]\nnsamples = 3\n", ["[gtpq.nsamples]", "[gptq]"]),
    ("selector-not-table", "['a'.kv_cache]\nbypass = true\n['b']\nname = 3\n", ["[b.name]", "string"]),
    ("bypass-type", f"{SEL}\nbypass = \"yes\"\n", [f"[{SELP}.bypass]", "true or false"]),
    ("extends-type", "extends = 3\n", ["[extends]"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_recipe_rejected_with_key_path(case, tmp_path):
    _, text, needles = case
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert str(path.resolve()) in msg or str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"


def test_bad_extends_cycle_and_missing(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match=r"\[extends\] extends cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_recipe(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(RecipeError, match=r"c\.toml: \[extends\] recipe file not found: .*nope\.toml"):
        load_recipe(tmp_path / "c.toml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "no_suffix"))  # a one-line string is a path, not TOML text
    assert load_recipe("") == load_recipe("\n") == Recipe()  # empty TOML text: no selectors


def test_bad_mase_default_and_dict_errors():
    with pytest.raises(RecipeError, match=r"\[default\].*explicit selector"):
        load_recipe({"default": {"config": {"name": "mxint", "weight_width": 4}}})
    with pytest.raises(RecipeError, match=r"<recipe dict>: \[x\.weight_width\]"):
        load_recipe({"x": {"config": {"name": "mxint", "weight_width": 99}}})
    with pytest.raises(RecipeError, match="expected a path, TOML text"):
        load_recipe(42)


def test_recipe_is_frozen():
    r = load_recipe(RECIPES / "w4a4kv4.toml")
    with pytest.raises(Exception):
        r.by = "type"
    assert isinstance(r, Recipe) and hash(r) == hash(load_recipe(save_recipe(r)))


def test_selector_for_and_stale_raw_refused():
    r = load_recipe(RECIPES / "w4a4kv4.toml")
    assert r.selector_for("model.layers.7.mlp.up_proj", role="layers.7.up").config == W4A4
    assert r.selector_for("model.layers.7.self_attn", role="layers.7.attention").config == KV4
    assert r.selector_for("model.layers.7.self_attn.q_norm", role=None) is None  # no role: never matched by role
    assert r.selector_for("lm_head", role="lm_head") is None
    r = load_recipe(ISSUE_RECIPE)
    assert r.selector_for("model.layers.7.mlp.up_proj").config == W4A4_GPTQ
    with pytest.raises(RecipeError, match="type_name"):
        load_recipe('by = "type"\n[Linear]\nname = "mxint"\nweight_width = 4\n').selector_for("x")
    # a Selector edited in code so that its raw table no longer says what its config says cannot be saved silently
    from ptq.recipe import Selector

    r = load_recipe(RECIPES / "w4a4kv4.toml")
    sel = r.selectors[1]
    edited = r.model_copy(update={"selectors": (Selector(sel.pattern, W4A4_GPTQ, sel.raw),)})
    with pytest.raises(RecipeError, match="round trip"):
        save_recipe(edited)
