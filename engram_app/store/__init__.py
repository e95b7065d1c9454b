"""Everything the app keeps in SQLite (``<home>/engram.db``) and the files beside it."""

from engram_app.store.conversations import ConversationStore
from engram_app.store.db import now, open_db

__all__ = ["ConversationStore", "now", "open_db"]
