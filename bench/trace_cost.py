"""What the per-token trace costs: generation speed, stored size, and inspection latency.

On the bundled SmolLM2-135M with a memory pack of the default shape (untrained: the cost is the
same), in one process: a 500-token reply from the base model, then with the memory and the
trace recorded while generating; the stored trace's size; ``inspect`` (one forward pass over the
whole sequence, every token's report) and the memory effect (two teacher-forced passes).

    python bench/trace_cost.py [--tokens 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.results_table import publish  # noqa: E402
from engram_app.inference import GenerationOptions  # noqa: E402
from engram_app.service import Service  # noqa: E402
from engram_app.settings import Settings, default_home  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="engram-trace-"))
    (home / "models").symlink_to((default_home() / "models").resolve())
    service = Service(Settings(home=home, device=args.device))
    service.create_pack("bench")
    # Sampling with a fixed seed keeps the reply going for the full length (greedy may stop early).
    options = GenerationOptions(max_new_tokens=args.tokens, temperature=0.8, seed=1)
    prompt = "Write a long story about a lighthouse keeper and her dog."
    service.chat(prompt, options=GenerationOptions(max_new_tokens=8), save=False)  # warm up
    service.chat(prompt, options=GenerationOptions(max_new_tokens=8), pack="bench", save=False)

    t = time.perf_counter()
    base = service.chat(prompt, options=options, save=False)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    traced = service.chat(prompt, options=options, pack="bench")
    traced_s = time.perf_counter() - t
    row = next(service.db().query("select length(trace) as size from messages where id = ?", [traced.message_id]))
    n = len(traced.tokens)

    t = time.perf_counter()
    reports = service.inspect("bench", ids=traced.ids)
    inspect_s = time.perf_counter() - t
    t = time.perf_counter()
    service.memory_effect("bench", traced.ids, start=len(traced.prompt_ids))
    effect_s = time.perf_counter() - t
    assert len(reports) == len(traced.ids)

    lines = [
        f"Trace cost, SmolLM2-135M + default memory, {args.device}, {torch.get_num_threads()} threads; "
        f"reply of {n} tokens after a {len(traced.prompt_ids)}-token prompt",
        "",
        "| measure | value |",
        "|---|---|",
        f"| base model, tokens/s | {len(base.tokens) / base_s:.1f} |",
        f"| memory + trace recorded while generating, tokens/s | {n / traced_s:.1f} "
        f"({(n / traced_s) / (len(base.tokens) / base_s):.2f}x base) |",
        f"| stored trace (whole sequence, zlib) | {row['size'] / 1024:.1f} KiB ({row['size'] / len(traced.ids):.0f} B/token) |",
        f"| inspect: one pass, {len(traced.ids)} token reports | {inspect_s * 1000:.0f} ms |",
        f"| memory effect: two teacher-forced passes | {effect_s * 1000:.0f} ms |",
    ]
    publish("trace_cost", lines)


if __name__ == "__main__":
    main()
