"""Traces recorded while generating, and their compact storage with a message.

The Engram hooks report, for every forward call, each layer's rows, gate, score and |Y|/|h|
(``EngramModel.tracing``). A :class:`Recorder` keeps those of the prefill and of every decoding
step (no second pass) and turns them into :class:`TraceArrays`: one array per quantity over the
positions of the whole sequence (prompt + reply). A token's report is what was read AT its
position: the n-grams ending at it, as ``inspect`` reports for the same text in one forward pass.

Stored with a message as safetensors bytes (no pickle) compressed with zlib: rows as int32 and
the three floats as float16, about 70 bytes per token per layer before compression.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from engram_app.engram import EngramModel, LayerTrace, TokenTrace, reports


@dataclass
class TraceArrays:
    ids: np.ndarray  # [N] token ids of the sequence
    layers: list[int]
    rows: np.ndarray  # [L, N, R]
    gate: np.ndarray  # [L, N]
    score: np.ndarray  # [L, N]
    ratio: np.ndarray  # [L, N]
    start: int = 0  # the first position of the reply (the prompt comes before it)

    def to_bytes(self) -> bytes:
        row_type = np.int32 if self.rows.size == 0 or int(self.rows.max()) < 2**31 else np.int64
        tensors = {"ids": self.ids.astype(np.int32), "layers": np.asarray(self.layers, dtype=np.int32),
                   "rows": self.rows.astype(row_type), "gate": self.gate.astype(np.float16),
                   "score": self.score.astype(np.float16), "ratio": self.ratio.astype(np.float16),
                   "start": np.asarray([self.start], dtype=np.int32)}
        return zlib.compress(st_save(tensors), 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> TraceArrays:
        t = st_load(zlib.decompress(data))
        start = int(t["start"][0]) if "start" in t else 0  # traces stored before the field existed: 0
        return cls(t["ids"].astype(np.int64), t["layers"].tolist(), t["rows"].astype(np.int64),
                   t["gate"].astype(np.float32), t["score"].astype(np.float32), t["ratio"].astype(np.float32), start)

    def tokens(self, memory: EngramModel, tokenizer, start: int = 0, end: int | None = None) -> list[TokenTrace]:
        """Per-token reports for positions ``start..end`` (the n-gram texts come from the ids)."""
        end = len(self.ids) if end is None else end
        layer_traces = {
            layer: LayerTrace(torch.from_numpy(self.rows[i, start:end][None]), torch.from_numpy(self.gate[i, start:end][None]),
                              torch.from_numpy(self.score[i, start:end][None]), torch.from_numpy(self.ratio[i, start:end][None]))
            for i, layer in enumerate(self.layers)
        }
        return reports(memory, tokenizer, self.ids.tolist(), layer_traces, first_position=start)


class Recorder:
    """Collects the traces of the forward calls of one generation, by position."""

    def __init__(self, memory: EngramModel):
        self.memory = memory
        self.calls: list[tuple[int, dict[int, LayerTrace]]] = []  # (first position, traces)

    def add(self, first_position: int, layer_traces: dict[int, LayerTrace]) -> None:
        self.calls.append((first_position, {k: LayerTrace(v.rows[0:1].cpu(), v.gate[0:1].float().cpu(),
                                                         v.score[0:1].float().cpu(), v.ratio[0:1].float().cpu())
                                            for k, v in layer_traces.items()}))

    def covered(self) -> int:
        """Positions traced so far (calls are contiguous from 0)."""
        if not self.calls:
            return 0
        first, traces = self.calls[-1]
        return first + next(iter(traces.values())).rows.shape[1]

    def arrays(self, ids: list[int], start: int = 0) -> TraceArrays:
        layers = self.memory.layer_ids
        n = self.covered()
        width = len(self.memory.layout.slot_names())
        rows = np.zeros((len(layers), n, width), dtype=np.int64)
        gate, score, ratio = (np.zeros((len(layers), n), dtype=np.float32) for _ in range(3))
        for first, traces in self.calls:
            for i, layer in enumerate(layers):
                t = traces[layer]
                steps = t.rows.shape[1]
                rows[i, first:first + steps] = t.rows[0].numpy()
                gate[i, first:first + steps] = t.gate[0].numpy()
                score[i, first:first + steps] = t.score[0].numpy()
                ratio[i, first:first + steps] = t.ratio[0].numpy()
        return TraceArrays(np.asarray(ids[:n], dtype=np.int64), list(layers), rows, gate, score, ratio, start)
