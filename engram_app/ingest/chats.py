"""Chat histories: the ChatGPT data export, lists of {role, content} messages, and transcripts."""

from __future__ import annotations

import re

from engram_app.ingest.records import ImportRejected, Parsed, Record

# "Speaker: text" at the start of a line; a speaker is a short name (User 1, Alice, assistant).
TURN = re.compile(r"^\s*([A-Za-z][\w .'\-]{0,30}?)\s*:\s+(\S.*)$")


def _content_text(content) -> str:
    """Text of a message's content: a string, a list of parts, or {"parts": [...]} (ChatGPT)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in (_content_text(p) for p in content) if t)
    if isinstance(content, dict):
        if "parts" in content:
            return _content_text(content["parts"])
        if content.get("type") in (None, "text") and isinstance(content.get("text"), str):
            return content["text"]
    return ""


def is_chatgpt_export(data) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(c, dict) and isinstance(c.get("mapping"), dict) for c in data)


def _active_branch(mapping: dict, current: str | None) -> list[dict]:
    """The messages on the path the user last saw: from ``current_node`` up to the root.

    Without ``current_node`` (older exports), follow the last child from the root down.
    """
    mapping = {key: node for key, node in mapping.items() if isinstance(node, dict)}
    if isinstance(current, str) and current in mapping:
        path, node, seen = [], current, set()
        while isinstance(node, str) and node in mapping and node not in seen:
            seen.add(node)
            path.append(mapping[node])
            node = mapping[node].get("parent")
        return path[::-1]
    roots = [n for n in mapping.values() if not isinstance(n.get("parent"), str) or n.get("parent") not in mapping]
    path, node, seen = [], roots[0] if roots else None, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        path.append(node)
        children = [c for c in node.get("children") or [] if isinstance(c, str) and c in mapping]
        node = mapping[children[-1]] if children else None
    return path


def chatgpt(data: list, name: str) -> Parsed:
    records: list[Record] = []
    titles = []
    for index, conversation in enumerate(data):
        titles.append(str(conversation.get("title") or ""))
        for node in _active_branch(conversation["mapping"], conversation.get("current_node")):
            message = node.get("message")
            if not isinstance(message, dict):
                continue
            author = message.get("author")
            role = author.get("role") if isinstance(author, dict) else None
            if role not in ("user", "assistant"):
                continue  # system prompts and tool output are not the user's words
            text = _content_text(message.get("content")).strip()
            if text:
                records.append(Record("turn", text, speaker=role, conversation=index))
    if not records:
        raise ImportRejected("the ChatGPT export holds no user or assistant messages")
    title = titles[0] if len(titles) == 1 and titles[0] else f"ChatGPT export: {len(data)} conversations"
    return Parsed("chat", "chatgpt", title[:120], records)


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
    records = [Record("turn", _content_text(m["content"]).strip(), speaker=m["role"].strip() or "unknown")
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
