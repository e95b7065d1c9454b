"""Everything the app keeps in SQLite (``<home>/engram.db``) and the files beside it."""

from engram_app.store.db import open_db

__all__ = ["open_db"]
