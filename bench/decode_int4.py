"""Chat speed of the 4-bit runtime, side by side with llama.cpp and the fp32 runtime, in one process.

On the bundled model (SmolLM2-135M-Instruct, a Q4_1 GGUF file): llama.cpp on the same file
(through ``llama-cpp-python``, installed for this bench only, never by the app), the app's fp32
runtime (what chat used before: the model's own forward), the same with the lean decoding step
(engram_app/inference/lean.py), the 4-bit runtime (engram_app/inference/quant.py) through the
model's own forward (stop 24's chat) and with the lean step (today's default), without and with a
pack (a randomly initialised memory of the ``medium`` size: speed does not depend on its
values). Speeds are ratios to the fp32 runtime measured in the same run, the models interleaved
so that the noise of a shared CPU falls on all alike; decode tok/s = 1 / the median time between
tokens. Then what the 4-bit runtime changes: teacher-forced top-1 agreement with the fp32 model
over varied text (prose, chat JSON, docs, code), read by the 4-bit runtime one token at a time as
decoding reads it (a whole text in one forward would go through its fp32 prompt path), and greedy
replies to 20 prompts. The 4-bit runtime decodes with the C kernel built on this machine
(engram_app/inference/native.py); a second 4-bit row uses PyTorch's bf16 kernel, what a machine
without a C compiler gets.

    python bench/decode_int4.py [--llama-path DIR] [--tokens 64] [--repeats 3] [--threads N]

``--llama-path``: a folder holding the ``llama_cpp`` package, e.g. made with
``pip install --target DIR --no-deps llama-cpp-python diskcache`` (builds llama.cpp from source,
5+ minutes). Without it (or if it does not import) the llama.cpp row says so.
Prints a table and writes it to bench/results/decode_int4.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engram_app.engram import attach_engram  # noqa: E402
from engram_app.inference import GenerationOptions, Message, Runtime  # noqa: E402
from engram_app.inference.native import load_kernels  # noqa: E402
from engram_app.inference.lean import StepCache, lean_decoder  # noqa: E402
from engram_app.inference.quant import decode_logits  # noqa: E402
from engram_app.models import LoadedModel, bundled_gguf, load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from engram_app.training.sizes import PRESETS  # noqa: E402
from results_table import publish  # noqa: E402

log = logging.getLogger("decode_int4")

SPEED_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "List some tips for learning a new language.",
]
GREEDY_PROMPTS = [
    "What is the capital of France?", "Give me three tips for sleeping better.",
    "Write a haiku about autumn.", "Explain what a neural network is in two sentences.",
    "How do I boil an egg?", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Name three planets of the solar system.", "Write a Python function that reverses a string.",
    "Why is the sky blue?", "Suggest a name for a black cat.", "What does DNA stand for?",
    "Summarise the plot of Romeo and Juliet.", "How many legs does a spider have?",
    "Give me a recipe for pancakes.", "What is the difference between weather and climate?",
    "Write a limerick about a programmer.", "What is the boiling point of water in Fahrenheit?",
    "Recommend a good habit for productivity.", "Who wrote 'Pride and Prejudice'?",
]
AGREEMENT_TEXTS = [  # varied: notes, a profile, a chat export, prose docs, Python code, a CSV of chats
    "assets/examples/garden-notes.md", "assets/examples/profile-maya.md", "assets/examples/chatgpt-conversations.json",
    "docs/CHAT.md", "engram_app/models.py", "README.md",
]


# These runtimes decode through the model's own forward, as chat did before the lean step.
OWN_FORWARD = {"fp32 runtime (before)", "int4 runtime, model's own forward (stop 24)"}


@contextlib.contextmanager
def lean_step(on: bool) -> Iterator[None]:
    """Replies inside decode with the lean step (``ENGRAM_LEAN``, read at each reply's start) or not."""
    os.environ["ENGRAM_LEAN"] = "1" if on else "0"
    try:
        yield
    finally:
        del os.environ["ENGRAM_LEAN"]


def decode_intervals(runtime: Runtime, ids: list[int], n: int, lean: bool = True) -> list[float]:
    """Seconds between consecutive generated tokens (prefill excluded)."""
    runtime.stop_ids = set()
    times = []
    with lean_step(lean):
        for _ in runtime.stream_ids(ids, GenerationOptions(max_new_tokens=n)):
            times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def prefill_seconds(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started


class LlamaCpp:
    """llama.cpp through llama-cpp-python, on the same GGUF file; timed the same way."""

    def __init__(self, gguf: Path, threads: int, path: Path | None):
        if path is not None:
            sys.path.insert(0, str(path))
        from llama_cpp import Llama  # noqa: PLC0415 (optional, bench only)

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def decode_intervals(self, ids: list[int], n: int) -> list[float]:
        self.llm.reset()
        times = []
        for _ in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return [b - a for a, b in zip(times, times[1:])]

    def prefill_seconds(self, ids: list[int]) -> float:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - started


def agreement(fp32: torch.nn.Module, int4: torch.nn.Module, windows: list[list[int]]) -> tuple[int, int, list[float]]:
    """(positions where the top-1 tokens agree, positions, fp32's top-1 minus top-2 logit where they do not).

    fp32 reads each window in one forward; the 4-bit runtime one token at a time (its decoding path).
    """
    agree = total = 0
    margins: list[float] = []
    with torch.inference_mode():
        for ids in windows:
            reference = fp32(torch.tensor([ids])).logits[0]
            got = decode_logits(int4, ids)
            same = reference.argmax(-1) == got.argmax(-1)
            agree += int(same.sum())
            total += len(ids)
            top2 = reference[~same].topk(2, dim=-1).values
            margins += (top2[:, 0] - top2[:, 1]).tolist()
    return agree, total, margins


def paired_on_off(model: torch.nn.Module, memory, ids: list[int], steps: int) -> tuple[float, float]:
    """Median seconds of a decoding step with the memory on and off: one model, two caches, the steps
    alternating (on, off, off, on, ...), so that the machine's noise falls on both alike."""
    decoder = lean_decoder(model)
    caches, tokens = {}, {}
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for on in (True, False):
            memory.enabled = on
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            caches[on] = StepCache.adopt(out.past_key_values, len(ids) + steps + 1, decoder)
            tokens[on] = int(out.logits[0, -1].argmax())
        for step in range(steps):
            for on in (True, False) if step % 2 else (False, True):
                memory.enabled = on
                started = time.perf_counter()
                out = decoder.step(model, torch.tensor([[tokens[on]]]), caches[on])
                tokens[on] = int(out.logits[0, -1].argmax())
                times[on].append(time.perf_counter() - started)
    memory.enabled = True
    return statistics.median(times[True]), statistics.median(times[False])


def greedy(runtime: Runtime, prompt: str, n: int, lean: bool = True) -> list[int]:
    runtime.stop_ids = runtime._stop_ids()
    with lean_step(lean):
        return [t.id for t in runtime.stream_ids(runtime.chat_ids([Message("user", prompt)]),
                                                 GenerationOptions(max_new_tokens=n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-path", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens for the prefill figure")
    parser.add_argument("--agreement-tokens", type=int, default=2400)
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--paired-steps", type=int, default=400, help="decoding steps each, memory on and off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    settings = Settings()
    gguf = bundled_gguf()
    plan = resolve_device("cpu")
    fp32 = load_base_model(None, settings.models_dir, plan)
    int4 = load_base_model(None, settings.models_dir, plan, int4=True)
    if int4.weights != "int4":
        raise SystemExit("The 4-bit runtime did not apply to the bundled model: see the log above.")
    os.environ["ENGRAM_NATIVE"] = "0"  # the same runtime where no C compiler is found: PyTorch's bf16 kernel
    load_kernels.cache_clear()
    int4_bf16 = load_base_model(None, settings.models_dir, plan, int4=True)
    del os.environ["ENGRAM_NATIVE"]
    tokenizer = fp32.tokenizer
    memory_model = copy.deepcopy(int4.model)
    memory = attach_engram(memory_model, tokenizer, PRESETS["medium"].engram_config())
    with torch.no_grad():  # non-zero values, as after training (speed does not depend on them)
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.02)
    runtimes = {
        "fp32 runtime (before)": Runtime(fp32),
        "fp32 runtime, lean step": Runtime(fp32),
        "int4 runtime, model's own forward (stop 24)": Runtime(int4),
        "int4 runtime": Runtime(int4),
        "int4 runtime, bf16 kernel (no C compiler)": Runtime(int4_bf16),
        "int4 runtime + medium pack": Runtime(LoadedModel(int4.source, memory_model, tokenizer, plan, 0.0, int4.path,
                                                          "int4")),
    }
    llama, llama_error = None, ""
    try:
        llama = LlamaCpp(gguf, args.threads, args.llama_path)
    except Exception as exc:  # not installed, or failed to build: bench without it, and say so
        llama_error = f"{type(exc).__name__}: {exc}"
        log.warning("llama.cpp not available (%s): benching without it.", llama_error)

    # --- speed ---------------------------------------------------------------------------------
    base = runtimes["fp32 runtime (before)"]
    prompts = [base.chat_ids([Message("user", p)]) for p in SPEED_PROMPTS]
    long_text = (ROOT / "docs/CHAT.md").read_text()
    prefill_ids = tokenizer.encode(long_text)[: args.prefill]
    llama_prompts = [llama.llm.tokenize(tokenizer.decode(p).encode(), add_bos=False, special=True) for p in prompts] \
        if llama else []
    llama_prefill = llama.llm.tokenize(tokenizer.decode(prefill_ids).encode(), add_bos=False) if llama else []
    for name, rt in runtimes.items():  # warm up
        decode_intervals(rt, prompts[0], 8, lean=name not in OWN_FORWARD)
    if llama:
        llama.decode_intervals(llama_prompts[0], 8)
    steps: dict[str, list[float]] = {name: [] for name in [*runtimes, "llama.cpp"]}
    prefill: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        for index, ids in enumerate(prompts):
            for name, rt in runtimes.items():
                steps[name] += decode_intervals(rt, ids, args.tokens, lean=name not in OWN_FORWARD)
            if llama:
                steps["llama.cpp"] += llama.decode_intervals(llama_prompts[index], args.tokens)
        for name, rt in runtimes.items():
            prefill[name].append(prefill_seconds(rt.model, prefill_ids))
        if llama:
            prefill["llama.cpp"].append(llama.prefill_seconds(llama_prefill))
        log.info("repeat %d done", repeat + 1)
    decode = {n: 1 / statistics.median(s) for n, s in steps.items() if s}
    paired_on, paired_off = paired_on_off(memory_model, memory, prompts[0], args.paired_steps)
    prefill_rate = {n: args.prefill / statistics.median(s) for n, s in prefill.items() if s}

    # --- what the 4-bit weights change ---------------------------------------------------------
    windows: list[list[int]] = []  # windows of up to 400 tokens, taken from each text in turn
    chunks = [tokenizer.encode((ROOT / path).read_text()) for path in AGREEMENT_TEXTS]
    chunks = [[ids[i:i + 400] for i in range(0, len(ids), 400)] for ids in chunks]
    for turn in range(max(map(len, chunks))):
        for pieces in chunks:
            if turn < len(pieces) and sum(map(len, windows)) < args.agreement_tokens:
                windows.append(pieces[turn])
    agree, total, margins = agreement(fp32.model, int4.model, windows)
    same_replies = same_bf16 = same_lean = 0
    for prompt in GREEDY_PROMPTS:
        reference = greedy(runtimes["fp32 runtime (before)"], prompt, args.greedy_tokens, lean=False)
        same_lean += reference == greedy(runtimes["fp32 runtime, lean step"], prompt, args.greedy_tokens)
        same_replies += reference == greedy(runtimes["int4 runtime"], prompt, args.greedy_tokens)
        same_bf16 += reference == greedy(runtimes["int4 runtime, bf16 kernel (no C compiler)"], prompt,
                                         args.greedy_tokens)

    # --- table ---------------------------------------------------------------------------------
    ref = "fp32 runtime (before)"
    lines = [
        f"Decode and prefill, {fp32.source.name} on CPU ({args.threads} threads), {args.tokens} new tokens x "
        f"{len(prompts)} prompts x {args.repeats} repeats, interleaved (tok/s = 1 / median time between tokens); "
        f"prefill of {args.prefill} tokens (median of {args.repeats}).",
        "",
        "| runtime | decode tok/s | vs fp32 | vs llama.cpp | prefill tok/s | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in [*runtimes, "llama.cpp"]:
        if name not in decode:
            lines.append(f"| {name} | not run: {llama_error or 'no llama_cpp'} | | | | |")
            continue
        vs_llama = f"{decode[name] / decode['llama.cpp']:.2f}x" if "llama.cpp" in decode else "n/a"
        lines.append(f"| {name} | {decode[name]:.1f} | {decode[name] / decode[ref]:.2f}x | {vs_llama} | "
                     f"{prefill_rate[name]:.0f} | {prefill_rate[name] / prefill_rate[ref]:.2f}x |")
    on_off = decode["int4 runtime + medium pack"] / decode["int4 runtime"]
    close = sum(m < 0.1 for m in margins)
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| memory on / off on the int4 runtime (decode, the two runtimes above) | {on_off:.3f}x |",
        f"| memory on / off, one model, {args.paired_steps} lean steps each, alternating | "
        f"{paired_off / paired_on:.3f}x ({1e3 * paired_off:.1f} vs {1e3 * paired_on:.1f} ms a step) |",
        f"| teacher-forced top-1 agreement with fp32 ({len(AGREEMENT_TEXTS)} texts) | {agree}/{total} = "
        f"{100 * agree / total:.2f}% |",
        f"| fp32's top-1 minus top-2 logit where they disagree | median {statistics.median(margins) if margins else 0:.3f}"
        f", {close} of {len(margins)} under 0.1 |",
        f"| greedy replies ({args.greedy_tokens} tokens) identical to fp32's | {same_replies} of {len(GREEDY_PROMPTS)} "
        f"(bf16 kernel: {same_bf16}) |",
        f"| greedy replies of the fp32 runtime's lean step identical to its own forward's | {same_lean} of "
        f"{len(GREEDY_PROMPTS)} |",
        "| teacher-forced agreement measured on | the 4-bit runtime's decoding path (the lean step), one token "
        "per forward, against the fp32 model's own forward |",
    ]
    publish("decode_int4", lines)


if __name__ == "__main__":
    main()
