"""Groundwork for tables larger than RAM: what it costs to read a token's rows from a mapped file.

A decoding step reads 16 rows per Engram layer (2 orders x 8 heads, 32 floats each). This
measures that read, per token, from:

- an in-memory table of 10^5 rows (``nn.Embedding``, the baseline),
- an in-memory table of 10^7 rows (``nn.Embedding``: same code, larger table, cache misses),
- a sparse file of 10^8 rows (or ``--rows``) mapped with ``numpy.memmap``, rows drawn uniformly
  (the worst case) and Zipf-distributed (like n-grams of text), after writing the rows read,

and prints each as a ratio of the baseline, next to the time of one decoding step of the bundled
model (~60 ms here), which is what the read must stay small against. Nothing is kept: the file
lives in a temporary folder (a sparse file: only the written rows take disk).

    python bench/mmap_gather.py [--rows 100000000] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402

DIM = 32
ROWS_PER_TOKEN = 16


def timed(read, batches: list[np.ndarray]) -> float:
    """Median microseconds per token over the batches (one batch = one token's rows)."""
    for b in batches[:50]:
        read(b)  # warm-up
    times = []
    for b in batches:
        t = time.perf_counter()
        read(b)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = np.random.default_rng(0)

    def uniform(rows: int) -> list[np.ndarray]:
        return [rng.integers(0, rows, ROWS_PER_TOKEN) for _ in range(args.tokens)]

    def zipf(rows: int) -> list[np.ndarray]:
        return [(rng.zipf(1.2, ROWS_PER_TOKEN) * 2654435761) % rows for _ in range(args.tokens)]

    results = []
    for rows in (100_000, 10_000_000):
        table = torch.nn.Embedding(rows, DIM)
        with torch.inference_mode():
            us = timed(lambda b: table(torch.from_numpy(b)), uniform(rows))
        results.append((f"in memory, {rows:.0e} rows, uniform", us, rows * DIM * 4))
        del table

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.bin"
        with open(path, "wb") as f:  # a sparse file: the size is set, no block is written
            f.truncate(args.rows * DIM * 4)
        t = time.perf_counter()
        mapped = np.memmap(path, dtype=np.float32, mode="r+", shape=(args.rows, DIM))
        open_ms = (time.perf_counter() - t) * 1e3
        for name, batches in (("uniform", uniform(args.rows)), ("Zipf", zipf(args.rows))):
            for b in batches:  # the rows a trained memory would hold: written once
                mapped[b] = rng.standard_normal((len(b), DIM), dtype=np.float32) * 0.02
            mapped.flush()
            us = timed(lambda b: torch.from_numpy(mapped[np.sort(b)]), batches)
            results.append((f"memory-mapped file, {args.rows:.0e} rows, {name} (rows written, page cache warm)", us, 0))
        used = os.stat(path).st_blocks * 512
        del mapped

    base = results[0][1]
    lines = [
        f"Reading one token's {ROWS_PER_TOKEN} rows of {DIM} floats (median over {args.tokens} tokens); "
        f"opening the {args.rows:.0e}-row mapped file took {open_ms:.2f} ms, and the file uses "
        f"{used / 2**20:.1f} MiB of disk for a logical size of {args.rows * DIM * 4 / 2**30:.1f} GiB.",
        "",
        "| table | µs per token | ratio to 10^5 in memory |",
        "|---|---:|---:|",
    ]
    for name, us, _ in results:
        lines.append(f"| {name} | {us:.1f} | {us / base:.2f}x |")
    publish("mmap_gather", lines)


if __name__ == "__main__":
    main()
