"""One command that proves the app on a GPU: five checks, each a ratio to a baseline measured in this run.

    python bench/gpu_check.py [--device cuda|cpu] [--model random|bundled|tiny] [--rows N] [--json]

(a) chat in the device's dtype (bf16 on a GPU) wearing a pack, against fp32 on the CPU: the top-1
    token of every position of a few hundred teacher-forced tokens, and how often the two agree;
(b) decoding with the memory on against off (tokens/s, the app's own decode loop);
(c) a training step of an Engram pack against one of a LoRA pack (the app's Trainer, same batches);
(d) decoding with a large table (10^8 rows on a GPU) held in host memory and prefetched (mapped,
    pinned, copied on a side stream) against the same number of rows on the device;
(e) peak memory (``torch.cuda.max_memory_allocated`` on a GPU, RSS on the CPU) with the chat
    runtime and a training step both live, against the chat runtime alone.

Models: ``random`` is SmolLM2-135M's shape with random weights (the bundled model's config when
it is converted under ``storage/models``, else the same numbers written here; nothing is
downloaded), ``bundled`` the bundled model itself, ``tiny`` a toy model for tests (the default on
the CPU: the whole run takes seconds). Speed does not depend on the weights; agreement does, so
(a) is the figure to read on ``bundled``. Everything goes through the app's pieces: packs are
attached with ``training.adapters.attach``, chat decodes with ``inference.runtime.Runtime``,
training steps run in ``training.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engram_app.engram import EngramConfig  # noqa: E402
from engram_app.inference.runtime import GenerationOptions, Runtime  # noqa: E402
from engram_app.models import BUNDLED_NAME, LoadedModel, ModelSource  # noqa: E402
from engram_app.settings import DevicePlan, Settings  # noqa: E402
from engram_app.training import adapters  # noqa: E402
from engram_app.training.packs import PackConfig  # noqa: E402
from engram_app.training.queue import TrainOptions  # noqa: E402
from engram_app.training.text import Example  # noqa: E402
from engram_app.training.trainer import Trainer  # noqa: E402

HEADS = 16  # 2 orders x 8 heads: rows per head = rows / 16
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@dataclass
class Sizes:
    """How much each check runs: a GPU and the real shape get real sizes, the tiny model toy ones."""

    agreement_tokens: int
    decode_tokens: int
    prompt_tokens: int
    train_steps: int
    batch: int
    length: int
    repeats: int
    rows: int
    preset: str  # the pack's size (sizes.py)

    @classmethod
    def pick(cls, model: str, rows: int | None) -> Sizes:
        if model == "tiny":
            return cls(64, 8, 16, 3, 2, 32, 2, rows or 100_000, "small")
        return cls(384, 64, 64, 6, 8, 256, 3, rows or 100_000_000, "medium")


# --- models ---------------------------------------------------------------------------------------

class Models:
    """Fresh copies of the chosen base model (and its tokenizer) in any device and dtype."""

    def __init__(self, kind: str):
        self.kind = kind
        self.models_dir = Settings().models_dir
        self.converted = self.models_dir / BUNDLED_NAME
        if kind == "tiny" or (kind == "random" and not (self.converted / "config.json").is_file()):
            from tiny import tiny_tokenizer  # a small tokenizer: it only feeds the memory's compression

            self.tokenizer = tiny_tokenizer()
        else:
            from engram_app.models import load_tokenizer

            self.tokenizer = load_tokenizer(None, self.models_dir)

    def describe(self) -> str:
        return {"tiny": "tiny random Llama (tests)", "bundled": "SmolLM2-135M-Instruct (bundled)",
                "random": "SmolLM2-135M shape, random weights"}[self.kind]

    def base(self, plan: DevicePlan) -> torch.nn.Module:
        if self.kind == "bundled":
            from engram_app.models import load_base_model

            return load_base_model(None, self.models_dir, plan).model
        if self.kind == "tiny":
            from tiny import tiny_llama

            model = tiny_llama(len(self.tokenizer))
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = (LlamaConfig.from_pretrained(self.converted) if (self.converted / "config.json").is_file()
                      else LlamaConfig(**SMOLLM2))
            torch.manual_seed(0)
            with torch.device(plan.device):  # initialised where it runs: seconds on a GPU
                model = LlamaForCausalLM(config)
        return model.to(plan.device, plan.dtype).eval().requires_grad_(False)

    def vocab(self, model: torch.nn.Module) -> int:
        return model.get_input_embeddings().weight.shape[0]


def wear(models: Models, plan: DevicePlan, config: PackConfig, seed: int = 0) -> adapters.Adapted:
    """A fresh base model wearing a fresh pack whose value projection is non-zero, as after training
    (a fresh memory is the identity: it would change nothing, and test nothing)."""
    torch.manual_seed(seed)
    adapted = adapters.attach(models.base(plan), models.tokenizer, config)
    if adapted.memory is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for block in adapted.memory.blocks.values():
                weight = block.value.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    return adapted


def runtime_for(adapted: adapters.Adapted, models: Models, plan: DevicePlan) -> Runtime:
    """The app's chat runtime on ``adapted`` (stop tokens off: a random model must not stop early)."""
    loaded = LoadedModel(ModelSource(models.kind, "directory", ""), adapted.model, models.tokenizer, plan, 0.0, None)
    runtime = Runtime(loaded)
    runtime.adapted = adapted
    runtime.stop_ids = set()
    return runtime


def sync(plan: DevicePlan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)


def free(plan: DevicePlan) -> None:
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


def decode_rate(runtime: Runtime, prompt: list[int], tokens: int) -> float:
    """Tokens/s of decoding after ``prompt``: from the first token to the last (the prompt's prefill
    excluded; each token is on the CPU when yielded, so no GPU work is left uncounted)."""
    stamps = [time.perf_counter() for _ in runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=tokens))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ids(vocab: int, count: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each measure, run in turn ``repeats`` times after one warm-up round (fair on a busy machine)."""
    for measure in measures.values():
        measure()
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def result(what: str, figure: float, baseline: float, unit: str, ratio: float | None = None) -> dict:
    return {"what": what, "figure": figure, "baseline": baseline, "unit": unit,
            "ratio": ratio if ratio is not None else figure / baseline}


# --- the checks -----------------------------------------------------------------------------------

def check_agreement(models: Models, plan: DevicePlan, sizes: Sizes, pack: PackConfig) -> dict:
    """(a) top-1 tokens of bf16 on the device against fp32 on the CPU, the same pack, teacher-forced.

    The baseline is fp32 on the CPU agreeing with itself: 1 by definition (the ratio is the agreement)."""
    cpu = DevicePlan(torch.device("cpu"), torch.float32)
    plan = DevicePlan(plan.device, torch.bfloat16)  # what the app chats in on a GPU (also on the CPU here)
    reference = wear(models, cpu, pack)
    text = ids(models.vocab(reference.base), sizes.agreement_tokens, seed=1)
    with torch.inference_mode():
        expected = reference.model(input_ids=torch.tensor([text])).logits[0].argmax(-1)
    del reference
    free(cpu)
    tested = wear(models, plan, pack)
    with torch.inference_mode():
        got = tested.model(input_ids=torch.tensor([text], device=plan.device)).logits[0].argmax(-1).cpu()
    del tested
    free(plan)
    agree = float((got == expected).float().mean())
    return result(f"top-1 agreement, {dtype_name(plan)} on {plan.device.type} vs fp32 on the CPU, with a pack "
                  f"({len(text)} teacher-forced tokens)", agree, 1.0, "fraction")


def check_memory_decode(models: Models, plan: DevicePlan, sizes: Sizes, pack: PackConfig) -> dict:
    """(b) decode tokens/s with the pack's memory on, against the same runtime with it off."""
    adapted = wear(models, plan, pack)
    runtime = runtime_for(adapted, models, plan)
    prompt = ids(models.vocab(adapted.base), sizes.prompt_tokens, seed=2)

    def off() -> float:
        with adapted.off():
            return decode_rate(runtime, prompt, sizes.decode_tokens)

    rates = interleaved({"on": lambda: decode_rate(runtime, prompt, sizes.decode_tokens), "off": off},
                        sizes.repeats)
    del runtime, adapted
    free(plan)
    return result(f"decode with memory on vs off ({sizes.decode_tokens} tokens)", rates["on"], rates["off"], "tok/s")


def check_training_step(models: Models, plan: DevicePlan, sizes: Sizes, pack: PackConfig) -> dict:
    """(c) seconds per training step of an Engram pack against a LoRA pack (r=16), same batches."""
    def step_seconds(config: PackConfig) -> float:
        adapted = wear(models, plan, config)
        vocab = models.vocab(adapted.base)
        examples = [Example(ids(vocab, sizes.length, seed=10 + i), ids(vocab, sizes.length, seed=10 + i), 0, "document")
                    for i in range(2 * sizes.batch)]
        options = TrainOptions(max_steps=sizes.train_steps + 1, batch_size=sizes.batch, max_length=sizes.length,
                               until_recalled=False, evaluate=False, anchors=0.0, replay=0.0)
        times: list[float] = []
        trainer = Trainer(adapted, models.tokenizer, examples, options,
                          on_step=lambda report: (sync(plan), times.append(time.perf_counter())))
        times.append(time.perf_counter())
        trainer.run()
        del trainer, adapted
        free(plan)
        steps = [b - a for a, b in zip(times, times[1:])][1:]  # the first step warms up
        return statistics.median(steps)

    engram = step_seconds(pack)
    lora = step_seconds(PackConfig(preset=pack.preset, mode="lora"))
    return result(f"training step, Engram ({pack.preset}) vs LoRA r=16 (batch {sizes.batch} x {sizes.length})",
                  engram, lora, "s/step")


def check_host_table(models: Models, plan: DevicePlan, sizes: Sizes) -> dict:
    """(d) decode with ``rows`` rows in host memory (mapped, prefetched) against the same rows on the device."""
    per_head = max(1, sizes.rows // HEADS)
    runtimes = {}
    for where, storage in (("host", "mapped"), ("device", "memory")):
        engram = EngramConfig(rows_per_head=per_head, storage=storage, compression_strip=True)
        adapted = wear(models, plan, PackConfig(preset="xlarge", mode="engram", engram=engram.to_dict()))
        runtimes[where] = runtime_for(adapted, models, plan)
    prompt = ids(models.vocab(runtimes["host"].model), sizes.prompt_tokens, seed=3)
    rates = interleaved({where: (lambda r=runtime: decode_rate(r, prompt, sizes.decode_tokens))
                         for where, runtime in runtimes.items()}, sizes.repeats)
    del runtimes
    free(plan)
    return result(f"decode with a {sizes.rows:.0e}-row table in host memory (mapped, prefetched) vs on the device",
                  rates["host"], rates["device"], "tok/s")


def check_peak_memory(models: Models, plan: DevicePlan, sizes: Sizes, pack: PackConfig) -> dict:
    """(e) peak memory with the chat runtime and a training step both live, against the chat alone."""
    free(plan)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    chat = runtime_for(wear(models, plan, pack), models, plan)
    prompt = ids(models.vocab(chat.model), sizes.prompt_tokens, seed=4)
    for _ in chat.stream_ids(prompt, GenerationOptions(max_new_tokens=sizes.decode_tokens)):
        pass
    chat_alone = peak_bytes(plan)
    adapted = wear(models, plan, pack, seed=1)
    vocab = models.vocab(adapted.base)
    examples = [Example(ids(vocab, sizes.length, seed=20 + i), ids(vocab, sizes.length, seed=20 + i), 0, "document")
                for i in range(sizes.batch)]
    options = TrainOptions(max_steps=1, batch_size=sizes.batch, max_length=sizes.length, until_recalled=False,
                           evaluate=False, anchors=0.0, replay=0.0)
    Trainer(adapted, models.tokenizer, examples, options).run()
    for _ in chat.stream_ids(prompt, GenerationOptions(max_new_tokens=sizes.decode_tokens)):  # both live
        pass
    both = peak_bytes(plan)
    del chat, adapted
    free(plan)
    what = "torch.cuda.max_memory_allocated" if plan.device.type == "cuda" else "RSS"
    return result(f"peak memory ({what}), chat runtime + a training step vs the chat runtime alone",
                  both / 2**20, chat_alone / 2**20, "MiB")


def peak_bytes(plan: DevicePlan) -> int:
    sync(plan)
    if plan.device.type == "cuda":
        return torch.cuda.max_memory_allocated(plan.device)
    import psutil

    return psutil.Process().memory_info().rss


def dtype_name(plan: DevicePlan) -> str:
    return str(plan.dtype).removeprefix("torch.")


# --- the command ----------------------------------------------------------------------------------

CHECKS = ("top1_agreement", "memory_on_off_decode", "engram_lora_step", "host_table_decode", "peak_memory")


def run(device: str, model: str, rows: int | None) -> dict:
    plan = DevicePlan(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA GPU here (run with --device cpu).")
    models, sizes = Models(model), Sizes.pick(model, rows)
    pack = PackConfig(preset=sizes.preset, mode="engram")
    from engram_app.training.sizes import PRESETS

    pack.engram = PRESETS[sizes.preset].engram_config().to_dict()
    started = time.perf_counter()
    checks = {
        "top1_agreement": check_agreement(models, plan, sizes, pack),
        "memory_on_off_decode": check_memory_decode(models, plan, sizes, pack),
        "engram_lora_step": check_training_step(models, plan, sizes, pack),
        "host_table_decode": check_host_table(models, plan, sizes),
        "peak_memory": check_peak_memory(models, plan, sizes, pack),
    }
    where = (f"{torch.cuda.get_device_name(plan.device)} ({torch.cuda.get_device_properties(plan.device).total_memory / 2**30:.0f} GiB)"
             if device == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    return {"device": where, "dtype": dtype_name(plan), "model": models.describe(), "rows": sizes.rows,
            "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__, "checks": checks}


def markdown(report: dict) -> list[str]:
    lines = [f"{report['model']} on {report['device']}, {report['dtype']}; torch {report['torch']}; "
             f"{report['seconds']} s.", "",
             "| check | figure | baseline | ratio |", "|---|---:|---:|---:|"]
    for key in CHECKS:
        row = report["checks"][key]
        lines.append(f"| {row['what']} | {row['figure']:.4g} {row['unit']} | {row['baseline']:.4g} {row['unit']} "
                     f"| {row['ratio']:.3f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("random", "bundled", "tiny"), default=None,
                        help="default: random on a GPU, tiny on the CPU")
    parser.add_argument("--rows", type=int, default=None, help="rows of the table of check (d) (default 10^8; tiny: 10^5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    model = args.model or ("random" if args.device == "cuda" else "tiny")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, once per model
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    report = run(args.device, model, args.rows)
    bad = [key for key, row in report["checks"].items() if not (math.isfinite(row["ratio"]) and row["ratio"] > 0)]
    if args.json:
        print(json.dumps(report, indent=1))
    elif model == "tiny":
        print("\n".join(markdown(report)))
    else:
        from bench.results_table import publish

        publish(f"gpu_check_{args.device}_{model}", markdown(report))
    return 1 if bad else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
