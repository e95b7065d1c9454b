"""The slot index of a pack version: which chunks (of which sources) and n-grams wrote which table rows.

An Engram row is addressed by an n-gram alone (hashing, no router), so the rows a training
sequence wrote are a function of its n-grams. The index is built from the very examples the job
trained on, each of which carries the library chunk it renders (``Example.chunk_id``): it keeps
the distinct n-grams seen in training (every version includes those of its ancestors, since their
writes are still in the table), the (source, chunk) pairs each came from (with counts), and the
rows each addresses, sorted by row:

    slots/grams.npy        [G, 1 + max_order]  order, compressed ids (most recent first, -1 pad)
    slots/text_ids.npy     [G, max_order]      original token ids of one occurrence (for display)
    slots/gram_chunks.npy  [E, 4]              gram, source id, occurrences, chunk id
                                               (sorted by gram, then source, then chunk)
    slots/rows.npy         [R, 2]              row, gram (sorted by row)

(int32 when every value fits, else int64.) ``gram`` is a row number of ``grams.npy``; ``chunk
id`` is ``chunks.id`` in the library's SQLite database, -1 (:data:`NO_CHUNK`) where it is not
known. The source id is kept beside the chunk so that the sources of a row are known without the
database, and after a source's chunks are deleted.

Versions written before chunks were recorded have ``gram_sources.npy`` [E, 3] (gram, source id,
occurrences: the first three columns of ``gram_chunks.npy``) instead; they open as an index
whose every chunk is :data:`NO_CHUNK`, and a version trained on top of one keeps those entries
so (the inspector then searches the source's text for the n-gram, as those versions did).

Plain ``.npy`` arrays (read with ``allow_pickle=False``, memory-mapped), so "who wrote row r" is
two binary searches, whatever the size of the pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_app.engram import EngramModel, rows_for, shifted_ngrams
from engram_app.engram.hashing import skipping_positions

NO_CHUNK = -1  # the chunk of an entry is not known (an index of an earlier version, or an example of no chunk)
COMMON = ("grams", "text_ids", "rows")
WRITERS = "gram_chunks"  # [E, 4]: gram, source, occurrences, chunk
OLD_WRITERS = "gram_sources"  # [E, 3]: gram, source, occurrences (indexes of earlier versions)


@dataclass
class Writer:
    source_id: int
    ngram_ids: list[int]  # original token ids, oldest first (-1: before the start of the sequence)
    count: int
    chunk_id: int | None = None  # None: the index does not know the chunk (an earlier version's)


class SlotIndexBuilder:
    """Collects the n-grams of training sequences, then writes the index of a version."""

    def __init__(self, memory: EngramModel):
        self.memory = memory
        self.max_order = memory.config.max_order
        self._keys: list[np.ndarray] = []
        self._text: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self._chunks: list[np.ndarray] = []

    def add(self, ids: list[int], source_id: int, chunk_id: int | None) -> None:
        """Record the n-grams of one training sequence, written by ``chunk_id`` of ``source_id``."""
        if not ids:
            return
        m = self.max_order
        tokens = torch.tensor([ids], dtype=torch.long)
        compressed = self.memory.compression.cpu()[tokens]
        history = torch.full((1, m - 1), self.memory.boundary_id, dtype=torch.long)
        if self.memory.skip_ids is None:
            grams = shifted_ngrams(compressed, history, m)[0].numpy()  # [T, m], most recent first
            text = shifted_ngrams(tokens, torch.full((1, m - 1), -1, dtype=torch.long), m)[0].numpy()
        else:  # the n-grams reach over the chat template's tokens (EngramConfig.skip_template)
            full = torch.cat([history, compressed], dim=1)
            positions = skipping_positions(full, m - 1, m, self.memory.skip_ids.cpu())[0]  # [T, m]
            grams = full[0][positions].numpy()
            text = torch.cat([torch.full((m - 1,), -1, dtype=torch.long), tokens[0]])[positions].numpy()
        chunk = NO_CHUNK if chunk_id is None else chunk_id
        for n in self.memory.config.orders:
            key = np.full((len(ids), 1 + m), -1, dtype=np.int64)
            key[:, 0] = n
            key[:, 1: 1 + n] = grams[:, :n]
            shown = np.full((len(ids), m), -1, dtype=np.int64)
            shown[:, :n] = text[:, :n]
            self._keys.append(key)
            self._text.append(shown)
            self._sources.append(np.full(len(ids), source_id, dtype=np.int64))
            self._chunks.append(np.full(len(ids), chunk, dtype=np.int64))

    def write(self, folder: Path, previous: SlotIndex | None = None) -> SlotIndex:
        """Merge what was added with ``previous`` (the parent version's index) and save to ``folder``."""
        m = self.max_order
        keys, text = [*self._keys], [*self._text]
        sources, chunks = [*self._sources], [*self._chunks]
        counts = [np.ones(len(s), dtype=np.int64) for s in self._sources]
        if previous is not None and len(previous.grams):
            entries = previous.entries()
            keys.append(np.asarray(previous.grams, dtype=np.int64)[entries[:, 0]])
            text.append(np.asarray(previous.text_ids, dtype=np.int64)[entries[:, 0]])
            sources.append(entries[:, 1])
            counts.append(entries[:, 2])
            chunks.append(entries[:, 3])
        if keys:
            all_keys, all_text = np.concatenate(keys), np.concatenate(text)
            all_sources, all_counts, all_chunks = np.concatenate(sources), np.concatenate(counts), np.concatenate(chunks)
        else:
            all_keys = np.zeros((0, 1 + m), np.int64)
            all_text = np.zeros((0, m), np.int64)
            all_sources = all_counts = all_chunks = np.zeros(0, np.int64)
        grams, first, gram_of = np.unique(all_keys, axis=0, return_index=True, return_inverse=True)
        text_ids = all_text[first]
        triples, triple_of = np.unique(np.stack([gram_of.reshape(-1), all_sources, all_chunks], axis=1), axis=0,
                                       return_inverse=True)
        triple_counts = np.bincount(triple_of.reshape(-1), weights=all_counts, minlength=len(triples)).astype(np.int64)
        writers = np.stack([triples[:, 0], triples[:, 1], triple_counts, triples[:, 2]], axis=1)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("grams", grams), ("text_ids", text_ids), (WRITERS, writers), ("rows", self._rows(grams))):
            small = array.size == 0 or (int(array.max()) < 2**31 and int(array.min()) >= -(2**31))
            np.save(folder / f"{name}.npy", np.ascontiguousarray(array, dtype=np.int32 if small else np.int64),
                    allow_pickle=False)
        return SlotIndex.open(folder)

    def _rows(self, grams: np.ndarray) -> np.ndarray:
        """(row, gram) pairs for every gram in every Engram layer, sorted by row."""
        layout = self.memory.layout
        pairs = [np.zeros((0, 2), np.int64)]
        for n in layout.orders:
            gram_ids = np.flatnonzero(grams[:, 0] == n)
            if not len(gram_ids):
                continue
            rows = rows_for(layout, torch.from_numpy(grams[gram_ids, 1: 1 + n].astype(np.int64)))  # [g, L, heads]
            owners = np.broadcast_to(gram_ids[:, None, None], rows.shape)
            pairs.append(np.stack([rows.numpy().reshape(-1), owners.reshape(-1)], axis=1))
        pairs_all = np.concatenate(pairs)
        return pairs_all[np.lexsort((pairs_all[:, 1], pairs_all[:, 0]))]


class SlotIndex:
    """A version's slot index, memory-mapped from its folder (either layout of the module docstring)."""

    def __init__(self, grams, text_ids, writes, rows):
        self.grams, self.text_ids, self.writes, self.rows = grams, text_ids, writes, rows

    @classmethod
    def open(cls, folder: Path) -> SlotIndex:
        grams, text_ids, rows = (np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in COMMON)
        name = WRITERS if (folder / f"{WRITERS}.npy").is_file() else OLD_WRITERS
        writes = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return cls(grams, text_ids, writes, rows)

    @classmethod
    def exists(cls, folder: Path) -> bool:
        return (all((folder / f"{name}.npy").is_file() for name in COMMON)
                and any((folder / f"{name}.npy").is_file() for name in (WRITERS, OLD_WRITERS)))

    @property
    def has_chunks(self) -> bool:
        """Whether the index records chunks (False for an index written by an earlier version)."""
        return self.writes.shape[1] >= 4

    @property
    def gram_sources(self) -> np.ndarray:
        """[E, 3] gram, source id, occurrences: the columns every layout has (a view, no copy)."""
        return self.writes[:, :3]

    def entries(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Entries ``lo:hi`` as [n, 4] int64 (gram, source, occurrences, chunk), NO_CHUNK where not known."""
        part = np.asarray(self.writes[lo:hi], dtype=np.int64)
        if self.has_chunks:
            return part
        return np.concatenate([part, np.full((len(part), 1), NO_CHUNK, np.int64)], axis=1)

    @property
    def size(self) -> dict:
        return {"ngrams": int(len(self.grams)), "row_entries": int(len(self.rows)),
                "source_entries": int(len(self.writes))}

    def writers(self, row: int, limit: int = 50) -> list[Writer]:
        """Who wrote ``row``: (source, chunk, n-gram, occurrences), most frequent first."""
        row_col = self.rows[:, 0]
        key = np.asarray(row, dtype=row_col.dtype)  # a needle of the array's dtype: no conversion of the array
        lo, hi = np.searchsorted(row_col, key, "left"), np.searchsorted(row_col, key, "right")
        gram_col = self.writes[:, 0]
        found = [np.zeros((0, 4), np.int64)]
        for gram in np.asarray(self.rows[lo:hi, 1]).astype(gram_col.dtype):
            a, b = np.searchsorted(gram_col, gram, "left"), np.searchsorted(gram_col, gram, "right")
            found.append(self.entries(int(a), int(b)))
        entries = np.concatenate(found)
        # Most frequent first; ties keep the index order (gram, source, chunk). Only the kept ones become objects.
        entries = entries[np.argsort(-entries[:, 2], kind="stable")[:limit]]
        return [Writer(int(source), self.ngram_ids(int(gram)), int(count), None if chunk == NO_CHUNK else int(chunk))
                for gram, source, count, chunk in entries]

    def ngram_ids(self, gram: int) -> list[int]:
        """The original token ids of n-gram ``gram``, oldest first; -1 for positions before a sequence's start."""
        text = [int(t) for t in np.asarray(self.text_ids[gram])[::-1] if t >= 0]
        missing = int(self.grams[gram, 0]) - len(text)
        return [-1] * missing + text
