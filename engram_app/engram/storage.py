"""Where the memory's rows live. The layer only calls :meth:`TableStorage.lookup`.

Keeping storage behind this small interface lets the rows move without touching the layer or
the addressing. :class:`EmbeddingTable` holds every row in memory (an ``nn.Embedding``);
:class:`MappedTable` stores only the rows ever written, in files mapped into memory, and reads
only the rows a token addresses, so a table of 10^9 rows opens in milliseconds on a laptop.

The row optimiser (:class:`~engram_app.engram.optim.RowwiseAdam`) talks to both through three
methods: :meth:`TableStorage.row_gradients`, :meth:`TableStorage.apply_row_update` and
:meth:`TableStorage.clear_row_gradients`.

**Prefetching rows to a GPU.** A table whose rows live in host memory (:class:`MappedTable` with
the model on a GPU) would stall the forward pass if the memory layer fetched its rows itself: a
gather on the CPU, then a copy, then the layer. But the rows depend only on the token ids, so
they are known before the first block runs. :meth:`TableStorage.prefetch` starts the fetch then:
the rows are gathered straight into a pinned (page-locked) host buffer and copied to the GPU on a
side CUDA stream, so the copy runs while the blocks before the memory layer compute. It returns
a :class:`PrefetchedRows`; the memory layer calls :meth:`PrefetchedRows.wait`, which makes the
compute stream wait for the copy's event (the GPU waits, the CPU does not). On the CPU the same
path runs without a stream or pinned memory (the gather is the whole fetch). Tables whose rows
are already where the model is (:class:`EmbeddingTable`) return None: the layer reads them itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class PrefetchedRows:
    """Rows fetched ahead of the layer that reads them (:meth:`TableStorage.prefetch`).

    On a GPU ``values`` may still be arriving: ``ready`` is the copy stream's event, and
    :meth:`wait` must be called before they are read.
    """

    rows: torch.Tensor  # the row ids asked for: a prefetch is used only for exactly these
    values: torch.Tensor  # rows.shape + (dim,), on the table's device
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after the copy (None: already there)

    def matches(self, rows: torch.Tensor) -> bool:
        """Whether these are the rows ``rows`` asks for (else the prefetch is stale: not to be used)."""
        return (self.rows.shape == rows.shape and self.rows.device == rows.device
                and bool(torch.equal(self.rows, rows)))

    def wait(self) -> torch.Tensor:
        """The values, safe to read on the current stream: on a GPU that stream waits for the copy."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.values.device)
            stream.wait_event(self.ready)  # the GPU waits; the CPU goes on queueing work
            self.values.record_stream(stream)  # its memory (allocated on the copy stream) is in use here too
            self.ready = None
        return self.values


class TableStorage(nn.Module):
    """A [num_rows, dim] matrix of memory rows, read by row index."""

    num_rows: int
    dim: int

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of ``rows`` (any shape of int64 indices) -> ``rows.shape + (dim,)``."""
        raise NotImplementedError

    def prefetch(self, rows: torch.Tensor) -> PrefetchedRows | None:
        """Start fetching ``rows`` to the model's device now, for a layer that reads them later.

        None: nothing to gain (the rows are already on the device), or not possible (a lookup that
        records gradients): the layer calls :meth:`lookup` itself.
        """
        return None

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are row-sparse (to be given to a sparse optimizer)."""
        raise NotImplementedError

    # The row optimiser's view of a table.
    def start_recording(self) -> None:
        """From now on, lookups made with gradients enabled record gradients for their rows."""

    def row_gradients(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sorted unique row ids, their summed gradients) of the last backward pass, or None."""
        raise NotImplementedError

    def apply_row_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta`` [len(rows), dim] to ``rows``."""
        raise NotImplementedError

    def clear_row_gradients(self) -> None:
        raise NotImplementedError


class ParameterRows:
    """The row-optimiser methods of a table whose rows are one [rows, dim] parameter, ``self.weight``."""

    weight: torch.Tensor

    def start_recording(self) -> None:
        pass  # autograd records a parameter's gradients

    def row_gradients(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        grad = self.weight.grad
        if grad is None:
            return None
        if grad.is_sparse:
            grad = grad.coalesce()
            return grad.indices()[0], grad.values()
        ids = grad.abs().sum(1).nonzero().flatten()  # a dense gradient: keep the rows it touches
        return ids, grad[ids]

    def apply_row_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.index_add_(0, rows, delta)

    def clear_row_gradients(self) -> None:
        self.weight.grad = None


class EmbeddingTable(ParameterRows, TableStorage):
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


# --- rows in memory-mapped files -----------------------------------------------------------------

MAPPED_FORMAT = "engram-row-table"
MAPPED_VERSION = 2
TABLE_JSON, ROWS_FILE, VALUES_FILE = "table.json", "rows.npy", "values.npy"


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
    table of 10^9 rows starts as zero bytes on disk and still is not all zeros (a zero table and a
    zero-initialised value projection would give each other zero gradients).
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


class RowSlots:
    """Row id -> position in append-only arrays, for a set of rows that grows (no reordering)."""

    def __init__(self):
        self.ids = np.empty(0, dtype=np.int64)  # sorted
        self.slots = np.empty(0, dtype=np.int64)  # slot of ids[i]

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (-1 where absent)."""
        if not len(self.ids):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, self.slots[pos], -1)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (unique), giving new rows the next free slots."""
        slots = self.find(ids)
        new = slots < 0
        if new.any():
            fresh = np.arange(len(self.ids), len(self.ids) + int(new.sum()), dtype=np.int64)
            slots[new] = fresh
            at = np.searchsorted(self.ids, ids[new])
            self.ids = np.insert(self.ids, at, ids[new])  # O(rows) integer copy: cheap next to a step
            self.slots = np.insert(self.slots, at, fresh)
        return slots


class MappedTable(TableStorage):
    """Only the rows ever written, in ``.npy`` files mapped into memory: the table need not fit in RAM.

    A stored table is a folder::

        table.json   {"format": "engram-row-table", "version": 2, "rows", "dim", "dtype": "float32",
                      "init_std", "seed", "count", "delta": false, "base": null}
                     (a checkpoint: "delta": true, "base": the version folder it extends, or null)
        rows.npy     int64 [count], the written rows' ids, sorted, unique
        values.npy   float32 [count, dim], their values

    Opening maps both arrays and reads nothing else (``numpy.load(mmap_mode="r")``, no pickle);
    a lookup finds its rows by binary search and reads only them; a row never written reads as
    :func:`initial_rows`. Pack versions are written whole (``base`` null); a training checkpoint
    stores only the rows changed since the version it started from (``base`` names it), so a
    checkpoint costs what the job touched, not what the table holds.

    Writes (:meth:`write_rows`, or training through :meth:`apply_row_update`) go to rows held in
    RAM, never into the mapped files, which stay exactly as they were read: a version on disk is
    never modified, and RAM grows with the rows written, not with the table.
    """

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02, seed: int = 0,
                 folder: str | Path | None = None):
        super().__init__()
        self.num_rows, self.dim, self.init_std, self.seed = int(num_rows), int(dim), float(init_std), int(seed)
        self.folder = Path(folder) if folder is not None else None
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []  # stored (ids, values), newest first
        self.base: Path | None = None  # the table a checkpoint's rows extend
        self.is_delta = False  # opened from a checkpoint (its folder will be replaced: never a base)
        if self.folder is not None:
            self._open_chain(self.folder)
        self.changed = RowSlots()  # rows written since opening: ids -> slots of self._values
        self._values = np.empty((0, self.dim), dtype=np.float32)
        self._recording = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row ids, leaf values) read this step
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device, dtype)
        self._stream: torch.cuda.Stream | None = None  # the side stream of prefetch copies (GPU only, made on first use)

    # --- files ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> MappedTable:
        meta = read_table_json(folder)
        return cls(meta["rows"], meta["dim"], meta["init_std"], meta["seed"], folder=folder)

    def _open_chain(self, folder: Path) -> None:
        """Map the table in ``folder`` and, for a checkpoint, the version it extends (newest first)."""
        seen: set[Path] = set()
        while folder is not None:
            if folder.resolve() in seen:
                raise ValueError(f"{folder}: a table that extends itself")
            seen.add(folder.resolve())
            meta = read_table_json(folder)
            if (meta["rows"], meta["dim"]) != (self.num_rows, self.dim):
                raise ValueError(f"{folder} holds a {meta['rows']} x {meta['dim']} table, not {self.num_rows} x {self.dim}.")
            self.layers.append(_read_layer(folder, meta))
            base = Path(meta["base"]) if meta.get("base") is not None else None
            if len(self.layers) == 1:
                self.is_delta, self.base = bool(meta.get("delta")), base
            folder = base

    def save(self, folder: str | Path, delta: bool = False) -> Path:
        """Write this table's rows (as now, changes included) to the new folder ``folder``.

        ``delta``: only the rows that differ from the version this table was opened from, with a
        reference to it (for checkpoints); else every written row, self-contained (for versions).
        Values are copied a block of rows at a time, so RAM stays small whatever the table holds.
        """
        folder = Path(folder)
        folder.mkdir(parents=True)
        if delta and self.is_delta:  # a checkpoint again: its own rows carry over, same base
            own, base = [self.layers[0][0]], self.base
        elif delta and self.folder is not None:  # the first checkpoint over a version
            own, base = [], self.folder
        else:
            own, base = [layer[0] for layer in self.layers], None
        ids = self.changed.ids
        for layer_ids in own:
            ids = np.union1d(ids, layer_ids)
        rows = np.lib.format.open_memmap(folder / ROWS_FILE, mode="w+", dtype=np.int64, shape=(len(ids),))
        values = np.lib.format.open_memmap(folder / VALUES_FILE, mode="w+", dtype=np.float32, shape=(len(ids), self.dim))
        block = 1 << 18
        for start in range(0, len(ids), block):
            chunk = ids[start:start + block]
            rows[start:start + len(chunk)] = chunk
            values[start:start + len(chunk)] = self.read_rows(chunk)
        rows.flush()
        values.flush()
        del rows, values
        (folder / TABLE_JSON).write_text(json.dumps({
            "format": MAPPED_FORMAT, "version": MAPPED_VERSION, "rows": self.num_rows, "dim": self.dim,
            "dtype": "float32", "init_std": self.init_std, "seed": self.seed, "count": int(len(ids)),
            "delta": bool(delta), "base": str(Path(base).resolve()) if base is not None else None}, indent=2))
        return folder

    # --- rows -----------------------------------------------------------------------------------

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 values of ``rows`` (sorted unique int64): changed, stored, or initial."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.empty((len(rows), self.dim), dtype=np.float32)
        missing = np.ones(len(rows), dtype=bool)
        slots = self.changed.find(rows)
        hit = slots >= 0
        if hit.any():
            values[hit] = self._values[slots[hit]]
            missing &= ~hit
        for ids, stored in self.layers:
            if not missing.any():
                break
            if not len(ids):
                continue
            want = rows[missing]
            pos = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
            found = ids[pos] == want
            if found.any():
                where = np.flatnonzero(missing)[found]
                values[where] = stored[pos[found]]
                missing[where] = False
        if missing.any():
            values[missing] = initial_rows(rows[missing], self.dim, self.init_std, self.seed)
        return values

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Set ``rows`` (unique int64) to ``values`` (held in RAM until :meth:`save`)."""
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.changed.add(rows)
        needed = len(self.changed)
        if needed > len(self._values):  # grow the value store by doubling
            grown = np.empty((max(needed, 2 * len(self._values), 1024), self.dim), dtype=np.float32)
            grown[: len(self._values)] = self._values
            self._values = grown
        self._values[slots] = np.asarray(values, dtype=np.float32)

    def stored_rows(self) -> int:
        """Rows held in the files this table was opened from."""
        return sum(len(ids) for ids, _ in self.layers)

    def written_rows(self) -> int:
        """Distinct rows that differ from their initial values (stored or changed)."""
        ids = self.changed.ids
        for layer_ids, _ in self.layers:
            ids = np.union1d(ids, layer_ids)
        return int(len(ids))

    def changed_bytes(self) -> int:
        """RAM held by rows changed since opening."""
        return self._values.nbytes + self.changed.ids.nbytes + self.changed.slots.nbytes

    # --- the model's view -------------------------------------------------------------------------

    def _distinct(self, rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(distinct row ids, their float32 values [n, dim] on the CPU, each of ``rows``' index into them)."""
        unique, inverse = np.unique(rows.reshape(-1).cpu().numpy(), return_inverse=True)
        return unique, torch.from_numpy(self.read_rows(unique)), torch.from_numpy(inverse.reshape(-1))

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        unique, values, inverse = self._distinct(rows)
        if self._recording and torch.is_grad_enabled():
            values.requires_grad_(True)
            self._pending.append((torch.from_numpy(unique), values))
        device = self._anchor.device
        gathered = values[inverse]
        if device.type == "cuda":  # pinned host memory: the copy does not hold up the CPU
            gathered = gathered.pin_memory() if not gathered.requires_grad else gathered
            gathered = gathered.to(device, non_blocking=True)
        return gathered.to(device, self._anchor.dtype).reshape(*rows.shape, self.dim)

    def prefetch(self, rows: torch.Tensor) -> PrefetchedRows | None:
        """Gather ``rows`` into a pinned buffer and copy them to the GPU on a side stream (module docstring).

        Exactly the values :meth:`lookup` gives. While training records gradients a lookup must
        return leaf tensors that collect them: no prefetch then (None).
        """
        if self._recording and torch.is_grad_enabled():
            return None
        _, values, inverse = self._distinct(rows)
        device, dtype, shape = self._anchor.device, self._anchor.dtype, (*rows.shape, self.dim)
        if device.type != "cuda":  # the CPU: the gather is the whole fetch, nothing to overlap
            return PrefetchedRows(rows, values[inverse].to(dtype).reshape(shape))
        staging = torch.empty((len(inverse), self.dim), dtype=values.dtype, pin_memory=True)
        torch.index_select(values, 0, inverse, out=staging)  # one gather, straight into page-locked memory
        stream = self._copy_stream(device)
        with torch.cuda.stream(stream):
            on_device = staging.to(device, non_blocking=True).to(dtype).reshape(shape)
            ready = torch.cuda.Event()
            ready.record(stream)
        return PrefetchedRows(rows, on_device, ready)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def sparse_parameters(self) -> list[nn.Parameter]:
        return []

    def start_recording(self) -> None:
        self._recording = True

    def row_gradients(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        pending = [(ids, leaf.grad) for ids, leaf in self._pending if leaf.grad is not None]
        if not pending:
            return None
        ids = torch.cat([p[0] for p in pending])
        grads = torch.cat([p[1] for p in pending])
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        summed = torch.zeros(len(unique), self.dim, dtype=grads.dtype).index_add_(0, inverse, grads)
        return unique, summed

    def apply_row_update(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        ids = rows.detach().cpu().numpy().astype(np.int64)
        delta = delta.detach().cpu().float().numpy()
        moved = delta.any(axis=1)  # a row whose update is zero (no gradient yet) is not written
        if moved.any():
            ids, delta = ids[moved], delta[moved]
            self.write_rows(ids, self.read_rows(ids) + delta)

    def clear_row_gradients(self) -> None:
        self._pending = []


def read_table_json(folder: str | Path) -> dict:
    path = Path(folder) / TABLE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} does not hold a memory table ({TABLE_JSON}: {exc}).") from None
    if meta.get("format") != MAPPED_FORMAT or meta.get("version") != MAPPED_VERSION or meta.get("dtype") != "float32":
        raise ValueError(f"{folder} does not hold a memory table of format {MAPPED_FORMAT} v{MAPPED_VERSION}.")
    for key in ("rows", "dim", "count", "seed"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise ValueError(f"{path}: {key!r} must be a non-negative integer.")
    if not isinstance(meta.get("init_std"), (int, float)) or meta["init_std"] < 0:
        raise ValueError(f"{path}: 'init_std' must be a non-negative number.")
    return meta


def _read_layer(folder: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, values) arrays of a stored table, mapped and checked (shape, dtype, order, range)."""
    count, dim = meta["count"], meta["dim"]
    if count == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
    ids = np.load(folder / ROWS_FILE, mmap_mode="r", allow_pickle=False)
    values = np.load(folder / VALUES_FILE, mmap_mode="r", allow_pickle=False)
    if ids.dtype != np.dtype("<i8") or ids.shape != (count,):
        raise ValueError(f"{folder / ROWS_FILE}: expected {count} int64 row ids, found {ids.dtype} {ids.shape}.")
    if values.dtype != np.dtype("<f4") or values.shape != (count, dim):
        raise ValueError(f"{folder / VALUES_FILE}: expected float32 {count} x {dim}, found {values.dtype} {values.shape}.")
    if ids[0] < 0 or ids[-1] >= meta["rows"]:
        raise ValueError(f"{folder / ROWS_FILE}: row ids outside 0..{meta['rows'] - 1}.")
    block = 1 << 22
    for start in range(0, count - 1, block):  # sorted and unique, or binary search would give wrong rows
        chunk = ids[start:start + block + 1]
        if not (chunk[1:] > chunk[:-1]).all():
            raise ValueError(f"{folder / ROWS_FILE}: row ids are not sorted and unique.")
    return ids, values
