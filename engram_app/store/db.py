"""Opening the database: WAL mode, foreign keys on, migrations applied."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from engram_app.store.migrations import migrate

DB_NAME = "engram.db"


def open_db(home: Path) -> sqlite_utils.Database:
    """The data root's database, created and migrated on first use."""
    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(home / DB_NAME, timeout=30, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("pragma journal_mode = wal")
    db.execute("pragma foreign_keys = on")
    db.execute("pragma busy_timeout = 30000")
    migrate(db)
    return db
