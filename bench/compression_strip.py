"""Does stripping whitespace in token compression help the memory? Persona bench, both variants.

Engram's token compression merges tokens whose normalised text is equal (ENGRAM.md 2.1). By
default " the" and "the" stay apart; ``EngramConfig.compression_strip`` also strips surrounding
whitespace, as DeepSeek's reference code does. This trains one Engram pack per variant on the
same personas, for the same number of steps (not minutes: a shared CPU would make a time budget
measure the load), with the same seed and learning rate, and reports each variant's vocabulary
after compression, recall on the fact probes, memorisation and the forgetting cost.

    python bench/compression_strip.py --data ../shared/data/ --personas 4 --steps 40
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402
from bench.train_recall import import_personas, run_job, scratch_service  # noqa: E402
from engram_app.engram.compression import compression_for  # noqa: E402
from engram_app.service import Service  # noqa: E402
from engram_app.training import TrainOptions  # noqa: E402
from engram_app.training.packs import PackConfig  # noqa: E402
from engram_app.training.sizes import PRESETS  # noqa: E402

SIZE = "medium"
RETENTION = "retention.json"  # where a job keeps its pack's retention texts (training/runner.py)


def create_pack(service: Service, name: str, strip: bool) -> None:
    """A medium Engram pack whose memory compresses tokens with or without stripping."""
    engram = PRESETS[SIZE].engram_config()
    engram.compression_strip = strip
    config = PackConfig(preset=SIZE, mode="engram", engram=engram.to_dict())
    service.packs_store().create(name, service.settings.model, size=SIZE, config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder or CSV of Synthetic-Persona-Chat")
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant (the same for both)")
    parser.add_argument("--lr", type=float, default=TrainOptions.lr, help="learning rate of the Engram dense parts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    service, home = scratch_service(args.device)
    people, probes = import_personas(service, home, args.data, args.personas)
    people = len(people)
    print(f"{people} personas, {len(probes)} probes", flush=True)
    tokenizer = service.runtime.tokenizer

    rows = []
    base = None
    for strip in (False, True):
        started = time.perf_counter()
        kept = int(compression_for(tokenizer, strip=strip).max()) + 1
        name = f"strip-{str(strip).lower()}"
        create_pack(service, name, strip)
        if rows:  # the base model's own replies (retention texts) are the same for both: generate them once
            folder = service.packs_store().folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(service.packs_store().folder("strip-false") / RETENTION, folder / RETENTION)
        options = TrainOptions(max_steps=args.steps, lr=args.lr, seed=args.seed, max_probes=0, until_recalled=False)
        ev = run_job(service, name, options)["evaluation"]
        report = service.evaluate(name, probes)
        base = base or report["summary"]["memory_off"]
        on = report["summary"]["memory_on"]
        rows.append((f"strip={strip}", kept, 1 - kept / len(tokenizer), on["recall"], on["mean_logprob"],
                     ev["memorisation"]["before"], ev["memorisation"]["after"], ev["retention"]["cost"], ev["steps"],
                     time.perf_counter() - started))

    lines = [
        f"Engram memory ({SIZE}) of {people} personas ({len(probes)} probes), {args.steps} steps per variant, "
        f"lr {args.lr:g}, seed {args.seed}, device {args.device}; tokenizer of {len(tokenizer)} tokens",
        "",
        "| variant | vocab after compression | reduction | recall | mean logprob | memorisation loss before -> after "
        "| forgetting cost | steps | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base model (memory off) | | | {base['recall']:.2f} | {base['mean_logprob']:.3f} | | | | |",
    ]
    for variant, kept, reduction, recall, logprob, before, after, cost, steps, seconds in rows:
        lines.append(f"| {variant} | {kept:,} | {reduction:.1%} | {recall:.2f} | {logprob:.3f} | {before:.3f} -> "
                     f"{after:.3f} | {cost:+.1%} | {steps} | {seconds:.0f} |")
    publish("compression_strip", lines)


if __name__ == "__main__":
    main()
