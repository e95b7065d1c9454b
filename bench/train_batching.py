"""What a training step costs when its batch is cut into micro-batches of similar length, against
the whole batch padded to its longest example, on the examples a job trains on.

    python bench/train_batching.py --data ../shared/data/ [--people 4] [--steps 12] [--mode engram]

For each of the first people of the tuning half, the chat (and the profile) is imported as the app
imports it and its examples built as a job builds them; then the same batches (batch 8, the job's
order) are stepped alternately both ways in this process: the ratio is whole / micro-batched seconds
per step. A second table fits one forward and backward call of one sequence against its length:
the fixed cost of a call, in tokens of work, is trainer.CPU_CALL_OVERHEAD.
Writes bench/results/train-batching.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recall import add_people_arguments, import_person, people_of  # noqa: E402
from bench.results_table import publish  # noqa: E402
from bench.train_recall import scratch_service  # noqa: E402
from engram_app.models import load_base_model  # noqa: E402
from engram_app.settings import resolve_device  # noqa: E402
from engram_app.training import adapters, dataset  # noqa: E402
from engram_app.training.evaluate import pad_batch, pad_id  # noqa: E402
from engram_app.training.queue import TrainOptions  # noqa: E402
from engram_app.training.runner import model_spec  # noqa: E402
from engram_app.training.trainer import CPU_CALL_OVERHEAD, Trainer, batch_indices, micro_batches  # noqa: E402


def examples_of(service, tokenizer) -> list:
    db = service.library().db
    examples = []
    for row in db.query("select id from sources order by id"):
        examples += dataset.source_examples(db, tokenizer, row["id"], TrainOptions.max_length)[0]
    return examples


def step_seconds(trainer: Trainer, batch, overhead) -> float:
    trainer.call_overhead = overhead
    started = time.perf_counter()
    trainer.optimizer.zero_grad()
    trainer._forward_backward(batch, pad_id(trainer.tokenizer))
    trainer.optimizer.step()
    return time.perf_counter() - started


def call_seconds(adapted, tokenizer, length: int, repeats: int) -> float:
    """Median seconds of one forward and backward call on one sequence of ``length`` tokens."""
    ids = list(range(1000, 1000 + length))
    example = dataset.Example(ids=ids, labels=ids, source_id=0, kind="chat")
    times = []
    for _ in range(repeats):
        inputs = pad_batch([example], pad_id(tokenizer), next(adapted.base.parameters()).device)
        started = time.perf_counter()
        adapted.model(**inputs).loss.backward()
        times.append(time.perf_counter() - started)
    adapted.model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_people_arguments(parser, people=4, split="tuning")
    parser.add_argument("--steps", type=int, default=12, help="steps timed each way per person and source")
    parser.add_argument("--mode", default="engram", choices=("engram", "lora", "engram+lora"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    lines = [f"`python bench/train_batching.py --data {args.data} --people {args.people} --steps {args.steps}"
             f" --mode {args.mode}`", "",
             f"Seconds per training step (batch 8, the job's batches), the whole batch padded to its longest"
             f" example vs micro-batches of similar length (overhead {CPU_CALL_OVERHEAD} tokens a call),"
             f" alternated in one process; {torch.get_num_threads()} threads, device {args.device}, pack"
             f" medium {args.mode}.", "",
             "| person | source | examples | real / padded tokens | calls per step | whole s/step | micro s/step | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    speedups = {"chat": [], "profile": []}
    adapted = tokenizer = None
    for person in people_of(args.data, args.people, args.split):
        for source in ("chat", "profile"):
            service, home = scratch_service(args.device)
            import_person(service, home, person, source)
            service.create_pack("p", size="medium", mode=args.mode)
            store = service.packs_store()
            if adapted is None:
                loaded = load_base_model(model_spec("default"), service.settings.models_dir,
                                         resolve_device(args.device))
                tokenizer = loaded.tokenizer
                torch.manual_seed(0)
                adapted = adapters.attach(loaded.model, tokenizer, store.config(store.row("p")))
                adapted.train(True)
            examples = examples_of(service, tokenizer)
            trainer = Trainer(adapted, tokenizer, examples, TrainOptions(max_steps=args.steps))
            whole, micro, real, padded, calls = [], [], 0, 0, 0
            step_seconds(trainer, [examples[0]], None)  # warm-up
            for step in range(args.steps):
                batch = [examples[i] for i in batch_indices(len(examples), 8, step, 0)]
                lengths = [len(e.ids) for e in batch]
                real += sum(lengths)
                padded += max(lengths) * len(lengths)
                calls += len(micro_batches(lengths, CPU_CALL_OVERHEAD))
                first, second = (whole, micro) if step % 2 == 0 else (micro, whole)
                first.append(step_seconds(trainer, batch, None if first is whole else CPU_CALL_OVERHEAD))
                second.append(step_seconds(trainer, batch, None if second is whole else CPU_CALL_OVERHEAD))
            ratio = sum(whole) / sum(micro)
            speedups[source].append(ratio)
            lines.append(f"| {person.row} | {source} | {len(examples)} | {real / padded:.2f} | {calls / args.steps:.1f} |"
                         f" {statistics.mean(whole):.2f} | {statistics.mean(micro):.2f} | {ratio:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", "| source | speed-up, geometric mean over people |", "|---|---:|"]
    for source, ratios in speedups.items():
        lines.append(f"| {source} | {statistics.geometric_mean(ratios):.2f}x |")

    lines += ["", "One forward and backward call on one sequence, median of 5:", "",
              "| tokens | seconds | seconds per token |", "|---:|---:|---:|"]
    points = []
    for length in (8, 16, 32, 64, 128, 256):
        seconds = call_seconds(adapted, tokenizer, length, 5)
        points.append((length, seconds))
        lines.append(f"| {length} | {seconds:.3f} | {seconds / length * 1000:.2f} ms |")
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    intercept = mean_y - slope * mean_x
    lines += ["", f"Least-squares line: {intercept:.3f} s a call + {slope * 1000:.2f} ms a token: a call costs"
              f" about {intercept / slope:.0f} tokens of work."]
    publish("train-batching", lines)


if __name__ == "__main__":
    main()
