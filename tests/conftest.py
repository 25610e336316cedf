"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is done here, at collection
start, and only where there is no CUDA device (on the GPU machine the kernels run for real).
"""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Everything the tests read is in the repository: the texts embedded in ptq (ptq/_data) and the tiny model under
# tests/fixtures. PTQ_DATA_DIR / PTQ_STORIES260K (e.g. ../shared/data) still override them.


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory in the PTQ_DATA_DIR layout: $PTQ_DATA_DIR when set, else the embedded texts written out
    once per session (for tests that read the files themselves)."""
    d = os.environ.get("PTQ_DATA_DIR")
    if d:
        if not Path(d).is_dir():
            raise pytest.UsageError(f"PTQ_DATA_DIR={d} is not a directory")
        return Path(d)
    import lzma

    from ptq.data import _LOCAL_FILES, embedded_path

    root = tmp_path_factory.mktemp("embedded-data")
    for (source, split), rel in _LOCAL_FILES.items():
        target = root / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(lzma.decompress(embedded_path(source, split).read_bytes()))
    return root


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    p = Path(os.environ.get("PTQ_STORIES260K", FIXTURES / "stories260k"))
    if not (p / "config.json").is_file():
        raise pytest.UsageError(f"stories260k not found at {p} (PTQ_STORIES260K or tests/fixtures/stories260k)")
    return p


@pytest.fixture
def stories260k(stories260k_path):
    """A fresh fp32 stories260k model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories260k_path)
    return model, tok


@pytest.fixture
def one_thread():
    """Tiny models' ops gain nothing from threads, which only add contention on a busy 2-core runner; files opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test (printed, so a failure can be replayed)."""
    import random

    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
