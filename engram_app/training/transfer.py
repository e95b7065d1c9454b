"""Export a pack version as one file, and import such a file as a new pack.

The file is a zip archive (stored, not compressed: safetensors of float weights barely
compress) holding exactly the members its pack's mode needs, and nothing else::

    pack.json                               format mark, the base model's name, the pack's config,
                                            the version's evaluation (numbers only)
    adapter/adapter_config.json             the Engram memory (modes engram, engram+lora)
    adapter/adapter_model.safetensors
    adapter/table/table.json                its rows, when the table is mapped from disk
    adapter/table/rows.npy                  (xlarge, huge): self-contained, never a delta
    adapter/table/values.npy
    adapter/lora/adapter_config.json        the LoRA adapter (modes lora, engram+lora)
    adapter/lora/adapter_model.safetensors

No pickle, no slot index (it names sources by their ids in the exporting library and would
carry the user's n-grams along), and no private text: the evaluation keeps its figures but not
the probe questions and answers (a profile's "What is my name?" and the user's name), and the
base model is named, never located (a model folder's name, not its path).

A pack file comes from someone else, so import trusts nothing in it and decides everything
before it writes a byte of it to disk:

1. Its config must be one of ours: a size preset, a mode, and a memory whose every dimension
   (rows per head, heads, head width, layers, orders, storage...) stays within that preset, so
   the table it asks for is never bigger than the preset's; the adapter's own config must equal
   it. (A config of 10^30 rows per head used to hang the prime search; 10^8 filled the RAM.)
2. Its base model must be one the user already has: the bundled model, the model the app runs
   with, one converted under the data root, or the base of one of their packs. A pack file never
   makes the app download or open a model it names.
3. Exactly the members the mode needs, each no larger than its config implies (its weights'
   size, or the rows its table holds); read in bounded chunks, so a member that inflates beyond
   what it declared is cut off.
4. A mapped table must be self-contained: its ``table.json`` may name no other table as its base
   (else it would serve the rows of whatever table that names, another pack's among them).
5. The evaluation is checked against the schema of :func:`public_evaluation`, or dropped.
6. The name is taken by inserting the pack's row (the unique index on names makes that atomic,
   so one of two concurrent imports under one name wins and the other is refused); from then on
   a failure removes exactly the folder and the row this import created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch

from engram_app.atomic import new_file
from engram_app.engram import DEFAULT_TARGETS, MAPPED_FORMAT, MAPPED_VERSION, STORAGES, EngramBlock, EngramConfig
from engram_app.engram import FORMAT_VERSION as ENGRAM_FORMAT_VERSION
from engram_app.engram import base_fingerprint, build_layout, find_decoder_layers, tokenizer_fingerprint
from engram_app.engram.config import OPTIONAL_FIELDS
from engram_app.errors import EngramError
from engram_app.models import BUNDLED_NAME, HUB_ID, load_base_model, resolve_model
from engram_app.settings import Settings, resolve_device
from engram_app.store.db import now
from engram_app.training import adapters
from engram_app.training.packs import MODES, NAME, PRESETS, PackConfig, PackStore, check_name
from engram_app.training.sizes import SizePreset

log = logging.getLogger(__name__)

FORMAT = "engram-studio-pack"
FORMAT_VERSION = 1
MAX_UNPACKED = 8 * 1024**3  # a bound on the whole archive, whatever the caps of its members add up to
MAX_MANIFEST = 256 * 1024  # pack.json: a config and figures (files exported before 0.2 also hold probe replies)
MAX_JSON = 64 * 1024  # adapter_config.json, table.json, the LoRA config
HEADER_ROOM = 64 * 1024  # a safetensors or .npy header beside the data its config implies
DISK_MARGIN = 256 * 1024**2  # left free under the data root after unpacking
CHUNK = 1024 * 1024
MAX_LORA_R = 64
MAX_ENGRAM_LAYERS = 2  # the paper splits a memory over two blocks at most
MAX_BLOCK_INDEX = 1023
MAX_SEED = 2**32 - 1
MAX_LR_SCALE = 100.0
MAX_TEMPLATE_IDS = 1024  # a chat template's own tokens: a few dozen at most in any template seen
MAX_TOKEN_ID = 2**31 - 1

MANIFEST = "pack.json"
ENGRAM_CONFIG = "adapter/adapter_config.json"
ENGRAM_WEIGHTS = "adapter/adapter_model.safetensors"
TABLE_META = "adapter/table/table.json"
TABLE_ROWS = "adapter/table/rows.npy"
TABLE_VALUES = "adapter/table/values.npy"
LORA_CONFIG = "adapter/lora/adapter_config.json"
LORA_WEIGHTS = "adapter/lora/adapter_model.safetensors"
ALL_MEMBERS = (MANIFEST, ENGRAM_CONFIG, ENGRAM_WEIGHTS, TABLE_META, TABLE_ROWS, TABLE_VALUES, LORA_CONFIG, LORA_WEIGHTS)

# PEFT config fields that say where an adapter came from, not what it computes (the first names a
# folder of the exporting user's, and is emptied on export and import).
INFORMATIONAL = {"base_model_name_or_path", "peft_version", "inference_mode", "revision", "auto_mapping"}
# The base model fingerprint's keys every saved memory has (newer ones add more).
FINGERPRINT_KEYS = {"model_type", "hidden_size", "num_hidden_layers", "vocab_size", "embedding_signs_sha256",
                    "tokenizer_sha256"}


def members_for(config: PackConfig) -> list[str]:
    """The archive members a pack of ``config`` has: no more, no fewer."""
    names = [MANIFEST]
    if config.uses_engram:
        names += [ENGRAM_CONFIG, ENGRAM_WEIGHTS]
        if config.engram_config().storage == "mapped":
            names += [TABLE_META, TABLE_ROWS, TABLE_VALUES]
    if config.uses_lora:
        names += [LORA_CONFIG, LORA_WEIGHTS]
    return names


# --- export ------------------------------------------------------------------------------------


def export(store: PackStore, settings: Settings, name: str, destination: str | Path | None = None,
           number: int | None = None, format: str = "zip") -> Path:
    """Write version ``number`` (the active one by default) of pack ``name``; returns its path.

    ``format``: "zip", one file for `pack import` (:func:`export_pack`); or "peft", a PEFT adapter
    folder with a model card (training/peft_export.py). ``destination`` defaults to
    ``<home>/exports/<name>-v<number>[.zip]``.
    """
    if format not in ("zip", "peft"):
        raise EngramError(f"Unknown export format {format!r}: choose zip or peft.")
    shown = number or store.get(name)["active_version"]
    default = settings.home / "exports" / (f"{name}-v{shown}" + (".zip" if format == "zip" else ""))
    destination = Path(destination) if destination else default
    if format == "zip":
        return export_pack(store, name, destination, number)
    from engram_app.training.runner import model_spec
    from engram_app.training.peft_export import export_peft

    def load_base():  # a copy of its own: the export wraps the model in PEFT
        loaded = load_base_model(model_spec(store.get(name)["base_model"]), settings.models_dir,
                                 resolve_device(settings.device))
        return loaded.model, loaded.tokenizer

    return export_peft(store.db, store, name, destination, number, load_base=load_base)


def export_pack(store: PackStore, name: str, destination: Path, number: int | None = None) -> Path:
    """Write version ``number`` (the active one by default) of pack ``name`` to ``destination`` (a .zip)."""
    pack = store.get(name)
    version = store.version(name, number)
    if version is None:
        raise EngramError(f"Pack {name!r} has no version {number} to export." if number else
                          f"Pack {name!r} has no trained version yet: train it before exporting it.")
    config = store.config(store.row(name))
    folder = Path(version["path"])
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "base_model": portable_base(pack["base_model"]),
        "config": json.loads(store.row(name)["config"]), "version": version["number"],
        "evaluation": public_evaluation(version["evaluation"]), "exported": now(),
    }
    contents = {MANIFEST: json.dumps(manifest, indent=2).encode()}
    for member in members_for(config)[1:]:
        path = folder.joinpath(*member.split("/")[1:])
        if not path.is_file():
            raise EngramError(f"Version {version['number']} of pack {name!r} is incomplete ({path} is missing): "
                              "roll back to another version, or train again.")
        contents[member] = path
    if TABLE_META in contents and not _self_contained(json.loads(contents[TABLE_META].read_text())):
        raise EngramError(f"Version {version['number']} of pack {name!r} has a table that extends another one: "
                          "only self-contained versions can be exported.")
    for member in (ENGRAM_CONFIG, LORA_CONFIG):  # PEFT writes the base model's path into its configs
        if member in contents:
            contents[member] = json.dumps(_without_paths(json.loads(contents[member].read_text())), indent=2).encode()
    destination = Path(destination)
    with new_file(destination) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, content in contents.items():
            if isinstance(content, Path):
                archive.write(content, member)
            else:
                archive.writestr(member, content)
    return destination


def _without_paths(adapter_config: dict) -> dict:
    """A PEFT adapter config with its informational fields emptied (one names the base model's folder)."""
    out = dict(adapter_config)
    for key in ("base_model_name_or_path", "revision", "auto_mapping"):
        if key in out:
            out[key] = None
    return out


def portable_base(spec: str | None) -> str:
    """How a pack file names its base model: ``default`` (the bundled one), a Hugging Face id, or
    a local model's name (its folder's or file's name), never its path, which would tell where the
    exporting user keeps their files."""
    if spec in (None, "", "default", BUNDLED_NAME):
        return "default"
    try:
        source = resolve_model(spec)
    except EngramError:  # a model no longer where it was: its name still names it
        return base_name(spec)
    if source.kind == "hub":
        return source.location
    return "default" if source.name == BUNDLED_NAME else source.name


def base_name(spec: str) -> str:
    """The name :func:`portable_base` gives the model ``spec``, from the text alone (no file looked at)."""
    if spec in ("", "default", BUNDLED_NAME):
        return "default"
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    path = PurePath(spec.replace("\\", "/"))
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return "default" if slug == BUNDLED_NAME else slug


# --- the evaluation's schema -----------------------------------------------------------------------

SIDE = {"recall": "fraction", "mean_logprob": "number?"}
EVALUATION_SCHEMA: dict = {
    "steps": "count", "planned_steps": "count", "outcome": "word", "train_seconds": "number", "examples": "count",
    "rows_touched": "count",
    "memorisation": {"before": "number?", "after": "number?", "change": "number?"},
    "retention": {"base": "number?", "before": "number?", "after": "number?", "cost": "number?"},
    "recall": {"memory_on": SIDE, "memory_off": SIDE, "probes": "count"},
    "held_out": {"memory_on": {"recall": "fraction"}, "memory_off": {"recall": "fraction"}, "probes": "count"},
}
WORD = re.compile(r"^[a-z_]{1,32}$")


def public_evaluation(evaluation) -> dict | None:
    """The figures of a version's evaluation, as :data:`EVALUATION_SCHEMA` describes them; None when
    the block does not fit it.

    What leaves (export) and what comes in (import) is this projection: the probes' questions,
    answers and replies (``recall.examples``) and any other text are never part of it, and a value
    of the wrong type (which would break the Training tab's table on every poll) drops the whole
    block instead of being stored.
    """
    if evaluation is None:
        return None
    return _project(evaluation, EVALUATION_SCHEMA, required=False)


def _project(value, schema: dict, required: bool):
    if not isinstance(value, dict):
        return None
    out = {}
    for key, kind in schema.items():
        if key not in value:
            if required:  # nested blocks are read whole by the UI (mem["before"], rec["memory_on"]["recall"])
                return None
            continue
        if isinstance(kind, dict):
            inner = _project(value[key], kind, required=True)
            if inner is None:
                return None
            out[key] = inner
        elif _fits(value[key], kind):
            out[key] = value[key]
        else:
            return None
    return out


def _fits(value, kind: str) -> bool:
    if kind.endswith("?") and value is None:
        return True
    kind = kind.rstrip("?")
    if kind == "word":
        return isinstance(value, str) and bool(WORD.match(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if kind == "count":
        return isinstance(value, int) and 0 <= value <= 10**12
    if kind == "fraction":
        return 0 <= value <= 1
    return abs(value) <= 1e12  # number


# --- import --------------------------------------------------------------------------------------


@dataclass
class PackFile:
    """An opened pack archive whose member names have been checked."""

    path: Path
    archive: zipfile.ZipFile
    members: dict[str, zipfile.ZipInfo]

    def refuse(self, reason: str) -> EngramError:
        return EngramError(f"{self.path.name}: {reason}")

    def read(self, name: str, cap: int) -> bytes:
        """A member's bytes, refused as soon as they pass ``cap`` (whatever its header says)."""
        return b"".join(self.chunks(name, cap))

    def read_json(self, name: str, cap: int = MAX_JSON):
        return self.parse(name, self.read(name, cap))

    def parse(self, name: str, content: bytes):
        try:
            return json.loads(content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.refuse(f"{name} is not valid JSON ({exc}).") from None

    def chunks(self, name: str, cap: int) -> Iterator[bytes]:
        info = self.members[name]
        if info.file_size > cap:
            raise self.refuse(f"{name} holds {info.file_size:,} bytes; a pack of this config has at most {cap:,} "
                              "there: refused.")
        seen = 0
        try:
            with self.archive.open(info) as stream:
                while chunk := stream.read(CHUNK):
                    seen += len(chunk)
                    if seen > cap:
                        raise self.refuse(f"{name} unpacks to more than the {cap:,} bytes a pack of this config "
                                          "has there: refused.")
                    yield chunk
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError) as exc:
            raise self.refuse(f"{name} cannot be read ({exc}).") from None

    def extract(self, name: str, target: Path, cap: int) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            for chunk in self.chunks(name, cap):
                out.write(chunk)


def open_pack_file(path: Path) -> PackFile:
    """The archive at ``path``, when every member is one a pack can have (each once)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngramError(f"{path.name} is not a pack file (a .zip exported by Engram Studio): {exc}") from None
    infos = archive.infolist()
    names = [m.filename for m in infos]
    odd = [n for n in names if n not in ALL_MEMBERS]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    problem = None
    if len(names) > 2 * len(ALL_MEMBERS):  # before looking at names one by one: a zip of a million entries
        problem = f"{path.name} holds {len(names)} files; a pack has at most {len(ALL_MEMBERS)}: refused."
    elif odd:
        problem = f"{path.name} holds files a pack never has: {', '.join(odd[:3])}."
    elif twice:
        problem = f"{path.name} holds {', '.join(twice[:3])} more than once: refused."
    elif MANIFEST not in names:
        problem = f"{path.name} is not a pack file: it has no {MANIFEST}."
    elif sum(m.file_size for m in infos) > MAX_UNPACKED:
        problem = f"{path.name} unpacks to more than {MAX_UNPACKED // 1024**3} GiB: refused."
    if problem:
        archive.close()
        raise EngramError(problem)
    return PackFile(path, archive, {m.filename: m for m in infos})


@dataclass
class Manifest:
    name: str | None  # the exporting pack's name, when it can name a pack
    base: str  # the base model's name (see portable_base)
    config: PackConfig
    evaluation: dict | None
    version: int | None
    exported: str | None


def read_manifest(pack: PackFile) -> Manifest:
    """``pack.json``, checked: format, a config within its preset's bounds, a base model name, an evaluation."""
    data = pack.read_json(MANIFEST, MAX_MANIFEST)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise pack.refuse(f"not a pack file: {MANIFEST} has no {FORMAT!r} format mark.")
    if data.get("format_version") != FORMAT_VERSION:
        raise pack.refuse(f"a pack file of format {str(data.get('format_version'))[:20]}; this version of Engram "
                          f"Studio reads format {FORMAT_VERSION}.")
    config = pack_config(pack, data.get("config"))
    base = data.get("base_model", "default")
    if not isinstance(base, str) or not 0 < len(base) <= 300:
        raise pack.refuse(f"{MANIFEST} does not name its base model.")
    evaluation = data.get("evaluation")
    public = public_evaluation(evaluation)
    if evaluation is not None and public is None:
        log.warning("%s: the evaluation does not fit its schema; it is left out", pack.path.name)
    name, version, exported = data.get("name"), data.get("version"), data.get("exported")
    return Manifest(
        name=name if isinstance(name, str) and NAME.match(name) else None, base=base_name(base), config=config,
        evaluation=public,
        version=version if isinstance(version, int) and not isinstance(version, bool) and 0 < version < 10**9 else None,
        exported=exported if isinstance(exported, str) and re.match(r"^[0-9T:.Z-]{1,40}$", exported) else None)


def pack_config(pack: PackFile, raw) -> PackConfig:
    """The pack's config when it is one this app makes: a preset, a mode, a bounded memory and LoRA rank."""
    if not isinstance(raw, dict) or not set(raw) <= {"preset", "mode", "engram", "lora_r"} \
            or raw.get("preset") not in PRESETS or raw.get("mode") not in MODES:
        raise pack.refuse(f"{MANIFEST} does not describe a pack (preset, mode).")
    preset = PRESETS[raw["preset"]]
    lora_r = raw.get("lora_r", 16)
    if not _is_int(lora_r) or not 1 <= lora_r <= MAX_LORA_R:
        raise pack.refuse(f"its LoRA rank {_show(lora_r)} is outside 1..{MAX_LORA_R}: refused.")
    engram = engram_config(pack, raw.get("engram"), preset, MANIFEST)
    return PackConfig(preset=preset.name, mode=raw["mode"], engram=engram.to_dict(), lora_r=lora_r)


def engram_config(pack: PackFile, raw, preset: SizePreset, where: str) -> EngramConfig:
    """The memory config ``raw`` when each field is of its type and within ``preset``'s bounds.

    The bounds are the preset's own shape (its rows per head, 8 heads, its head width, orders 2
    and 3, kernel 4, its storage), and the whole table (layers x orders x heads x rows) may not
    hold more rows than the preset's: so what was checked against this machine (``check_fits``)
    is what gets allocated.
    """
    if not isinstance(raw, dict):
        raise pack.refuse(f"{where} has no memory config.")
    ref = preset.engram_config()
    known = set(ref.to_dict()) | set(OPTIONAL_FIELDS)
    if not set(raw) <= known:
        raise pack.refuse(f"{where}: unknown memory config fields {sorted(set(raw) - known)[:3]}.")

    def bounded(key: str, low, high, integer: bool = True):
        value = raw.get(key, getattr(ref, key))
        ok = _is_int(value) if integer else _is_number(value)
        if not ok or not low <= value <= high:
            raise pack.refuse(f"the memory's {key} ({_show(value)}) is outside what the {preset.name} size allows "
                              f"({low}..{high}): refused.")
        return value

    layers = raw.get("layers")
    if layers is not None and (not isinstance(layers, list) or not 1 <= len(layers) <= MAX_ENGRAM_LAYERS
                               or not all(_is_int(x) and 0 <= x <= MAX_BLOCK_INDEX for x in layers)
                               or len(set(layers)) != len(layers)):
        raise pack.refuse(f"the memory's layers ({_show(layers)}) must be 1 to {MAX_ENGRAM_LAYERS} distinct block "
                          "indices: refused.")
    orders = raw.get("orders", list(ref.orders))
    if not isinstance(orders, list) or not 1 <= len(orders) <= len(ref.orders) or len(set(map(str, orders))) != len(orders) \
            or not all(_is_int(n) and 1 <= n <= ref.max_order for n in orders):
        raise pack.refuse(f"the memory's orders ({_show(orders)}) must be up to {len(ref.orders)} distinct n-gram "
                          f"lengths in 1..{ref.max_order}: refused.")
    storage = raw.get("storage", ref.storage)
    if storage not in STORAGES or storage != ref.storage:
        raise pack.refuse(f"the memory's storage ({_show(storage)}) is not the {preset.name} size's "
                          f"({ref.storage!r}): refused.")
    use_conv = raw.get("use_conv", ref.use_conv)
    if not isinstance(use_conv, bool):
        raise pack.refuse(f"the memory's use_conv ({_show(use_conv)}) must be true or false: refused.")
    strip = raw.get("compression_strip", False)  # absent in packs made before stripping was the default
    if not isinstance(strip, bool):
        raise pack.refuse(f"the memory's compression_strip ({_show(strip)}) must be true or false: refused.")
    skip = raw.get("skip_template", False)  # absent in packs made before n-grams skipped the chat template
    if not isinstance(skip, bool):
        raise pack.refuse(f"the memory's skip_template ({_show(skip)}) must be true or false: refused.")
    template_ids = raw.get("template_ids")  # checked against the token map when the memory is attached
    if template_ids is not None and (not isinstance(template_ids, list) or len(template_ids) > MAX_TEMPLATE_IDS
                                     or not all(_is_int(i) and 0 <= i <= MAX_TOKEN_ID for i in template_ids)):
        raise pack.refuse(f"the memory's template_ids ({_show(template_ids)}) must be up to {MAX_TEMPLATE_IDS} "
                          "token ids: refused.")
    depth = raw.get("depth")  # absent in packs made before the presets placed the memory mid-model
    if depth is not None and (not _is_number(depth) or not 0 <= depth < 1):
        raise pack.refuse(f"the memory's depth ({_show(depth)}) must be a fraction in [0, 1): refused.")
    version = raw.get("format_version", ENGRAM_FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= ENGRAM_FORMAT_VERSION:
        raise pack.refuse(f"the memory's format ({_show(version)}) is not one this version reads "
                          f"(1..{ENGRAM_FORMAT_VERSION}).")
    config = EngramConfig(
        layers=layers, orders=tuple(orders), heads=bounded("heads", 1, ref.heads),
        rows_per_head=bounded("rows_per_head", 2, ref.rows_per_head), head_dim=bounded("head_dim", 1, ref.head_dim),
        kernel_size=bounded("kernel_size", 1, ref.kernel_size), use_conv=use_conv,
        init_std=float(bounded("init_std", 0, 1, integer=False)), seed=bounded("seed", 0, MAX_SEED),
        table_lr_scale=float(bounded("table_lr_scale", 1e-6, MAX_LR_SCALE, integer=False)), storage=storage,
        compression_strip=strip, skip_template=skip, template_ids=template_ids if skip else None,
        depth=depth)
    rows = len(layers or [1]) * len(config.orders) * config.heads * config.rows_per_head
    if rows > preset.rows(1):
        raise pack.refuse(f"the memory's table ({rows:,} rows) is larger than the {preset.name} size's "
                          f"({preset.rows(1):,}): refused.")
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def local_base(pack: PackFile, wanted: str, settings: Settings, store: PackStore) -> str:
    """The user's own model that the pack file's base model name means; refused when they have none.

    Candidates: the bundled model, the model the app runs with, the models converted under the
    data root and the base models of the user's packs, each named as :func:`portable_base` names
    it. Nothing the file says is opened or downloaded: it only picks among these.
    """
    if wanted == "default":
        return "default"
    candidates = [settings.model] if settings.model else []
    candidates += [row["base_model"] for row in store.db.query("select distinct base_model from packs order by id")]
    if settings.models_dir.is_dir():
        candidates += [str(p) for p in sorted(settings.models_dir.iterdir()) if (p / "config.json").is_file()]
    for spec in candidates:
        if spec and spec != "default" and portable_base(spec) == wanted:
            return spec
    raise pack.refuse(
        f"it was trained for the base model {wanted!r}, which this app does not have (the bundled model, the model "
        f"given with --model, the models in {settings.models_dir} and the base models of your packs). A pack file "
        "never makes the app download a model: start it with --model pointing at your copy of that model (its "
        "folder or .gguf file) and import again.")


def import_pack(store: PackStore, settings: Settings, path: Path, name: str | None = None) -> dict:
    """The pack file at ``path`` as a new pack with one version (see the module docstring for the checks)."""
    path = Path(path)
    pack = open_pack_file(path)
    with pack.archive:
        manifest = read_manifest(pack)
        config = manifest.config
        expected = members_for(config)
        extra = [n for n in pack.members if n not in expected]
        missing = [n for n in expected if n not in pack.members]
        if extra:
            raise pack.refuse(f"it holds files a {config.mode} pack of the {config.preset} size never has: "
                              f"{', '.join(extra[:3])}.")
        if missing:
            raise pack.refuse(f"it is incomplete: {', '.join(missing[:3])} missing.")
        name = check_name((name or "").strip() or manifest.name or "")
        base = local_base(pack, manifest.base, settings, store)
        reserved = store.reserve(name, base, config)  # from here on, a failure undoes what this import made
        folder, created, made_root = store.folder(name), False, not store.root.exists()
        try:
            if folder.exists():
                raise EngramError(f"The folder {folder} exists but no pack uses it (left by an earlier failure?): "
                                  "remove it, or import under another name.")
            loaded = load_base_model(None if base == "default" else base, settings.models_dir,
                                     resolve_device(settings.device))
            plan = _plan_members(pack, config, loaded)
            _check_disk(pack, plan, store.root)
            folder.mkdir(parents=True)
            created = True
            staging = folder / ".v1.import"
            _unpack(pack, plan, staging)
            try:  # the adapter must load onto its base model before it is kept
                adapters.load(loaded.model, loaded.tokenizer, staging, config)
            except EngramError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch, safetensors and PEFT raise many types
                raise pack.refuse(f"its adapter does not load ({exc}).") from None
            del loaded
            staging.rename(store.version_folder(name, 1))
            evaluation = dict(manifest.evaluation or {})
            evaluation["imported"] = {"file": path.name, "pack": manifest.name, "version": manifest.version,
                                      "exported": manifest.exported}
            store.record_version(reserved["id"], 1, store.version_folder(name, 1), None, [], evaluation)
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            if made_root:
                with contextlib.suppress(OSError):  # only while empty: another pack may have been made meanwhile
                    store.root.rmdir()
            store.release(reserved["id"])
            raise
    return store.get(name)


@dataclass
class MemberPlan:
    """How each member is written: validated bytes (small JSON members) or copied under a cap."""

    contents: dict[str, bytes]
    caps: dict[str, int]


def _plan_members(pack: PackFile, config: PackConfig, loaded) -> MemberPlan:
    """Check the small members against the manifest and the base model; cap the large ones."""
    model = loaded.model
    plan = MemberPlan({}, {})
    if config.uses_engram:
        engram = config.engram_config()
        _, _, blocks = find_decoder_layers(model)
        layers = engram.layers if engram.layers is not None else [min(1, len(blocks) - 1)]
        if any(layer >= len(blocks) for layer in layers):
            raise pack.refuse(f"its memory sits at blocks {layers}; the base model has blocks 0..{len(blocks) - 1}.")
        meta = _check_engram_meta(pack, pack.read_json(ENGRAM_CONFIG), config, layers, model, loaded.tokenizer)
        plan.contents[ENGRAM_CONFIG] = json.dumps(meta, indent=2).encode()
        rows = build_layout(engram, layers, 2).total_rows  # the primes only (the multipliers do not matter here)
        vocab = model.get_input_embeddings().weight.shape[0]
        plan.caps[ENGRAM_WEIGHTS] = HEADER_ROOM + _engram_weight_bytes(engram, model.config.hidden_size, len(layers),
                                                                       rows, vocab)
        if engram.storage == "mapped":
            plan.contents[TABLE_META] = pack.read(TABLE_META, MAX_JSON)
            table = pack.parse(TABLE_META, plan.contents[TABLE_META])
            _check_table(pack, table, engram, rows)
            plan.caps[TABLE_ROWS] = HEADER_ROOM + 8 * table["count"]
            plan.caps[TABLE_VALUES] = HEADER_ROOM + 4 * engram.head_dim * table["count"]
    if config.uses_lora:
        lora = _check_lora(pack, pack.read_json(LORA_CONFIG), config, model)
        plan.contents[LORA_CONFIG] = json.dumps(lora, indent=2).encode()
        plan.caps[LORA_WEIGHTS] = HEADER_ROOM + _lora_weight_bytes(model, lora["target_modules"], config.lora_r)
    return plan


def _check_engram_meta(pack: PackFile, meta, config: PackConfig, layers: list[int], model, tokenizer) -> dict:
    """The adapter's own config: an Engram memory equal to the manifest's, for this very base model.

    Returns it as it is unpacked (no path in it). Both layouts the engine reads are understood:
    format 1 (``engram`` and ``base_model`` nested) and a flat PEFT config (format 2).
    """
    where = ENGRAM_CONFIG
    if not isinstance(meta, dict) or meta.get("peft_type") != "ENGRAM":
        raise pack.refuse(f"its adapter does not load ({where} does not describe an Engram memory).")
    if "engram" in meta:
        if not set(meta) <= {"peft_type", "format_version", "engram", "base_model", "lora"} \
                or meta.get("format_version") != 1 or meta.get("lora") is not config.uses_lora:
            raise pack.refuse(f"its adapter does not load ({where}: fields, format or LoRA flag differ from "
                              f"{MANIFEST}).")
        fields, fingerprint = meta["engram"], meta.get("base_model")
    else:
        target = meta.get("target_modules")
        if meta.get("task_type") not in (None, "CAUSAL_LM") or not (
                target is None or (isinstance(target, str) and len(target) <= 200)):
            raise pack.refuse(f"its adapter does not load ({where}: task type or target differ from an Engram "
                              "memory's).")
        fields = {k: v for k, v in meta.items()
                  if k not in INFORMATIONAL | {"peft_type", "task_type", "target_modules", "base_model_fingerprint"}}
        fingerprint = meta.get("base_model_fingerprint")
    theirs = engram_config(pack, fields, PRESETS[config.preset], where).to_dict()
    ours = config.engram_config().to_dict()
    theirs["layers"] = theirs["layers"] if theirs["layers"] is not None else layers
    ours["layers"] = layers
    for derived in (theirs, ours):  # found from the tokenizer when the memory is attached, whether saved or not
        derived.pop("template_ids", None)
    if theirs != ours:
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise pack.refuse(f"its adapter's memory config differs from {MANIFEST} ({', '.join(differ)}): refused.")
    actual = base_fingerprint(model, tokenizer_fingerprint(tokenizer))
    if not isinstance(fingerprint, dict) or not FINGERPRINT_KEYS <= set(fingerprint) \
            or any(actual.get(key) != value for key, value in fingerprint.items()):
        raise pack.refuse("its adapter does not load: it was trained for another base model than the one of that "
                          "name here (their fingerprints differ).")
    return meta if "engram" in meta else _without_paths({**meta, "inference_mode": True})


def _check_table(pack: PackFile, table, engram: EngramConfig, rows: int) -> None:
    """A mapped table's description: this config's shape, and self-contained (no base to read rows from)."""
    if not isinstance(table, dict) or table.get("format") != MAPPED_FORMAT or table.get("version") != MAPPED_VERSION \
            or table.get("dtype") != "float32":
        raise pack.refuse(f"its adapter does not load ({TABLE_META} does not describe a memory table).")
    if not _self_contained(table):
        raise pack.refuse(f"its table is not self-contained ({TABLE_META} names a base table to read rows from, "
                          f"{_show(table.get('base'))}): refused.")
    count = table.get("count")
    same = (table.get("rows") == rows and table.get("dim") == engram.head_dim and table.get("seed") == engram.seed
            and _is_number(table.get("init_std")) and float(table["init_std"]) == engram.init_std)
    if not same or not _is_int(count) or not 0 <= count <= rows:
        raise pack.refuse(f"its table ({TABLE_META}) does not match its memory config: refused.")


def _self_contained(table: dict) -> bool:
    return table.get("base") is None and table.get("delta") is False


def _check_lora(pack: PackFile, lora, config: PackConfig, model) -> dict:
    """The LoRA config when it is the one this app attaches (rank, alpha, target modules), and nothing
    more; returned as this version of PEFT writes it, with no path in it (what is unpacked)."""
    from peft import LoraConfig

    if not isinstance(lora, dict) or lora.get("peft_type") != "LORA" or lora.get("r") != config.lora_r:
        raise pack.refuse(f"its adapter does not load ({LORA_CONFIG} is not a LoRA of rank {config.lora_r}).")
    targets = lora.get("target_modules")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not isinstance(targets, list) or not targets or not all(t in DEFAULT_TARGETS and t in names for t in targets):
        raise pack.refuse(f"its LoRA targets {_show(targets)}; this app targets {', '.join(DEFAULT_TARGETS)} "
                          "(those the model has): refused.")
    reference = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM").to_dict()
    for key, value in lora.items():
        if key in INFORMATIONAL or key == "target_modules":
            continue
        expected = reference.get(key)
        if key in reference and value != expected and not (value in (None, {}, []) and expected in (None, {}, [])):
            raise pack.refuse(f"its LoRA config sets {key} to {_show(value)}, which this app never does: refused.")
        if key not in reference and value not in (None, False, {}, [], ""):
            raise pack.refuse(f"its LoRA config sets {key}, which this version of PEFT does not know: refused.")
    written = {k: sorted(v) if isinstance(v, set) else v for k, v in reference.items()}
    written.update(target_modules=list(targets), inference_mode=True, base_model_name_or_path=None)
    return written


def _engram_weight_bytes(engram: EngramConfig, hidden: int, layers: int, rows: int, vocab: int) -> int:
    """Bytes of the memory's saved tensors (float32): its blocks, its table when held in memory, and
    room for one int64 per token id (the token map, which the PEFT layout saves with the weights)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        block = EngramBlock(hidden, engram.memory_width, engram.kernel_size, engram.dilation, engram.use_conv)
    dense = layers * sum(p.numel() for p in block.parameters())
    table = rows * engram.head_dim if engram.storage == "memory" else 0
    return 4 * (dense + table) + 8 * (vocab + 1)


def _lora_weight_bytes(model, targets: list[str], r: int) -> int:
    """At most the bytes of a rank-``r`` LoRA (float32 A and B) on every module of the target names."""
    total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in targets and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            total += r * (weight.shape[0] + weight.shape[1])
    return 4 * total


def _check_disk(pack: PackFile, plan: MemberPlan, root: Path) -> None:
    needed = sum(pack.members[n].file_size for n in plan.caps) + sum(len(b) for b in plan.contents.values())
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN > free:
        raise pack.refuse(f"it needs {needed / 1024**2:,.0f} MiB of disk and {free / 1024**2:,.0f} MiB are free "
                          "under the data root: free some space first.")


def _unpack(pack: PackFile, plan: MemberPlan, folder: Path) -> None:
    """Write the checked members into ``folder`` (new) by their names, never the archive's paths."""
    folder.mkdir()
    for member, content in plan.contents.items():
        target = folder.joinpath(*member.split("/")[1:])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    for member, cap in plan.caps.items():
        pack.extract(member, folder.joinpath(*member.split("/")[1:]), cap)
