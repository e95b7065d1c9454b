"""The Engram engine on the real bundled model (SmolLM2-135M-Instruct)."""

import pytest
import torch

from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram, trace_tokens
from engram_app.models import load_base_model
from engram_app.settings import resolve_device

pytestmark = pytest.mark.slow

FACTS = [
    "I have a turtle named Timothy.",
    "My dog is called Pixel and she loves the beach.",
    "I work as a nurse in Lisbon.",
]
UNRELATED = [
    "The mitochondria is the powerhouse of the cell, producing energy for the organism.",
    "In 1969, astronauts landed on the moon for the first time in history.",
]


def losses(model, tokenizer, texts):
    with torch.no_grad():
        out = []
        for text in texts:
            batch = tokenizer(text, return_tensors="pt")
            out.append(model(**batch, labels=batch.input_ids).loss.item())
        return out


def test_short_training_learns_its_sentences_and_leaves_other_text_alone(bundled_home):
    loaded = load_base_model(None, bundled_home / "models", resolve_device("cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    facts_before, other_before = losses(model, tokenizer, FACTS), losses(model, tokenizer, UNRELATED)

    memory = attach_engram(model, tokenizer, EngramConfig())
    assert losses(model, tokenizer, FACTS) == facts_before  # identity at initialisation, real model
    optimizer = EngramOptimizer(memory, lr=3e-3)
    batch = tokenizer(FACTS, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(30):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()

    facts_after, other_after = losses(model, tokenizer, FACTS), losses(model, tokenizer, UNRELATED)
    print("facts", facts_before, "->", facts_after, "unrelated", other_before, "->", other_after)
    assert sum(facts_after) < 0.5 * sum(facts_before)
    for before, after in zip(other_before, other_after):
        assert abs(after - before) < 0.02 * before

    # The trace shows where memory fired: the trained sentence's tokens read their slots.
    traces = trace_tokens(memory, tokenizer, tokenizer(FACTS[0]).input_ids)
    assert all(len(t.memory) == 1 and len(t.memory[0].slots) == 16 for t in traces)
    assert max(t.memory[0].ratio for t in traces) > 0
