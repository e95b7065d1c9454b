"""Who wrote a memory slot: the sources, chunks, n-grams and passages behind a row of a pack version.

Read from the version's slot index (training/slots.py), which records, for every n-gram the
trainer saw, the library chunk of each training example it came from. The passage shown for a
writer is that chunk's text: around the n-gram where the chunk says it, else the chunk's start
(a profile fact trained as a question and answer writes n-grams its chunk never spells out:
"What is my dog called?" comes from the chunk "My dog is called Pixel.").

Indexes written before chunks were recorded know the source only: for them the passage is
searched for in the source's chunks, else the source's opening is shown, as those versions did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sqlite_utils

from engram_app.engram import ngram_text
from engram_app.errors import EngramError
from engram_app.training.packs import PackStore
from engram_app.training.slots import SlotIndex, Writer

WIDTH = 160  # characters of a passage around its n-gram


class Provenance:
    """The slot indexes of a data root's pack versions, opened once (memory-mapped) and kept."""

    def __init__(self, db: sqlite_utils.Database, store: PackStore):
        self.db = db
        self.store = store
        self._indexes: dict[str, SlotIndex] = {}

    def writers(self, pack: str, rows: Sequence[int], version: int | None, limit: int, tokenizer) -> dict[int, list[dict]]:
        """For each row: source id, title, status, n-gram (as trace reports write it), count, passage, chunk.

        ``chunk`` is the library chunk whose training text wrote the row (None for an index of an
        earlier version, which did not record it).
        """
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
                found.append({"source": w.source_id, "title": source["title"], "status": source["status"],
                              "ngram": self.ngram(w, tokenizer), "count": w.count,
                              "passage": self.writer_passage(w, tokenizer), "chunk": w.chunk_id})
            out[int(row)] = found
        return out

    @staticmethod
    def ngram(writer: Writer, tokenizer) -> str:
        """The writer's n-gram written as trace reports write a slot's n-gram (``"<s>|My| dog"``)."""
        ids = [t for t in writer.ngram_ids if t >= 0]
        return ngram_text(tokenizer, ids, len(ids) - 1, len(writer.ngram_ids))

    def writer_passage(self, writer: Writer, tokenizer) -> str:
        """The passage of the chunk that wrote the row; for an earlier version's index, a searched one."""
        needle = "".join(tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in writer.ngram_ids if t >= 0)
        if writer.chunk_id is not None:
            return self.passage(writer.chunk_id, needle)
        return self.searched_passage(writer.source_id, needle)

    def passage(self, chunk_id: int, needle: str, width: int = WIDTH) -> str:
        """Chunk ``chunk_id``'s text around ``needle`` (case and spacing aside), else its start ("" if deleted)."""
        rows = list(self.db.query("select text from chunks where id = ?", [chunk_id]))
        return _around(rows[0]["text"], needle, width) if rows else ""

    def searched_passage(self, source_id: int, needle: str, width: int = WIDTH) -> str:
        """For indexes that know no chunk: the first of the source's chunks that says ``needle``, else its opening."""
        needle = needle.strip()
        rows = list(self.db.query(
            "select text from chunks where source_id = ? and instr(lower(text), lower(?)) > 0 order by position limit 1",
            [source_id, needle])) if needle else []
        if not rows:  # trained on a phrasing of the source (a profile fact as a question): show its opening
            rows = list(self.db.query("select text from chunks where source_id = ? order by position limit 1",
                                      [source_id]))
        return _around(rows[0]["text"], needle, width) if rows else ""


def _around(text: str, needle: str, width: int) -> str:
    """``text`` (its runs of whitespace made one space) around the first ``needle``, else its first ``width`` chars."""
    flat, needle = " ".join(text.split()), " ".join(needle.split())
    at = flat.lower().find(needle.lower()) if needle else -1
    if at < 0:
        return flat[:width] + ("..." if len(flat) > width else "")
    begin, end = max(0, at - width // 2), min(len(flat), at + len(needle) + width // 2)
    return ("..." if begin else "") + flat[begin:end] + ("..." if end < len(flat) else "")
