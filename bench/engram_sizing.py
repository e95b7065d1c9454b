"""Choosing the default memory size for the bundled model, by measurement.

Trains each candidate EngramConfig for the same number of steps on persona statements from the
Synthetic-Persona-Chat CSV (the "profile" material the app ingests) and reports, per config:
the loss on the statements it learned (lower: more remembered), the loss on held-out statements
of other personas (should stay at the base model's: memory must not disturb unrelated text),
trainable parameters and seconds per step. Ratios are to the base model in the same run.

    python bench/engram_sizing.py --data ../shared/data/synthetic-persona-chat-valid.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram  # noqa: E402
from engram_app.models import load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from results_table import publish  # noqa: E402

CANDIDATES = {
    "rows 8k, d_h 32, layer 1": EngramConfig(rows_per_head=8_191, head_dim=32, layers=[1]),
    "rows 32k, d_h 32, layer 1": EngramConfig(rows_per_head=32_749, head_dim=32, layers=[1]),
    "rows 128k, d_h 32, layer 1": EngramConfig(rows_per_head=131_071, head_dim=32, layers=[1]),
    "rows 32k, d_h 16, layer 1": EngramConfig(rows_per_head=32_749, head_dim=16, layers=[1]),
    "rows 32k, d_h 64, layer 1": EngramConfig(rows_per_head=32_749, head_dim=64, layers=[1]),
    "rows 32k, d_h 32, layers 1+5": EngramConfig(rows_per_head=32_749, head_dim=32, layers=[1, 5]),
}


def persona_statements(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    people = []
    for row in rows:
        lines = [s.strip() for s in row["user 1 personas"].splitlines() if s.strip()]
        if lines:
            people.append(lines)
    return people


def mean_loss(model, tokenizer, texts: list[str], batch: int = 32) -> float:
    losses = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            losses.append(model(**enc, labels=labels).loss.item())
    return statistics.mean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--people", type=int, default=120)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--only", nargs="*", default=None, help="names of candidates to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loaded = load_base_model(Settings().model, Settings().models_dir, resolve_device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    people = persona_statements(args.data)
    random.Random(0).shuffle(people)
    learned = [s for person in people[: args.people] for s in person]
    held_out = [s for person in people[args.people: args.people + 60] for s in person][:200]
    base_learned, base_held = mean_loss(model, tokenizer, learned), mean_loss(model, tokenizer, held_out)

    lines = [
        f"Memory sizing on {loaded.source.name}, CPU: {len(learned)} persona statements of {args.people} people, "
        f"{args.steps} steps of {args.batch}, lr {args.lr} (tables x5). Base loss: learned set {base_learned:.3f}, "
        f"held-out {base_held:.3f}.",
        "",
        "| config | params | s/step | learned loss (ratio to base) | held-out loss (ratio to base) |",
        "|---|---:|---:|---:|---:|",
    ]
    rng = random.Random(1)
    for name, config in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        memory = attach_engram(model, tokenizer, config)
        optimizer = EngramOptimizer(memory, lr=args.lr)
        times = []
        for _ in range(args.steps):
            batch = rng.sample(learned, args.batch)
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            started = time.perf_counter()
            optimizer.zero_grad()
            model(**enc, labels=labels).loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        after_learned, after_held = mean_loss(model, tokenizer, learned), mean_loss(model, tokenizer, held_out)
        lines.append(
            f"| {name} | {memory.num_parameters() / 1e6:.1f} M | {statistics.median(times):.2f} "
            f"| {after_learned:.3f} ({after_learned / base_learned:.2f}x) | {after_held:.3f} ({after_held / base_held:.3f}x) |"
        )
        print(lines[-1], flush=True)
        memory.detach()
        del memory, optimizer
    publish("engram_sizing", lines)


if __name__ == "__main__":
    main()
