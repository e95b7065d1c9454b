"""Memory packs: a named memory bound to one base model, with immutable numbered versions.

    <home>/packs/<name>/v<N>/     adapter_config.json + adapter_model.safetensors (+ lora/) + slots/
    <home>/packs/<name>/jobs/<id>/checkpoint/   the running job's last checkpoint

The ``packs`` row points at its active version; rolling back points it at an earlier one. A
version's folder is written under a temporary name and renamed, and only then recorded in the
database, so a kill at any moment leaves the pack loadable at its previous version. Before the
row is written the folder is flushed to disk (``sync_folder``), and the commit itself is
synchronous (store/db.py): a power cut cannot leave a recorded version whose files were still
only in the operating system's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlite_utils

from engram_app.atomic import write_text
from engram_app.engram import EngramConfig
from engram_app.errors import EngramError
from engram_app.models import resolve_model
from engram_app.store.batches import batched, placeholders
from engram_app.store.db import now
from engram_app.training.sizes import DEFAULT_PRESET, PRESETS, check_fits

MIGRATION_FILE = "migration.json"  # in a pack's folder: the pack it was moved from (training/migrate.py)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODES = ("engram", "lora", "engram+lora")


def check_name(name: str) -> str:
    """``name`` when it can name a pack (and its folder); else a clear error."""
    if not NAME.match(name or ""):
        raise EngramError(f"Invalid pack name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                          "letter or digit.")
    return name


def sync_folder(folder: Path) -> None:
    """Flush a finished folder to disk: its files, its folders, and the two folders above it.

    Renaming a folder into place makes it whole or absent, but neither its files' contents nor the
    rename are on disk until fsynced: the folders above record its name (the pack's folder, and
    ``packs/`` for a pack's first version).
    """
    for top, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(top)
    _fsync(folder.parent)
    _fsync(folder.parent.parent)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class PackConfig:
    """What a pack is: its memory shape, what trains, and which collections it learns from."""

    preset: str = DEFAULT_PRESET
    mode: str = "engram"  # engram | lora | engram+lora
    engram: dict = field(default_factory=dict)  # EngramConfig.to_dict()
    lora_r: int = 16

    def engram_config(self) -> EngramConfig:
        return EngramConfig.from_dict(self.engram)

    @property
    def uses_engram(self) -> bool:
        return "engram" in self.mode

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.mode


class PackStore:
    """Packs and versions in the database and under ``<home>/packs``."""

    def __init__(self, db: sqlite_utils.Database, home: Path):
        self.db = db
        self.root = Path(home) / "packs"

    # --- packs --------------------------------------------------------------------------------

    def create(self, name: str, base_model: str | None, size: str = DEFAULT_PRESET,
               collections: list[str] | None = None, mode: str = "engram", config: PackConfig | None = None) -> dict:
        check_name(name)
        if base_model is not None:
            resolve_model(base_model)  # fails now, with a clear message, for a model that cannot be found
        known = {r["name"] for r in self.db.query("select name from collections")}
        unknown = [c for c in collections or [] if c not in known]
        if unknown:
            raise EngramError(f"No collection named {', '.join(map(repr, unknown))} in the library "
                              f"(collections: {', '.join(sorted(known)) or 'none yet'}).")
        check_fits(size, self.root.parent)  # an unknown size is refused here too, with the sizes
        config = config or PackConfig(preset=size, mode=mode, engram=PRESETS[size].engram_config().to_dict())
        self.reserve(name, base_model, config, collections)
        return self.get(name)

    def names(self) -> dict[int, str]:
        """Every pack's name by its id."""
        return {r["id"]: r["name"] for r in self.db.query("select id, name from packs")}

    def learners(self, collection: str) -> list[str]:
        """The packs that learn from ``collection``: their collections name it, or they have none (they
        learn the whole library)."""
        return [p["name"] for p in self.list() if not p["collections"] or collection in p["collections"]]

    def reserve(self, name: str, base_model: str | None, config: PackConfig,
                collections: list[str] | None = None) -> dict:
        """Take ``name`` for a new pack of ``config``: insert its row (no version yet), in one transaction.

        The unique index on names makes this the one place a name is decided: of two callers
        racing for a name (two imports, an import and a create), exactly one inserts, and the other
        is refused, before either has written a file. Returns the new row.
        """
        check_name(name)
        if config.mode not in MODES:
            raise EngramError(f"Unknown mode {config.mode!r}: choose one of {', '.join(MODES)}.")
        check_fits(config.preset, self.root.parent)  # refused with the reason when this machine cannot hold it
        try:
            with self.db.atomic():
                self.db["packs"].insert({
                    "name": name, "base_model": base_model or "default", "config": json.dumps(asdict(config)),
                    "collections": json.dumps(sorted(set(collections or []))), "active_version": None,
                    "created": now(),
                })
        except sqlite3.IntegrityError:
            raise EngramError(f"A pack named {name!r} exists already: choose another name.") from None
        return self.row(name)

    def release(self, pack_id: int) -> None:
        """Give back a name taken with :meth:`reserve` whose pack was never finished.

        Only a pack with no version and no job is removed: whatever else uses it is left alone.
        """
        with self.db.atomic():
            self.db.execute("delete from packs where id = ? and active_version is null "
                            "and not exists (select 1 from pack_versions where pack_id = ?) "
                            "and not exists (select 1 from jobs where pack_id = ?)", [pack_id, pack_id, pack_id])

    def list(self) -> list[dict]:
        return [self._describe(row) for row in self.db.query("select * from packs order by name")]

    def row(self, name: str) -> dict:
        rows = list(self.db.query("select * from packs where name = ?", [name]))
        if not rows:
            known = ", ".join(r["name"] for r in self.db.query("select name from packs order by name")) or "none yet"
            raise EngramError(f"No memory pack named {name!r} (packs: {known}). Create one with `pack create {name}`.")
        return rows[0]

    def get(self, name: str) -> dict:
        return self._describe(self.row(name))

    def config(self, pack: dict) -> PackConfig:
        return PackConfig(**json.loads(pack["config"]))

    def _describe(self, row: dict) -> dict:
        versions = self.versions(row["id"])
        active = next((v for v in versions if v["number"] == row["active_version"]), None)
        learned = active["sources"] if active else []
        forgotten = []
        for ids in batched(learned):  # one parameter per source: in batches under SQLite's limit
            forgotten += [r["id"] for r in self.db.query(
                f"select id from sources where status = 'deleted' and id in ({placeholders(ids)}) order by id", ids)]
        config = PackConfig(**json.loads(row["config"]))
        return {
            "id": row["id"], "name": row["name"], "base_model": row["base_model"], "preset": config.preset,
            "mode": config.mode, "parameters": PRESETS[config.preset].parameters(len(config.engram.get("layers") or [1]))
            if config.uses_engram else None,
            "storage": config.engram.get("storage", "memory") if config.uses_engram else None,
            "collections": json.loads(row["collections"] or "[]"), "active_version": row["active_version"],
            "versions": versions, "learned_sources": len(learned), "deleted_sources_learned": forgotten,
            "created": row["created"], "migrated_from": self.migration(row["name"]),
        }

    # --- migrations (training/migrate.py) -------------------------------------------------------

    def record_migration(self, name: str, record: dict) -> None:
        """Keep with pack ``name`` where it was moved from (``<home>/packs/<name>/migration.json``)."""
        write_text(self.folder(name) / MIGRATION_FILE, json.dumps(record, indent=1))

    def migration(self, name: str) -> dict | None:
        """The record of the pack ``name`` was moved from (None: it was not moved)."""
        path = self.folder(name) / MIGRATION_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"error": f"unreadable {path}"}

    # --- versions -----------------------------------------------------------------------------

    def versions(self, pack_id: int) -> list[dict]:
        out = []
        for v in self.db.query("select * from pack_versions where pack_id = ? order by number", [pack_id]):
            out.append({"number": v["number"], "path": v["path"], "job_id": v["job_id"],
                        "sources": json.loads(v["sources"] or "[]"), "evaluation": json.loads(v["evaluation"] or "null"),
                        "created": v["created"]})
        return out

    def trained(self, name: str) -> dict:
        """The pack's active version; refused when it has none yet."""
        if (version := self.version(name)) is None:
            raise EngramError(f"Pack {name!r} has no trained version yet: train it first (`train --pack {name}`).")
        return version

    def version(self, name: str, number: int | None = None) -> dict | None:
        """A version of the pack (its active one by default); None when it has none."""
        pack = self.get(name)
        number = pack["active_version"] if number is None else number
        return next((v for v in pack["versions"] if v["number"] == number), None)

    def folder(self, name: str) -> Path:
        return self.root / name

    def version_folder(self, name: str, number: int) -> Path:
        return self.folder(name) / f"v{number}"

    def job_folder(self, name: str, job_id: int) -> Path:
        return self.folder(name) / "jobs" / str(job_id)

    def next_number(self, pack_id: int) -> int:
        row = self.db.execute("select max(number) from pack_versions where pack_id = ?", [pack_id]).fetchone()
        return (row[0] or 0) + 1

    def record_version(self, pack_id: int, number: int, path: Path, job_id: int | None, sources: list[int],
                       evaluation: dict | None) -> None:
        """Record a version whose folder is complete, and make it the active one (one transaction).

        The folder is flushed to disk first: the row must never point at files a power cut can lose.
        """
        sync_folder(Path(path))
        with self.db.atomic():
            self.db.execute("delete from pack_versions where pack_id = ? and number = ?", [pack_id, number])
            self.db["pack_versions"].insert({
                "pack_id": pack_id, "number": number, "path": str(path), "job_id": job_id,
                "sources": json.dumps(sorted(set(sources))), "evaluation": json.dumps(evaluation), "created": now(),
            })
            self.db.execute("update packs set active_version = ? where id = ?", [number, pack_id])

    def rollback(self, name: str, number: int) -> dict:
        pack = self.get(name)
        if not any(v["number"] == number for v in pack["versions"]):
            have = ", ".join(str(v["number"]) for v in pack["versions"]) or "none"
            raise EngramError(f"Pack {name!r} has no version {number} (versions: {have}).")
        with self.db.atomic():
            self.db.execute("update packs set active_version = ? where id = ?", [number, pack["id"]])
        return self.get(name)

    def clean_job(self, name: str, job_id: int) -> None:
        shutil.rmtree(self.job_folder(name, job_id), ignore_errors=True)
