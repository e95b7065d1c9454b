"""Rows fetched before the first block runs (engram/storage.py ``prefetch``, model.py's pre-hook).

On a GPU a mapped table's rows are copied from pinned host memory on a side stream while the
blocks before the memory layer compute. No GPU is needed to prove what matters for correctness:
the prefetched rows are exactly what the layer would read itself, a prefetch for other ids is
never used, training (which needs rows that collect gradients) reads its own, and on the CPU no
CUDA stream or event is ever made.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_app.engram import EngramConfig, EngramOptimizer, attach_engram
from engram_app.engram.storage import MappedTable
from tiny import tiny_llama, tiny_tokenizer

CONFIG = dict(rows_per_head=997, head_dim=8, storage="mapped", layers=[0, 1])


@pytest.fixture()
def wearing():
    """A tiny model wearing a mapped memory on both blocks, with written rows and a non-zero value projection."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    memory = attach_engram(model, tokenizer, EngramConfig(**CONFIG))
    table = memory.table
    assert isinstance(table, MappedTable)
    rng = np.random.default_rng(0)
    written = np.arange(0, table.num_rows, 3, dtype=np.int64)  # a third of the rows differ from their initial values
    table.write_rows(written, rng.normal(0, 0.5, (len(written), table.dim)).astype(np.float32))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
            block.conv.weight.normal_(0, 0.5)
    return model, tokenizer, memory


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


class CountingLookups:
    """Counts the table's own lookups and prefetches (to see which path a call took)."""

    def __init__(self, table: MappedTable, monkeypatch):
        self.lookups = self.prefetches = 0
        lookup, prefetch = table.lookup, table.prefetch

        def counted_lookup(rows):
            self.lookups += 1
            return lookup(rows)

        def counted_prefetch(rows):
            self.prefetches += 1
            return prefetch(rows)

        monkeypatch.setattr(table, "lookup", counted_lookup)
        monkeypatch.setattr(table, "prefetch", counted_prefetch)


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_prefetched_rows_give_exactly_the_output_of_the_layer_reading_them_itself(wearing, monkeypatch):
    model, tokenizer, memory = wearing
    ids = ids_of(tokenizer, "I have a turtle named Timothy and a dog called Pixel.")
    counts = CountingLookups(memory.table, monkeypatch)

    memory.prefetching = True
    fetched = logits(model, ids)
    assert (counts.prefetches, counts.lookups) == (2, 0)  # both layers' rows fetched before block 0

    memory.prefetching = False
    read = logits(model, ids)
    assert (counts.prefetches, counts.lookups) == (2, 2)  # each layer read its own rows

    with memory.disabled():
        base = logits(model, ids)
    assert not torch.equal(read, base)  # the rows matter to the output
    assert torch.equal(fetched, read)


def test_decoding_with_a_kv_cache_gives_the_same_tokens_and_logits_with_and_without_prefetch(wearing):
    model, tokenizer, memory = wearing
    prompt = ids_of(tokenizer, "The capital of France is")

    @torch.inference_mode()
    def decode(steps: int = 6):
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens, all_logits = [], [out.logits[:, -1]]
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            all_logits.append(out.logits[:, -1])
        return tokens, torch.cat(all_logits)

    memory.prefetching = True
    tokens_fetched, logits_fetched = decode()
    memory.prefetching = False
    tokens_read, logits_read = decode()
    assert tokens_fetched == tokens_read
    assert torch.equal(logits_fetched, logits_read)


def test_an_early_prefetch_is_used_for_the_same_ids_and_a_stale_one_for_other_ids_is_not(wearing):
    model, tokenizer, memory = wearing
    asked = ids_of(tokenizer, "My favourite food is pizza.")
    other = ids_of(tokenizer, "hello there! how can I help you today?")
    memory.prefetching = False
    expected_other = logits(model, other)
    memory.prefetching = True

    def poisoned_prefetch(ids: torch.Tensor) -> None:
        """Prefetch ``ids`` early, then spoil what was fetched: any call that uses it gives NaN."""
        memory.prefetch(ids)
        assert set(memory._prefetched) == {0, 1}
        for fetched in memory._prefetched.values():
            fetched.values.fill_(float("nan"))

    poisoned_prefetch(asked)
    assert torch.isnan(logits(model, asked)).all()  # the same ids: the early prefetch is what the layers read

    poisoned_prefetch(asked)
    stale_call = logits(model, other)  # other ids: the stale prefetch is dropped, the rows fetched again
    assert torch.isfinite(stale_call).all()
    assert torch.equal(stale_call, expected_other)
    assert memory._prefetched == {}  # and it is gone: a later call with the first ids cannot use it either
    assert torch.isfinite(logits(model, asked)).all()


def test_on_the_cpu_prefetching_makes_no_cuda_stream_and_no_event(wearing, monkeypatch):
    model, tokenizer, memory = wearing

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA stream or event was made without a GPU")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    ids = ids_of(tokenizer, "Café, CAFÉ, cafe and Cafe should all look alike.")
    memory.prefetch(ids)
    assert all(fetched.ready is None for fetched in memory._prefetched.values())
    assert torch.isfinite(logits(model, ids)).all()
    assert memory.table._stream is None


def test_training_reads_rows_that_collect_gradients_not_prefetched_copies(wearing):
    model, tokenizer, memory = wearing
    EngramOptimizer(memory, lr=1e-2)  # starts recording the table's lookups
    rows = torch.tensor([[[1, 2, 3]]])
    with torch.no_grad():
        assert memory.table.prefetch(rows) is not None  # no gradients: prefetching is fine
    assert memory.table.prefetch(rows) is None  # gradients recorded: the layer must read them itself
    ids = ids_of(tokenizer, "I like to go hiking on weekends.")
    model(input_ids=ids, labels=ids).loss.backward()
    assert memory.table.row_gradients() is not None  # the lookups of the training step recorded gradients


def test_a_table_held_in_memory_has_nothing_to_prefetch():
    tokenizer = tiny_tokenizer()
    memory = attach_engram(tiny_llama(len(tokenizer)), tokenizer, EngramConfig(rows_per_head=97, head_dim=8))
    assert memory.table.prefetch(torch.tensor([[0, 1]])) is None
    memory.prefetch(ids_of(tokenizer, "hello there"))
    assert memory._prefetched == {}
