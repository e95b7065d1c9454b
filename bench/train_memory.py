"""Peak RAM while training a memory of 10^7 rows (or ``--rows``), against the table's own size.

Each configuration trains in its own process (peak RSS is per process): the bundled model (or
``--model``) with

- a memory of ~10^5 rows in RAM (the baseline: model, activations, a small table),
- a memory of ``--rows`` rows in RAM (``nn.Embedding`` + row-wise Adam),
- a memory of ``--rows`` rows mapped from disk (only touched rows in RAM),
- a memory of 10^9 rows mapped from disk,

for ``--steps`` steps of 4 x 256 tokens of the example library texts, and reports the peak
resident memory, the extra over the baseline as a multiple of the table's size, the rows
touched, and the seconds per step (a ratio to the baseline's).

    python bench/train_memory.py [--rows 10000000] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = 16  # 2 orders x 8 heads


def child(args) -> None:
    import torch

    from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram
    from engram_app.models import load_base_model
    from engram_app.settings import Settings, resolve_device

    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = Settings(model=args.model, device="cpu")
    loaded = load_base_model(settings.model, settings.models_dir, resolve_device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "assets" / "examples").iterdir()) if p.is_file())
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    config = EngramConfig(rows_per_head=max(2, args.child_rows // HEADS), head_dim=32, storage=args.storage)
    memory = attach_engram(model, tokenizer, config)
    optimizer = EngramOptimizer(memory, lr=1e-2)
    model.train()
    times = []
    for step in range(args.steps):
        start = (step * 4 * 256) % max(1, len(ids) - 4 * 256)
        batch = ids[start:start + 4 * 256]
        if len(batch) < 4 * 256:
            batch = ids[: 4 * 256].repeat((4 * 256) // max(1, len(ids)) + 1)[: 4 * 256]
        batch = batch.reshape(4, 256)
        t = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "rows": memory.table.num_rows, "touched": optimizer.rows_touched,
                      "step_seconds": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child-rows", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rows is not None:
        child(args)
        return
    from bench.results_table import publish

    runs = [("baseline: 10^5 rows in RAM", 100_000, "memory"), (f"{args.rows:.0e} rows in RAM", args.rows, "memory"),
            (f"{args.rows:.0e} rows mapped", args.rows, "mapped"), ("10^9 rows mapped", 1_000_000_000, "mapped")]
    results = []
    for name, rows, storage in runs:
        command = [sys.executable, __file__, "--child-rows", str(rows), "--storage", storage, "--steps", str(args.steps)]
        if args.model:
            command += ["--model", args.model]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    base = results[0][1]
    lines = [f"Training {args.steps} steps of 4 x 256 tokens, 2 CPU threads; peak RSS per process.", "",
             "| memory | rows | table size (GiB) | peak RSS (GiB) | extra over baseline (GiB) | extra / table size "
             "| rows touched | s/step (vs baseline) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results:
        table = r["rows"] * 32 * 4
        extra = r["peak"] - base["peak"]
        lines.append(f"| {name} | {r['rows']:.2e} | {table / 2**30:.2f} | {r['peak'] / 2**30:.2f} | {extra / 2**30:.2f} "
                     f"| {extra / table:.2f}x | {r['touched']:,} | {r['step_seconds']:.2f} "
                     f"({r['step_seconds'] / base['step_seconds']:.2f}x) |")
    publish("train_memory", lines)


if __name__ == "__main__":
    main()
