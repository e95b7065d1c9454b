"""Chat speed with another busy process on the CPU (a training job's, for instance).

The chat's runtimes (the fp32 lean step and the 4-bit runtime, as bench/decode_int4.py builds
them) decode in a child process, once with the machine idle and then beside a busy process (a
PyTorch matmul loop, as a training step runs, on one or two threads), at the chat's default thread
count, at one thread and with OpenMP's passive wait (``OMP_WAIT_POLICY=PASSIVE``: threads sleep at
a barrier instead of spinning). Speeds are ratios to the idle run of the same invocation.

    python bench/decode_contention.py [--tokens 32]

Prints a table and writes it to bench/results/decode_contention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUSY = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""

# (what runs beside the chat, its threads or 0 for nothing; the chat's environment)
CONDITIONS = [
    ("idle", 0, {}),
    ("idle, chat with passive wait", 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("a one-thread busy process", 1, {}),
    ("a one-thread busy process, chat at one thread", 1, {"CHAT_THREADS": "1"}),
    ("a one-thread busy process, chat with passive wait", 1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("a two-thread busy process", 2, {}),
    ("a two-thread busy process, chat at one thread", 2, {"CHAT_THREADS": "1"}),
]


def child(tokens: int) -> None:
    """Decode tok/s of both runtimes in this process, printed as JSON."""
    import torch

    from decode_int4 import SPEED_PROMPTS, decode_intervals
    from engram_app.inference import Message, Runtime
    from engram_app.models import load_base_model
    from engram_app.settings import Settings, resolve_device

    if os.environ.get("CHAT_THREADS"):
        torch.set_num_threads(int(os.environ["CHAT_THREADS"]))
    settings, plan = Settings(), resolve_device("cpu")
    runtimes = {"fp32": Runtime(load_base_model(None, settings.models_dir, plan)),
                "int4": Runtime(load_base_model(None, settings.models_dir, plan, int4=True))}
    prompts = [runtimes["fp32"].chat_ids([Message("user", p)]) for p in SPEED_PROMPTS]
    for runtime in runtimes.values():  # warm up
        decode_intervals(runtime, prompts[0], 8)
    steps: dict[str, list[float]] = {name: [] for name in runtimes}
    for ids in prompts:
        for name, runtime in runtimes.items():
            steps[name] += decode_intervals(runtime, ids, tokens)
    print(json.dumps({name: 1 / statistics.median(s) for name, s in steps.items()}
                     | {"threads": torch.get_num_threads()}))


def measure(busy_threads: int, env: dict, tokens: int) -> dict:
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(busy_threads)]) if busy_threads else None
    try:
        time.sleep(2 if busy else 0)
        done = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(tokens)], env={**os.environ, **env},
                              capture_output=True, text=True, check=True, timeout=1800)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if busy:
            busy.kill()
            busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply (3 prompts each)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.tokens)
        return
    from results_table import publish

    results = [(name, measure(busy, env, args.tokens)) for name, busy, env in CONDITIONS]
    idle = results[0][1]
    lines = [f"Chat decode beside a busy process, smollm2-135m-instruct on CPU ({os.cpu_count()} cores), "
             f"{args.tokens} new tokens x 3 prompts (tok/s = 1 / median time between tokens).", "",
             "| beside the chat | chat threads | fp32 tok/s | vs idle | int4 tok/s | vs idle |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, got in results:
        lines.append(f"| {name} | {got['threads']} | {got['fp32']:.1f} | {got['fp32'] / idle['fp32']:.2f}x | "
                     f"{got['int4']:.1f} | {got['int4'] / idle['int4']:.2f}x |")
    publish("decode_contention", lines)


if __name__ == "__main__":
    main()
