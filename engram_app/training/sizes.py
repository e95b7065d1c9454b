"""Size presets of a pack's memory, what each needs from the machine, and whether this one has it.

Three presets keep every row in memory (RAM, or the GPU when the model runs there); two keep
only the rows training has written, in files mapped from disk (``storage="mapped"``), so their
size is not bounded by RAM: a table of 10^9 rows opens in milliseconds and costs disk only for
what training writes.

What a preset needs (figures from ``bench/train_memory.py`` and ``bench/table_versions.py``,
see docs/BENCHMARKS.md):

- in memory: chat holds the table (4 bytes per parameter); training holds it once more in
  pieces (gradient rows and Adam moments for the rows touched): counted as 1.5x; each version
  on disk is the whole table;
- mapped: chat holds only the rows it reads (the page cache); training holds the rows it
  touches three times (value + two Adam moments, ~400 bytes a row); each version on disk is
  the rows written so far (136 bytes a row: a 10-minute CPU job writes ~0.1-0.3 GB).

A preset is refused, with the reason, when its needs exceed this machine's physical RAM or the
free disk under the data root.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from engram_app.engram import EngramConfig
from engram_app.errors import EngramError

GiB = 1024**3
MODEL_RAM = 3 * GiB  # the base model while training on the CPU (SmolLM2, 4 x 256 tokens: peak 2.7 GiB measured)
MAPPED_RAM = 2 * GiB  # rows a long training job touches (three copies), with margin
MAPPED_DISK = 2 * GiB  # the first versions of a mapped pack and a checkpoint
PRESET_DEPTH = 0.5  # a new pack's memory sits at the middle block (15 of SmolLM2's 30): bench/recall.py --layers


@dataclass(frozen=True)
class SizePreset:
    name: str
    rows_per_head: int
    head_dim: int
    storage: str  # "memory" | "mapped"
    description: str

    def engram_config(self) -> EngramConfig:
        """A new pack's memory. Its token compression strips whitespace as DeepSeek's reference does
        (" the" = "the"): on the persona bench it recalls more and forgets less than without
        (docs/BENCHMARKS.md, bench/compression_strip.py). It sits at the model's middle block
        (``PRESET_DEPTH``), where a memory of a person recalls far more of its facts asked in new
        words than at the 2nd block (docs/BENCHMARKS.md, stop 38). Packs made before keep their own
        config."""
        return EngramConfig(rows_per_head=self.rows_per_head, head_dim=self.head_dim, storage=self.storage,
                            compression_strip=True, depth=PRESET_DEPTH)

    def rows(self, layers: int = 1) -> int:
        config = self.engram_config()
        return layers * len(config.orders) * config.heads * self.rows_per_head

    def parameters(self, layers: int = 1) -> int:
        return self.rows(layers) * self.head_dim

    def table_bytes(self, layers: int = 1) -> int:
        return 4 * self.parameters(layers)  # fp32, as a full table would take

    def needs(self) -> dict:
        """Bytes of RAM (chat, training), disk (first version) and GPU memory this preset needs."""
        table = self.table_bytes()
        if self.storage == "memory":
            return {"ram_chat": table, "ram_train": int(1.5 * table) + MODEL_RAM, "disk": 2 * table,
                    "gpu": table, "gpu_note": "the table on the GPU"}
        return {"ram_chat": 0, "ram_train": MAPPED_RAM + MODEL_RAM, "disk": MAPPED_DISK, "gpu": 0,
                "gpu_note": "rows read from host memory (the table stays off the GPU)"}

    def to_json(self) -> dict:
        return {**asdict(self), "rows": self.rows(), "parameters": self.parameters(), "table_bytes": self.table_bytes(),
                "needs": self.needs()}


PRESETS = {
    p.name: p for p in (
        SizePreset("small", 4_093, 32, "memory", "~2 M parameters (8 MB): a few profiles and chats"),
        SizePreset("medium", 32_749, 32, "memory", "~17 M parameters (67 MB): the default; a library of documents"),
        SizePreset("large", 262_139, 32, "memory", "~134 M parameters (537 MB): a large library"),
        SizePreset("xlarge", 6_250_000, 32, "mapped",
                   "~3.2 B parameters (10^8 rows) mapped from disk: only written rows take space"),
        SizePreset("huge", 62_500_000, 32, "mapped",
                   "~32 B parameters (10^9 rows) mapped from disk: only written rows take space"),
    )
}
DEFAULT_PRESET = "medium"


def machine(home: Path) -> dict:
    """This machine's physical RAM, the free disk under ``home`` and the GPU's memory (None: no GPU)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = None
    probe = Path(home)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = shutil.disk_usage(probe).free
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0).total_memory
    except Exception:  # noqa: BLE001 - no usable GPU is an answer, not an error
        gpu = None
    return {"ram": ram, "disk_free": disk, "gpu": gpu}


def refusal(preset: SizePreset, resources: dict) -> str | None:
    """Why this machine cannot hold ``preset`` (None when it can)."""
    needs = preset.needs()
    ram, disk = resources.get("ram"), resources.get("disk_free")
    if ram is not None and needs["ram_train"] > ram:
        return (f"The {preset.name} preset needs {needs['ram_train'] / GiB:.1f} GiB of RAM to train; this machine has "
                f"{ram / GiB:.1f} GiB. Choose a smaller size" + (" or a mapped one (xlarge, huge)."
                                                                 if preset.storage == "memory" else "."))
    if disk is not None and needs["disk"] > disk:
        return (f"The {preset.name} preset needs {needs['disk'] / GiB:.1f} GiB of free disk for its first versions; "
                f"{disk / GiB:.1f} GiB are free under the data root. Free some space or choose a smaller size.")
    return None


def check_fits(name: str, home: Path, resources: dict | None = None) -> SizePreset:
    """The preset ``name`` when this machine can hold it; else a clear error."""
    if name not in PRESETS:
        raise EngramError(f"Unknown size {name!r}: choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    reason = refusal(preset, resources if resources is not None else machine(home))
    if reason:
        raise EngramError(reason)
    return preset


def describe(home: Path, resources: dict | None = None) -> list[dict]:
    """Every preset with its needs and whether it fits this machine (for `pack sizes` and the app)."""
    resources = resources if resources is not None else machine(home)
    out = []
    for preset in PRESETS.values():
        reason = refusal(preset, resources)
        out.append({**preset.to_json(), "fits": reason is None, "refusal": reason})
    return out


def human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def summary(row: dict) -> str:
    """One line of what a preset needs, for people."""
    needs = row["needs"]
    if row["storage"] == "memory":
        text = (f"{row['name']}: {row['parameters'] / 1e6:,.0f} M parameters in memory. RAM: {human(needs['ram_chat'])} to "
                f"chat, ~{human(needs['ram_train'])} to train. Disk: {human(row['table_bytes'])} per version. "
                f"GPU: {human(needs['gpu'])} ({needs['gpu_note']}).")
    else:
        text = (f"{row['name']}: {row['parameters'] / 1e9:,.1f} B parameters ({row['rows']:.1e} rows) mapped from disk. "
                f"RAM: only the rows read to chat, ~{human(needs['ram_train'])} to train. Disk: only rows written "
                f"(136 B each; {human(needs['disk'])} kept free for the first versions). GPU: {needs['gpu_note']}.")
    return text + ("" if row["fits"] else f" Not on this machine: {row['refusal']}")
