"""The database schema, grown by small numbered migrations (the way Simon Willison's ``llm`` does).

Each migration is a function registered with :func:`migration`; they run once each, in order,
at start-up, and the names of those applied are kept in the ``_migrations`` table. To change the
schema, add a new function at the end: never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    MIGRATIONS.append(fn)
    return fn


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations not applied yet; returns their names."""
    db["_migrations"].create({"name": str, "applied": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.atomic():
            # Two processes starting on a new data root at once: the other may have applied it
            # since ``done`` was read; under the write lock that is certain either way.
            if db.execute("select 1 from _migrations where name = ?", [fn.__name__]).fetchone():
                continue
            fn(db)
            db["_migrations"].insert({"name": fn.__name__, "applied": _now(db)})
        applied.append(fn.__name__)
    return applied


def _now(db: sqlite_utils.Database) -> str:
    return db.execute("select strftime('%Y-%m-%dT%H:%M:%fZ', 'now')").fetchone()[0]


@migration
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


@migration
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


@migration
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


@migration
def m004_job_attempts(db: sqlite_utils.Database) -> None:
    """How many times a worker picked each job up: a job that keeps killing its worker is given up."""
    db["jobs"].add_column("attempts", int, not_null_default=0)


@migration
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


@migration
def m006_record_timestamps(db: sqlite_utils.Database) -> None:
    """When each chat message was written (ISO 8601), as chat exports give it: a column of records.

    Records imported before stay as they were, without a time.
    """
    if "timestamp" not in db["records"].columns_dict:
        db["records"].add_column("timestamp", str)
