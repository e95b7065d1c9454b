"""A pack version as a PEFT adapter folder with a model card, to share or push to the Hugging Face Hub.

A version folder is already a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, ``table/`` for mapped tables, ``lora/`` for LoRA) with a model card;
``pack export --format peft DIR`` writes a copy without what only this library means anything
to (the slot index, which names its sources), with ``base_model_name_or_path`` set to the base
model's Hub id when it has one. A LoRA-only pack's adapter goes to the folder's root. A version
saved before Engram was a PEFT method is converted (loaded onto its base model, written anew).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from engram_app.atomic import new_folder
from engram_app.engram import CARD_NAME, CONFIG_NAME, LORA_DIR, load_engram, write_adapter, write_model_card
from engram_app.errors import EngramError
from engram_app.models import BUNDLED_NAME, HUB_ID
from engram_app.training.packs import PackStore

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled GGUF is this model, converted
ADAPTER_FILES = (CONFIG_NAME, "adapter_model.safetensors")


def base_model_reference(spec: str | None) -> tuple[str, str | None]:
    """(what to call the base model, its Hub id or None) for a pack's ``base_model`` setting."""
    if spec in (None, "", "default", BUNDLED_NAME):
        return BUNDLED_HUB_ID, BUNDLED_HUB_ID
    if HUB_ID.match(spec) and not Path(spec).expanduser().exists():
        return spec, spec
    return Path(spec).expanduser().name, None  # a local model by its name, never its path (it tells where files live)


def source_kinds(db: sqlite_utils.Database, source_ids: list[int]) -> dict[str, int]:
    """How many of ``source_ids`` are documents, chats, profiles (counts only: no names, no text)."""
    kinds: dict[str, int] = {}
    for start in range(0, len(source_ids), 500):
        ids = list(source_ids[start:start + 500])
        marks = ",".join("?" * len(ids))
        for row in db.query(f"select kind, count(*) as n from sources where id in ({marks}) group by kind", ids):
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + row["n"]
    return kinds


def write_version_card(db: sqlite_utils.Database, base_model: str | None, sources: list[int], folder: Path) -> Path:
    """The model card of a version folder (written with the version)."""
    name, hub_id = base_model_reference(base_model)
    return write_model_card(folder, name, source_kinds(db, sources), hub_id)


def export_peft(db: sqlite_utils.Database, store: PackStore, name: str, destination: Path, number: int | None = None,
                load_base: Callable[[], tuple] | None = None) -> Path:
    """Write version ``number`` (the active one by default) of pack ``name`` as a PEFT folder ``destination``.

    ``load_base``: returns (model, tokenizer) of the pack's base model; called only to convert a
    version saved before Engram was a PEFT method.
    """
    pack = store.get(name)
    version = store.version(name, number)
    if version is None:
        raise EngramError(f"Pack {name!r} has no version {number} to export." if number else
                          f"Pack {name!r} has no trained version yet: train it before exporting it.")
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise EngramError(f"{destination} exists and is not an empty folder: name a new folder to export into.")
    source = Path(version["path"])
    reference, hub_id = base_model_reference(pack["base_model"])
    with new_folder(destination) as tmp:  # replaces the empty folder (checked above) or creates it
        _copy_adapters(source, tmp, load_base)
        for config in [tmp / CONFIG_NAME, tmp / LORA_DIR / CONFIG_NAME]:
            if config.is_file():
                data = json.loads(config.read_text())
                data["base_model_name_or_path"] = reference
                config.write_text(json.dumps(data, indent=2, sort_keys=True))
        write_model_card(tmp, reference, source_kinds(db, version["sources"]), hub_id)
    return destination


def _copy_adapters(source: Path, target: Path, load_base: Callable[[], tuple] | None) -> None:
    """The adapter files of a version folder into ``target`` (no slot index, no PEFT template cards)."""
    skip = shutil.ignore_patterns(CARD_NAME)
    if not (source / CONFIG_NAME).is_file():  # LoRA only: its adapter is the folder
        shutil.copytree(source / LORA_DIR, target, dirs_exist_ok=True, ignore=skip)
        return
    if "engram" in json.loads((source / CONFIG_NAME).read_text()):  # the pre-PEFT layout: convert it
        if load_base is None:
            raise EngramError(f"{source} was saved before memories were PEFT adapters: it needs its base model to "
                              "be converted.")
        model, tokenizer = load_base()
        write_adapter(load_engram(model, tokenizer, source), target)
    else:
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, target / name)
        if (source / "table").is_dir():
            shutil.copytree(source / "table", target / "table")
    if (source / LORA_DIR).is_dir():
        shutil.copytree(source / LORA_DIR, target / LORA_DIR, ignore=skip)
