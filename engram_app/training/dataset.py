"""From library sources to training examples and recall probes (see :mod:`text` for the phrasing).

What a job trains on is planned once, when it starts, and kept with the job so that a resumed job
trains on the same sources: the sources of the pack's collections not learned by its active
version (all of them for a full retrain), plus a replay sample of the sources it learned before,
so that old memories are kept. Deleted sources are never read: their content is gone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import sqlite_utils

from engram_app.training.text import (
    Example,
    Probe,
    chat_example,
    conversation_example,
    chat_statements,
    fact_phrasings,
    fact_probes,
    held_out_probes,
    text_example,
    turns_as_messages,
)


MIN_REPLAY = 256


@dataclass
class Plan:
    new: list[int]  # source ids learned by this job
    replay: list[int]  # source ids learned before, replayed to keep them
    learned: list[int]  # what the version written by this job will have learned

    def to_json(self) -> dict:
        return {"new": self.new, "replay": self.replay, "learned": self.learned}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(list(data["new"]), list(data["replay"]), list(data["learned"]))


def ready_sources(db: sqlite_utils.Database, collections: list[str]) -> list[int]:
    sql = ("select s.id from sources s join collections c on c.id = s.collection_id where s.status = 'ready'")
    args: list = []
    if collections:
        sql += f" and c.name in ({','.join('?' * len(collections))})"
        args = list(collections)
    return [r["id"] for r in db.query(sql + " order by s.id", args)]


def plan(db: sqlite_utils.Database, collections: list[str], learned_before: list[int], full: bool) -> Plan:
    ready = ready_sources(db, collections)
    if full:
        return Plan(new=ready, replay=[], learned=ready)
    before = set(learned_before)
    new = [s for s in ready if s not in before]
    replay = [s for s in ready if s in before]
    return Plan(new=new, replay=replay, learned=sorted(before | set(new)))


def source_examples(db: sqlite_utils.Database, tokenizer, source_id: int, max_length: int) -> tuple[list[Example], list[Probe]]:
    """The training examples and recall probes of one source (none when it was deleted).

    Each example carries the id of the chunk it renders (see :class:`Example`): a document
    chunk's text, a chat chunk's turns, or a phrasing of a fact, for the first chunk holding
    that fact's record (chunks may overlap; a fact is trained once).
    """
    rows = list(db.query("select kind, status from sources where id = ?", [source_id]))
    if not rows or rows[0]["status"] != "ready":
        return [], []
    kind = rows[0]["kind"]
    records = list(db.query("select position, kind, speaker, person, text from records where source_id = ? "
                            "order by position", [source_id]))
    chunks = list(db.query("select id, text, first_record, last_record from chunks where source_id = ? "
                           "order by position", [source_id]))
    examples: list[Example] = []
    probes: list[Probe] = []
    facts_done: set[int] = set()
    statements_done: set[str] = set()
    for chunk in chunks:
        covered = records[chunk["first_record"]: chunk["last_record"] + 1]
        turns = [(r["speaker"], r["text"]) for r in covered if r["kind"] == "turn"]
        if len(covered) == 1 and turns and len(chunk["text"]) < len(turns[0][1]):
            # A turn longer than a chunk is cut into windows (ingest.chunking): each window is
            # trained and read for facts, not the whole turn again (which trained the turn's first
            # tokens once per window, and read a megabyte turn once per window).
            speaker = turns[0][0]
            window = chunk["text"].removeprefix(f"{speaker}: ") if speaker else chunk["text"]
            turns = [(speaker, window)]
        texts = [r for r in covered if r["kind"] == "text"]
        for r in covered:
            if r["kind"] == "fact" and r["position"] not in facts_done:
                facts_done.add(r["position"])
                _add_fact(r["text"], examples, probes, tokenizer, source_id, kind, max_length, chunk["id"])
        if turns:
            examples.append(_chat(tokenizer, turns, source_id, kind, max_length, chunk["id"]))
            # The user's own first-person facts in the chat, trained (and probed) as profile facts are.
            for statement in chat_statements(turns):
                if statement not in statements_done:
                    statements_done.add(statement)
                    _add_fact(statement, examples, probes, tokenizer, source_id, kind, max_length, chunk["id"])
        if texts:
            examples.append(text_example(tokenizer, chunk["text"], source_id, kind, max_length, chunk["id"]))
    return [e for e in examples if e.loss_tokens > 0], probes


def _add_fact(fact: str, examples: list[Example], probes: list[Probe], tokenizer, source_id: int, kind: str,
              max_length: int, chunk_id: int) -> None:
    """A fact's phrasings as examples of ``chunk_id``, and its trained and held-out questions as probes."""
    examples += [conversation_example(tokenizer, conversation, source_id, kind, max_length, chunk_id)
                 for conversation in fact_phrasings(fact)]
    probes += fact_probes(fact, source_id) + held_out_probes(fact, source_id)


def _chat(tokenizer, turns, source_id: int, kind: str, max_length: int, chunk_id: int) -> Example:
    messages = turns_as_messages(turns)
    if getattr(tokenizer, "chat_template", None):
        try:
            return chat_example(tokenizer, messages, source_id, kind, max_length, chunk_id=chunk_id)
        except Exception:  # a template that refuses this turn order (e.g. must start with the user)
            pass
    text = "\n".join(f"{speaker or 'Speaker'}: {line}" for speaker, line in turns)
    return text_example(tokenizer, text, source_id, kind, max_length, chunk_id)


def build(db: sqlite_utils.Database, tokenizer, plan: Plan, max_length: int, replay_ratio: float,
          seed: int) -> tuple[list[Example], list[Example], list[Probe], list[Probe]]:
    """(new examples, replay examples, probes of new sources, probes of replayed sources)."""
    new, new_probes = [], []
    for sid in plan.new:
        ex, pr = source_examples(db, tokenizer, sid, max_length)
        new += ex
        new_probes += pr
    old, old_probes = [], []
    for sid in plan.replay:
        ex, pr = source_examples(db, tokenizer, sid, max_length)
        old += ex
        old_probes += pr
    rng = random.Random(seed)
    # Replay ``replay_ratio`` x the new examples, and never fewer than MIN_REPLAY: a small library
    # is replayed whole (cheap), a large one by sample.
    count = min(len(old), max(math.ceil(replay_ratio * len(new)), MIN_REPLAY)) if replay_ratio > 0 else 0
    replay = rng.sample(old, count) if count < len(old) else old
    return new, replay, new_probes, old_probes
