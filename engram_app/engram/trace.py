"""Which memory slots fired, per token and per Engram layer (ENGRAM.md section 11).

A slot is one (order, head) row a token read: the row index, and the n-gram text (of the
original tokens) whose hash produced it. With each layer come the gate alpha_t, the pre-sigmoid
score, and |Y|/|h|, how large the memory's contribution is next to the hidden state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import EngramModel, LayerTrace

START = "<s>"  # shown for n-gram positions before the start of the sequence


@dataclass
class SlotHit:
    order: int
    head: int
    row: int
    ngram: str

    def to_json(self) -> dict:
        return {"order": self.order, "head": self.head, "row": self.row, "ngram": self.ngram}


@dataclass
class LayerReport:
    layer: int
    gate: float
    score: float
    ratio: float
    slots: list[SlotHit]

    def to_json(self) -> dict:
        return {"layer": self.layer, "gate": self.gate, "score": self.score, "ratio": self.ratio,
                "slots": [s.to_json() for s in self.slots]}


@dataclass
class TokenTrace:
    position: int
    id: int
    text: str
    memory: list[LayerReport]

    def to_json(self) -> dict:
        return {"text": self.text, "id": self.id, "memory": [m.to_json() for m in self.memory]}


def ngram_text(tokenizer, ids: Sequence[int], position: int, order: int) -> str:
    start = position - order + 1
    prefix = [START] * max(0, -start)
    pieces = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids[max(0, start): position + 1]]
    return "|".join(prefix + pieces)


def reports(memory: EngramModel, tokenizer, ids: Sequence[int], layer_traces: dict[int, LayerTrace],
            first_position: int = 0, batch_index: int = 0) -> list[TokenTrace]:
    """Turn one forward call's traces into per-token reports.

    ``ids`` is the whole sequence so far (for n-gram texts); the traced call covered positions
    ``first_position ..`` of it (a decoding step covers one position).
    """
    slot_names = memory.layout.slot_names()
    steps = next(iter(layer_traces.values())).rows.shape[1] if layer_traces else 0
    out = []
    for t in range(steps):
        position = first_position + t
        layers = []
        for layer in memory.layer_ids:
            trace = layer_traces[layer]
            rows = trace.rows[batch_index, t].tolist()
            slots = [SlotHit(order, head, row, ngram_text(tokenizer, ids, position, order))
                     for (order, head), row in zip(slot_names, rows)]
            layers.append(LayerReport(layer, float(trace.gate[batch_index, t]), float(trace.score[batch_index, t]),
                                      float(trace.ratio[batch_index, t]), slots))
        token_id = int(ids[position])
        out.append(TokenTrace(position, token_id, tokenizer.decode([token_id], clean_up_tokenization_spaces=False), layers))
    return out


def trace_tokens(memory: EngramModel, tokenizer, ids: Sequence[int]) -> list[TokenTrace]:
    """Run ``ids`` (one sequence) through the model once and report every token's slots."""
    device = next(memory.parameters()).device
    with torch.inference_mode(), memory.tracing() as calls:
        memory.base_model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    return reports(memory, tokenizer, ids, calls[-1])
