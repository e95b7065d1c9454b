"""Saving and loading a memory as a PEFT adapter folder (no pickle).

    <folder>/adapter_config.json        an EngramConfig ("peft_type": "ENGRAM", base_model_name_or_path,
                                        the memory's settings and the base model's fingerprint)
    <folder>/adapter_model.safetensors  the memory's tensors under PEFT's keys
                                        (base_model.engram_memory.memories.*): tables, projections,
                                        norms, conv, and the token map (so loading needs no tokenizer)
    <folder>/table/                     the table's rows instead, when it is mapped from disk
                                        (``"storage": "mapped"``; format in storage.py)
    <folder>/lora/                      a PEFT LoRA adapter, when one was trained alongside

So ``PeftModel.from_pretrained(base_model, folder)`` loads it (once ``engram_app.engram`` is
imported), and :func:`load_engram` is that call plus the tokenizer check. The folder is written
under a temporary name and renamed into place, so an interrupted save never leaves a folder
that fails to load.

Folders written before Engram was a PEFT method (format 1: ``{"peft_type": "ENGRAM",
"format_version": 1, "engram": {...}, "base_model": {...}, "lora": bool}`` with the memory's own
state-dict keys) still load with :func:`load_engram`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .config import TABLE_DIR, EngramConfig
from .model import EngramAttachError, EngramModel
from .registration import ENGRAM
from .tuner import WEIGHTS_NAME, attach, bind

CONFIG_NAME = "adapter_config.json"
LORA_DIR = "lora"
__all__ = ["CONFIG_NAME", "LORA_DIR", "TABLE_DIR", "WEIGHTS_NAME", "load_engram", "load_lora", "read_adapter_config",
           "save_engram", "write_adapter"]


def save_engram(memory: EngramModel, folder: str | Path, lora_model=None, delta: bool = False) -> Path:
    """Write ``memory`` (and optionally the PEFT LoRA adapter of ``lora_model``) to ``folder``.

    ``delta``: a mapped table writes only the rows changed since it was opened, referring to the
    folder it was opened from (for checkpoints; that folder must stay). In-memory tables ignore it.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_adapter(memory, tmp, delta=delta)
        if lora_model is not None:
            lora_model.save_pretrained(tmp / LORA_DIR)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_adapter(memory: EngramModel, folder: Path, delta: bool = False) -> None:
    """The PEFT adapter files of ``memory`` in ``folder``: what ``PeftModel.save_pretrained`` writes for
    it (same keys, config and files), without PEFT's template model card."""
    peft_model, name = memory.peft_model, memory.adapter_name
    config: EngramConfig = peft_model.peft_config[name]
    state = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}, folder / WEIGHTS_NAME,
              metadata={"format": "pt"})
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = memory.base_model.__dict__.get("name_or_path") or None
    inference_mode, config.inference_mode = config.inference_mode, True
    try:
        config.save_pretrained(folder, table_delta=delta)
    finally:
        config.inference_mode = inference_mode


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished folder ``tmp`` to ``folder`` by renames, replacing what was there.

    The engine's own (it imports nothing from the app); the app's is ``engram_app/atomic.py``.

    At every moment ``folder`` is either the old complete folder, absent (between two renames,
    with the old one kept beside it as ``.<name>.old``), or the new complete folder.
    """
    os.chmod(tmp, 0o755)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def read_adapter_config(folder: str | Path) -> dict:
    """The raw ``adapter_config.json`` of an Engram memory folder (either format)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise EngramAttachError(f"{folder} is not an Engram memory folder: {CONFIG_NAME} is missing.")
    meta = json.loads(path.read_text())
    if meta.get("peft_type") != ENGRAM:
        raise EngramAttachError(f"{folder} holds a {meta.get('peft_type')!r} adapter, not an Engram memory.")
    return meta


def load_engram(base_model, tokenizer, folder: str | Path) -> EngramModel:
    """Attach the memory saved in ``folder`` to ``base_model``; refuses a different base model or tokenizer.

    A LoRA adapter saved alongside is not applied here: use :func:`load_lora` on the base model
    first (LoRA wraps the model), then this function on the same base model.
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    if "engram" in meta:
        return _load_format_1(base_model, tokenizer, folder, meta)
    config = EngramConfig.from_pretrained(folder)
    config.tokenizer = tokenizer
    base_model.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(base_model, str(folder), config=config, is_trainable=True)
    return bind(peft_model, "default")


def _load_format_1(base_model, tokenizer, folder: Path, meta: dict) -> EngramModel:
    """A memory saved before Engram was a PEFT method: the same settings, the memory's own keys."""
    config = EngramConfig.from_dict(meta["engram"])
    config.base_model_fingerprint = meta["base_model"]  # checked when attaching, as then
    config._source = folder  # a mapped table is in table/, as now
    memory = attach(base_model, tokenizer, config)
    tensors = load_file(folder / WEIGHTS_NAME, device=str(memory.compression.device))
    memory.load_state_dict(tensors, strict=True)
    return memory


def load_lora(base_model, folder: str | Path, trainable: bool = False):
    """Wrap ``base_model`` with the PEFT LoRA adapter saved in ``folder/lora`` (if there is one)."""
    path = Path(folder) / LORA_DIR
    if not path.is_dir():
        return base_model
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
