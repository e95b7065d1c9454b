"""Who wrote a memory slot: the sources, n-grams and passages behind a row of a pack version.

Read from the version's slot index (training/slots.py), which records, for every n-gram the
trainer saw, the sources it came from; the passage shown is where that source says the n-gram.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sqlite_utils

from engram_app.engram.trace import START
from engram_app.errors import EngramError
from engram_app.training.packs import PackStore
from engram_app.training.slots import SlotIndex


class Provenance:
    """The slot indexes of a data root's pack versions, opened once (memory-mapped) and kept."""

    def __init__(self, db: sqlite_utils.Database, store: PackStore):
        self.db = db
        self.store = store
        self._indexes: dict[str, SlotIndex] = {}

    def writers(self, pack: str, rows: Sequence[int], version: int | None, limit: int, tokenizer) -> dict[int, list[dict]]:
        """For each row: source id, title, status, n-gram (as trace reports write it), count, passage."""
        info = self.store.version(pack, version)
        if info is None:
            return {int(r): [] for r in rows}
        folder = Path(info["path"]) / "slots"
        if (info["evaluation"] or {}).get("imported") and not SlotIndex.exists(folder):
            return {int(r): [] for r in rows}  # an imported version carries no record of sources (transfer.py)
        if not SlotIndex.exists(folder):
            raise EngramError(f"Version {info['number']} of pack {pack!r} has no slot index.")
        index = self._indexes.get(str(folder)) or SlotIndex.open(folder)
        self._indexes[str(folder)] = index
        titles: dict[int, dict] = {}
        out: dict[int, list[dict]] = {}
        for row in rows:
            found = []
            for w in index.writers(int(row), limit):
                if w.source_id not in titles:
                    hit = list(self.db.query("select title, status from sources where id = ?", [w.source_id]))
                    titles[w.source_id] = hit[0] if hit else {"title": None, "status": "unknown"}
                source = titles[w.source_id]
                pieces = [START if t < 0 else tokenizer.decode([t], clean_up_tokenization_spaces=False)
                          for t in w.ngram_ids]
                found.append({"source": w.source_id, "title": source["title"], "status": source["status"],
                              "ngram": "|".join(pieces), "count": w.count,
                              "passage": self.passage(w.source_id, [p for p in pieces if p != START])})
            out[int(row)] = found
        return out

    def passage(self, source_id: int, pieces: list[str], width: int = 160) -> str:
        """Where a source says an n-gram: the text around it in the source's chunks (or its opening)."""
        needle = "".join(pieces).strip()
        rows = list(self.db.query(
            "select text from chunks where source_id = ? and instr(lower(text), lower(?)) > 0 order by position limit 1",
            [source_id, needle])) if needle else []
        if not rows:  # trained on a phrasing of the source (a profile fact as a question): show its opening
            rows = list(self.db.query("select text from chunks where source_id = ? order by position limit 1",
                                      [source_id]))
            return " ".join(rows[0]["text"][:width].split()) if rows else ""
        text = rows[0]["text"]
        at = text.lower().find(needle.lower())
        begin, end = max(0, at - width // 2), min(len(text), at + len(needle) + width // 2)
        return ("..." if begin else "") + " ".join(text[begin:end].split()) + ("..." if end < len(text) else "")
