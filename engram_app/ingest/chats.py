"""Chat histories: lists of {role, content} messages and transcripts (chat apps' exports: ``exports.py``,
``whatsapp.py``)."""

from __future__ import annotations

import re

from engram_app.ingest.records import ImportRejected, Parsed, Record

# "Speaker: text" at the start of a line; a speaker is a short name (User 1, Alice, assistant).
TURN = re.compile(r"^\s*([A-Za-z][\w .'\-]{0,30}?)\s*:\s+(\S.*)$")


def content_text(content) -> str:
    """Text of a message's content: a string, a list of parts, or {"parts": [...]} (ChatGPT)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in (content_text(p) for p in content) if t)
    if isinstance(content, dict):
        if "parts" in content:
            return content_text(content["parts"])
        if content.get("type") in (None, "text") and isinstance(content.get("text"), str):
            return content["text"]
    return ""


def message_list(data) -> list[dict] | None:
    """The messages of ``[{role, content}, ...]`` or ``{"messages": [...]}``, else None."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        data = data["messages"]
    if isinstance(data, list) and data and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in data
    ):
        return data
    return None


def messages(data: list[dict], name: str, fmt: str = "messages") -> Parsed:
    records = [Record("turn", content_text(m["content"]).strip(), speaker=m["role"].strip() or "unknown")
               for m in data]
    records = [r for r in records if r.text]
    if not records:
        raise ImportRejected("the chat has no message with text")
    return Parsed("chat", fmt, f"Chat: {records[0].text[:80]}", records)


def transcript_lines(text: str) -> tuple[int, int]:
    """(lines that look like 'Speaker: text', non-blank lines)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return sum(1 for line in lines if TURN.match(line)), len(lines)


def looks_like_transcript(text: str) -> bool:
    turns, lines = transcript_lines(text)
    if turns < 2 or turns < 0.6 * lines:
        return False
    speakers = {TURN.match(line).group(1).strip().lower() for line in text.splitlines() if TURN.match(line)}
    return 1 <= len(speakers) <= 6


def transcript(text: str, name: str) -> Parsed:
    records: list[Record] = []
    for line in text.splitlines():
        match = TURN.match(line)
        if match:
            records.append(Record("turn", match.group(2).strip(), speaker=match.group(1).strip()))
        elif line.strip() and records:
            records[-1].text += "\n" + line.strip()  # a continuation line of the previous turn
    if len(records) < 1:
        raise ImportRejected("no 'Speaker: text' lines found: not a chat transcript")
    return Parsed("chat", "transcript", f"Chat: {records[0].text[:80]}", records)
