"""The slot index of a pack version: which sources and n-grams wrote which table rows.

An Engram row is addressed by an n-gram alone (hashing, no router), so the rows a training
sequence wrote are a function of its n-grams. The index keeps the distinct n-grams seen in
training (every version includes those of its ancestors, since their writes are still in the
table), the sources each came from (with counts), and the rows each addresses, sorted by row:

    slots/grams.npy         [G, 1 + max_order]  order, compressed ids (most recent first, -1 pad)
    slots/text_ids.npy      [G, max_order]      original token ids of one occurrence (for display)
    slots/gram_sources.npy  [E, 3]              gram, source id, occurrences (sorted by gram)
    slots/rows.npy          [R, 2]              row, gram (sorted by row)

(int32 when every value fits, else int64.)

Plain ``.npy`` arrays (read with ``allow_pickle=False``, memory-mapped), so "who wrote row r" is
two binary searches, whatever the size of the pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_app.engram.hashing import hash_rows, shifted_ngrams
from engram_app.engram.model import EngramModel

FILES = ("grams", "text_ids", "gram_sources", "rows")


@dataclass
class Writer:
    source_id: int
    ngram_ids: list[int]  # original token ids, oldest first
    count: int


class SlotIndexBuilder:
    """Collects the n-grams of training sequences, then writes the index of a version."""

    def __init__(self, memory: EngramModel):
        self.memory = memory
        self.max_order = memory.config.max_order
        self._keys: list[np.ndarray] = []
        self._text: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []

    def add(self, ids: list[int], source_id: int) -> None:
        if not ids:
            return
        m = self.max_order
        tokens = torch.tensor([ids], dtype=torch.long)
        compressed = self.memory.compression.cpu()[tokens]
        history = torch.full((1, m - 1), self.memory.boundary_id, dtype=torch.long)
        grams = shifted_ngrams(compressed, history, m)[0].numpy()  # [T, m], most recent first
        text = shifted_ngrams(tokens, torch.full((1, m - 1), -1, dtype=torch.long), m)[0].numpy()
        for n in self.memory.config.orders:
            key = np.full((len(ids), 1 + m), -1, dtype=np.int64)
            key[:, 0] = n
            key[:, 1: 1 + n] = grams[:, :n]
            shown = np.full((len(ids), m), -1, dtype=np.int64)
            shown[:, :n] = text[:, :n]
            self._keys.append(key)
            self._text.append(shown)
            self._sources.append(np.full(len(ids), source_id, dtype=np.int64))

    def write(self, folder: Path, previous: SlotIndex | None = None) -> SlotIndex:
        """Merge what was added with ``previous`` (the parent version's index) and save to ``folder``."""
        m = self.max_order
        keys = [*self._keys]
        text = [*self._text]
        sources = [*self._sources]
        counts = [np.ones(len(s), dtype=np.int64) for s in self._sources]
        if previous is not None and len(previous.grams):
            pairs = np.asarray(previous.gram_sources, dtype=np.int64)
            keys.append(np.asarray(previous.grams, dtype=np.int64)[pairs[:, 0]])
            text.append(np.asarray(previous.text_ids, dtype=np.int64)[pairs[:, 0]])
            sources.append(pairs[:, 1])
            counts.append(pairs[:, 2])
        if keys:
            all_keys, all_text = np.concatenate(keys), np.concatenate(text)
            all_sources, all_counts = np.concatenate(sources), np.concatenate(counts)
        else:
            all_keys = np.zeros((0, 1 + m), np.int64)
            all_text = np.zeros((0, m), np.int64)
            all_sources = all_counts = np.zeros(0, np.int64)
        grams, first, gram_of = np.unique(all_keys, axis=0, return_index=True, return_inverse=True)
        gram_of = gram_of.reshape(-1)
        text_ids = all_text[first]
        pair_keys = np.stack([gram_of, all_sources], axis=1)
        pairs, pair_of = np.unique(pair_keys, axis=0, return_inverse=True)
        pair_counts = np.bincount(pair_of.reshape(-1), weights=all_counts, minlength=len(pairs)).astype(np.int64)
        gram_sources = np.concatenate([pairs, pair_counts[:, None]], axis=1) if len(pairs) else np.zeros((0, 3), np.int64)
        rows = self._rows(grams)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in zip(FILES, (grams, text_ids, gram_sources, rows)):
            small = array.size == 0 or (int(array.max()) < 2**31 and int(array.min()) >= -(2**31))
            np.save(folder / f"{name}.npy", np.ascontiguousarray(array, dtype=np.int32 if small else np.int64),
                    allow_pickle=False)
        return SlotIndex.open(folder)

    def _rows(self, grams: np.ndarray) -> np.ndarray:
        """(row, gram) pairs for every gram in every Engram layer, sorted by row."""
        layout = self.memory.layout
        if not len(grams):
            return np.zeros((0, 2), np.int64)
        keys = torch.from_numpy(grams[:, 1:].copy()).clamp_min(0).unsqueeze(0)  # [1, G, m]; pads do not matter
        rows = hash_rows(layout, keys)[0]  # [G, L, orders*heads]
        order_index = {n: i for i, n in enumerate(layout.orders)}
        column = torch.tensor([order_index[int(n)] for n in grams[:, 0]]) * layout.heads  # first column of its order
        picks = column[:, None] + torch.arange(layout.heads)[None]  # [G, heads]
        chosen = torch.gather(rows, 2, picks[:, None, :].expand(-1, rows.shape[1], -1))  # [G, L, heads]
        gram_ids = torch.arange(len(grams))[:, None, None].expand_as(chosen)
        pairs = torch.stack([chosen.reshape(-1), gram_ids.reshape(-1)], dim=1).numpy()
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


class SlotIndex:
    """A version's slot index, memory-mapped from its folder."""

    def __init__(self, grams, text_ids, gram_sources, rows):
        self.grams, self.text_ids, self.gram_sources, self.rows = grams, text_ids, gram_sources, rows

    @classmethod
    def open(cls, folder: Path) -> SlotIndex:
        arrays = [np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in FILES]
        return cls(*arrays)

    @classmethod
    def exists(cls, folder: Path) -> bool:
        return all((folder / f"{name}.npy").is_file() for name in FILES)

    @property
    def size(self) -> dict:
        return {"ngrams": int(len(self.grams)), "row_entries": int(len(self.rows)),
                "source_entries": int(len(self.gram_sources))}

    def writers(self, row: int, limit: int = 50) -> list[Writer]:
        """Who wrote ``row``: (source, n-gram, occurrences), most frequent first."""
        row_col = self.rows[:, 0]
        key = np.asarray(row, dtype=row_col.dtype)  # a needle of the array's dtype: no conversion of the array
        lo, hi = np.searchsorted(row_col, key, "left"), np.searchsorted(row_col, key, "right")
        out: list[Writer] = []
        gram_col = self.gram_sources[:, 0]
        for gram in np.asarray(self.rows[lo:hi, 1]).astype(gram_col.dtype):
            a, b = np.searchsorted(gram_col, gram, "left"), np.searchsorted(gram_col, gram, "right")
            text = [int(t) for t in np.asarray(self.text_ids[gram])[::-1] if t >= 0]
            missing = int(self.grams[gram, 0]) - len(text)  # positions before the start of a sequence
            for _gram, source, count in np.asarray(self.gram_sources[a:b]):
                out.append(Writer(int(source), [-1] * missing + text, int(count)))
        out.sort(key=lambda w: -w.count)
        return out[:limit]
