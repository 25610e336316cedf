"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is done here, at collection
start, and only where there is no CUDA device (on the GPU machine the kernels run for real).
"""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "PTQ_DATA_DIR" not in os.environ and (SHARED / "data").is_dir():
    os.environ["PTQ_DATA_DIR"] = str(SHARED / "data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("PTQ_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("no data directory: set PTQ_DATA_DIR (e.g. ../shared/data)")
    return Path(d)


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    p = Path(os.environ.get("PTQ_STORIES260K", SHARED / "models" / "stories260k"))
    if not (p / "config.json").is_file():
        pytest.skip("stories260k not found: set PTQ_STORIES260K or place ../shared/models/stories260k")
    return p


@pytest.fixture
def stories260k(stories260k_path):
    """A fresh fp32 stories260k model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories260k_path)
    return model, tok


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test (printed, so a failure can be replayed)."""
    import random

    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
