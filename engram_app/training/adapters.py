"""A base model wearing a pack's adapters: an Engram memory, a LoRA adapter, or both.

One object for the three modes, so that training, evaluation and chat do not care which: it
knows what to call (``model``), what trains, how to switch everything off for a comparison, and
how to save itself as an adapter folder (atomically).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from engram_app.engram import (CONFIG_NAME, LORA_DIR, EngramModel, attach_engram, attach_lora, load_engram,
                               load_lora, save_engram)
from engram_app.atomic import new_folder
from engram_app.training.packs import PackConfig

LORA_ONLY_MARKER = "pack_version.json"


@dataclass
class Adapted:
    base: nn.Module  # the frozen base model
    model: nn.Module  # what to call: the PEFT wrapper when LoRA is on, else the base model
    memory: EngramModel | None
    lora: nn.Module | None  # the PeftModel

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The base model alone inside this block (memory and LoRA switched off)."""
        with contextlib.ExitStack() as stack:
            if self.memory is not None:
                stack.enter_context(self.memory.disabled())
            if self.lora is not None:
                stack.enter_context(self.lora.disable_adapter())
            yield

    def trainable_extra(self) -> list[nn.Parameter]:
        """Trainable parameters outside the Engram memory (LoRA's)."""
        if self.lora is None:
            return []
        return [p for n, p in self.lora.named_parameters() if p.requires_grad and "lora_" in n]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, folder: Path, checkpoint: bool = False) -> Path:
        """Write the adapters to ``folder`` (temporary name, then rename).

        ``checkpoint``: a mapped table writes only the rows changed since the version it was opened
        from (that version's folder is never removed while the job runs).
        """
        if self.memory is not None:
            return save_engram(self.memory, folder, lora_model=self.lora, delta=checkpoint)
        with new_folder(folder) as tmp:
            self.lora.save_pretrained(tmp / LORA_DIR)
            (tmp / LORA_ONLY_MARKER).write_text(json.dumps({"mode": "lora"}))
        return folder


def attach(base: nn.Module, tokenizer, config: PackConfig) -> Adapted:
    """Fresh adapters for ``config`` (identity at initialisation), ready to train."""
    base.requires_grad_(False)
    memory = attach_engram(base, tokenizer, config.engram_config()) if config.uses_engram else None
    lora = attach_lora(base, r=config.lora_r, alpha=2 * config.lora_r) if config.uses_lora else None
    return Adapted(base, lora if lora is not None else base, memory, lora)


def load(base: nn.Module, tokenizer, folder: Path, config: PackConfig, trainable: bool = False) -> Adapted:
    """The adapters saved in ``folder`` on ``base``; with ``trainable`` LoRA weights train further."""
    base.requires_grad_(False)
    folder = Path(folder)
    memory = load_engram(base, tokenizer, folder) if (folder / CONFIG_NAME).is_file() else None
    if memory is not None and trainable:
        memory.requires_grad_(True)
    lora = None
    if (folder / LORA_DIR).is_dir():
        lora = load_lora(base, folder, trainable=trainable)
    elif config.uses_lora and trainable:
        lora = attach_lora(base, r=config.lora_r, alpha=2 * config.lora_r)
    if memory is None and lora is None:
        raise FileNotFoundError(f"no adapter in {folder}")
    return Adapted(base, lora if lora is not None else base, memory, lora)
