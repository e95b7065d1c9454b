"""The data exports of chat apps, as JSON: ChatGPT's and Claude's ``conversations.json``, and
Telegram Desktop's ``result.json`` (one chat, or the whole account with ``chats.list``).

Each becomes one record per message, with its speaker, its conversation and its time; what an
export holds besides the words people wrote (ids, uuids, account data, tool calls, the model's
hidden reasoning) is never turned into text. WhatsApp's export is text: ``whatsapp.py``; the
zips these apps send: ``archives.py``.

Times are ISO 8601: in UTC with a ``Z`` where the export gives an absolute time (ChatGPT's and
Telegram's Unix times, Claude's UTC stamps), as written where it gives a local time only.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from engram_app.ingest.chats import content_text
from engram_app.ingest.decode import decode_text
from engram_app.ingest.records import ImportRejected, Parsed, Record, plural


def utc_from_unix(value) -> str | None:
    """A Unix time (number or numeric string) as ``YYYY-MM-DDTHH:MM:SSZ``; None when there is none."""
    try:
        seconds = float(value)
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def iso_time(value) -> str | None:
    """An ISO 8601 stamp normalised to seconds: UTC (``Z``) when it carries a zone, as written otherwise."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%dT%H:%M:%S")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# --- ChatGPT ---------------------------------------------------------------------------------------


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


def _chatgpt_turn(message: dict) -> tuple[str, str] | None:
    """(role, text) of a message the user saw written, or None.

    Dropped: system prompts, tool output, the assistant's calls to tools (``recipient`` is the
    tool, the content is code), hidden context, and parts that are not text (image pointers).
    """
    author = message.get("author")
    role = author.get("role") if isinstance(author, dict) else None
    if role not in ("user", "assistant"):
        return None
    if message.get("recipient") not in (None, "all"):
        return None
    metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
    if metadata.get("is_visually_hidden_from_conversation"):
        return None
    content = message.get("content")
    if isinstance(content, dict) and content.get("content_type") not in (None, "text", "multimodal_text"):
        return None
    text = content_text(content).strip()
    return (role, text) if text else None


def chatgpt(data: list, name: str) -> Parsed:
    records: list[Record] = []
    titles = []
    for index, conversation in enumerate(data):
        titles.append(str(conversation.get("title") or ""))
        for node in _active_branch(conversation["mapping"], conversation.get("current_node")):
            message = node.get("message")
            turn = _chatgpt_turn(message) if isinstance(message, dict) else None
            if turn:
                records.append(Record("turn", turn[1], speaker=turn[0], conversation=index,
                                      timestamp=utc_from_unix(message.get("create_time"))))
    if not records:
        raise ImportRejected("the ChatGPT export holds no user or assistant messages")
    title = titles[0] if len(titles) == 1 and titles[0] else f"ChatGPT export: {len(data)} conversations"
    return Parsed("chat", "chatgpt", title[:120], records)


# --- Claude ----------------------------------------------------------------------------------------

CLAUDE_SPEAKERS = {"human": "user", "assistant": "assistant"}


def is_claude_export(data) -> bool:
    return isinstance(data, list) and bool(data) and all(
        isinstance(c, dict) and isinstance(c.get("chat_messages"), list) for c in data)


def _claude_text(message: dict) -> str:
    """The message's text blocks (not tool calls, tool results or the model's thinking); else its ``text``."""
    blocks = [b.get("text") for b in _dicts(message.get("content")) if b.get("type") == "text"]
    text = "\n\n".join(b.strip() for b in blocks if isinstance(b, str) and b.strip())
    if not text and isinstance(message.get("text"), str):
        text = message["text"].strip()
    return text


def claude(data: list, name: str) -> Parsed:
    records: list[Record] = []
    attachments = 0
    for index, conversation in enumerate(data):
        for message in _dicts(conversation["chat_messages"]):
            speaker = CLAUDE_SPEAKERS.get(message.get("sender"))
            attachments += len(_dicts(message.get("attachments"))) + len(_dicts(message.get("files")))
            text = _claude_text(message)
            if speaker and text:
                records.append(Record("turn", text, speaker=speaker, conversation=index,
                                      timestamp=iso_time(message.get("created_at"))))
    if not records:
        raise ImportRejected("the Claude export holds no messages with text")
    titles = [str(c.get("name") or "") for c in data]
    title = titles[0] if len(titles) == 1 and titles[0] else f"Claude export: {len(data)} conversations"
    parsed = Parsed("chat", "claude", title[:120], records)
    if attachments:
        parsed.warnings.append(f"{plural(attachments, 'file')} attached to messages not imported (only the "
                               "messages' text is): import them on their own if they should be remembered")
    return parsed


# --- Telegram --------------------------------------------------------------------------------------

TELEGRAM_MESSAGE_TYPES = {"message", "service"}


def _is_telegram_chat(data) -> bool:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return False
    messages = _dicts(data["messages"])[:20]
    return bool(messages) and all(m.get("type") in TELEGRAM_MESSAGE_TYPES and "date" in m for m in messages)


def is_telegram_export(data) -> bool:
    """One chat (``{"name", "type", "id", "messages"}``) or a whole account (``{"chats": {"list": [...]}}``)."""
    return _is_telegram_chat(data) or bool(_telegram_chats(data))


def _telegram_chats(data) -> list[dict]:
    if not isinstance(data, dict):
        return []
    chats = []
    for key in ("chats", "left_chats"):  # left_chats: groups the user has left, still their history
        section = data.get(key)
        if isinstance(section, dict):
            chats += [c for c in _dicts(section.get("list")) if isinstance(c.get("messages"), list)]
    return chats


def telegram_text(text) -> str:
    """A message's text: a string, or a list of strings and entities (``{"type": "bold", "text": ...}``)."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        return "".join(t if isinstance(t, str) else str(t.get("text") or "") if isinstance(t, dict) else ""
                       for t in text)
    return ""


def telegram(data: dict, name: str) -> Parsed:
    chats = [data] if _is_telegram_chat(data) else _telegram_chats(data)
    records: list[Record] = []
    media = 0
    for index, chat in enumerate(chats):
        for message in _dicts(chat["messages"]):
            if message.get("type") != "message":
                continue  # service messages: "X joined the group", pinned, calls
            text = telegram_text(message.get("text")).strip()
            if not text:
                media += 1 if any(k in message for k in ("photo", "file", "media_type", "sticker_emoji")) else 0
                continue
            speaker = message.get("from") or "Deleted Account"  # what Telegram shows for a deleted account
            stamp = utc_from_unix(message.get("date_unixtime")) or iso_time(message.get("date"))
            records.append(Record("turn", text, speaker=str(speaker).strip(), conversation=index, timestamp=stamp))
    if not records:
        raise ImportRejected("the Telegram export holds no messages with text")
    title = (f"Telegram: {chats[0].get('name') or 'chat'}" if len(chats) == 1
             else f"Telegram export: {len(chats)} chats")
    parsed = Parsed("chat", "telegram", title[:120], records)
    if media:
        parsed.warnings.append(f"{plural(media, 'message')} with a photo, file, sticker or voice note and no "
                               "text not imported (only text is kept)")
    return parsed


# --- any of them from bytes (an archive's member) --------------------------------------------------


def parse_conversations(content: bytes, name: str, app: str) -> Parsed:
    """A ``conversations.json`` read from ChatGPT's or Claude's export archive."""
    label = {"chatgpt": "ChatGPT", "claude": "Claude"}[app]
    try:
        data = json.loads(decode_text(content))
    except (ValueError, RecursionError) as exc:
        raise ImportRejected(f"the {label} export's conversations.json is not valid JSON ({exc})"[:300]) from None
    if app == "chatgpt" and is_chatgpt_export(data):
        return chatgpt(data, name)
    if app == "claude" and is_claude_export(data):
        return claude(data, name)
    raise ImportRejected(f"the archive's conversations.json is not a {label} export (no conversations in it)")
