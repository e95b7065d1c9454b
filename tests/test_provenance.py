"""Provenance recorded where it happens: every training example carries its chunk, the slot index
records (n-gram, chunk) pairs from the examples the job trained on, and the inspector shows the
passage of the chunk that wrote a slot (a document's second chunk, a chat turn's chunk, the chunk
of a profile fact trained as a question). Indexes of earlier versions (sources only) still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_app.engram import rows_for, shifted_ngrams
from engram_app.engram.hashing import hash_rows
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training.dataset import Plan, build
from engram_app.training.provenance import Provenance
from engram_app.training.slots import SlotIndex, SlotIndexBuilder
from engram_app.training.text import fact_phrasings
from engram_app.training.trainer import batch_indices
from test_training import run_inline, stop_worker

FILLER = ("The river bends twice before it reaches the old mill. Swallows nest under the bridge every spring. "
          "Fishermen gather at the weir when the water is high. A narrow path follows the bank through the reeds. "
          "In winter the meadows flood and freeze over. Children race paper boats from the stone steps. ")
KEY = "The spare key hides under the blue flowerpot by the door."
DOCUMENT = "River walk\n\n" + FILLER * 2 + KEY + "\n"  # two chunks of 256 tokens; KEY only in the second
TURN = "Ben: I keep my bicycle down in the cellar now."
CHAT = "".join(f"Ana: Did you water the plants on day {i}?\nBen: Yes, I watered them all on day {i}.\n"
               for i in range(5)) + "Ana: Where do you keep your bicycle?\n" + TURN + "\n"  # TURN in the second chunk
FACT = "My cat is called Mochi."
PROFILE = "# About me\n" + "".join(f"- I once heard song number {i} on my grandfather's old wooden radio during a "
                                   "long winter evening.\n" for i in range(4)) + f"- {FACT}\n"  # FACT in the second chunk
ONE_EPOCH = dict(epochs=1, evaluate=False, until_recalled=False)  # every example drawn once, nothing else


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A document, a chat and a profile, each of two chunks, learned by pack "me" in one epoch."""
    tmp = tmp_path_factory.mktemp("provenance")
    service = Service(Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu"))
    for name, text in (("walk.txt", DOCUMENT), ("chat.txt", CHAT), ("me.md", PROFILE)):
        (tmp / name).write_text(text)
    results = service.ingest([tmp / "walk.txt", tmp / "chat.txt", tmp / "me.md"])
    assert [(r.status, r.kind) for r in results] == [("added", "document"), ("added", "chat"), ("added", "profile")]
    sources = {r.kind: r.source for r in results}
    service.create_pack("me", size="small")
    run_inline(service, "me", **ONE_EPOCH)
    yield service, sources
    stop_worker(service.settings.home)


def chunks(service: Service, source: int) -> list[dict]:
    return list(service.db().query("select id, text from chunks where source_id = ? order by position", [source]))


def flat(text: str) -> str:
    return " ".join(text.split())


def last_trigram(service: Service, text: str):
    """The order-3 slot (head 0) the last token of ``text`` reads."""
    return next(s for s in service.inspect("me", text=text)[-1].memory[0].slots if s.order == 3)


def writers_of(who: dict, slot, source: int) -> list[dict]:
    """The writers of ``slot``'s row from ``source`` with ``slot``'s own n-gram (a row may hold colliding ones)."""
    return [w for w in who[slot.row] if w["source"] == source and w["ngram"] == slot.ngram]


def test_the_rows_of_an_ngram_are_the_rows_its_last_token_reads_in_a_sequence(trained):
    service, _ = trained
    memory = service.chat_runtime("me").adapted.memory
    ids = torch.tensor([[17, 5, 230, 41, 9]])
    grams = shifted_ngrams(memory.compression.cpu()[ids], torch.full((1, 2), memory.boundary_id), 3)[0]  # [T, 3]
    in_sequence = hash_rows(memory.layout, grams.unsqueeze(0))[0]  # [T, layers, orders*heads]
    heads = memory.layout.heads
    assert torch.equal(rows_for(memory.layout, grams[:, :2]), in_sequence[..., :heads])  # order 2 columns
    assert torch.equal(rows_for(memory.layout, grams), in_sequence[..., heads:])  # order 3 columns
    with pytest.raises(ValueError, match="orders"):
        rows_for(memory.layout, grams[:, :1])


def test_a_document_slot_shows_the_second_chunk_that_wrote_it(trained):
    service, sources = trained
    first, second = chunks(service, sources["document"])
    assert KEY not in first["text"] and KEY in second["text"]
    slot = last_trigram(service, "under the blue flowerpot")
    [writer] = writers_of(service.provenance("me", [slot.row]), slot, sources["document"])
    assert writer["chunk"] == second["id"] and writer["count"] == 1
    assert KEY in writer["passage"] and writer["passage"].strip(".") in flat(second["text"])
    assert set(writer) == {"source", "title", "status", "ngram", "count", "passage", "chunk"}


def test_a_chat_slot_shows_the_chunk_holding_the_turn_that_wrote_it(trained):
    service, sources = trained
    first, second = chunks(service, sources["chat"])
    assert TURN not in first["text"] and TURN in second["text"]
    slot = last_trigram(service, "down in the cellar")
    [writer] = writers_of(service.provenance("me", [slot.row]), slot, sources["chat"])
    assert writer["chunk"] == second["id"]
    assert TURN in writer["passage"] and writer["passage"].strip(".") in flat(second["text"])


def test_a_profile_fact_trained_as_a_question_shows_the_chunk_of_that_fact(trained):
    service, sources = trained
    first, second = chunks(service, sources["profile"])
    assert FACT not in first["text"] and FACT in second["text"]
    slot = last_trigram(service, "What is my cat called?")  # " called?": only the question phrasings say it
    [writer] = writers_of(service.provenance("me", [slot.row]), slot, sources["profile"])
    assert writer["chunk"] == second["id"]
    asked = [c for c in fact_phrasings(FACT) if c[0]["content"] == "What is my cat called?"]
    assert writer["count"] == len(asked) == 4  # the question asked with each of its 3 answers, and once told
    assert writer["passage"] == flat(second["text"])  # the n-gram is not in the chunk: its start (here all of it)


def old_layout(folder: Path) -> None:
    """Rewrite the index in ``folder`` as versions before chunk ids wrote it: gram_sources.npy [E, 3] only."""
    index = SlotIndex.open(folder)
    entries = np.asarray(index.writes, dtype=np.int64)
    pairs, pair_of = np.unique(entries[:, :2], axis=0, return_inverse=True)
    counts = np.bincount(pair_of.reshape(-1), weights=entries[:, 2], minlength=len(pairs)).astype(np.int64)
    gram_sources = np.concatenate([pairs, counts[:, None]], axis=1).astype(np.int32)
    del index, entries
    (folder / "gram_chunks.npy").unlink()
    np.save(folder / "gram_sources.npy", gram_sources, allow_pickle=False)


def test_an_index_written_before_chunks_were_recorded_falls_back_to_searching_the_source(trained, tmp_path):
    service, sources = trained
    folder = Path(service.packs_store().version("me")["path"]) / "slots"
    shutil.copytree(folder, tmp_path / "kept")
    try:
        old_layout(folder)
        assert SlotIndex.exists(folder) and not SlotIndex.open(folder).has_chunks
        provenance = Provenance(service.db(), service.packs_store())  # not the service's: it keeps indexes open
        tokenizer = service.chat_runtime("me").tokenizer
        document = last_trigram(service, "under the blue flowerpot")
        fact = last_trigram(service, "What is my cat called?")
        who = provenance.writers("me", [document.row, fact.row], None, 10, tokenizer)
        [by_document] = writers_of(who, document, sources["document"])
        assert by_document["chunk"] is None and KEY in by_document["passage"]  # found by searching the source
        [by_profile] = writers_of(who, fact, sources["profile"])
        # Not in the text: the source's opening, not the fact's chunk (what the old index can do).
        first = chunks(service, sources["profile"])[0]
        assert by_profile["chunk"] is None and by_profile["count"] == 4  # the question's 4 phrasings (above)
        assert by_profile["passage"] == flat(first["text"])[:160] + "..."
        assert first["text"].startswith("I once heard song number 0")

        # A version trained on top of it keeps the old entries (chunk unknown) beside its own.
        memory = service.chat_runtime("me").adapted.memory
        builder = SlotIndexBuilder(memory)
        ids = tokenizer("What is my cat called?", add_special_tokens=False)["input_ids"]
        builder.add(ids, 99, 1234)
        merged = builder.write(tmp_path / "merged", SlotIndex.open(folder))
        assert merged.has_chunks
        found = {(w.source_id, w.chunk_id, w.count) for w in merged.writers(fact.row)
                 if Provenance.ngram(w, tokenizer) == fact.ngram}
        assert found == {(sources["profile"], None, 4), (99, 1234, 1)}
    finally:
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "kept", folder)


def test_a_run_stopped_inside_its_first_epoch_indexes_only_the_examples_it_drew(trained):
    service, _ = trained
    service.create_pack("partial", size="small")
    run_inline(service, "partial", max_steps=1, evaluate=False, until_recalled=False)
    job = service.jobs()[0]
    tokenizer = service.chat_runtime("partial").tokenizer
    new, replay, _, _ = build(service.db(), tokenizer, Plan.from_json(job["plan"]), 256, 0.5, 0)
    assert not replay and len(new) > 8
    trained = len(new) + min(16, -(-len(new) // 4))  # the job's anchors follow its new examples, never indexed
    drawn = {(new[i].source_id, new[i].chunk_id) for i in batch_indices(trained, 8, 0, 0) if i < len(new)}
    index = SlotIndex.open(Path(service.packs_store().version("partial")["path"]) / "slots")
    indexed = {(int(s), int(c)) for s, c in np.asarray(index.writes)[:, [1, 3]]}
    assert indexed == drawn and drawn != {(e.source_id, e.chunk_id) for e in new}
