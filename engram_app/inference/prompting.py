"""How retrieved library lines are put into a chat prompt (the app's retrieval mode).

Facts first, short, in the system message: the few lines of the library nearest the user's
message (``Library.search_lines``), one per bullet, before the conversation. Measured on a
ten-fact profile asked in new words (bench/held_out_retrieval.py, docs/BENCHMARKS.md): the two
nearest lines in the system message recall 3 of 10 facts without memory and 8 of 10 with it,
every general control kept; three whole passages before the user's message (how it was done
before) recalled 1 and 4, and broke two of four controls with memory on. Lines below
``RETRIEVAL_MIN_SCORE`` are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from engram_app.inference.runtime import Message

RETRIEVAL_HEADER = "What the user has told you about themselves (they wrote these lines):"
# Lines less similar than this to the message (cosine, all-MiniLM-L6-v2) stay out of the prompt: a
# general question then gets none, and a small model no longer talks about the user's lines in its
# answer ("What is the capital of Japan?"). Chosen on the tuning half of bench/recall.py's people
# (20 people, 100 held-out questions): 0.25 keeps 80% of the lines a question is about and gives 6%
# of the general questions any line at all, where every one got k lines before (docs/BENCHMARKS.md).
RETRIEVAL_MIN_SCORE = 0.25


def retrieval_message(retrieved: Sequence[dict]) -> Message | None:
    """The system message holding the retrieved lines (``text`` of each hit), or None without any."""
    if not retrieved:
        return None
    lines = "\n".join(f"- {' '.join(hit['text'].split())}" for hit in retrieved)
    return Message("system", f"{RETRIEVAL_HEADER}\n{lines}")


def with_retrieved(messages: Sequence[Message], retrieved: Sequence[dict]) -> list[Message]:
    """``messages`` with the retrieved lines in a system message first (after any system message of their own)."""
    system = retrieval_message(retrieved)
    if system is None:
        return list(messages)
    own = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    if own:
        system = Message("system", "\n\n".join([*(m.content for m in own), system.content]))
    return [system, *rest]
