"""Where the memory's rows live. The layer only calls :meth:`TableStorage.lookup`.

Keeping storage behind this small interface lets the rows move (to a memory-mapped file, to
pinned host memory with prefetch) without touching the layer or the addressing.
:class:`EmbeddingTable` holds every row in memory; :class:`MappedTable` keeps them in a file
mapped into memory and reads only the rows a token addresses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TableStorage(nn.Module):
    """A [num_rows, dim] matrix of memory rows, read by row index."""

    num_rows: int
    dim: int

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of ``rows`` (any shape of int64 indices) -> ``rows.shape + (dim,)``."""
        raise NotImplementedError

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are row-sparse (to be given to a sparse optimizer)."""
        raise NotImplementedError


class EmbeddingTable(TableStorage):
    """All rows in one ``nn.Embedding`` with sparse gradients: a step only touches the rows it read."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.embedding = nn.Embedding(num_rows, dim, sparse=True)
        with torch.no_grad():
            if init_std > 0:
                self.embedding.weight.normal_(0.0, init_std)
            else:
                self.embedding.weight.zero_()

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embedding(rows)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.weight]


# --- rows in a memory-mapped file ---------------------------------------------------------------

MAPPED_FORMAT = "engram-mapped-table"
MAPPED_VERSION = 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (SplitMix64) of uint64 values: the same output for the same input, anywhere."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def initial_rows(rows: np.ndarray, dim: int, std: float, seed: int) -> np.ndarray:
    """The N(0, std) initial values of ``rows``, a pure function of (seed, row, column).

    A mapped table never stores a row it has not written: reading one computes these values, so a
    table of 10^9 rows starts as a sparse file of zero bytes and still is not all zeros (a zero
    table and a zero-initialised value projection would give each other zero gradients).
    """
    if std == 0:
        return np.zeros((len(rows), dim), dtype=np.float32)
    with np.errstate(over="ignore"):
        counter = (rows.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None]) * np.uint64(2)
        key = _splitmix64(np.asarray([seed], dtype=np.uint64))[0]
        a = _splitmix64(counter ^ key)
        b = _splitmix64((counter + np.uint64(1)) ^ key)
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = (b >> np.uint64(11)).astype(np.float64) / 2.0**53  # [0, 1)
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    return (normal * std).astype(np.float32)


class MappedTable(TableStorage):
    """Rows in a file mapped into memory (``numpy.memmap``): the table need not fit in RAM.

    A folder holds ``table.json`` (format, rows, dim, dtype, init std and seed), ``table.f32``
    (the rows, row-major little-endian float32, created as a sparse file) and ``written.bits``
    (one bit per row: has it been written?). Opening maps both files and reads nothing; a lookup
    reads only the rows it addresses, and a row never written reads as :func:`initial_rows`.

    Read-only for the model for now (no sparse parameters: training writes go through
    :meth:`write_rows`); training a mapped table in place is the next step of the
    ultra-large-memory work.
    """

    def __init__(self, folder: str | Path, writable: bool = False):
        super().__init__()
        self.folder = Path(folder)
        meta = json.loads((self.folder / "table.json").read_text())
        if meta.get("format") != MAPPED_FORMAT or meta.get("version") != MAPPED_VERSION or meta.get("dtype") != "float32":
            raise ValueError(f"{self.folder} does not hold a mapped table of format {MAPPED_FORMAT} v{MAPPED_VERSION}.")
        self.num_rows, self.dim = int(meta["rows"]), int(meta["dim"])
        self.init_std, self.seed = float(meta["init_std"]), int(meta["seed"])
        mode = "r+" if writable else "r"
        self.data = np.memmap(self.folder / "table.f32", dtype="<f4", mode=mode, shape=(self.num_rows, self.dim))
        self.bits = np.memmap(self.folder / "written.bits", dtype=np.uint8, mode=mode, shape=((self.num_rows + 7) // 8,))
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device, dtype)

    @classmethod
    def create(cls, folder: str | Path, num_rows: int, dim: int, init_std: float = 0.02, seed: int = 0) -> MappedTable:
        """A new table of ``num_rows`` x ``dim`` in ``folder``: sparse files, nothing written yet."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, size in (("table.f32", num_rows * dim * 4), ("written.bits", (num_rows + 7) // 8)):
            with open(folder / name, "wb") as f:
                f.truncate(size)  # a hole: no disk block is used until a row is written
        (folder / "table.json").write_text(json.dumps({
            "format": MAPPED_FORMAT, "version": MAPPED_VERSION, "rows": num_rows, "dim": dim, "dtype": "float32",
            "init_std": init_std, "seed": seed}, indent=2))
        return cls(folder, writable=True)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 values of ``rows`` (sorted unique int64 indices): stored, or initial when never written."""
        values = np.array(self.data[rows])
        fresh = ((self.bits[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1) == 0
        if fresh.any():
            values[fresh] = initial_rows(rows[fresh], self.dim, self.init_std, self.seed)
        return values

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` for ``rows`` (unique int64 indices) and mark them written."""
        rows = np.asarray(rows, dtype=np.int64)
        self.data[rows] = np.asarray(values, dtype=np.float32)
        np.bitwise_or.at(self.bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))

    def flush(self) -> None:
        self.data.flush()
        self.bits.flush()

    def written_rows(self) -> int:
        return int(np.bitwise_count(self.bits).sum(dtype=np.int64))

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1).cpu().numpy()
        unique, inverse = np.unique(flat, return_inverse=True)
        values = torch.from_numpy(self.read_rows(unique))[torch.from_numpy(inverse.reshape(-1))]
        return values.to(self._anchor.device, self._anchor.dtype).reshape(*rows.shape, self.dim)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return []
