"""Chunks by the base model's tokens: overlapping windows for documents, whole turns for chats,
whole statements for profiles."""

from __future__ import annotations

from dataclasses import dataclass

from engram_app.ingest.records import Record


@dataclass
class Chunk:
    text: str
    token_count: int
    first_record: int  # positions of the records the chunk covers
    last_record: int


def _windows(text: str, tokenizer, size: int, overlap: int) -> list[tuple[str, int]]:
    """Split ``text`` into windows of at most ``size`` tokens, ``overlap`` tokens shared."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= size:
        return [(text, len(offsets))]
    out, step, start = [], max(1, size - overlap), 0
    while start < len(offsets):
        end = min(start + size, len(offsets))
        chars = text[offsets[start][0]: offsets[end - 1][1]]
        out.append((chars.strip(), end - start))
        if end == len(offsets):
            break
        start += step
    return out


def _label(record: Record) -> str:
    return f"{record.speaker}: {record.text}" if record.kind == "turn" and record.speaker else record.text


def chunk_records(records: list[Record], tokenizer, size: int = 256, overlap: int = 32) -> list[Chunk]:
    chunks: list[Chunk] = []
    group: list[tuple[int, str, int]] = []  # (record position, text, tokens) of whole turns/facts

    def flush() -> None:
        if group:
            chunks.append(Chunk("\n".join(t for _, t, _ in group), sum(n for _, _, n in group), group[0][0], group[-1][0]))
            group.clear()

    previous_key = None
    for position, record in enumerate(records):
        if record.kind == "text":
            flush()
            for text, count in _windows(record.text, tokenizer, size, overlap):
                chunks.append(Chunk(text, count, position, position))
            continue
        # Turns stay within their conversation, facts with their person; neither is split
        # unless it alone is longer than a chunk.
        key = (record.kind, record.conversation if record.kind == "turn" else record.person)
        text = _label(record)
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if key != previous_key or sum(n for _, _, n in group) + count > size:
            flush()
        previous_key = key
        if count > size:
            for piece, n in _windows(text, tokenizer, size, overlap):
                chunks.append(Chunk(piece, n, position, position))
            continue
        group.append((position, text, count))
    flush()
    return [c for c in chunks if c.text]
