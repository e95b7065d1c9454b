"""The model card (``README.md``) of an adapter folder, so it can be shared or pushed to the Hub as is.

It states only facts about the adapter: the base model, its size and shape, how many sources of
each kind it learned from, and how to load it. Never any text the memory was trained on, nor the
names of the sources. The YAML front matter is the Hub's model-card metadata
(``huggingface_hub.ModelCardData``): ``library_name: peft``, ``base_model`` (when the base model
is a Hub id), tags.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from .config import TABLE_DIR

CARD_NAME = "README.md"
KIND_NAMES = {"document": ("document", "documents"), "chat": ("chat history", "chat histories"),
              "profile": ("profile", "profiles")}


def write_model_card(folder: str | Path, base_model: str, source_kinds: dict[str, int],
                     hub_id: str | None = None) -> Path:
    """Write ``folder/README.md`` for the adapter(s) in ``folder`` (Engram at the root, LoRA at the
    root or in ``lora/``); ``source_kinds``: {"document": 2, "profile": 1, ...}."""
    folder = Path(folder)
    data = ModelCardData(library_name="peft", base_model=hub_id, pipeline_tag="text-generation",
                         tags=["peft", "engram", "memory"] if _is_engram(folder) else ["peft", "lora"])
    body = "\n".join(_body(folder, base_model, source_kinds))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    card.save(folder / CARD_NAME)
    return folder / CARD_NAME


def _is_engram(folder: Path) -> bool:
    config = folder / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") == "ENGRAM"


def _body(folder: Path, base_model: str, source_kinds: dict[str, int]) -> list[str]:
    engram = _is_engram(folder)
    lora = folder / "lora" if (folder / "lora" / "adapter_config.json").is_file() else (None if engram else folder)
    lines = [f"# {'Engram memory' if engram else 'LoRA adapter'} for {base_model}", ""]
    if engram:
        lines += ["An [Engram](https://arxiv.org/abs/2601.07372) memory trained with Engram Studio: hashed n-gram "
                  "tables read at the start of chosen decoder blocks of the frozen base model, gated by its hidden "
                  "state. It is a PEFT adapter (`peft_type` \"ENGRAM\").", ""]
    lines += ["## What it is", "", f"- Base model: `{base_model}`"]
    if engram:
        lines += _engram_facts(folder)
    if lora is not None:
        lines += _lora_facts(lora, "" if lora == folder else " (in `lora/`)")
    lines += [f"- Files: {_size(folder)}", f"- Learned from: {_kinds(source_kinds)}", "",
              "The folder holds weights and settings, not the texts the memory learned from (though the weights can "
              "make the model recall them).", "",
              "## How to load it", "", "```python"]
    if engram:
        lines += ["import engram_app.engram  # registers the Engram method with PEFT (Engram Studio)"]
    lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base_model}")']
    if engram and lora is not None:
        lines += ['lora = PeftModel.from_pretrained(base, "path/to/this/folder", subfolder="lora")',
                  'PeftModel.from_pretrained(base, "path/to/this/folder")  # the memory, on the same model',
                  "model = lora  # runs the base model with both adapters"]
    else:
        subfolder = ', subfolder="lora"' if lora is not None and lora != folder else ""
        lines += [f'model = PeftModel.from_pretrained(base, "path/to/this/folder"{subfolder})']
    lines += ["```"]
    if engram:
        lines += ["", "Only one Engram memory fires at a time: `model.set_adapter(name)` switches between memories "
                      "loaded with `model.load_adapter(folder, adapter_name=name)`, and `with model.disable_adapter():` "
                      "gives the base model's own outputs."]
    return lines


def _engram_facts(folder: Path) -> list[str]:
    config = json.loads((folder / "adapter_config.json").read_text())
    shapes = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not key.endswith(".compression"):
                shapes[key] = f.get_slice(key).get_shape()
    dense = sum(_numel(shape) for key, shape in shapes.items() if ".table." not in key)
    if config["storage"] == "mapped":
        table = json.loads((folder / TABLE_DIR / "table.json").read_text())
        rows, dim, stored = table["rows"], table["dim"], f"{table['count']:,} rows written, stored in `table/`"
    else:
        [shape] = [shape for key, shape in shapes.items() if ".table." in key]
        (rows, dim), stored = shape, "in memory"
    orders = ", ".join(str(n) for n in config["orders"])
    return [f"- Memory: {rows * dim + dense:,} parameters: a table of {rows:,} rows x {dim} ({stored}) and "
            f"{dense:,} in its gates and convolution",
            f"- Shape: decoder blocks {config['layers']}, n-gram orders {orders}, {config['heads']} hash heads per "
            f"order, {config['rows_per_head']:,} rows per head"]


def _lora_facts(folder: Path, where: str) -> list[str]:
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = ", ".join(sorted(config.get("target_modules") or []))
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        count = sum(_numel(f.get_slice(key).get_shape()) for key in f.keys())
    return [f"- LoRA{where}: rank {config.get('r')}, alpha {config.get('lora_alpha')}, on {targets}: {count:,} parameters"]


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != CARD_NAME)
    return f"{total / 1e6:,.1f} MB"


def _kinds(source_kinds: dict[str, int]) -> str:
    parts = []
    for kind, count in sorted(source_kinds.items()):
        singular, plural = KIND_NAMES.get(kind, (kind, kind + "s"))
        parts.append(f"{count} {singular if count == 1 else plural}")
    return ", ".join(parts) or "no sources"
