"""The schema's migrations on sqlite-utils' ``Migrations``: carrying over databases the app's earlier
registry made, a fresh database, a later migration, and two openers at once.

``fixtures/db_before_sqlite_migrations.db`` was made by the code before this change (its own
``_migrations`` table): ``open_db`` on a fresh data root, then one text file imported into the
collection ``me`` through ``Library.ingest`` (one source, one record, one chunk, one embedding);
then only vacuumed with 1 KiB pages to keep it small (its schema and rows as the old code wrote them).
"""

from __future__ import annotations

import shutil
from contextlib import closing
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlite_utils
from sqlite_utils.migrations import Migrations

import engram_app.store.migrations as migrations
from engram_app.store import open_db
from engram_app.store.db import DB_NAME

FIXTURE = Path(__file__).parent / "fixtures" / "db_before_sqlite_migrations.db"
SHIPPED = ["m001_library", "m002_packs_jobs_chats", "m003_job_control", "m004_job_attempts",
           "m005_one_ready_source_per_file", "m006_record_timestamps"]
BOOKKEEPING = {"_migrations", "_sqlite_migrations"}


def schema(path: Path, leave_out: set[str] = BOOKKEEPING) -> dict[str, str]:
    """Every table, index and trigger of the database with its SQL (bookkeeping tables left out)."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("select name, tbl_name, sql from sqlite_master where name not like 'sqlite_%'").fetchall()
    return {name: sql for name, table, sql in rows if table not in leave_out}


def contents(path: Path) -> dict[str, list[tuple]]:
    """Every row of the app's tables."""
    with closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table' and name not like "
                                             "'sqlite_%'") if r[0] not in BOOKKEEPING]
        return {t: conn.execute(f"select * from [{t}] order by rowid").fetchall() for t in tables}


@pytest.fixture
def old_home(tmp_path) -> Path:
    """A data root holding a copy of the database the previous code made (the fixture itself stays as it is)."""
    home = tmp_path / "old"
    home.mkdir()
    shutil.copyfile(FIXTURE, home / DB_NAME)
    return home


def recording_set(monkeypatch, calls: list[str], later: bool = False) -> None:
    """Replace the app's migration set with a copy whose migrations append their name to ``calls``
    when they run, and with one more migration at its end when ``later``."""
    copy = Migrations(migrations.MIGRATIONS.name)
    for migration in migrations.MIGRATIONS.pending(sqlite_utils.Database(memory=True)):
        def run(db: sqlite_utils.Database, fn=migration.fn, name=migration.name) -> None:
            calls.append(name)
            fn(db)
        copy(name=migration.name)(run)
    if later:
        @copy()
        def m999_a_later_column(db: sqlite_utils.Database) -> None:
            calls.append("m999_a_later_column")
            db["sources"].add_column("later", str)

    monkeypatch.setattr(migrations, "MIGRATIONS", copy)


def test_the_fixture_was_made_by_the_previous_registry_with_every_shipped_migration_and_one_source():
    with closing(sqlite3.connect(f"file:{FIXTURE}?immutable=1", uri=True)) as conn:  # it stays as committed
        assert [r[0] for r in conn.execute("select name from _migrations order by applied")] == SHIPPED
        assert conn.execute("select count(*) from sqlite_master where name = '_sqlite_migrations'").fetchone() == (0,)
        assert conn.execute("select name from collections").fetchall() == [("me",)]
        assert conn.execute("select title, status from sources").fetchall() == [
            ("My dog is called Pixel. I live in Lisbon.", "ready")]
    assert FIXTURE.stat().st_size < 64 * 1024


def test_the_shipped_migrations_keep_their_names_and_order():
    assert migrations.registered() == SHIPPED


def test_an_old_database_opens_with_its_applied_names_carried_over_and_no_migration_run_again(old_home, monkeypatch):
    before_schema, before_rows = schema(old_home / DB_NAME), contents(old_home / DB_NAME)
    with closing(sqlite3.connect(old_home / DB_NAME)) as conn:
        stamps = dict(conn.execute("select name, applied from _migrations"))
    calls: list[str] = []
    recording_set(monkeypatch, calls)

    db = open_db(old_home)

    assert calls == []
    assert migrations.applied(db) == SHIPPED
    assert {r["name"]: r["applied_at"] for r in db["_sqlite_migrations"].rows} == stamps  # when each ran, kept
    assert not db["_migrations"].exists()  # one record of what ran, not two
    assert schema(old_home / DB_NAME) == before_schema
    assert contents(old_home / DB_NAME) == before_rows
    assert migrations.migrate(db) == []


def test_a_later_migration_runs_once_on_an_old_database(old_home, monkeypatch):
    calls: list[str] = []
    recording_set(monkeypatch, calls, later=True)

    db = open_db(old_home)
    assert calls == ["m999_a_later_column"]
    assert migrations.applied(db) == [*SHIPPED, "m999_a_later_column"]
    assert "later" in db["sources"].columns_dict
    assert [r["title"] for r in db["sources"].rows] == ["My dog is called Pixel. I live in Lisbon."]
    db.close()

    open_db(old_home)  # the next start
    assert calls == ["m999_a_later_column"]


def test_a_fresh_database_gets_every_migration_and_the_schema_the_old_code_made(tmp_path, old_home, monkeypatch):
    calls: list[str] = []
    recording_set(monkeypatch, calls)

    db = open_db(tmp_path / "new")

    assert calls == SHIPPED
    assert migrations.applied(db) == SHIPPED
    assert not db["_migrations"].exists()
    assert schema(tmp_path / "new" / DB_NAME) == schema(old_home / DB_NAME)  # a copy of the fixture


def test_a_failing_migration_leaves_the_old_database_as_the_previous_start_left_it(old_home, monkeypatch):
    copy = Migrations(migrations.MIGRATIONS.name)
    for migration in migrations.MIGRATIONS.pending(sqlite_utils.Database(memory=True)):
        copy(name=migration.name)(migration.fn)

    @copy()
    def m999_fails_halfway(db: sqlite_utils.Database) -> None:
        db["sources"].add_column("half", str)
        raise RuntimeError("a bug in a new migration")

    monkeypatch.setattr(migrations, "MIGRATIONS", copy)
    before = schema(old_home / DB_NAME, leave_out=set())
    with pytest.raises(RuntimeError, match="a bug in a new migration"):
        open_db(old_home)
    assert schema(old_home / DB_NAME, leave_out=set()) == before  # the old bookkeeping too: nothing half done


def test_two_openers_of_a_new_data_root_at_once_both_succeed_and_each_migration_runs_once(tmp_path, monkeypatch):
    home = tmp_path / "new"
    home.mkdir()
    calls: list[str] = []
    recording_set(monkeypatch, calls)
    # Another writer holds the write lock while both openers read what is pending (everything) and
    # queue for the lock: the one served second must find the work done, not run m001 again.
    blocker = sqlite3.connect(home / DB_NAME, isolation_level=None)
    blocker.execute("pragma journal_mode = wal")
    blocker.execute("begin immediate")
    errors: list[BaseException] = []
    opened: list[list[str]] = []

    def opener() -> None:
        try:
            db = open_db(home)
            opened.append(migrations.applied(db))
            db.close()
        except BaseException as exc:  # noqa: BLE001 (the assertion below reports it)
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(2)]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.5)  # both are waiting for the lock by now
    blocker.execute("commit")
    blocker.close()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert opened == [SHIPPED, SHIPPED]
    assert calls == SHIPPED
