"""Saving and loading a memory as an adapter folder (PEFT's folder conventions, no pickle).

    <folder>/adapter_config.json        {"peft_type": "ENGRAM", "format_version", "engram": {...},
                                          "base_model": fingerprint, "lora": bool}
    <folder>/adapter_model.safetensors  the memory's tensors (tables, projections, norms, conv)
    <folder>/table/                     the table's rows instead, when it is mapped from disk
                                        (``"storage": "mapped"``; format in storage.py)
    <folder>/lora/                      a PEFT LoRA adapter, when one was trained alongside

The folder is written under a temporary name and renamed into place, so an interrupted save
never leaves a folder that fails to load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from engram_app.engram.config import FORMAT_VERSION, EngramConfig
from engram_app.engram.model import EngramAttachError, EngramModel, base_fingerprint
from engram_app.engram.compression import tokenizer_fingerprint
from engram_app.engram.storage import MappedTable

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORA_DIR = "lora"
TABLE_DIR = "table"


def save_engram(memory: EngramModel, folder: str | Path, lora_model=None, delta: bool = False) -> Path:
    """Write ``memory`` (and optionally the PEFT LoRA adapter of ``lora_model``) to ``folder``.

    ``delta``: a mapped table writes only the rows changed since it was opened, referring to the
    folder it was opened from (for checkpoints; that folder must stay). In-memory tables ignore it.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in memory.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        if isinstance(memory.table, MappedTable):
            memory.table.save(tmp / TABLE_DIR, delta=delta)
        meta = {
            "peft_type": "ENGRAM",
            "format_version": FORMAT_VERSION,
            "engram": memory.config.to_dict(),
            "base_model": memory.fingerprint(),
            "lora": lora_model is not None,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if lora_model is not None:
            lora_model.save_pretrained(tmp / LORA_DIR)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished folder ``tmp`` to ``folder`` by renames, replacing what was there.

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
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise EngramAttachError(f"{folder} is not an Engram memory folder: {CONFIG_NAME} is missing.")
    meta = json.loads(path.read_text())
    if meta.get("peft_type") != "ENGRAM":
        raise EngramAttachError(f"{folder} holds a {meta.get('peft_type')!r} adapter, not an Engram memory.")
    return meta


def load_engram(base_model, tokenizer, folder: str | Path) -> EngramModel:
    """Attach the memory saved in ``folder`` to ``base_model``; refuses a different base model.

    A LoRA adapter saved alongside is not applied here: use :func:`load_lora` on the base model
    first (LoRA wraps the model), then this function on the same base model.
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    expected = meta["base_model"]
    actual = base_fingerprint(base_model, tokenizer_fingerprint(tokenizer))
    differences = [key for key in expected if expected[key] != actual.get(key)]
    if differences:
        details = ", ".join(f"{k}: saved {expected[k]!r}, this model {actual.get(k)!r}" for k in differences)
        raise EngramAttachError(
            f"The memory in {folder} was trained for another base model ({details}). Load it onto the model it "
            "was trained with, or train a new memory for this one."
        )
    config = EngramConfig.from_dict(meta["engram"])
    base_model.requires_grad_(False)
    table = None
    if config.storage == "mapped":
        try:
            table = MappedTable.open(folder / TABLE_DIR)
        except (OSError, ValueError) as exc:
            raise EngramAttachError(f"The memory table in {folder} cannot be read: {exc}") from None
    memory = EngramModel(base_model, tokenizer, config, table)
    tensors = load_file(folder / WEIGHTS_NAME, device=str(next(memory.parameters()).device))
    memory.load_state_dict(tensors, strict=True)
    return memory


def load_lora(base_model, folder: str | Path, trainable: bool = False):
    """Wrap ``base_model`` with the PEFT LoRA adapter saved in ``folder/lora`` (if there is one)."""
    from peft import PeftModel

    path = Path(folder) / LORA_DIR
    if not path.is_dir():
        return base_model
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)

