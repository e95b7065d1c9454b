"""Looking inside a memory: every token's slots for a text, and what the memory changed in the output."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engram_app.engram import trace_tokens
from engram_app.errors import EngramError
from engram_app.inference.runtime import Runtime


def trace_text(runtime: Runtime, text: str | None = None, ids: Sequence[int] | None = None) -> list:
    """Every token's memory report for ``text`` (tokenised as is) or ``ids``, in one forward pass.

    ``runtime`` wears an Engram memory (``runtime.adapted.memory``)."""
    if ids is None:
        if not text:
            raise EngramError("Nothing to inspect: give a text or token ids.")
        ids = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in ids]
    vocab = runtime.model.get_input_embeddings().weight.shape[0]
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise EngramError(f"Token ids must be between 0 and {vocab - 1} (the model's vocabulary).")
    with runtime.session():
        return trace_tokens(runtime.adapted.memory, runtime.tokenizer, ids)


def memory_effect(runtime: Runtime, ids: Sequence[int], start: int = 1) -> list[dict]:
    """For tokens ``start..``: log-probability with memory on, off, and the difference (one pass each)."""
    ids = [int(i) for i in ids]
    tensor = torch.tensor([ids], device=runtime.device)
    with runtime.session(), torch.inference_mode():
        on = torch.log_softmax(runtime.model(input_ids=tensor).logits[0].float(), -1)
        with runtime.adapted.off():
            off = torch.log_softmax(runtime.model(input_ids=tensor).logits[0].float(), -1)
    out = []
    for p in range(max(start, 1), len(ids)):
        a, b = float(on[p - 1, ids[p]]), float(off[p - 1, ids[p]])
        out.append({"position": p, "logprob_on": round(a, 4), "logprob_off": round(b, 4), "effect": round(a - b, 4)})
    return out


def memory_runtime(runtime: Runtime, pack: str) -> Runtime:
    """``runtime`` (the base model wearing ``pack``), refused when the pack has no Engram memory."""
    if runtime.adapted is None or runtime.adapted.memory is None:
        raise EngramError(f"Pack {pack!r} has no Engram memory to inspect (it is a LoRA-only pack).")
    return runtime


def stored_trace(runtime: Runtime, message: dict) -> dict:
    """The per-token memory report of a stored reply (a ``messages`` row with its pack's name), from
    the trace recorded while it was generated, read with the memory ``runtime`` wears."""
    from engram_app.inference.tracing import TraceArrays

    arrays = TraceArrays.from_bytes(message["trace"])
    return {"message": message["id"], "pack": message["pack"], "version": message["version"],
            "content": message["content"], "ids": arrays.ids.tolist(), "start": arrays.start,
            "tokens": arrays.tokens(runtime.adapted.memory, runtime.tokenizer, arrays.start)}
