"""The database schema, grown by small numbered migrations (the way Simon Willison's ``llm`` does).

The migrations are sqlite-utils' own :class:`~sqlite_utils.migrations.Migrations` set named
``engram``: each function registered with ``@MIGRATIONS()`` runs once, in order, at start-up,
and the names of those applied are kept in sqlite-utils' ``_sqlite_migrations`` table. To
change the schema, add a new function at the end: never edit one that has shipped.

Databases made before the app used sqlite-utils' bookkeeping kept the names in a table of their
own, ``_migrations``; :func:`migrate` moves those names over once (see :func:`_carry_over`).
"""

from __future__ import annotations

import sqlite_utils
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("engram")
LEGACY_TABLE = "_migrations"  # the bookkeeping of the app's own registry, before sqlite-utils'


def migrate(db: sqlite_utils.Database, stop_before: str | None = None) -> list[str]:
    """Apply the migrations not applied yet (those before ``stop_before`` when given); returns their names.

    ``stop_before`` (sqlite-utils' own option) leaves a database as an earlier version of the
    app left it: the tests of a migration that carries old data over start from there.

    sqlite-utils reads what is pending before it takes any lock, so two processes starting on a
    new data root at once would both run ``m001`` (the second failing on a table that exists).
    Here the whole step runs in one transaction that takes the write lock first (the app's
    ``Database.atomic()`` begins ``IMMEDIATE``), so what is pending is read by one process at a
    time and the other finds it done. Each migration is a savepoint in it, with its record; if
    one fails, the step is rolled back whole and the database stays as the previous start left
    it. A database with nothing to do never takes the lock. (A migration registered with
    ``transactional=False``, such as a ``VACUUM``, could not run in here: none is.)
    """
    if not db[LEGACY_TABLE].exists() and not MIGRATIONS.pending(db):
        return []
    with db.atomic():
        _carry_over(db)
        pending = [m.name for m in MIGRATIONS.pending(db)]
        MIGRATIONS.apply(db, stop_before=stop_before)
    return pending[:pending.index(stop_before)] if stop_before in pending else pending


def applied(db: sqlite_utils.Database) -> list[str]:
    """The names of the migrations applied to ``db``, in the order they ran."""
    return [m.name for m in MIGRATIONS.applied(db)]


def registered() -> list[str]:
    """The names of every migration of the app, in order (what a database fully migrated has applied)."""
    return [m.name for m in MIGRATIONS.pending(sqlite_utils.Database(memory=True))]


def _carry_over(db: sqlite_utils.Database) -> None:
    """Record the names in a legacy ``_migrations`` table as applied in sqlite-utils' table, then drop it.

    So that an existing database runs none of its migrations again, and keeps one record of
    them. Runs inside :func:`migrate`'s transaction: a concurrent opener finds either the old
    table or the new records, never half of each. The time each was applied is kept.
    """
    if not db[LEGACY_TABLE].exists():
        return
    MIGRATIONS.ensure_migrations_table(db)
    done = set(applied(db))
    legacy = db.execute(f"select name, applied from {LEGACY_TABLE} order by applied, rowid").fetchall()
    for name, stamp in legacy:
        if name not in done:
            db[Migrations.migrations_table].insert({"migration_set": MIGRATIONS.name, "name": name,
                                                    "applied_at": stamp})
    db[LEGACY_TABLE].drop()


def _now(db: sqlite_utils.Database) -> str:
    return db.execute("select strftime('%Y-%m-%dT%H:%M:%fZ', 'now')").fetchone()[0]


@MIGRATIONS()
def m001_library(db: sqlite_utils.Database) -> None:
    """Collections, sources, their parsed records, chunks and chunk embeddings."""
    db["collections"].create({"id": int, "name": str, "created": str}, pk="id")
    db["collections"].create_index(["name"], unique=True)
    db["sources"].create(
        {
            "id": int,
            "collection_id": int,
            "kind": str,  # document | chat | profile
            "format": str,  # txt, markdown, html, pdf, docx, chatgpt, messages, transcript, ...
            "title": str,
            "filename": str,
            "sha256": str,  # of the original bytes, kept in uploads/<sha256>
            "size": int,
            "status": str,  # ready | failed | deleted
            "error": str,
            "records": int,
            "chunks": int,
            "tokens": int,
            "created": str,
            "deleted": str,
        },
        pk="id",
        foreign_keys=[("collection_id", "collections", "id")],
    )
    db["sources"].create_index(["sha256"])
    db["sources"].create_index(["collection_id", "status"])
    # Parsed content: a document's text, a chat's turns, a profile's statements.
    db["records"].create(
        {
            "id": int,
            "source_id": int,
            "position": int,
            "kind": str,  # text | turn | fact
            "conversation": int,  # which conversation of a multi-conversation source (chats)
            "speaker": str,  # role or speaker name (turns)
            "person": str,  # who a fact is about (facts)
            "text": str,
        },
        pk="id",
        foreign_keys=[("source_id", "sources", "id")],
    )
    db["records"].create_index(["source_id", "position"])
    db["chunks"].create(
        {"id": int, "source_id": int, "position": int, "text": str, "token_count": int, "first_record": int,
         "last_record": int},
        pk="id",
        foreign_keys=[("source_id", "sources", "id")],
    )
    db["chunks"].create_index(["source_id", "position"])
    db["embeddings"].create(
        {"chunk_id": int, "model": str, "dim": int, "vector": bytes},
        pk="chunk_id",
        foreign_keys=[("chunk_id", "chunks", "id")],
    )


@MIGRATIONS()
def m002_packs_jobs_chats(db: sqlite_utils.Database) -> None:
    """Memory packs and versions, training jobs and metrics, conversations and messages.

    Defined with the library so that the schema is designed once; the training and chat
    features fill them.
    """
    db["packs"].create(
        {"id": int, "name": str, "base_model": str, "config": str, "collections": str, "active_version": int,
         "created": str},
        pk="id",
    )
    db["packs"].create_index(["name"], unique=True)
    db["pack_versions"].create(
        {"id": int, "pack_id": int, "number": int, "path": str, "job_id": int, "sources": str, "evaluation": str,
         "created": str},
        pk="id",
        foreign_keys=[("pack_id", "packs", "id")],
    )
    db["pack_versions"].create_index(["pack_id", "number"], unique=True)
    db["jobs"].create(
        {"id": int, "pack_id": int, "status": str, "options": str, "progress": float, "step": int, "total_steps": int,
         "error": str, "worker": str, "heartbeat": str, "created": str, "started": str, "finished": str},
        pk="id",
        foreign_keys=[("pack_id", "packs", "id")],
    )
    db["jobs"].create_index(["status"])
    db["job_metrics"].create(
        {"id": int, "job_id": int, "step": int, "name": str, "value": float, "created": str},
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
    )
    db["job_metrics"].create_index(["job_id", "name", "step"])
    db["conversations"].create({"id": int, "title": str, "pack_id": int, "created": str}, pk="id")
    db["messages"].create(
        {"id": int, "conversation_id": int, "role": str, "content": str, "pack_id": int, "pack_version": int,
         "trace": bytes, "created": str},
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["messages"].create_index(["conversation_id", "id"])


@MIGRATIONS()
def m003_job_control(db: sqlite_utils.Database) -> None:
    """Cooperative cancel, a log per job, and the kind of each job (train or evaluate)."""
    db["jobs"].add_column("cancel_requested", int, not_null_default=0)
    db["jobs"].add_column("result", str)  # JSON: what the job produced (version number, evaluation)
    db["job_logs"].create(
        {"id": int, "job_id": int, "level": str, "message": str, "created": str},
        pk="id",
        foreign_keys=[("job_id", "jobs", "id")],
    )
    db["job_logs"].create_index(["job_id", "id"])


@MIGRATIONS()
def m004_job_attempts(db: sqlite_utils.Database) -> None:
    """How many times a worker picked each job up: a job that keeps killing its worker is given up."""
    db["jobs"].add_column("attempts", int, not_null_default=0)


@MIGRATIONS()
def m005_one_ready_source_per_file(db: sqlite_utils.Database) -> None:
    """At most one ready source per file content and collection, enforced by a unique index.

    Two imports of the same folder at once could both add a file (the duplicate check ran
    before their write transactions). Such duplicates already in a database are resolved
    here: the first (lowest id) stays; each later one becomes ``deleted``, its records, chunks
    and embeddings removed (the first holds the same content), with ``error`` saying which
    source it duplicated. Packs that learned a later duplicate report it among their deleted
    sources, as for any deleted source; the original file stays in uploads/ (the first uses it).
    """
    later = db.execute(
        "select s.id, f.first from sources s join (select collection_id, sha256, min(id) as first from sources "
        "where status = 'ready' group by collection_id, sha256 having count(*) > 1) f "
        "on f.collection_id = s.collection_id and f.sha256 = s.sha256 "
        "where s.status = 'ready' and s.id > f.first order by s.id").fetchall()
    stamp = _now(db)
    for source_id, first in later:
        db.execute("delete from embeddings where chunk_id in (select id from chunks where source_id = ?)", [source_id])
        db.execute("delete from chunks where source_id = ?", [source_id])
        db.execute("delete from records where source_id = ?", [source_id])
        db.execute("update sources set status = 'deleted', deleted = ?, error = ? where id = ?",
                   [stamp, f"a duplicate of source {first} (the same file in the same collection), removed by "
                           "the upgrade that allows one ready copy of a file per collection", source_id])
    db.execute("create unique index if not exists sources_one_ready_per_file on sources (collection_id, sha256) "
               "where status = 'ready'")


@MIGRATIONS()
def m006_record_timestamps(db: sqlite_utils.Database) -> None:
    """When each chat message was written (ISO 8601), as chat exports give it: a column of records.

    Records imported before stay as they were, without a time.
    """
    if "timestamp" not in db["records"].columns_dict:
        db["records"].add_column("timestamp", str)
