"""The slot index at scale: build time, size, and "who wrote this row" for a million trained tokens.

A memory with the default shape (2 orders x 8 heads, 32,749 rows per head) on the bundled
tokenizer is fed a million tokens of synthetic Zipf-distributed text from 1,000 sources (in
chunks of 256 tokens, one training example each); then
`writers(row)` is timed for rows that a trained token reads.

    python bench/slot_index.py [--tokens 1000000]
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
from engram_app.engram import EngramConfig, attach_engram  # noqa: E402
from engram_app.models import load_base_model  # noqa: E402
from engram_app.settings import default_home, resolve_device  # noqa: E402
from engram_app.training.slots import SlotIndex, SlotIndexBuilder  # noqa: E402

CHUNK_TOKENS = 256  # the library's chunk size (ingest/chunking.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()

    loaded = load_base_model(None, default_home() / "models", resolve_device("cpu"))
    memory = attach_engram(loaded.model, loaded.tokenizer, EngramConfig())
    rng = np.random.default_rng(0)
    vocab = len(loaded.tokenizer)
    ranks = rng.zipf(1.2, size=args.tokens) % vocab  # Zipf-distributed token ids, like text
    per_source = args.tokens // args.sources

    started = time.perf_counter()
    builder = SlotIndexBuilder(memory)
    chunk = 0
    for s in range(args.sources):
        tokens = ranks[s * per_source:(s + 1) * per_source]
        for start in range(0, len(tokens), CHUNK_TOKENS):  # one training example per chunk, as jobs have
            chunk += 1
            builder.add(tokens[start:start + CHUNK_TOKENS].tolist(), s + 1, chunk)
    folder = Path(tempfile.mkdtemp(prefix="slots-"))
    index = builder.write(folder / "slots")
    build_seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in (folder / "slots").iterdir())

    started = time.perf_counter()
    index = SlotIndex.open(folder / "slots")
    open_ms = (time.perf_counter() - started) * 1000
    rows = np.asarray(index.rows[rng.integers(0, len(index.rows), args.lookups), 0])
    times, writers = [], []
    for row in rows:
        t = time.perf_counter()
        found = index.writers(int(row))
        times.append((time.perf_counter() - t) * 1000)
        writers.append(len(found))
    # A token's provenance reads all its slots: 16 rows per Engram layer.
    t = time.perf_counter()
    for row in rows[:16]:
        index.writers(int(row))
    token_ms = (time.perf_counter() - t) * 1000

    lines = [
        f"Slot index of {args.tokens:,} trained tokens from {args.sources} sources (default memory shape)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| distinct n-grams | {index.size['ngrams']:,} |",
        f"| (row, n-gram) entries | {index.size['row_entries']:,} |",
        f"| (n-gram, source, chunk) entries ({chunk:,} chunks) | {index.size['source_entries']:,} |",
        f"| files on disk | {size / 2**20:.1f} MiB |",
        f"| build time | {build_seconds:.1f} s |",
        f"| open (memory-mapped) | {open_ms:.1f} ms |",
        f"| writers(row): median / p99 | {np.median(times):.2f} / {np.percentile(times, 99):.2f} ms |",
        f"| writers per row: median / max | {int(np.median(writers))} / {max(writers)} |",
        f"| one token's 16 slots | {token_ms:.1f} ms |",
    ]
    publish("slot_index", lines)


if __name__ == "__main__":
    main()
