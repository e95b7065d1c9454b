"""What a new pack on a given base model needs from this machine, shown before it is created.

The size presets (sizes.py) say what the memory's tables need; this adds the base model: its
parameters and size on disk (models.py reads them without loading a weight), the RAM to train
(the fp32 weights plus the tables' training share), the GPU memory when there is a GPU (the bf16
weights plus the table), and the free disk under the data root. A Hugging Face id that is not in
the local cache is not looked up: it is said to be downloaded on first use.
"""

from __future__ import annotations

from pathlib import Path

from engram_app.errors import EngramError
from engram_app.models import model_facts
from engram_app.training.sizes import MODEL_RAM, PRESETS, human, machine

WHERE = {
    "converted": "converted under the data root",
    "gguf": "a GGUF file, converted once on first use",
    "folder": "a local folder",
    "cached": "in the Hugging Face cache",
}
DOWNLOAD = "will be downloaded from Hugging Face on first use (needs internet)"


def model_needs(model: str | None, size: str, home: Path, models_dir: Path, resources: dict | None = None) -> dict:
    """Bytes a pack of preset ``size`` on ``model`` needs, and what this machine has.

    ``ram_train``: fp32 weights + the tables' training share (without the activations, which grow
    with the batch); ``gpu``: bf16 weights + the table, only when a GPU is present. Parameters and
    bytes are None when unknown (a model still to be downloaded).
    """
    if size not in PRESETS:
        raise EngramError(f"Unknown size {size!r}: choose one of {', '.join(PRESETS)}.")
    facts = model_facts(model, models_dir)
    resources = resources if resources is not None else machine(home)
    preset = PRESETS[size].needs()
    tables_train = preset["ram_train"] - MODEL_RAM  # sizes.py counts a fixed model share: the real model's replaces it
    weights = 4 * facts.parameters if facts.parameters is not None else None
    gpu = None
    if resources.get("gpu") and facts.parameters is not None:
        gpu = 2 * facts.parameters + preset["gpu"]
    # A model not yet in the fp32 safetensors form the app loads is written once under <home>/models.
    disk_model = weights if facts.where == "gguf" else None
    return {
        "model": facts.source.location if facts.source.kind == "hub" else facts.source.name, "kind": facts.source.kind, "where": facts.where,
        "parameters": facts.parameters, "disk_bytes": facts.disk_bytes, "weights_fp32": weights,
        "tables_train": tables_train, "ram_train": None if weights is None else weights + tables_train,
        "gpu": gpu, "gpu_total": resources.get("gpu"), "disk_model": disk_model,
        "disk_free": resources.get("disk_free"), "ram": resources.get("ram"),
    }


def needs_summary(needs: dict) -> str:
    """The base model's part of what a new pack needs, in one line for people."""
    where = WHERE.get(needs["where"], needs["where"])
    if needs["parameters"] is None:
        text = (f"Model {needs['model']}: {DOWNLOAD}. RAM to train: its fp32 weights (4 bytes per parameter) + "
                f"~{human(needs['tables_train'])} for the memory's tables.")
    else:
        text = (f"Model {needs['model']} ({where}): {needs['parameters']:,} parameters, "
                f"{human(needs['disk_bytes'])} on disk. RAM to train: ~{human(needs['ram_train'])} (fp32 weights "
                f"{human(needs['weights_fp32'])} + the memory's tables {human(needs['tables_train'])}), plus activations.")
        if needs["ram"] is not None and needs["ram_train"] > needs["ram"]:
            text += f" This machine has {human(needs['ram'])} of RAM: too little to train it."
    if needs["gpu"] is not None:
        text += f" GPU: ~{human(needs['gpu'])} of {human(needs['gpu_total'])} (bf16 weights + the table)."
    if needs["disk_model"]:
        text += f" Converting it writes {human(needs['disk_model'])}."
    if needs["disk_free"] is not None:
        text += f" Disk free under the data root: {human(needs['disk_free'])}."
    return text
