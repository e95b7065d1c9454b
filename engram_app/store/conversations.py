"""Chat conversations and their messages, as the app keeps them in SQLite.

A conversation is a list of turns (``messages``): the user's message and the model's reply, each
with the pack and version that answered, and for a reply made with a memory its per-token trace
(``inference/tracing.py``'s ``TraceArrays``, stored as bytes), so Inspect can show it later.
"""

from __future__ import annotations

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

    def _require(self, conversation: int) -> None:
        if not self.db["conversations"].count_where("id = ?", [conversation]):
            raise EngramError(f"No conversation {conversation}.")
