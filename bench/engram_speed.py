"""What an Engram memory costs: decode speed with memory vs the base model, and training speed of
Engram vs LoRA r=16 (vs both) on the same batches. Ratios against baselines run in this process.

    python bench/engram_speed.py [--model M] [--device cpu|cuda] [--random-init] [--data CSV] [--orders 2,3,4] [--layers 1]

--random-init builds a randomly initialised model of the same shape (for GPU machines without
the bundled weights). --data reads text from the Synthetic-Persona-Chat CSV; without it the
batches are random token ids (speed does not depend on content). Writes
bench/results/engram_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram, attach_lora  # noqa: E402
from engram_app.engram.model import placed_block  # noqa: E402
from engram_app.inference import GenerationOptions, Message, Runtime  # noqa: E402
from engram_app.models import LoadedModel, load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from engram_app.training.sizes import PRESET_DEPTH  # noqa: E402
from results_table import publish  # noqa: E402

PROMPTS = ["Tell me about your favourite hobby.", "What should I cook tonight?", "Describe a walk in the forest."]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_intervals(runtime: Runtime, ids: list[int], n: int) -> list[float]:
    """Seconds between consecutive generated tokens (prefill excluded)."""
    runtime.stop_ids = set()
    times = []
    for _ in runtime.stream_ids(ids, GenerationOptions(max_new_tokens=n)):
        sync(runtime.device)
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def training_batches(tokenizer, data: Path | None, batch: int, length: int, count: int, vocab: int) -> list[torch.Tensor]:
    if data is not None:
        with open(data, newline="") as f:
            texts = [row["Best Generated Conversation"] for row in csv.DictReader(f)]
        ids = tokenizer("\n".join(texts[: 400]), return_tensors="pt").input_ids[0]
        need = batch * length
        return [ids[i * need:(i + 1) * need].view(batch, length) for i in range(count)]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(count)]


def train_step_seconds(model, optimizer, batches, device) -> list[float]:
    times = []
    for ids in batches:
        ids = ids.to(device)
        sync(device)
        started = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--orders", default="2,3", help="n-gram orders of the memory (the default: 2,3)")
    parser.add_argument("--layers", default=None, metavar="L[,L]",
                        help="0-based blocks of the memory (default: the size presets' middle block)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = Settings(model=args.model, device=args.device)
    plan = resolve_device(settings.device)
    loaded = load_base_model(settings.model, settings.models_dir, resolve_device("cpu"))
    if args.random_init:
        from transformers import AutoModelForCausalLM

        loaded.model = AutoModelForCausalLM.from_config(loaded.model.config).eval().requires_grad_(False)
    loaded.model.to(plan.device, plan.dtype)
    loaded.device = plan
    tokenizer = loaded.tokenizer
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    config = EngramConfig(orders=tuple(int(n) for n in args.orders.split(",")), layers=layers, depth=PRESET_DEPTH)
    blocks = layers or [placed_block(PRESET_DEPTH, loaded.model.config.num_hidden_layers)]
    describe = (f"{loaded.source.name}{' (random init)' if args.random_init else ''} on {plan.describe()}, "
                f"memory at block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}")

    # --- decode ------------------------------------------------------------------------------
    base = Runtime(loaded)
    with_memory_model = copy.deepcopy(loaded.model)
    memory = attach_engram(with_memory_model, tokenizer, config)
    with torch.no_grad():  # non-zero values, as after training (speed does not depend on them)
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.02)
    mem_runtime = Runtime(LoadedModel(loaded.source, with_memory_model, tokenizer, plan, 0.0, loaded.path))
    prompts = [base.chat_ids([Message("user", p)]) for p in PROMPTS]
    for rt in (base, mem_runtime):
        decode_intervals(rt, prompts[0], 8)
    # Interleave the two models and pool every inter-token interval: the median step time is
    # robust to the bursts of noise of a shared CPU, which fall on both alike.
    steps: dict[str, list[float]] = {"base": [], "memory": []}
    for _ in range(args.repeats):
        for ids in prompts:
            steps["base"] += decode_intervals(base, ids, args.tokens)
            steps["memory"] += decode_intervals(mem_runtime, ids, args.tokens)
    base_rate = 1 / statistics.median(steps["base"])
    mem_rate = 1 / statistics.median(steps["memory"])
    del mem_runtime, with_memory_model, memory

    # --- training ----------------------------------------------------------------------------
    batches = training_batches(tokenizer, args.data, args.batch, args.length, args.steps + 1,
                               loaded.model.config.vocab_size)
    results: dict[str, float] = {}
    trainable: dict[str, int] = {}
    for name in ("LoRA r=16", "Engram", "Engram + LoRA r=16"):
        model = copy.deepcopy(loaded.model).train()
        model.requires_grad_(False)
        memory = attach_engram(model, tokenizer, config) if "Engram" in name else None
        target = attach_lora(model, r=16) if "LoRA" in name else model
        extra = [p for n, p in target.named_parameters() if "lora_" in n]
        optimizer = EngramOptimizer(memory, lr=1e-3, extra_parameters=extra)
        trainable[name] = (memory.num_parameters() if memory else 0) + sum(p.numel() for p in extra)
        times = train_step_seconds(target, optimizer, batches, plan.device)[1:]  # first step warms up
        results[name] = statistics.median(times)
        del model, memory, target, optimizer

    tokens_per_step = args.batch * args.length
    lora_tps = tokens_per_step / results["LoRA r=16"]
    lines = [
        f"Engram cost, {describe}; memory: {config.heads} heads x {len(config.orders)} orders, "
        f"{config.rows_per_head} rows/head, d_h={config.head_dim}.",
        "",
        f"Decode ({args.tokens} new tokens, {len(PROMPTS)} prompts x {args.repeats} repeats, interleaved; "
        "tok/s = 1 / median time between tokens):",
        "",
        "| model | decode tok/s | ratio to base |",
        "|---|---:|---:|",
        f"| base model | {base_rate:.1f} | 1.00x |",
        f"| base + Engram memory | {mem_rate:.1f} | {mem_rate / base_rate:.3f}x |",
        "",
        f"Training ({args.batch}x{args.length} tokens a step, median of {args.steps} steps after one warm-up):",
        "",
        "| adapter | trainable params | s/step | tokens/s | ratio to LoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in results.items():
        tps = tokens_per_step / seconds
        lines.append(f"| {name} | {trainable[name] / 1e6:.1f} M | {seconds:.2f} | {tps:.0f} | {tps / lora_tps:.2f}x |")
    publish("engram_speed", lines)


if __name__ == "__main__":
    main()
