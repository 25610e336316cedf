"""The GPTQ recipe the GPTQ tests share: the shipped W4A4KV4 recipe with GPTQ on every decoder matmul (by role)."""

import json
import textwrap
from pathlib import Path

SHIPPED_RTN = Path(__file__).resolve().parents[1] / "recipes" / "w4a4kv4.toml"


def gptq_recipe_text(checkpoint_dir=None, **settings) -> str:
    """TOML text: ``settings`` as the [gptq] table (plus ``checkpoint_dir`` when given), MXINT4 weight_config."""
    if checkpoint_dir:
        settings["checkpoint_dir"] = str(checkpoint_dir)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f"extends = {json.dumps(str(SHIPPED_RTN))}\n[gptq]\n{lines}\n" + textwrap.dedent("""\
        [gptq.weight_config]
        weight_block_size = 32
        weight_width = 4
        ['layers\\.\\d+\\.(q|k|v|qkv|o)']
        gptq = true
        ['layers\\.\\d+\\.(gate|up|gate_up|down|experts)']
        gptq = true
        """)
