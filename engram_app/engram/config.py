"""Configuration of an Engram memory: where it sits, how it addresses, how big it is.

:class:`EngramConfig` is a PEFT ``PeftConfig`` (``peft_type`` "ENGRAM"): it is what
``adapter_config.json`` holds, what ``get_peft_model(model, EngramConfig(...))`` takes, and what
``PeftConfig.from_pretrained(folder)`` returns for an Engram adapter folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peft import PeftConfig

from .registration import ENGRAM, add_peft_type

FORMAT_VERSION = 2  # 1: the pre-PEFT folder layout (io.py still reads it); 2: a PEFT adapter folder
STORAGES = ("memory", "mapped")
TABLE_DIR = "table"  # a mapped table's rows, beside adapter_config.json
RUNTIME_FIELDS = ("tokenizer",)  # fields that hold live objects: never saved, never compared
# Fields saved only when they differ from this default.
OPTIONAL_FIELDS = {"compression_strip": False, "skip_template": False, "template_ids": None, "depth": None}


@dataclass
class EngramConfig(PeftConfig):
    """Everything that determines an Engram memory's shape and addressing.

    Two memories with equal configs attached to the same base model address the same rows for
    the same tokens, so a saved memory is reproduced exactly from this config and its weights.
    """

    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "PEFT task type: Engram adapts causal LMs."})
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based decoder blocks that receive memory at their start. None: the block `depth` names, "
                          "or without it the 2nd block (index 1), as the paper found best for a single module."},
    )
    depth: float | None = field(
        default=None,
        metadata={"help": "with layers None: the memory sits at the block this fraction of the way through the model "
                          "(block int(depth x blocks); 0.5: block 15 of SmolLM2's 30), resolved into `layers` when "
                          "attaching. The size presets set 0.5: a middle block's hidden state, which the gate reads, "
                          "already holds the question, and a personal memory there recalls far more of what it was "
                          "taught when asked in new words (docs/BENCHMARKS.md, stop 38). None (saved only when set): "
                          "block 1, so earlier memories keep their place."},
    )
    orders: tuple[int, ...] = field(
        default=(2, 3), metadata={"help": "n-gram orders; each n-gram ends at (and includes) the current token."}
    )
    heads: int = field(default=8, metadata={"help": "hash heads per order (K); heads differ only by their prime modulus."})
    rows_per_head: int = field(
        default=32_749,
        metadata={"help": "rows of each (order, head) table; the actual size is the next unused prime at or above."},
    )
    head_dim: int = field(default=32, metadata={"help": "width d_h of each retrieved row; the memory width is orders*heads*d_h."})
    kernel_size: int = field(default=4, metadata={"help": "kernel of the causal depthwise convolution."})
    use_conv: bool = field(default=True, metadata={"help": "apply the short convolution (the paper found it helps a little)."})
    init_std: float = field(default=0.02, metadata={"help": "std of the N(0, std) table initialisation (0: zeros)."})
    seed: int = field(default=0, metadata={"help": "seed of the hash multipliers (layer l uses seed + 10007*l)."})
    table_lr_scale: float = field(default=5.0, metadata={"help": "table learning rate as a multiple of the base rate."})
    storage: str = field(
        default="memory",
        metadata={"help": "where the table's rows live: 'memory' (all rows in RAM or on the GPU) or 'mapped' (only "
                          "written rows, in files mapped from disk: for tables larger than RAM)."},
    )
    target_modules: str | None = field(
        default=None,
        metadata={"help": "the module that owns the decoder blocks (the backbone): found when attaching, kept for "
                          "reference. The memory's hooks sit on it and on the chosen blocks."},
    )
    base_model_fingerprint: dict | None = field(
        default=None,
        metadata={"help": "what a saved memory checks before loading: the base model's sizes, a hash of its "
                          "embeddings' signs and of its tokenizer's vocabulary. Filled when attaching."},
    )
    compression_strip: bool = field(
        default=False,
        metadata={"help": "token compression also strips surrounding whitespace (\" the\" and \"the\" share an id), "
                          "as DeepSeek's reference code does. Off by default here, so memories saved without it "
                          "keep their addressing (saved only when on); the app's size presets turn it on for new "
                          "packs (it recalled more on the persona bench)."},
    )
    skip_template: bool = field(
        default=False,
        metadata={"help": "n-grams skip the chat template's own tokens (turn markers, role names), reaching back to "
                          "the words before them: the first token of a reply is then keyed on the last words of the "
                          "user's message instead of on the constant assistant header. Off by default (saved only "
                          "when on), so earlier memories keep their addressing; the size presets leave it off "
                          "(docs/BENCHMARKS.md, stop 29)."},
    )
    template_ids: list[int] | None = field(
        default=None,
        metadata={"help": "with skip_template: the token ids the n-grams skip, each given a canonical id of its "
                          "own; found from the tokenizer's chat template when attaching (None), and saved."},
    )
    format_version: int = FORMAT_VERSION
    tokenizer: Any = field(
        default=None, repr=False, compare=False,
        metadata={"help": "runtime only, never saved: the base model's tokenizer, which defines the memory's "
                          "token compression. Not needed when loading a saved memory (the map is in its weights)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type(ENGRAM)
        if self.format_version < FORMAT_VERSION:
            raise ValueError(
                f"This Engram memory was saved by an earlier Engram Studio (format {self.format_version}), before it "
                "was a PEFT adapter: load it with engram_app.engram.load_engram(model, tokenizer, folder), or "
                "write a PEFT copy with `python -m engram_app pack export --format peft DIR`."
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this memory was saved by a newer version (format {self.format_version}, this code reads "
                f"{FORMAT_VERSION}): update Engram Studio"
            )
        self.orders = tuple(sorted(set(int(n) for n in self.orders)))
        if not self.orders or self.orders[0] < 1:
            raise ValueError("orders must be positive n-gram lengths, e.g. (2, 3)")
        if self.heads < 1 or self.rows_per_head < 2 or self.head_dim < 1:
            raise ValueError("heads, rows_per_head and head_dim must be positive")
        if self.layers is not None:
            self.layers = sorted(set(int(x) for x in self.layers))
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, (int, float))
                                       or not 0 <= self.depth < 1):
            raise ValueError(f"depth must be a fraction of the model's blocks in [0, 1), not {self.depth!r}")
        if not isinstance(self.compression_strip, bool):
            raise ValueError(f"compression_strip must be true or false, not {self.compression_strip!r}")
        if not isinstance(self.skip_template, bool):
            raise ValueError(f"skip_template must be true or false, not {self.skip_template!r}")
        if self.template_ids is not None:
            if not isinstance(self.template_ids, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.template_ids):
                raise ValueError("template_ids must be a list of non-negative token ids")
            self.template_ids = sorted(set(self.template_ids))
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, not {self.storage!r}")
        # Live objects the tuner uses; attributes, not fields: never saved or compared.
        self._source: Path | None = None  # the local folder this config was read from (its weights, its table)
        self._table = None  # a table to attach instead of a new one (attach_engram(table=...))
        self._memory = None  # the memory this config describes, once attached (to save a mapped table)

    @property
    def max_order(self) -> int:
        return max(self.orders)

    @property
    def dilation(self) -> int:
        """The convolution's dilation: the largest n-gram order (3 by default)."""
        return self.max_order

    @property
    def memory_width(self) -> int:
        return len(self.orders) * self.heads * self.head_dim

    # --- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The saved fields (PEFT's and Engram's); runtime objects such as the tokenizer are left out.

        An optional field at its default is left out too, so a memory that does not use it saves
        the same config as before the field existed (and older versions, and pack checks that
        refuse unknown fields, still read it).
        """
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in RUNTIME_FIELDS}
        for name, default in OPTIONAL_FIELDS.items():
            if data[name] == default:
                del data[name]
        data["orders"] = list(self.orders)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EngramConfig:
        """A config from :meth:`to_dict` output, or from the Engram fields alone (as packs store them)."""
        known = {f.name for f in fields(cls)} - set(RUNTIME_FIELDS)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Engram config fields: {sorted(unknown)}")
        data = dict(data)
        if data.get("format_version", FORMAT_VERSION) < FORMAT_VERSION:
            data["format_version"] = FORMAT_VERSION  # the settings themselves did not change between formats
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __deepcopy__(self, memo: dict) -> EngramConfig:
        """A copy of the settings that shares the live tokenizer and source, and describes no memory yet."""
        copied = copy.copy(self)
        for f in fields(self):
            if f.name not in RUNTIME_FIELDS:
                setattr(copied, f.name, copy.deepcopy(getattr(self, f.name), memo))
        copied._memory = None
        return copied

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse, with what to do instead, the adapter_config.json of the pre-PEFT layout."""
        if "engram" in kwargs and "layers" not in kwargs:
            raise ValueError(
                "This Engram memory was saved by an earlier Engram Studio (format 1), before it was a PEFT adapter: "
                "load it with engram_app.engram.load_engram(model, tokenizer, folder), or write a PEFT copy with "
                "`python -m engram_app pack export --format peft DIR`."
            )
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> EngramConfig:
        """PEFT's loader, remembering the folder: a memory's compression map and mapped table are read from it.

        A Hub repository id is first downloaded whole (a mapped table lives in ``table/``, beside the
        files PEFT itself fetches).
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(str(pretrained_model_name_or_path), revision=kwargs.get("revision"),
                                                cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token")))
            except Exception:  # not a reachable repository either: PEFT's own message says what is missing
                return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = folder / subfolder if subfolder else folder
        config = super().from_pretrained(str(folder), **{k: v for k, v in kwargs.items() if k != "revision"})
        config._source = folder
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json``, and the rows of a mapped table into ``table/`` beside it.

        PEFT writes tensors into ``adapter_model.safetensors`` from RAM; a mapped table (larger than
        RAM) is copied instead a block of rows at a time, in its own format (storage.py).
        ``table_delta``: write only the rows changed since the table was opened (checkpoints).
        """
        delta = bool(kwargs.pop("table_delta", False))
        super().save_pretrained(str(save_directory), **kwargs)
        memory = self._memory
        if memory is not None and memory.config.storage == "mapped":
            save_table(memory.table, Path(save_directory) / TABLE_DIR, delta)


def save_table(table, folder: Path, delta: bool = False) -> Path:
    """Write a mapped ``table`` to ``folder`` under a temporary name, then rename it into place."""
    from .io import replace_folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        table.save(tmp / "rows", delta=delta)
        os.replace(tmp / "rows", tmp / "ready")
        replace_folder(tmp / "ready", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
