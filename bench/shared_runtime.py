"""Packs as adapters on one shared base model vs a copy of the base model per pack, side by side.

Measures, in one run on the bundled model (else ``--model``, or a tiny random model with
``--tiny``):

- resident memory (RSS, and PSS: shared pages counted once) of a process holding 1 and
  ``--packs`` packs the old way (a copy of the base model per pack, with its adapters) and the
  new way (one model, the packs' adapters on it, engram_app/inference/pool.py); each in its own
  child process so that one measurement's freed memory does not hide in the next;
- the time to switch packs between two model calls (the activation alone, and one decoding
  step after a switch vs without), and the time to load a pack's adapters on first use;
- whether the greedy replies of every pack are identical both ways (token ids).

The packs are ``--size`` (default medium) adapters of mode ``--mode`` with seeded random weights
(a trained pack is the same size and shape; training five on the CPU would take the bench
hours). Their replies differ from the base model's, which the table shows.

    python bench/shared_runtime.py [--packs 5] [--size medium] [--mode engram] [--tokens 24] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_table import publish  # noqa: E402
from engram_app.inference import Message, Runtime  # noqa: E402
from engram_app.inference.pool import AdapterSpec, ModelPool  # noqa: E402
from engram_app.models import load_base_model  # noqa: E402
from engram_app.settings import Settings, resolve_device  # noqa: E402
from engram_app.training import adapters  # noqa: E402
from engram_app.training.packs import PackConfig  # noqa: E402
from engram_app.training.sizes import PRESETS  # noqa: E402

QUESTION = "Tell me about my garden and my dog."


def memory_now() -> dict:
    gc.collect()
    info = psutil.Process().memory_full_info()
    return {"rss": info.rss, "pss": info.pss}


def pack_config(args) -> PackConfig:
    return PackConfig(preset=args.size, mode=args.mode, engram=PRESETS[args.size].engram_config().to_dict())


def make_packs(args, model: str | None, models_dir: Path, root: Path) -> list[Path]:
    """``--packs`` adapter folders of the chosen size and mode, with seeded random (non-identity) weights."""
    folders = []
    for i in range(args.packs):
        loaded = load_base_model(model, models_dir, resolve_device("cpu"))
        torch.manual_seed(1000 + i)
        adapted = adapters.attach(loaded.model, loaded.tokenizer, pack_config(args))
        with torch.no_grad():  # what starts at zero (LoRA's B, the memory's value and conv) gets weights
            trained = [p for n, p in adapted.model.named_parameters() if "lora_B" in n]
            if adapted.memory is not None:
                trained += adapted.memory.dense_parameters() + adapted.memory.sparse_parameters()
            for p in trained:
                p.add_(torch.randn_like(p) * args.scale)
        folders.append(adapted.save(root / f"pack{i}"))
        del adapted, loaded
    return folders


def spec(args, folder: Path, i: int) -> AdapterSpec:
    return AdapterSpec(f"pack{i}_v1", folder, pack_config(args))


def old_copy(model, models_dir: Path, folder: Path, args) -> Runtime:
    """How chat worked before: a copy of the base model wearing one pack."""
    loaded = load_base_model(model, models_dir, resolve_device("cpu"))
    adapted = adapters.load(loaded.model, loaded.tokenizer, folder, pack_config(args))
    adapted.model.eval()
    runtime = Runtime(dataclasses.replace(loaded, model=adapted.model))
    runtime.adapted = adapted
    return runtime


def child(args) -> None:
    """One memory measurement in this fresh process: ``--child old|new`` with ``--count`` packs."""
    folders = [Path(f) for f in json.loads(args.folders)]
    torch.set_num_threads(1)
    before = memory_now()
    keep = []
    if args.child == "old":
        for folder in folders[:args.count]:
            keep.append(old_copy(args.model, Path(args.models_dir), folder, args))
    else:
        pool = ModelPool(load_base_model(args.model, Path(args.models_dir), resolve_device("cpu")), 2**62)
        keep = [pool.runtime(spec(args, folder, i)) for i, folder in enumerate(folders[:args.count])]
    for runtime in keep:  # one call each, as a chat makes: every weight it reads is resident now
        prompt = runtime.chat_ids([Message("user", QUESTION)])
        with runtime.session(), torch.inference_mode():
            runtime.model(input_ids=torch.tensor([prompt]), use_cache=False, logits_to_keep=1)
    after = memory_now()
    print(json.dumps({kind: after[kind] - before[kind] for kind in after}))


def measure(args, way: str, count: int, folders: list[Path]) -> dict:
    command = [sys.executable, __file__, "--child", way, "--count", str(count), "--folders",
               json.dumps([str(f) for f in folders]), "--models-dir", str(args.models_dir), "--size", args.size,
               "--mode", args.mode]
    if args.model:
        command += ["--model", args.model]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def replies_and_switching(args, folders: list[Path]) -> dict:
    """Greedy replies both ways (token ids), and switch and first-load times on the shared model."""
    from engram_app.inference import GenerationOptions

    options = GenerationOptions(max_new_tokens=args.tokens)
    pool = ModelPool(load_base_model(args.model, args.models_dir, resolve_device("cpu")), 2**62)
    prompt = pool.base_runtime.chat_ids([Message("user", QUESTION)])
    base = [t.id for t in pool.base_runtime.stream_ids(prompt, options)]
    load_seconds, views = [], []
    for i, folder in enumerate(folders):
        started = time.perf_counter()
        views.append(pool.runtime(spec(args, folder, i)))
        load_seconds.append(time.perf_counter() - started)
    shared = [[t.id for t in view.stream_ids(prompt, options)] for view in views]
    # Switching: the activation alone, then one decoding step with and without a switch before it.
    a, b = views[0], views[1]
    switch = []
    for _ in range(args.repeats):
        with a.session():
            pass
        started = time.perf_counter()
        with b.session():
            pass
        switch.append(time.perf_counter() - started)
    ids = torch.tensor([prompt], device=pool.loaded.device.device)
    with torch.inference_mode():
        caches = {}
        for view in (a, b):
            with view.session():
                caches[view.spec.key] = view.model(input_ids=ids, use_cache=True).past_key_values
    step = torch.tensor([[prompt[-1]]])

    def decode_step(view) -> float:
        started = time.perf_counter()
        with view.session(), torch.inference_mode():
            view.model(input_ids=step, past_key_values=caches[view.spec.key], use_cache=True)
            caches[view.spec.key].crop(-1)  # back to the prompt: every step measured is the same step
        return time.perf_counter() - started

    same, switched = [], []
    for _ in range(args.repeats):
        decode_step(a)
        same.append(decode_step(a))
        switched.append(decode_step(b))
    del pool, views
    gc.collect()
    old = []
    for folder in folders:
        runtime = old_copy(args.model, args.models_dir, folder, args)
        old.append([t.id for t in runtime.stream_ids(prompt, options)])
        del runtime
        gc.collect()
    return {"identical": [o == s for o, s in zip(old, shared)], "differs_from_base": [s != base for s in shared],
            "load_ms": statistics.median(load_seconds) * 1e3, "switch_ms": statistics.median(switch) * 1e3,
            "step_same_ms": statistics.median(same) * 1e3, "step_switched_ms": statistics.median(switched) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", type=int, default=5)
    parser.add_argument("--size", default="medium", choices=["small", "medium", "large"])
    parser.add_argument("--mode", default="engram", choices=["engram", "lora", "engram+lora"])
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per reply")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.5, help="std of the random weights given to the adapters")
    parser.add_argument("--model", default=None, help="a base model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (no bundled model needed)")
    parser.add_argument("--models-dir", type=Path, default=Settings().models_dir,
                        help="where converted models are kept (default: the data root's models/)")
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folders", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny import save_tiny_model

            args.model = str(save_tiny_model(Path(tmp) / "tiny"))
        args.models_dir.mkdir(parents=True, exist_ok=True)
        loaded = load_base_model(args.model, args.models_dir, resolve_device("cpu"))
        name, model_bytes = loaded.source.name, sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        del loaded
        folders = make_packs(args, args.model, args.models_dir, Path(tmp))
        gc.collect()  # this process maps none of the model file while the children measure
        memory = {(way, n): measure(args, way, n, folders) for way in ("old", "new") for n in (1, args.packs)}
        result = replies_and_switching(args, folders)
    mb = 2**20
    n = args.packs
    rows = [f"Base model {name} ({model_bytes / mb:.0f} MB of weights), CPU fp32, 1 thread; {n} {args.size} packs "
            f"(mode {args.mode}) with seeded random weights; greedy replies of {args.tokens} tokens.", "",
            "| | 1 pack | " + f"{n} packs | each extra pack |", "|---|---:|---:|---:|"]
    for way, label in (("old", "a copy of the model per pack (before)"), ("new", "one shared model (now)")):
        for kind in ("rss", "pss"):
            one, many = memory[(way, 1)][kind], memory[(way, n)][kind]
            rows.append(f"| {label}: {kind.upper()} | {one / mb:.0f} MB | {many / mb:.0f} MB | "
                        f"{(many - one) / (n - 1) / mb:.0f} MB |")
    rows += ["", "Each process made one model call per pack before it was measured. RSS counts the pages of every "
             "copy; PSS counts a page mapped by several copies once. On the CPU, transformers maps fp32 weights "
             "from the converted safetensors file without copying them, so the copies of the old way share those "
             "pages: PSS is the RAM each copy really took. On a GPU every copy is its own full copy in VRAM.",
             "", "| on the shared model | value |", "|---|---:|",
             f"| switch packs between two calls (activation) | {result['switch_ms']:.2f} ms |",
             f"| one decoding step, same pack as the call before | {result['step_same_ms']:.1f} ms |",
             f"| one decoding step, after a switch from another pack | {result['step_switched_ms']:.1f} ms |",
             f"| load a pack's adapters on first use | {result['load_ms']:.0f} ms |",
             f"| greedy replies identical to the per-pack copies | {sum(result['identical'])} of {n} |",
             f"| replies that differ from the base model's | {sum(result['differs_from_base'])} of {n} |"]
    publish("shared_runtime", rows)


if __name__ == "__main__":
    main()
