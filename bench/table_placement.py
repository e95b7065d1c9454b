"""Prefill and decode throughput with the memory table on the device vs in host memory (mapped).

Runs on any device (``--device cpu|cuda``). On a GPU this is the ultra-large-memory issue's
measurement: the base model alone; a memory whose table sits on the device (``nn.Embedding``,
``--device-rows`` rows); and a memory mapped from disk in host memory (``--rows`` rows, the
prompts' rows written and saved as a pack version is, then opened again), whose rows are
gathered before the first block runs and copied from pinned memory. Ratios are to the base model
and to the on-device table, all measured in this process, interleaved.

The model is SmolLM2-135M's shape with random weights (``--model`` for a real one): speed does
not depend on the weights, and it needs no download. The tokenizer only feeds the memory's
compression (a small one trained on the fly).

    python bench/table_placement.py [--device cuda] [--rows 100000000] [--device-rows 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.results_table import publish  # noqa: E402
from engram_app.engram import EngramConfig, attach_engram  # noqa: E402
from engram_app.engram.storage import MappedTable  # noqa: E402

HEADS = 16  # 2 orders x 8 heads


def smollm2_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill_rate(model, ids: torch.Tensor) -> float:
    sync(ids.device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    sync(ids.device)
    return ids.numel() / (time.perf_counter() - t)


@torch.inference_mode()
def decode_rate(model, ids: torch.Tensor, n: int) -> float:
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    t = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a model folder or hub id (default: SmolLM2's shape, random)")
    parser.add_argument("--rows", type=int, default=100_000_000, help="rows of the mapped table")
    parser.add_argument("--device-rows", type=int, default=10_000_000, help="rows of the table on the device")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()

    def model_copy():
        if args.model:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
        else:
            model = smollm2_shape()
        return model.to(device, dtype).eval().requires_grad_(False)

    def wearing(config: EngramConfig, table=None):
        model = model_copy()
        memory = attach_engram(model, tokenizer, config, table=table)
        with torch.no_grad():  # non-zero values, as after training (speed does not depend on them)
            for block in memory.blocks.values():
                block.value.weight.normal_(0, 0.02)
        return model, memory

    g = torch.Generator().manual_seed(0)
    vocab = 49152
    prompts = [torch.randint(0, vocab, (1, args.prefill), generator=g).to(device) for _ in range(3)]
    short = [p[:, :64] for p in prompts]

    base = model_copy()
    on_device, _ = wearing(EngramConfig(rows_per_head=args.device_rows // HEADS))
    mapped_config = EngramConfig(rows_per_head=args.rows // HEADS, storage="mapped")
    writer, writer_memory = wearing(mapped_config)
    with tempfile.TemporaryDirectory() as tmp:
        # Write every row the prompts address (as training would), save, reopen as a version.
        with torch.inference_mode(), writer_memory.tracing() as calls:
            for p in prompts:
                writer(input_ids=p)
        touched = np.unique(np.concatenate([t.rows.cpu().numpy().ravel() for c in calls for t in c.values()]))
        writer_memory.table.write_rows(touched, writer_memory.table.read_rows(touched) + 0.01)
        folder = writer_memory.table.save(Path(tmp) / "table")
        del writer, writer_memory
        started = time.perf_counter()
        table = MappedTable.open(folder)
        open_ms = (time.perf_counter() - started) * 1e3
        mapped, mapped_memory = wearing(mapped_config, table)
        models = {"base model": base, f"memory on the device ({args.device_rows:.0e} rows)": on_device,
                  f"memory mapped in host memory ({mapped_memory.table.num_rows:.1e} rows, {len(touched):,} written)": mapped}
        for m in models.values():  # warm-up
            prefill_rate(m, prompts[0])
            decode_rate(m, short[0], 4)
        prefill = {name: [] for name in models}
        decode = {name: [] for name in models}
        for _ in range(args.repeats):
            for p, s in zip(prompts, short):
                for name, m in models.items():
                    prefill[name].append(prefill_rate(m, p))
                    decode[name].append(decode_rate(m, s, args.tokens))

    names = list(models)
    pre = {n: statistics.median(v) for n, v in prefill.items()}
    dec = {n: statistics.median(v) for n, v in decode.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"{args.model or 'SmolLM2-135M shape, random weights'} on {where}, {dtype}; prefill of {args.prefill} "
             f"tokens, decode of {args.tokens} tokens after a 64-token prompt; {args.repeats} x 3 prompts, medians. "
             f"Opening the saved mapped table: {open_ms:.1f} ms.", "",
             "| model | prefill tok/s | vs base | decode tok/s | vs base | decode vs table on device |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | {pre[n]:.0f} | {pre[n] / pre[names[0]]:.3f}x | {dec[n]:.1f} | {dec[n] / dec[names[0]]:.3f}x "
                     f"| {dec[n] / dec[names[1]]:.3f}x |")
    publish(f"table_placement_{device.type}", lines)


if __name__ == "__main__":
    main()
