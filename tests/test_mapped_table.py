"""Memory rows in files mapped from disk: tables far larger than RAM.

A mapped table must give the model exactly what the same rows give from memory, read only the
rows a token addresses, train exactly as the in-memory table trains while keeping in RAM only
the rows it touched, and never let a crash cost the version it was opened from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram, load_engram, save_engram
from engram_app.engram.storage import EmbeddingTable, MappedTable, TableStorage, initial_rows
from tiny import CORPUS, tiny_llama, tiny_tokenizer

TESTS = str(Path(__file__).resolve().parent)
ROOT = str(Path(__file__).resolve().parents[1])
HUNDRED_MILLION = EngramConfig(rows_per_head=6_250_000, head_dim=32, storage="mapped")  # 2 orders x 8 heads


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


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids_of(tokenizer, text)).logits


def addressed_rows(model, memory, ids: torch.Tensor) -> np.ndarray:
    with torch.inference_mode(), memory.tracing() as calls:
        model(input_ids=ids)
    return np.unique(np.concatenate([t.rows.numpy().ravel() for t in calls[-1].values()]))


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
    mapped = MappedTable(table.num_rows, table.dim)
    mapped.write_rows(np.arange(table.num_rows), table.weight.detach().numpy())
    mapped.save(tmp_path / "table")
    copy, _, copy_memory = memory_on(MappedTable.open(tmp_path / "table"), config)
    copy_memory.blocks.load_state_dict(memory.blocks.state_dict())
    for text in CORPUS[:3]:
        assert torch.equal(logits(model, tokenizer, text), logits(copy, tokenizer, text))
    with pytest.raises(Exception, match="addresses"):
        memory_on(MappedTable.open(tmp_path / "table"), EngramConfig(rows_per_head=2003, head_dim=8, heads=2))


def test_a_table_of_a_hundred_million_rows_matches_the_same_rows_in_memory(tmp_path):
    model, tokenizer, memory = memory_on(None, HUNDRED_MILLION)
    table = memory.table
    assert isinstance(table, MappedTable) and table.num_rows >= 10**8
    text = CORPUS[0]
    addressed = addressed_rows(model, memory, ids_of(tokenizer, text))
    # Write some of the rows it reads (the rest read as their initial values), as training would.
    written = addressed[::2]
    values = np.random.default_rng(0).standard_normal((len(written), 32)).astype(np.float32)
    table.write_rows(written, values)
    folder = table.save(tmp_path / "big")
    reference = {int(r): v for r, v in zip(addressed, initial_rows(addressed, 32, 0.02, seed=HUNDRED_MILLION.seed))}
    reference.update({int(r): v for r, v in zip(written, values)})

    in_memory, _, other = memory_on(RowsInMemory(table.num_rows, 32, reference), HUNDRED_MILLION)
    other.blocks.load_state_dict(memory.blocks.state_dict())
    started = time.perf_counter()
    reopened = MappedTable.open(folder)
    opened_in = time.perf_counter() - started
    from_disk, _, disk_memory = memory_on(reopened, HUNDRED_MILLION)
    disk_memory.blocks.load_state_dict(memory.blocks.state_dict())
    expected = logits(in_memory, tokenizer, text)
    assert torch.equal(logits(model, tokenizer, text), expected)
    assert torch.equal(logits(from_disk, tokenizer, text), expected)

    # Disk holds only the written rows (12 GiB of logical table); opening maps, reads no row.
    used = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    assert used < 64 * 1024 + len(written) * (32 * 4 + 8) * 2, f"{used} bytes on disk for {len(written)} rows"
    assert opened_in < 1.0
    assert reopened.written_rows() == len(written) and reopened.stored_rows() == len(written)


def trained(memory_model, memory, steps: int, texts=CORPUS[:2]) -> EngramOptimizer:
    optimizer = EngramOptimizer(memory, lr=1e-2)
    for step in range(steps):
        ids = ids_of(memory.tokenizer_for_tests, texts[step % len(texts)])
        optimizer.zero_grad()
        memory_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return optimizer


def test_training_a_mapped_table_equals_training_the_same_rows_in_memory_and_touches_only_addressed_rows(tmp_path):
    mapped_config = EngramConfig(rows_per_head=1009, head_dim=8, heads=2, storage="mapped", seed=4)
    model, tokenizer, memory = memory_on(None, mapped_config)
    table = memory.table
    # The same initial rows, held in an nn.Embedding.
    embedding = EmbeddingTable(table.num_rows, table.dim)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(table.read_rows(np.arange(table.num_rows))))
    ref_model, _, ref_memory = memory_on(embedding, EngramConfig(rows_per_head=1009, head_dim=8, heads=2, seed=4))
    ref_memory.blocks.load_state_dict(memory.blocks.state_dict())
    before = embedding.weight.detach().clone()
    addressed = set()
    for m, mem in ((model, memory), (ref_model, ref_memory)):
        mem.tokenizer_for_tests = tokenizer
        for text in CORPUS[:2]:
            addressed |= set(addressed_rows(m, mem, ids_of(tokenizer, text)).tolist())
        optimizer = trained(m, mem, steps=4)
    for text in CORPUS[:4]:
        assert torch.allclose(logits(model, tokenizer, text), logits(ref_model, tokenizer, text), atol=1e-5)
    moved = set((embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist())
    changed = set(table.changed.ids.tolist())
    assert changed == moved and changed and changed <= addressed
    assert np.allclose(table.read_rows(np.array(sorted(changed))), embedding.weight.detach()[sorted(changed)].numpy(),
                       atol=1e-6)
    table_opt = optimizer.optimizers[0]
    assert len(moved) <= table_opt.rows_touched and set(table_opt.rows.tolist()) <= addressed


def test_optimizer_and_table_memory_grow_with_rows_touched_not_with_a_hundred_million_rows():
    model, tokenizer, memory = memory_on(None, HUNDRED_MILLION)
    memory.tokenizer_for_tests = tokenizer
    sizes = []
    for steps in (1, 3):
        optimizer = trained(model, memory, steps=steps, texts=CORPUS[:3])
        table_opt = optimizer.optimizers[0]
        touched = table_opt.rows_touched
        per_row = 2 * 32 * 4 + 2 * 8  # two moments of d_h floats, a row id and a step count
        assert table_opt.state_bytes() == touched * per_row
        assert 0 < len(memory.table.changed) <= touched  # rows whose update was zero are not written
        sizes.append(table_opt.state_bytes() + memory.table.changed_bytes())
    table_bytes = memory.table.num_rows * 32 * 4
    assert max(sizes) < 1e-3 * table_bytes  # < 12 MB of RAM for a 12 GiB table


def test_checkpoints_store_only_changed_rows_over_their_version_and_reload_exactly(tmp_path):
    config = EngramConfig(rows_per_head=100_003, head_dim=16, heads=2, storage="mapped")
    model, tokenizer, memory = memory_on(None, config)
    memory.tokenizer_for_tests = tokenizer
    trained(model, memory, steps=3)
    save_engram(memory, tmp_path / "v1")  # a version: every written row, self-contained
    v1_rows = memory.table.written_rows()

    fresh = tiny_llama(len(tokenizer))
    loaded = load_engram(fresh, tokenizer, tmp_path / "v1")
    loaded.tokenizer_for_tests = tokenizer
    assert torch.equal(logits(fresh, tokenizer, CORPUS[0]), logits(model, tokenizer, CORPUS[0]))
    trained(fresh, loaded, steps=2, texts=CORPUS[2:4])
    save_engram(loaded, tmp_path / "checkpoint", delta=True)
    meta = json.loads((tmp_path / "checkpoint" / "table" / "table.json").read_text())
    assert meta["delta"] and Path(meta["base"]) == (tmp_path / "v1" / "table").resolve()
    assert meta["count"] == len(loaded.table.changed) < loaded.table.written_rows()

    # Resuming from the checkpoint, training on, checkpointing again: the rows carry over.
    again_model = tiny_llama(len(tokenizer))
    again = load_engram(again_model, tokenizer, tmp_path / "checkpoint")
    for text in CORPUS[:4]:
        assert torch.equal(logits(again_model, tokenizer, text), logits(fresh, tokenizer, text))
    save_engram(again, tmp_path / "checkpoint", delta=True)
    assert json.loads((tmp_path / "checkpoint" / "table" / "table.json").read_text())["count"] == meta["count"]
    save_engram(again, tmp_path / "v2")
    v2 = json.loads((tmp_path / "v2" / "table" / "table.json").read_text())
    assert v2["base"] is None and not v2["delta"] and v2["count"] == again.table.written_rows() >= v1_rows
    last_model = tiny_llama(len(tokenizer))
    load_engram(last_model, tokenizer, tmp_path / "v2")
    assert torch.equal(logits(last_model, tokenizer, CORPUS[3]), logits(fresh, tokenizer, CORPUS[3]))


KILL_DURING_SAVE = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from tiny import CORPUS, tiny_llama, tiny_tokenizer
from engram_app.engram import EngramOptimizer, load_engram, save_engram
tokenizer = tiny_tokenizer()
model = tiny_llama(len(tokenizer))
memory = load_engram(model, tokenizer, {v1!r})
optimizer = EngramOptimizer(memory, lr=1e-2)
for text in CORPUS[2:5]:
    ids = tokenizer(text, return_tensors="pt").input_ids
    optimizer.zero_grad(); model(input_ids=ids, labels=ids).loss.backward(); optimizer.step()
real = np.lib.format.open_memmap
def dying(path, *args, **kwargs):
    if str(path).endswith("values.npy"):  # rows.npy is written: die in the middle of the version
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
np.lib.format.open_memmap = dying
save_engram(memory, {v2!r})
"""


def test_a_kill_while_a_version_is_written_leaves_the_previous_version_loadable(tmp_path):
    config = EngramConfig(rows_per_head=100_003, head_dim=16, heads=2, storage="mapped")
    model, tokenizer, memory = memory_on(None, config)
    memory.tokenizer_for_tests = tokenizer
    trained(model, memory, steps=3)
    save_engram(memory, tmp_path / "v1")
    expected = logits(model, tokenizer, CORPUS[1])
    files = {p: p.read_bytes() for p in (tmp_path / "v1").rglob("*") if p.is_file()}

    code = KILL_DURING_SAVE.format(tests=TESTS, v1=str(tmp_path / "v1"), v2=str(tmp_path / "v2"))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not (tmp_path / "v2").exists()  # only a temporary folder, never a half version under its name
    assert any(p.name.startswith(".v2.") for p in tmp_path.iterdir())
    assert {p: p.read_bytes() for p in (tmp_path / "v1").rglob("*") if p.is_file()} == files
    again = tiny_llama(len(tokenizer))
    load_engram(again, tokenizer, tmp_path / "v1")
    assert torch.equal(logits(again, tokenizer, CORPUS[1]), expected)


@pytest.mark.parametrize("damage", ["unsorted", "short", "pickle", "json"])
def test_a_damaged_table_is_refused_with_a_reason(tmp_path, damage):
    config = EngramConfig(rows_per_head=1009, head_dim=8, heads=2, storage="mapped")
    model, tokenizer, memory = memory_on(None, config)
    memory.table.write_rows(np.array([5, 9, 700]), np.ones((3, 8), dtype=np.float32))
    folder = save_engram(memory, tmp_path / "v1") / "table"
    if damage == "unsorted":
        np.save(folder / "rows.npy", np.array([9, 5, 700], dtype=np.int64))
    elif damage == "short":
        np.save(folder / "values.npy", np.ones((2, 8), dtype=np.float32))
    elif damage == "pickle":
        np.save(folder / "rows.npy", np.array([object(), 1, 2], dtype=object), allow_pickle=True)
    else:
        (folder / "table.json").write_text("{not json")
    with pytest.raises(Exception, match="cannot be read"):
        load_engram(tiny_llama(len(tokenizer)), tokenizer, tmp_path / "v1")
    assert os.path.isdir(folder)
