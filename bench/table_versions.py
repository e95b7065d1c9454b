"""How to keep pack versions immutable when the table is far larger than RAM: measured, not guessed.

A training job reads a parent version's table and changes the rows it touched. Three ways to
write the new version, each measured here on the same rows:

- **sparse file, copy on write**: every version is a dense ``rows x dim`` file with holes; the
  new one is a copy of the parent (only its data extents, found with SEEK_DATA/SEEK_HOLE, copied
  with ``copy_file_range``) with the touched rows written into it;
- **row file, cumulative**: every version holds the sorted ids and values of all rows ever
  written (parent's rows merged with the job's), in two ``.npy`` files mapped on open;
- **row file, delta**: every version holds only the rows its job touched and points at its
  parent; a read looks through the chain (newest first).

For each: seconds to write a version, disk it adds, and the time to read one token's 16 rows
(median, warm page cache) after ``--versions`` versions. The scenario: a table of ``--rows``
rows of ``--dim`` floats; each job touches ``--touched`` rows, ``--overlap`` of them rows the
parent had written (replay makes jobs re-read old material), the rest new.

    python bench/table_versions.py [--rows 100000000] [--touched 1000000] [--versions 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402

ROWS_PER_TOKEN = 16


def disk_bytes(path: Path) -> int:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in paths)


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data extents of ``src`` (holes stay holes)."""
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fi.fileno(), offset, os.SEEK_DATA)
            except OSError:  # no data after offset
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            copied = start
            while copied < end:
                copied += os.copy_file_range(fi.fileno(), fo.fileno(), end - copied, copied, copied)
            offset = end


def write_npy(folder: Path, ids: np.ndarray, values: np.ndarray) -> None:
    folder.mkdir(parents=True)
    np.save(folder / "rows.npy", ids)
    np.save(folder / "values.npy", values)


def open_npy(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / "rows.npy", mmap_mode="r"), np.load(folder / "values.npy", mmap_mode="r")


def lookup_rows(layers: list[tuple[np.ndarray, np.ndarray]], want: np.ndarray, dim: int) -> np.ndarray:
    """Values of ``want`` from row files, newest layer first (unwritten rows: zeros here)."""
    out = np.zeros((len(want), dim), dtype=np.float32)
    missing = np.ones(len(want), dtype=bool)
    for ids, values in layers:
        pos = np.searchsorted(ids, want)
        pos = np.minimum(pos, len(ids) - 1)
        hit = missing & (ids[pos] == want)
        out[hit] = values[pos[hit]]
        missing &= ~hit
        if not missing.any():
            break
    return out


def median_us(read, batches: list[np.ndarray]) -> float:
    for b in batches[:100]:
        read(b)
    times = []
    for b in batches:
        t = time.perf_counter()
        read(b)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--touched", type=int, default=1_000_000)
    parser.add_argument("--overlap", type=float, default=0.7)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dim = args.dim

    # The rows each job touches: the first job only new rows; later ones `overlap` old, the rest new.
    jobs, written = [], np.empty(0, dtype=np.int64)
    for v in range(args.versions):
        old = rng.choice(written, int(args.touched * args.overlap), replace=False) if len(written) else np.empty(0, np.int64)
        new = rng.integers(0, args.rows, args.touched - len(old))
        touched = np.unique(np.concatenate([old, new]))
        jobs.append((touched, rng.standard_normal((len(touched), dim), dtype=np.float32)))
        written = np.union1d(written, touched)
    reads = [rng.choice(written, ROWS_PER_TOKEN // 2) for _ in range(args.tokens)]  # half written, half not
    reads = [np.sort(np.concatenate([r, rng.integers(0, args.rows, ROWS_PER_TOKEN // 2)])) for r in reads]

    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)

        # 1. sparse dense file per version, copy on write
        times, disks, parent = [], [], None
        for v, (ids, values) in enumerate(jobs):
            path = root / f"sparse-v{v}.f32"
            t = time.perf_counter()
            if parent is None:
                with open(path, "wb") as f:
                    f.truncate(args.rows * dim * 4)
            else:
                sparse_copy(parent, path)
            data = np.memmap(path, dtype="<f4", mode="r+", shape=(args.rows, dim))
            data[ids] = values
            data.flush()
            del data
            os.sync()
            times.append(time.perf_counter() - t)
            disks.append(disk_bytes(path))
            parent = path
        last = np.memmap(parent, dtype="<f4", mode="r", shape=(args.rows, dim))
        results["sparse file, copy on write"] = (times, disks, median_us(lambda b: np.array(last[b]), reads))
        for p in root.glob("sparse-*"):
            p.unlink()

        # 2. row files, cumulative
        times, disks, parent = [], [], None
        for v, (ids, values) in enumerate(jobs):
            folder = root / f"cumulative-v{v}"
            t = time.perf_counter()
            if parent is None:
                write_npy(folder, ids, values)
            else:
                old_ids, old_values = open_npy(parent)
                merged = np.union1d(old_ids, ids)
                out = np.empty((len(merged), dim), dtype=np.float32)
                keep = ~np.isin(old_ids, ids, assume_unique=True)
                out[np.searchsorted(merged, old_ids[keep])] = old_values[keep]
                out[np.searchsorted(merged, ids)] = values
                write_npy(folder, merged, out)
            os.sync()
            times.append(time.perf_counter() - t)
            disks.append(disk_bytes(folder))
            parent = folder
        layers = [open_npy(parent)]
        results["row file, cumulative"] = (times, disks, median_us(lambda b: lookup_rows(layers, b, dim), reads))
        shutil.rmtree(root / "cumulative-v0")

        # 3. row files, delta chain
        times, disks, chain = [], [], []
        for v, (ids, values) in enumerate(jobs):
            folder = root / f"delta-v{v}"
            t = time.perf_counter()
            write_npy(folder, ids, values)
            os.sync()
            times.append(time.perf_counter() - t)
            disks.append(disk_bytes(folder))
            chain.insert(0, open_npy(folder))
        results[f"row file, delta (chain of {len(chain)})"] = (times, disks,
                                                               median_us(lambda b: lookup_rows(chain, b, dim), reads))

    base_read = results["sparse file, copy on write"][2]
    lines = [f"Table {args.rows:.0e} rows x {dim} floats ({args.rows * dim * 4 / 2**30:.1f} GiB logical); "
             f"{args.versions} versions, each job touches {args.touched:,} rows ({args.overlap:.0%} already written); "
             f"{len(written):,} rows written in all ({len(written) * dim * 4 / 2**20:.0f} MiB of values).", "",
             "| strategy | write a version (s, each) | disk added per version (MiB) | disk, all versions (MiB) "
             "| read 16 rows (µs) | read vs sparse file |",
             "|---|---|---|---|---|---|"]
    for name, (times, disks, read) in results.items():
        lines.append(f"| {name} | {' / '.join(f'{t:.2f}' for t in times)} | "
                     f"{' / '.join(f'{d / 2**20:.0f}' for d in disks)} | {sum(disks) / 2**20:.0f} | {read:.1f} | "
                     f"{read / base_read:.2f}x |")
    publish("table_versions", lines)


if __name__ == "__main__":
    main()
