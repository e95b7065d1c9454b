"""Decode speed of the base model on this machine: which generation path is fastest and correct.

Compares, in one process and on the same prompts, transformers' ``generate`` against the app's
own decode loop (``engram_app.inference.Runtime``) with each attention implementation, a static
cache compiled with ``torch.compile``, and int8 dynamic quantisation of the linear layers.
Speeds are reported as ratios to ``generate`` (the baseline), and each variant's greedy tokens
are compared with the baseline's: "same tokens" is the share of generated tokens that match
before the first divergence.

    python bench/decode_speed.py [--model M] [--device cpu] [--tokens 96] [--repeats 3]

Prints a table and writes it to bench/results/decode_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engram_app.inference import GenerationOptions, Message, Runtime  # noqa: E402
from engram_app.models import LoadedModel, load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from results_table import publish  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "List some tips for learning a new language.",
]


class _Clock(BaseStreamer):
    """Records when generate() emits each token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float:
    """Tokens per second between the first and the last generated token (prefill excluded)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_generate(runtime: Runtime, ids: list[int], n: int) -> tuple[list[int], float]:
    clock = _Clock()
    with torch.inference_mode():
        runtime.model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
            pad_token_id=runtime.tokenizer.eos_token_id,
        )
    return clock.tokens, decode_rate(clock.times)


def run_loop(runtime: Runtime, ids: list[int], n: int) -> tuple[list[int], float]:
    times, tokens = [], []
    runtime.stop_ids = set()  # always generate n tokens so that rates compare like with like
    for tok in runtime.stream_ids(ids, GenerationOptions(max_new_tokens=n)):
        times.append(time.perf_counter())
        tokens.append(tok.id)
    return tokens, decode_rate(times)


def run_static_compiled(runtime: Runtime, ids: list[int], n: int) -> tuple[list[int], float]:
    clock = _Clock()
    with torch.inference_mode():
        runtime.model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
            cache_implementation="static", pad_token_id=runtime.tokenizer.eos_token_id,
        )
    return clock.tokens, decode_rate(clock.times)


def with_attention(loaded: LoadedModel, impl: str) -> Runtime:
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation(impl)
    return Runtime(LoadedModel(loaded.source, model, loaded.tokenizer, loaded.device, 0.0, loaded.path))


def int8_dynamic(loaded: LoadedModel, per_channel: bool = False, keep_head: bool = False) -> Runtime:
    """int8 weights, activations quantised on the fly (torch.ao dynamic quantisation)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    model = copy.deepcopy(loaded.model)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {name: qconfig for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if keep_head:
        spec.pop("lm_head", None)
    model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    return Runtime(LoadedModel(loaded.source, model, loaded.tokenizer, loaded.device, 0.0, loaded.path))


def teacher_forced_agreement(reference: Runtime, runtime: Runtime, sequences: list[list[int]], starts: list[int]) -> float:
    """Share of positions where the variant's top-1 next token equals the reference model's,
    both reading the same text (the baseline's own generations): a per-token correctness
    measure that one early divergence cannot dominate."""
    same = total = 0
    with torch.inference_mode():
        for ids, start in zip(sequences, starts):
            x = torch.tensor([ids])
            a = reference.model(x).logits[0, start - 1:-1].argmax(-1)
            b = runtime.model(x).logits[0, start - 1:-1].argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
    return same / max(total, 1)


def agreement(reference: list[int], tokens: list[int]) -> float:
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile variant (slow to build)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = Settings(model=args.model, device=args.device)
    loaded = load_base_model(settings.model, settings.models_dir, resolve_device(settings.device))
    base = Runtime(loaded)
    prompts = [base.chat_ids([Message("user", p)]) for p in PROMPTS]

    variants: list[tuple[str, Runtime, object]] = [
        ("generate(), sdpa (baseline)", base, run_generate),
        ("own loop, sdpa", with_attention(loaded, "sdpa"), run_loop),
        ("own loop, eager", with_attention(loaded, "eager"), run_loop),
        ("own loop, int8 dynamic quant", int8_dynamic(loaded), run_loop),
        ("own loop, int8 per-channel, fp32 lm_head", int8_dynamic(loaded, per_channel=True, keep_head=True), run_loop),
    ]
    if not args.skip_compile:
        compiled = with_attention(loaded, "sdpa")
        compiled.model.forward = torch.compile(compiled.model.forward, mode="reduce-overhead", fullgraph=False)
        variants.append(("generate(), static cache + torch.compile", compiled, run_static_compiled))

    # Warm up every variant once (compilation happens here), then interleave repeats so that
    # noise from the shared CPU falls on all variants alike.
    reference: dict[int, list[int]] = {}
    warm_seconds: dict[str, float] = {}
    for name, runtime, fn in variants:
        started = time.perf_counter()
        fn(runtime, prompts[0], 8)
        warm_seconds[name] = time.perf_counter() - started
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    agree: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(args.repeats):
        for i, ids in enumerate(prompts):
            for name, runtime, fn in variants:
                tokens, rate = fn(runtime, ids, args.tokens)
                rates[name].append(rate)
                reference.setdefault(i, tokens)
                agree[name].append(agreement(reference[i], tokens))

    baseline = statistics.median(rates[variants[0][0]])
    lines = [
        f"Decode speed, {loaded.source.name} on {loaded.device.describe()}, {args.tokens} new tokens, "
        f"{len(PROMPTS)} prompts x {args.repeats} repeats (median).",
        "",
        "| variant | decode tok/s | ratio to baseline | greedy prefix equal to baseline | teacher-forced top-1 agreement | warm-up s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sequences = [prompts[i] + reference[i] for i in range(len(prompts))]
    starts = [len(p) for p in prompts]
    for name, runtime, _ in variants:
        rate = statistics.median(rates[name])
        forced = teacher_forced_agreement(base, runtime, sequences, starts)
        lines.append(
            f"| {name} | {rate:.1f} | {rate / baseline:.2f}x | {100 * statistics.mean(agree[name]):.0f}% "
            f"| {100 * forced:.1f}% | {warm_seconds[name]:.1f} |"
        )
    publish("decode_speed", lines)


if __name__ == "__main__":
    main()
