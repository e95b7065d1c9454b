"""Decode speed with a memory of 10^8 rows (or more) in a memory-mapped file vs a small in-memory one.

Four copies of the bundled model (or ``--model``) decode the same prompts, interleaved so that
the noise of a shared CPU falls on all alike: the base model; a memory of ~10^5 rows in memory
(the baseline of the ratio); a mapped memory of ``--rows`` rows (10^8 by default) with nothing
stored yet (rows read as their deterministic initial values); and the same table after the rows
the prompts address were written, saved as a pack version is and opened again from disk. Also
prints the time to open the saved table and the disk it uses.

    python bench/mapped_decode.py [--rows 100000000] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_app.engram import EngramConfig, attach_engram  # noqa: E402
from engram_app.engram.storage import MappedTable  # noqa: E402
from engram_app.inference import Message, Runtime  # noqa: E402
from engram_app.models import LoadedModel, load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from engram_speed import PROMPTS, decode_intervals  # noqa: E402
from results_table import publish  # noqa: E402

HEADS = 16  # 2 orders x 8 heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    settings = Settings(model=args.model, device="cpu")
    plan = resolve_device("cpu")
    loaded = load_base_model(settings.model, settings.models_dir, plan)
    tokenizer = loaded.tokenizer

    def wearing(config: EngramConfig, table=None) -> Runtime:
        model = copy.deepcopy(loaded.model)
        memory = attach_engram(model, tokenizer, config, table=table)
        with torch.no_grad():  # non-zero values, as after training (speed does not depend on them)
            for block in memory.blocks.values():
                block.value.weight.normal_(0, 0.02)
        runtime = Runtime(LoadedModel(loaded.source, model, tokenizer, plan, 0.0, loaded.path))
        runtime.memory = memory
        return runtime

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "table"
        runtimes = {
            "base model": Runtime(loaded),
            "memory, 1e5 rows in memory": wearing(EngramConfig(rows_per_head=100_000 // HEADS)),
        }
        started = time.perf_counter()
        config = EngramConfig(rows_per_head=args.rows // HEADS, storage="mapped")
        mapped = wearing(config)  # nothing stored: every row reads as its initial value
        attach_seconds = time.perf_counter() - started
        rows_total = mapped.memory.table.num_rows
        runtimes[f"memory, {rows_total:.1e} rows mapped, never written"] = mapped
        prompts = [runtimes["base model"].chat_ids([Message("user", p)]) for p in PROMPTS]

        steps: dict[str, list[float]] = {name: [] for name in runtimes}
        for runtime in runtimes.values():
            decode_intervals(runtime, prompts[0], 8)  # warm-up
        for _ in range(args.repeats):
            for ids in prompts:
                for name, runtime in runtimes.items():
                    steps[name] += decode_intervals(runtime, ids, args.tokens)

        # Write every row the decoding read (what training would have written), then measure again.
        table = mapped.memory.table
        with mapped.memory.tracing() as calls:
            for ids in prompts:
                decode_intervals(mapped, ids, args.tokens)
        touched = np.unique(np.concatenate([t.rows.numpy().ravel() for call in calls for t in call.values()]))
        table.write_rows(touched, table.read_rows(touched) + 0.01)
        table.save(folder)  # as a pack version is written
        started = time.perf_counter()
        reopened = MappedTable.open(folder)  # as a pack version is opened
        open_ms = (time.perf_counter() - started) * 1e3
        written = wearing(config, reopened)
        # Second round, again interleaved with the baseline (each round is compared with its own baseline).
        written_name = f"memory, {rows_total:.1e} rows mapped, {len(touched)} rows written"
        second = {"memory, 1e5 rows in memory": runtimes["memory, 1e5 rows in memory"], written_name: written}
        later: dict[str, list[float]] = {name: [] for name in second}
        for _ in range(args.repeats):
            for ids in prompts:
                for name, runtime in second.items():
                    later[name] += decode_intervals(runtime, ids, args.tokens)
        disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
        logical = rows_total * table.dim * 4

    rates = {name: 1 / statistics.median(times) for name, times in steps.items()}
    baseline = rates["memory, 1e5 rows in memory"]
    later_rates = {name: 1 / statistics.median(times) for name, times in later.items()}
    lines = [
        f"Decode on {plan.describe()}, {loaded.source.name}, {args.tokens} tokens x {len(PROMPTS)} prompts x "
        f"{args.repeats}, median over every inter-token interval. The mapped table: {rows_total:,} rows x "
        f"{table.dim} floats ({logical / 2**30:.1f} GiB logical, {disk / 2**20:.1f} MiB on disk after the writes); "
        f"opening it took {open_ms:.2f} ms, attaching the memory (layout + table) {attach_seconds:.2f} s.",
        "",
        "| model | tokens/s | ratio to the 1e5-row memory |",
        "|---|---:|---:|",
    ]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:.1f} | {rate / baseline:.3f}x |")
    later_baseline = later_rates["memory, 1e5 rows in memory"]
    lines.append(f"| second round: memory, 1e5 rows in memory | {later_baseline:.1f} | 1.000x |")
    lines.append(f"| second round: {written_name} | {later_rates[written_name]:.1f} | "
                 f"{later_rates[written_name] / later_baseline:.3f}x |")
    publish("mapped_decode", lines)


if __name__ == "__main__":
    main()
