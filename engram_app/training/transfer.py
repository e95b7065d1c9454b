"""Export a pack version as one file, and import such a file as a new pack.

The file is a zip archive (stored, not compressed: safetensors of float weights barely
compress) holding::

    pack.json                     what the pack is: format, base model, mode, memory config, the
                                  version's evaluation
    adapter/adapter_config.json   the version folder's adapter files, as saved (safetensors + JSON)
    adapter/adapter_model.safetensors
    adapter/lora/...              (LoRA packs)
    adapter/table/...             table.json + rows.npy + values.npy (packs whose table is mapped)

No pickle anywhere, and no slot index: it names sources by their ids in the exporting library,
which mean nothing elsewhere (and would carry the user's n-grams along). An imported version
therefore says which sources wrote a slot only as "imported".

Import reads the archive defensively: only the names above, no paths outside the folder, a
bound on the unpacked size, and the adapter must load onto its base model (which checks the
base model's fingerprint) before the pack is recorded.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from engram_app.errors import EngramError
from engram_app.training.packs import MODES, PRESETS, PackConfig, PackStore, now

FORMAT = "engram-studio-pack"
FORMAT_VERSION = 1
MAX_UNPACKED = 8 * 1024**3  # the large preset is ~0.5 GiB per Engram layer: room for several layers + LoRA
ALLOWED = re.compile(r"^adapter/((lora/)?[A-Za-z0-9_.-]+\.(json|safetensors|md)|table/(table\.json|rows\.npy|values\.npy))$")


def export_pack(store: PackStore, name: str, destination: Path, number: int | None = None) -> Path:
    """Write version ``number`` (the active one by default) of pack ``name`` to ``destination`` (a .zip)."""
    pack = store.get(name)
    version = store.version(name, number)
    if version is None:
        raise EngramError(f"Pack {name!r} has no version {number} to export." if number else
                          f"Pack {name!r} has no trained version yet: train it before exporting it.")
    folder = Path(version["path"])
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "base_model": pack["base_model"],
        "config": json.loads(store.row(name)["config"]), "version": version["number"],
        "evaluation": version["evaluation"], "exported": now(),
    }
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("pack.json", json.dumps(manifest, indent=2))
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(folder)
                if path.is_file() and relative.parts[0] != "slots":
                    archive.write(path, f"adapter/{relative.as_posix()}")
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


def read_manifest(path: Path) -> tuple[dict, list[zipfile.ZipInfo]]:
    """The archive's manifest and adapter members, after checking every name and the total size."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngramError(f"{Path(path).name} is not a pack file (a .zip exported by Engram Studio): {exc}") from None
    with archive:
        members = archive.infolist()
        names = [m.filename for m in members if not m.is_dir()]
        if "pack.json" not in names:
            raise EngramError(f"{Path(path).name} is not a pack file: it has no pack.json.")
        odd = [n for n in names if n != "pack.json" and not ALLOWED.match(n)]
        if odd:
            raise EngramError(f"{Path(path).name} holds files a pack never has: {', '.join(odd[:3])}.")
        if sum(m.file_size for m in members) > MAX_UNPACKED:
            raise EngramError(f"{Path(path).name} unpacks to more than {MAX_UNPACKED // 1024**3} GiB: refused.")
        try:
            manifest = json.loads(archive.read("pack.json"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngramError(f"{Path(path).name}: pack.json is not valid JSON ({exc}).") from None
        adapter = [m for m in members if not m.is_dir() and m.filename != "pack.json"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngramError(f"{Path(path).name} is not a pack file: pack.json has no {FORMAT!r} format mark.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngramError(f"{Path(path).name} is a pack file of format {manifest.get('format_version')}; this version "
                          f"of Engram Studio reads format {FORMAT_VERSION}.")
    config = manifest.get("config")
    if not isinstance(config, dict) or config.get("preset") not in PRESETS or config.get("mode") not in MODES:
        raise EngramError(f"{Path(path).name}: pack.json does not describe a pack (preset, mode).")
    if not adapter:
        raise EngramError(f"{Path(path).name} holds no adapter files.")
    return manifest, adapter


def unpack_adapter(path: Path, members: list[zipfile.ZipInfo], folder: Path) -> None:
    """Extract the adapter files into ``folder`` (which must not exist), by name, never by the archive's paths."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(path) as archive:
        for member in members:
            target = folder.joinpath(*member.filename.split("/")[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)


def import_config(manifest: dict) -> PackConfig:
    return PackConfig(**{k: v for k, v in manifest["config"].items() if k in PackConfig.__dataclass_fields__})
