"""How retrieved library passages are put into a chat prompt (the app's retrieval mode)."""

from __future__ import annotations

from collections.abc import Sequence


def with_retrieved(message: str, retrieved: Sequence[dict]) -> str:
    """The user's message with retrieved library passages (``text`` of each hit) put before it."""
    if not retrieved:
        return message
    passages = "\n\n".join(f"[{i + 1}] {hit['text']}" for i, hit in enumerate(retrieved))
    return f"Here are passages from my own notes that may help:\n\n{passages}\n\nMy message: {message}"
