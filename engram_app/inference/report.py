"""One inspection of a memory, built in one place for both front ends.

The CLI's ``inspect`` and the UI's Inspect tab show the same thing: for every token of a text (or
of token ids, or of a reply stored with its trace), which memory slots it read and how strongly;
how much its probability depends on the memory (the memory effect: log-probability with memory
on minus off); and which sources wrote those slots (provenance). This module assembles that
report from the service's calls, so the two front ends only choose what to show.

A report is JSON-shaped: ``{"pack", "version", "start", "tokens"}``. Token ``i`` sits at position
``start + i`` of the sequence the model ran (``start`` is 0 for a text, the reply's first position
for a stored reply). Each token is the trace's own JSON (``text``, ``id``, ``memory``), plus
``effect`` when asked for (every token but the sequence's first, which has nothing before it),
plus ``sources`` on each slot when asked for: exactly what ``inspect --json`` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from engram_app.errors import EngramError

if TYPE_CHECKING:
    from engram_app.service import Service

SOURCES_PER_SLOT = 10  # the writers listed per slot by `inspect --sources` (the most frequent first)


def inspect_report(service: Service, pack: str | None = None, *, text: str | None = None,
                   ids: Sequence[int] | None = None, message: int | None = None, effect: bool = False,
                   sources: bool = False, sources_per_slot: int = SOURCES_PER_SLOT) -> dict:
    """The report of stored reply ``message`` (read from its recorded trace: no second pass), or of
    ``text`` / ``ids`` traced in one forward pass with ``pack``'s active version."""
    if message is not None:
        stored = service.reply_trace(int(message))
        pack, version, ids, start, traces = (stored["pack"], stored["version"], stored["ids"], stored["start"],
                                             stored["tokens"])
    else:
        if not pack:
            raise EngramError("Choose a memory pack to look into.")
        traces = service.inspect(pack, text=text, ids=ids)
        ids, start = [t.id for t in traces], 0
        version = service.pack(pack)["active_version"]
    tokens = [t.to_json() for t in traces]
    if effect:
        index = {t.position: i for i, t in enumerate(traces)}
        for item in service.memory_effect(pack, ids, start=max(start, 1)):
            if item["position"] in index:
                tokens[index[item["position"]]]["effect"] = item
    report = {"pack": pack, "version": version, "start": start, "tokens": tokens}
    if sources:
        writers = slot_writers(service, report, tokens, limit=sources_per_slot)
        for slot in slots_of(tokens):
            slot["sources"] = writers.get(slot["row"], [])
    return report


def slots_of(tokens: Iterable[dict]) -> list[dict]:
    """Every slot the tokens read, over all their memory layers."""
    return [slot for token in tokens for layer in token["memory"] for slot in layer["slots"]]


def slot_writers(service: Service, report: dict, tokens: Iterable[dict], limit: int) -> dict[int, list[dict]]:
    """Who wrote the rows ``tokens`` (some of ``report``'s) read: the sources, n-grams and passages of
    the slot index of the version the report was made with (no one, before the pack is trained)."""
    rows = sorted({slot["row"] for slot in slots_of(tokens)})
    if not report["version"]:
        return {row: [] for row in rows}
    return service.provenance(report["pack"], rows, version=report["version"], limit=limit)
