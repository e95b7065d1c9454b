"""Chat conversations and their messages, as the app keeps them in SQLite.

A conversation is a list of turns (``messages``): the user's message and the model's reply, each
with the pack and version that answered, and for a reply made with a memory its per-token trace
(``inference/tracing.py``'s ``TraceArrays``, stored as bytes), so Inspect can show it later.
A conversation can be renamed, deleted (its messages and their traces with it) and exported as
JSON or Markdown.
"""

from __future__ import annotations

import json

import sqlite_utils

from engram_app.errors import EngramError
from engram_app.store.db import now


class ConversationStore:
    def __init__(self, db: sqlite_utils.Database):
        self.db = db

    def save_turn(self, conversation: int | None, pack_id: int | None, version: int | None, message: str,
                  reply: str, trace: bytes | None) -> tuple[int, int]:
        """Add a user message and its reply (to a new conversation when ``conversation`` is None).

        Returns the conversation id and the reply's message id."""
        with self.db.atomic():
            if conversation is None:
                conversation = self.db["conversations"].insert({"title": message[:80], "pack_id": pack_id,
                                                                "created": now()}).last_pk
            else:
                self._require(conversation)
            turn = {"conversation_id": conversation, "pack_id": pack_id, "pack_version": version}
            self.db["messages"].insert({**turn, "role": "user", "content": message, "trace": None, "created": now()})
            reply_id = self.db["messages"].insert({**turn, "role": "assistant", "content": reply, "trace": trace,
                                                   "created": now()}).last_pk
        return conversation, reply_id

    def history(self, conversation: int) -> list[tuple[str, str]]:
        """(role, content) of every message, oldest first."""
        rows = self.db.query("select role, content from messages where conversation_id = ? order by id", [conversation])
        return [(r["role"], r["content"]) for r in rows]

    def list(self, limit: int = 50) -> list[dict]:
        """Newest first: id, title, created, pack name, number of messages."""
        return list(self.db.query(
            "select c.id, c.title, c.created, p.name as pack, (select count(*) from messages m where "
            "m.conversation_id = c.id) as messages from conversations c left join packs p on p.id = c.pack_id "
            "order by c.id desc limit ?", [limit]))

    def turns(self, conversation: int) -> list[dict]:
        """The messages of a conversation: id, role, content, the pack and version used, whether traced."""
        rows = list(self.db.query(
            "select m.id, m.role, m.content, p.name as pack, m.pack_version as version, m.trace is not null as traced "
            "from messages m left join packs p on p.id = m.pack_id where m.conversation_id = ? order by m.id",
            [conversation]))
        if not rows:
            self._require(conversation)
        return rows

    def traced_replies(self, limit: int = 30) -> list[dict]:
        """Recent replies that carry a memory trace (the ones Inspect can show), newest first."""
        return list(self.db.query(
            "select m.id, m.conversation_id as conversation, m.content, p.name as pack, m.pack_version as version "
            "from messages m join packs p on p.id = m.pack_id where m.role = 'assistant' and m.trace is not null "
            "order by m.id desc limit ?", [limit]))

    def message(self, message_id: int) -> dict:
        """One message with its trace bytes and the pack (name) and version that made it."""
        rows = list(self.db.query(
            "select m.id, m.content, m.trace, m.pack_version as version, p.name as pack from messages m "
            "left join packs p on p.id = m.pack_id where m.id = ?", [message_id]))
        if not rows:
            raise EngramError(f"No message {message_id}.")
        return rows[0]

    def traced_message(self, message_id: int) -> dict:
        """:meth:`message`, refused when the message was not generated with a memory (it has no trace)."""
        row = self.message(message_id)
        if row["trace"] is None or row["pack"] is None:
            raise EngramError(f"Message {message_id} was not generated with a memory: it has no trace.")
        return row

    def get(self, conversation: int) -> dict:
        """One conversation as :meth:`list` shows it: id, title, created, pack name, number of messages."""
        rows = list(self.db.query(
            "select c.id, c.title, c.created, p.name as pack, (select count(*) from messages m where "
            "m.conversation_id = c.id) as messages from conversations c left join packs p on p.id = c.pack_id "
            "where c.id = ?", [conversation]))
        if not rows:
            raise EngramError(f"No conversation {conversation}: `conversations` lists them.")
        return rows[0]

    def rename(self, conversation: int, title: str) -> dict:
        """Give a conversation a new title (white space runs become one space); returns it renamed."""
        title = " ".join((title or "").split())
        if not title:
            raise EngramError("Type the conversation's new title: it cannot be empty.")
        with self.db.atomic():
            self._require(conversation)
            self.db.execute("update conversations set title = ? where id = ?", [title, conversation])
        return self.get(conversation)

    def delete(self, conversation: int) -> dict:
        """Delete a conversation with its messages (and so their memory traces), in one transaction.

        Returns the conversation as it was. Other conversations' replies keep their traces: Inspect
        still shows them."""
        with self.db.atomic():
            info = self.get(conversation)
            self.db.execute("delete from messages where conversation_id = ?", [conversation])
            self.db.execute("delete from conversations where id = ?", [conversation])
        return info

    def export_data(self, conversation: int) -> dict:
        """A conversation and its turns in order, as plain data (no traces: they are bytes for Inspect):
        ``{"id", "title", "created", "pack", "messages": [{"role", "content", "pack", "version",
        "created"}, ...]}``."""
        info = self.get(conversation)
        messages = list(self.db.query(
            "select m.role, m.content, p.name as pack, m.pack_version as version, m.created from messages m "
            "left join packs p on p.id = m.pack_id where m.conversation_id = ? order by m.id", [conversation]))
        return {"id": info["id"], "title": info["title"], "created": info["created"], "pack": info["pack"],
                "messages": messages}

    def export(self, conversation: int, format: str = "json") -> str:
        """The conversation as text: ``json`` (:meth:`export_data`, indented) or ``markdown`` (a heading,
        then each turn under its speaker's name)."""
        if format not in EXPORT_FORMATS:
            raise EngramError(f"Unknown export format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
        data = self.export_data(conversation)
        if format == "json":
            return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        return conversation_markdown(data)

    def _require(self, conversation: int) -> None:
        if not self.db["conversations"].count_where("id = ?", [conversation]):
            raise EngramError(f"No conversation {conversation}.")


EXPORT_FORMATS = ("json", "markdown")
SPEAKERS = {"user": "User", "assistant": "Assistant", "system": "System"}


def conversation_markdown(data: dict) -> str:
    """A conversation (:meth:`ConversationStore.export_data`) as Markdown: its title, when it started and
    with which pack, then every turn in order, ``**User**:`` or ``**Assistant** (pack vN):`` and its text."""
    pack = f", with pack {data['pack']}" if data["pack"] else ""
    title = " ".join(data["title"].split())  # a title taken from a first message may hold line breaks
    lines = [f"# {title}", "", f"Conversation {data['id']}, started {data['created']}{pack}.", ""]
    for message in data["messages"]:
        lines += [f"**{SPEAKERS.get(message['role'], message['role'])}**{made_with(message)}:", "",
                  message["content"], ""]
    return "\n".join(lines)


def made_with(message: dict) -> str:
    """`` (pack vN)`` after a reply generated with a pack (`` (pack)`` before its first version), else ""."""
    if message["role"] != "assistant" or not message["pack"]:
        return ""
    return f" ({message['pack']})" if message["version"] is None else f" ({message['pack']} v{message['version']})"
