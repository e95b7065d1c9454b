"""Opening the database: one connection per thread, WAL mode, foreign keys on, migrations applied."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from engram_app.store.migrations import migrate

DB_NAME = "engram.db"
BUSY_SECONDS = 30


def now() -> str:
    """The time stamps the app writes into its tables: UTC, ISO 8601, microseconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Database(sqlite_utils.Database):
    """sqlite-utils' Database with one connection per thread and ``BEGIN IMMEDIATE`` transactions.

    One connection per thread: a SQLite connection has one transaction at a time, so threads
    sharing one (the app's request threads, the worker's heartbeat) share their transactions too:
    a thread that rolled back took with it whatever another thread had written meanwhile (a chat
    turn saved during a failed import vanished). Here ``conn`` is the calling thread's own
    connection, opened on its first use, so a transaction belongs to the thread that began it and
    other threads wait for the write lock instead of joining in. Objects that hold a Database
    (``Library``, ``PackStore``, ``JobQueue``) can be shared between threads as before; cursors
    cannot (each connection refuses use from another thread).

    ``BEGIN IMMEDIATE``: several connections and processes write (the app, the worker, its
    heartbeat thread, the CLI). A deferred ``BEGIN`` that reads first and writes later cannot wait
    for a lock when another connection committed in between: SQLite answers "database is locked"
    at once, whatever the busy timeout. Taking the write lock when the transaction starts lets the
    busy timeout do its job. Nested blocks are savepoints, as in sqlite-utils.

    Every connection runs with ``synchronous = FULL``: a commit (the one that records a new pack
    version among them) is on disk when it returns, not only in the operating system's cache.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        super().__init__(self._connect(), execute_plugins=False)

    @property
    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @conn.setter
    def conn(self, value: sqlite3.Connection) -> None:
        self._local.conn = value

    def _connect(self) -> sqlite3.Connection:
        """A new connection with this app's settings (all of them hold per connection)."""
        conn = sqlite3.connect(self.path, timeout=BUSY_SECONDS)
        conn.execute("pragma foreign_keys = on")
        conn.execute(f"pragma busy_timeout = {BUSY_SECONDS * 1000}")
        conn.execute("pragma synchronous = full")
        conn.execute("pragma recursive_triggers = on")  # what sqlite-utils sets on its connection
        return conn

    def close(self) -> None:
        """Close the calling thread's connection (the next use in this thread opens a new one).

        Other threads' connections close when their thread ends.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

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
    db = Database(home / DB_NAME)
    use_wal(db)
    migrate(db)
    return db


def use_wal(db: Database) -> None:
    """Switch the file to write-ahead logging (kept in the file: every later connection uses it).

    Two connections opening a new data root at once (the app and a worker, two imports) race for
    this switch, and SQLite answers the loser "database is locked" at once, without waiting out
    the busy timeout: 14 of 150 such pairs failed here. It is retried until the busy timeout; once
    the other connection has switched, the switch is a no-op.
    """
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            db.execute("pragma journal_mode = wal")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
