"""Memory rows in a memory-mapped file (groundwork of the ultra-large-memory issue).

A mapped table must give the model exactly what the same rows give from memory, read only the
rows a token addresses, and stay a sparse file: a 10^8-row table costs disk only for the rows
written.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from engram_app.engram import EngramConfig, attach_engram
from engram_app.engram.storage import EmbeddingTable, MappedTable, TableStorage, initial_rows
from tiny import CORPUS, tiny_llama, tiny_tokenizer


class RowsInMemory(TableStorage):
    """Only the given rows, held in memory (a reference for a table too large to hold whole)."""

    def __init__(self, num_rows: int, dim: int, rows: dict[int, np.ndarray]):
        super().__init__()
        self.num_rows, self.dim, self.rows = num_rows, dim, rows

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = [torch.from_numpy(self.rows[int(r)]) for r in rows.reshape(-1)]
        return torch.stack(flat).reshape(*rows.shape, self.dim)

    def sparse_parameters(self):
        return []


def memory_on(table, config: EngramConfig, seed: int = 3):
    """A tiny model wearing a memory with ``table`` and a non-zero value projection (so rows matter)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    memory = attach_engram(model, tokenizer, config, table=table)
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
    return model, tokenizer, memory


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_initial_rows_are_a_deterministic_normal_sample():
    rows = np.arange(0, 50_000, dtype=np.int64) * 7919
    a = initial_rows(rows, 32, 0.02, seed=1)
    assert np.array_equal(a, initial_rows(rows, 32, 0.02, seed=1))
    assert not np.array_equal(a, initial_rows(rows, 32, 0.02, seed=2))
    assert np.array_equal(a[10:20], initial_rows(rows[10:20], 32, 0.02, seed=1))  # a row's values: its own
    assert abs(float(a.mean())) < 1e-3 and abs(float(a.std()) - 0.02) < 5e-4
    assert not initial_rows(np.array([0], dtype=np.int64), 32, 0.0, 0).any()


def test_a_mapped_copy_of_an_in_memory_table_gives_the_same_outputs(tmp_path):
    config = EngramConfig(rows_per_head=1009, head_dim=8, heads=2)
    model, tokenizer, memory = memory_on(None, config)
    table = memory.table
    assert isinstance(table, EmbeddingTable)
    mapped = MappedTable.create(tmp_path / "table", table.num_rows, table.dim)
    mapped.write_rows(np.arange(table.num_rows), table.weight.detach().numpy())
    mapped.flush()
    copy, _, copy_memory = memory_on(MappedTable(tmp_path / "table"), config)
    copy_memory.blocks.load_state_dict(memory.blocks.state_dict())
    for text in CORPUS[:3]:
        assert torch.equal(logits(model, tokenizer, text), logits(copy, tokenizer, text))
    with pytest.raises(Exception, match="addresses"):
        memory_on(MappedTable(tmp_path / "table"), EngramConfig(rows_per_head=2003, head_dim=8, heads=2))


def test_a_table_of_a_hundred_million_rows_in_a_sparse_file_matches_the_same_rows_in_memory(tmp_path):
    config = EngramConfig(rows_per_head=6_250_000, head_dim=32)  # 2 orders x 8 heads: 10^8 rows
    folder = tmp_path / "big"
    model, tokenizer, memory = memory_on(lambda rows, dim: MappedTable.create(folder, rows, dim, seed=5), config)
    table = memory.table
    assert table.num_rows >= 10**8
    text = CORPUS[0]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode(), memory.tracing() as calls:  # the rows this text reads
        model(input_ids=ids)
    addressed = np.unique(np.concatenate([t.rows.numpy().ravel() for t in calls[-1].values()]))
    # Write some of them (the rest read as their initial values), as training would.
    written = addressed[::2]
    values = np.random.default_rng(0).standard_normal((len(written), 32)).astype(np.float32)
    table.write_rows(written, values)
    table.flush()
    reference = {int(r): v for r, v in zip(addressed, initial_rows(addressed, 32, 0.02, seed=5))}
    reference.update({int(r): v for r, v in zip(written, values)})

    in_memory, _, other = memory_on(RowsInMemory(table.num_rows, 32, reference), config)
    other.blocks.load_state_dict(memory.blocks.state_dict())
    assert torch.equal(logits(model, tokenizer, text), logits(in_memory, tokenizer, text))

    # The file is sparse: disk only for the written rows' pages; reopening maps, reads nothing.
    used = os.stat(folder / "table.f32").st_blocks * 512
    assert used < 64 * 2**20, f"{used / 2**20:.1f} MiB on disk for {len(written)} written rows"
    assert os.path.getsize(folder / "table.f32") == table.num_rows * 32 * 4
    started = time.perf_counter()
    reopened = MappedTable(folder)
    assert time.perf_counter() - started < 1.0  # maps the files; reads no row
    assert reopened.written_rows() == len(written)
