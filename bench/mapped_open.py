"""Opening a saved mapped table with many written rows, from a cold page cache.

Writes ``--written`` random rows (10^7 by default) into a table of ``--rows`` rows (10^9), saves
it as a pack version is saved, drops the page cache when allowed (root), and times opening it
(which maps the files and checks the row ids) and the first read of one token's 16 rows.

    python bench/mapped_open.py [--rows 1000000000] [--written 10000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402
from engram_app.engram.storage import MappedTable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000_000)
    parser.add_argument("--written", type=int, default=10_000_000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        table = MappedTable(args.rows, 32)
        ids = np.unique(rng.integers(0, args.rows, args.written))
        t0 = time.perf_counter()
        table.write_rows(ids, rng.standard_normal((len(ids), 32), dtype=np.float32))
        t1 = time.perf_counter()
        folder = table.save(Path(tmp) / "table")
        t2 = time.perf_counter()
        del table
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            cache = "cold (page cache dropped)"
        except OSError:
            cache = "page cache not dropped (not root): warm"
        t3 = time.perf_counter()
        opened = MappedTable.open(folder)
        t4 = time.perf_counter()
        t5 = time.perf_counter()
        opened.read_rows(np.sort(rng.integers(0, args.rows, 16)))
        t6 = time.perf_counter()
        disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    publish("mapped_open", [
        f"A table of {args.rows:.0e} rows x 32 floats with {len(ids):,} rows written; {cache}.", "",
        "| step | time |", "|---|---:|",
        f"| write the rows (in RAM) | {t1 - t0:.2f} s |",
        f"| save (rows.npy + values.npy, {disk / 2**30:.2f} GiB on disk) | {t2 - t1:.2f} s |",
        f"| open | {(t4 - t3) * 1e3:.1f} ms |",
        f"| first read of one token's 16 rows | {(t6 - t5) * 1e3:.2f} ms |"])


if __name__ == "__main__":
    main()
