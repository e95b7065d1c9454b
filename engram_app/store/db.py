"""Opening the database: WAL mode, foreign keys on, migrations applied."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from engram_app.store.migrations import migrate

DB_NAME = "engram.db"


class Database(sqlite_utils.Database):
    """sqlite-utils' Database whose write transactions start with ``BEGIN IMMEDIATE``.

    Several processes write to the database (the app, the worker, its heartbeat thread, the
    CLI). A deferred ``BEGIN`` that reads first and writes later cannot wait for a lock when
    another connection committed in between: SQLite answers "database is locked" at once,
    whatever the busy timeout. Taking the write lock when the transaction starts lets the busy
    timeout do its job. Nested blocks are savepoints, as in sqlite-utils.
    """

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Database]:
        if self.conn.in_transaction:
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.rollback()
                raise


def open_db(home: Path) -> Database:
    """The data root's database, created and migrated on first use."""
    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(home / DB_NAME, timeout=30, check_same_thread=False)
    db = Database(conn)
    db.execute("pragma journal_mode = wal")
    db.execute("pragma foreign_keys = on")
    db.execute("pragma busy_timeout = 30000")
    migrate(db)
    return db
