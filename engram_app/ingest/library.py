"""The memory library: import files, list, open, search and delete sources.

Each file succeeds or fails alone. A file is parsed (within the limits of ``limits.py``; PDF,
Word and large files in a child process, ``sandbox.py``), chunked and embedded first; then its
source row, records, chunks and embeddings are written in ONE transaction, so a crash or a kill
never leaves half a source. That transaction also decides whether the file is a duplicate, so
two imports of the same folder at once add each file once. The original bytes are kept under
``uploads/<sha256>``, unmodified. A zip archive of files is walked like a folder: each member, read
through the guards of ``archives.py``, is a file of its own (a chat app's export zip is one file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sqlite_utils

from engram_app.atomic import write_bytes
from engram_app.errors import EngramError
from engram_app.ingest import archives
from engram_app.ingest.chunking import chunk_records
from engram_app.ingest.detect import parse_bytes
from engram_app.ingest.embedding import Embedder
from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits, isolated
from engram_app.ingest.records import ImportRejected, Parsed
from engram_app.ingest.sandbox import ParserProcess
from engram_app.store.db import now

log = logging.getLogger(__name__)
# pypdf logs a warning for every damaged PDF; the import reports the reason itself.
logging.getLogger("pypdf").setLevel(logging.ERROR)

DEFAULT_MAX_BYTES = 50 * 2**20  # per file; --max-size changes it


@dataclass
class ImportResult:
    path: str
    status: str  # added | duplicate | failed
    reason: str | None = None
    source: int | None = None
    kind: str | None = None
    format: str | None = None
    title: str | None = None
    records: int = 0
    chunks: int = 0
    warnings: list[str] = field(default_factory=list)  # added, but the user should know: read as plain text,
    #                                                    media of a chat export skipped, dates read one way

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Entry:
    """A file to import: one from disk, or a member of a zip archive."""

    path: str  # as reported: the path given, or "notes.zip/week 1/monday.md" for a member
    filename: str  # as stored in sources.filename: the file's name, or "notes.zip/week 1/monday.md"
    data: bytes | None = None
    depth: int = 0  # how many archives it is inside


def _stored_name(filename: str | Path) -> str:
    """The name a source keeps: a file's name, or an archive member's path inside its archive (at most 200
    characters, its end kept)."""
    name = filename.name if isinstance(filename, Path) else filename
    return name if len(name) <= 200 else "..." + name[-197:]


def _first_person_statements(text: str) -> bool:
    """Typed text that is profile statements: every line a short first-person sentence ("I live in Porto.").

    Stricter than the profile detection for files (``profiles.looks_like_statements``: two lines,
    most of them first person), since one typed line is common and a note must stay a note.
    """
    from engram_app.ingest import profiles

    lines = profiles.statement_lines(text)
    return bool(lines) and all(len(line) <= 300 and profiles.FIRST_PERSON.match(line) for line in lines)


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under ``paths``: folders recurse (sorted, hidden entries skipped); links are not followed."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


class Library:
    def __init__(self, db: sqlite_utils.Database, home: Path, tokenizer, embedder: Embedder | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, limits: ParseLimits = DEFAULT_LIMITS):
        self.db = db
        self.uploads = home / "uploads"
        self.tokenizer = tokenizer
        self.embedder = embedder or Embedder()
        self.max_bytes = max_bytes
        self.limits = limits

    # --- collections ------------------------------------------------------------------------

    def collection_id(self, name: str, create: bool = True) -> int:
        name = (name or "default").strip()
        row = self.db.execute("select id from collections where name = ?", [name]).fetchone()
        if row:
            return row[0]
        if not create:
            raise EngramError(f"There is no collection named {name!r}.")
        with self.db.atomic():  # look again inside the write lock: another import may have created it
            row = self.db.execute("select id from collections where name = ?", [name]).fetchone()
            if row:
                return row[0]
            return self.db["collections"].insert({"name": name, "created": now()}).last_pk

    def collections(self) -> list[dict]:
        return list(self.db.query(
            "select c.name, count(s.id) as sources from collections c left join sources s "
            "on s.collection_id = c.id and s.status = 'ready' group by c.id order by c.name"))

    # --- import -----------------------------------------------------------------------------

    def ingest(self, paths: Iterable[str | Path], kind: str = "auto", collection: str = "default",
               progress: Callable[[int, ImportResult], None] | None = None) -> list[ImportResult]:
        collection_id = self.collection_id(collection)
        results = []
        with ParserProcess(self.limits) as parser:  # one child process for the whole import, if needed
            for path in expand_paths(Path(p) for p in paths):
                for result in self.ingest_path(path, kind, collection_id, parser):
                    results.append(result)
                    if progress:
                        progress(len(results), result)
        return results

    def ingest_path(self, path: Path, kind: str, collection_id: int,
                    parser: ParserProcess | None = None) -> Iterator[ImportResult]:
        """Import one file: its result, or one per member when it is a zip archive of files.

        ``parser`` is the import's child process (a new one when not given).
        """
        if parser is None:
            with ParserProcess(self.limits) as parser:
                yield from self.ingest_path(path, kind, collection_id, parser)
            return
        entry = Entry(str(path), path.name)
        size = None
        try:
            if not path.exists():
                raise ImportRejected("no such file or folder")
            if not path.is_file():
                raise ImportRejected("not a regular file")
            size = path.stat().st_size
            if size > self.max_bytes:
                raise ImportRejected(f"the file is {size / 2**20:.2f} MB; the limit is {self.max_bytes / 2**20:.2f} MB "
                                     "(change it with --max-size)")
            entry.data = path.read_bytes()
        except ImportRejected as exc:
            yield self._failed(entry, str(exc), collection_id, size=size)
            return
        except OSError as exc:
            yield self._failed(entry, f"could not read the file ({type(exc).__name__}: {exc})", collection_id)
            return
        yield from self._ingest_entry(entry, kind, collection_id, parser, None)

    def _ingest_entry(self, entry: Entry, kind: str, collection_id: int, parser: ParserProcess,
                      budget: archives.Budget | None) -> Iterator[ImportResult]:
        """A file's bytes: one source, or the members of a zip archive of files, each a source of its own.

        A Word file or a chat app's export archive is one file (``archives.classify``).
        """
        if archives.is_zip(entry.data):
            try:
                what = archives.classify(entry.data, entry.filename, self.limits)
            except Exception as exc:  # noqa: BLE001 (each reason is reported; a bug costs this file only)
                yield self._failed(entry, self._reason(exc, entry), collection_id)
                return
            if what == "files":
                yield from self._ingest_archive(entry, kind, collection_id, parser, budget)
                return
        yield self._ingest_one(entry, kind, collection_id, parser)

    def _ingest_archive(self, entry: Entry, kind: str, collection_id: int, parser: ParserProcess,
                        budget: archives.Budget | None) -> Iterator[ImportResult]:
        """Each member of a zip archive, through the guards of ``archives.py``: a refused member fails
        with its reason, the others import. Folders and hidden files are skipped, as in a folder walk."""
        if entry.depth >= self.limits.archive_depth:
            yield self._failed(entry, f"a zip archive inside {entry.depth} others: archives are opened "
                                      f"{self.limits.archive_depth} levels deep at most; unzip it and import its files",
                               collection_id)
            return
        try:
            archive = archives.open_zip(entry.data, self.limits)
        except Exception as exc:  # noqa: BLE001
            yield self._failed(entry, self._reason(exc, entry), collection_id)
            return
        budget = budget or archives.Budget(self.limits)
        with archive:
            for info in archive.infolist():
                if archives.skipped(info):
                    continue
                member = Entry(f"{entry.path}/{info.filename}", f"{entry.filename}/{info.filename}",
                               depth=entry.depth + 1)
                problem = archives.member_problem(info, self.max_bytes, self.limits)
                if problem is None:
                    try:
                        member.data = archives.read_member(archive, info, self.max_bytes, budget)
                    except Exception as exc:  # noqa: BLE001
                        problem = self._reason(exc, member)
                if problem:
                    yield self._failed(member, problem, collection_id)
                    continue
                yield from self._ingest_entry(member, kind, collection_id, parser, budget)

    def _ingest_one(self, entry: Entry, kind: str, collection_id: int, parser: ParserProcess) -> ImportResult:
        """One file's bytes to one source (or a duplicate, or a failure with its reason)."""
        data = entry.data
        sha = hashlib.sha256(data).hexdigest()
        try:
            existing = self._ready_source(sha, collection_id)  # saves parsing; _write checks again
            if existing is not None:
                return ImportResult(entry.path, "duplicate", "the same file is already in this collection", existing)
            parsed = self._parse(data, entry.filename, kind, parser)
            chunks = chunk_records(parsed.records, self.tokenizer)
            if not chunks:
                raise ImportRejected("nothing to keep after parsing")
            vectors = self.embedder.encode([c.text for c in chunks])
            self._keep_upload(sha, data)
            source_id, added = self._write(entry.filename, sha, len(data), collection_id, parsed, chunks, vectors)
            if not added:
                return ImportResult(entry.path, "duplicate", "the same file is already in this collection", source_id)
            return ImportResult(entry.path, "added", None, source_id, parsed.kind, parsed.format, parsed.title,
                                len(parsed.records), len(chunks), list(parsed.warnings))
        except Exception as exc:  # noqa: BLE001 (a parser bug must cost this file only, never the import)
            return self._failed(entry, self._reason(exc, entry), collection_id, sha, len(data))

    @staticmethod
    def _reason(exc: Exception, entry: Entry) -> str:
        """What the user reads when a file fails: our own reasons as they are, anything else named."""
        if isinstance(exc, ImportRejected):
            return str(exc)
        if isinstance(exc, (OSError, MemoryError, RecursionError)):
            return f"could not read the file ({type(exc).__name__}: {exc})"
        log.exception("Unexpected error importing %s", entry.path, exc_info=exc)
        return f"unexpected error while parsing ({type(exc).__name__}: {exc})"

    def _failed(self, entry: Entry, reason: str, collection_id: int, sha: str | None = None,
                size: int | None = None) -> ImportResult:
        self._record_failure(entry.filename, sha, size, collection_id, reason[:500])
        return ImportResult(entry.path, "failed", reason[:500])

    def _parse(self, data: bytes, filename: str, kind: str, parser: ParserProcess) -> Parsed:
        """Parse in the child process when the file's work is not bounded by its size (see limits.py)."""
        if isolated(data, self.limits):
            return parser.parse(data, filename, kind)
        return parse_bytes(data, filename, kind, self.limits)

    def _keep_upload(self, sha: str, data: bytes) -> None:
        self.uploads.mkdir(parents=True, exist_ok=True)
        target = self.uploads / sha
        if target.exists():
            return
        write_bytes(target, data)  # a temporary name per writer: two imports of one file never mix

    def _write(self, filename: str | Path, sha, size, collection_id, parsed, chunks, vectors) -> tuple[int, bool]:
        """Write the source in one transaction: (its id, True), or (the id already there, False).

        ``filename``: the name stored for the source (a path: its name).

        The duplicate check at the start of :meth:`ingest_file` only saves parsing; this one,
        under the write lock, is the one that counts when two imports of the same file race,
        and the unique index on ready sources (migration m005) backs it.
        """
        tokens = sum(c.token_count for c in chunks)
        try:
            with self.db.atomic():  # one transaction: all of the source or nothing
                existing = self._ready_source(sha, collection_id)
                if existing is not None:
                    return existing, False
                return self._insert(_stored_name(filename), sha, size, collection_id, parsed, chunks, vectors,
                                    tokens), True
        except sqlite3.IntegrityError:
            existing = self._ready_source(sha, collection_id)
            if existing is None:
                raise
            return existing, False

    def _ready_source(self, sha: str, collection_id: int) -> int | None:
        row = self.db.execute("select id from sources where sha256 = ? and collection_id = ? and status = 'ready'",
                              [sha, collection_id]).fetchone()
        return row[0] if row else None

    def _insert(self, filename: str, sha, size, collection_id, parsed, chunks, vectors, tokens) -> int:
        """The rows of a new ready source (inside the caller's transaction)."""
        self.db.execute("delete from sources where sha256 = ? and collection_id = ? and status = 'failed'",
                        [sha, collection_id])
        source_id = self.db["sources"].insert({
            "collection_id": collection_id, "kind": parsed.kind, "format": parsed.format, "title": parsed.title,
            "filename": filename, "sha256": sha, "size": size, "status": "ready", "error": None,
            "records": len(parsed.records), "chunks": len(chunks), "tokens": tokens, "created": now(),
            "deleted": None,
        }).last_pk
        self.db["records"].insert_all(
            ({"source_id": source_id, "position": i, "kind": r.kind, "conversation": r.conversation,
              "speaker": r.speaker, "person": r.person, "text": r.text, "timestamp": r.timestamp}
             for i, r in enumerate(parsed.records)),
            batch_size=500)
        chunk_ids = []
        for i, chunk in enumerate(chunks):
            chunk_ids.append(self.db["chunks"].insert({
                "source_id": source_id, "position": i, "text": chunk.text, "token_count": chunk.token_count,
                "first_record": chunk.first_record, "last_record": chunk.last_record}).last_pk)
        self.db["embeddings"].insert_all(
            ({"chunk_id": cid, "model": self.embedder.name, "dim": int(v.shape[0]), "vector": v.tobytes()}
             for cid, v in zip(chunk_ids, vectors)), batch_size=500)
        return source_id

    def _record_failure(self, filename: str, sha, size, collection_id: int, reason: str) -> None:
        name = _stored_name(filename)
        with self.db.atomic():
            # One failed row per file: a new attempt replaces the previous one's.
            self.db.execute("delete from sources where filename = ? and sha256 is ? and collection_id = ? "
                            "and status = 'failed'", [name, sha, collection_id])
            self.db["sources"].insert({
                "collection_id": collection_id, "kind": None, "format": None, "title": name,
                "filename": name, "sha256": sha, "size": size, "status": "failed", "error": reason,
                "records": 0, "chunks": 0, "tokens": 0, "created": now(), "deleted": None,
            })

    # --- what the user types or says ("Remember this", "Save this conversation to memory") ------

    def remember(self, text: str, collection: str = "default") -> ImportResult:
        """A fact or note the user typed, as a source of its own (the usual :class:`ImportResult`).

        Lines that are all first-person statements ("My dog is called Pixel.", "I live in Porto.")
        are read by the profile parser, so they become facts (about "me") that training phrases as
        questions and answers; any other text is a short document. The text goes through the same
        path as a file's bytes, so the same text twice in a collection is a duplicate.
        """
        text = (text or "").strip()
        if not text:
            raise EngramError("Type something to remember: the text is empty.")
        if _first_person_statements(text):
            return self._ingest_text(text.encode("utf-8"), "me.txt", "profile", collection)
        return self._ingest_text(text.encode("utf-8"), "note.txt", "document", collection)

    def remember_chat(self, turns: Iterable[dict], name: str, collection: str = "default") -> ImportResult:
        """A conversation with the model (``{"role", "content"}`` turns) as a chat source named ``name``.

        Written as the JSON message list the chat parser reads (``{"messages": [...]}``), so the
        speakers (user, assistant) are kept as for an imported chat, and saving the same
        conversation again without new turns is a duplicate.
        """
        import json

        messages = [{"role": t["role"], "content": t["content"]} for t in turns
                    if t["role"] in ("user", "assistant") and (t["content"] or "").strip()]
        if not messages:
            raise EngramError("This conversation has no messages yet: chat first, then save it to memory.")
        data = json.dumps({"messages": messages}, ensure_ascii=False, indent=1).encode("utf-8")
        return self._ingest_text(data, f"{name}.json", "chat", collection)

    def _ingest_text(self, data: bytes, filename: str, kind: str, collection: str) -> ImportResult:
        """Bytes made here (not read from a file) through the one import path of :meth:`_ingest_one`."""
        entry = Entry(f"typed: {filename}", filename, data)
        with ParserProcess(self.limits) as parser:  # started only if the text is large enough to need it
            result = self._ingest_one(entry, kind, self.collection_id(collection), parser)
        if result.status == "failed":
            raise EngramError(f"Could not remember this: {result.reason}")
        return result

    # --- reading ----------------------------------------------------------------------------

    def sources(self, collection: str | None = None, status: str | None = "ready", query: str | None = None) -> list[dict]:
        sql = ("select s.id, c.name as collection, s.kind, s.format, s.title, s.filename, s.size, s.status, s.error, "
               "s.records, s.chunks, s.tokens, s.created from sources s join collections c on c.id = s.collection_id "
               "where 1 = 1")
        args: list = []
        if collection:
            sql += " and c.name = ?"
            args.append(collection)
        if status:
            sql += " and s.status = ?"
            args.append(status)
        if query:
            sql += " and (s.title like ? or s.filename like ?)"
            args += [f"%{query}%", f"%{query}%"]
        return list(self.db.query(sql + " order by s.id", args))

    def source(self, source_id: int) -> dict:
        rows = list(self.db.query(
            "select s.*, c.name as collection from sources s join collections c on c.id = s.collection_id "
            "where s.id = ?", [source_id]))
        if not rows:
            raise EngramError(f"There is no source {source_id}: 'sources' lists them.")
        return rows[0]

    def show(self, source_id: int) -> dict:
        """A source with its records and chunks."""
        source = self.source(source_id)
        source["records_list"] = list(self.db.query(
            "select position, kind, conversation, speaker, person, timestamp, text from records where source_id = ? "
            "order by position", [source_id]))
        source["chunks_list"] = list(self.db.query(
            "select id, position, token_count, text from chunks where source_id = ? order by position", [source_id]))
        return source

    def search(self, query: str, k: int = 5, collection: str | None = None) -> list[dict]:
        """The ``k`` chunks closest in meaning to ``query`` (cosine similarity of MiniLM embeddings)."""
        return self._search(self._query_vector(query), k, collection)

    def _query_vector(self, query: str) -> np.ndarray:
        if not query.strip():
            raise EngramError("Search for something: the query is empty.")
        return self.embedder.encode([query])[0]

    def _search(self, vector: np.ndarray, k: int, collection: str | None) -> list[dict]:
        sql = ("select e.chunk_id, e.vector, ch.text, ch.source_id, s.title from embeddings e "
               "join chunks ch on ch.id = e.chunk_id join sources s on s.id = ch.source_id "
               "join collections c on c.id = s.collection_id where s.status = 'ready'")
        args: list = []
        if collection:
            sql += " and c.name = ?"
            args.append(collection)
        rows = self.db.execute(sql, args).fetchall()
        if not rows:
            return []
        matrix = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
        scores = matrix @ vector
        top = np.argsort(-scores)[:k]
        return [{"chunk": rows[i][0], "source": rows[i][3], "title": rows[i][4], "score": round(float(scores[i]), 4),
                 "text": rows[i][2]} for i in top]

    def search_lines(self, query: str, k: int = 3, collection: str | None = None, passages: int = 4,
                     min_score: float | None = None) -> list[dict]:
        """The ``k`` lines of the library nearest in meaning to ``query``: what chat's retrieval puts in the prompt.

        The ``max(k, passages)`` nearest chunks (:meth:`search`), cut into lines and sentences
        (:func:`passage_lines`), ranked again one by one: a small model answers from a short fact
        it is given, not from a page (bench/held_out_retrieval.py). Same keys as :meth:`search`, the
        ``text`` one line, ``score`` that line's; with ``min_score``, only lines scoring at least that
        (cosine similarity), so a question about nothing in the library gets none.
        """
        vector = self._query_vector(query)
        lines: dict[str, dict] = {}  # each line once, with the nearest passage holding it
        for hit in self._search(vector, max(k, passages), collection):
            # a passage of short lines only ("Dog: Rex") stays whole
            for line in passage_lines(hit["text"]) or [" ".join(hit["text"].split())[:1000]]:
                if line:
                    lines.setdefault(line, hit)
        if not lines:
            return []
        texts = list(lines)
        scores = self.embedder.encode(texts) @ vector
        top = [i for i in np.argsort(-scores, kind="stable")[:k] if min_score is None or scores[i] >= min_score]
        return [{**lines[texts[i]], "score": round(float(scores[i]), 4), "text": texts[i]} for i in top]

    def delete(self, source_id: int) -> dict:
        """Forget a source's content (records, chunks, embeddings, original file).

        The source row stays, marked deleted, so that memory packs trained on it can say so.
        """
        source = self.source(source_id)
        if source["status"] == "deleted":
            raise EngramError(f"Source {source_id} is already deleted.")
        with self.db.atomic():
            self.db.execute("delete from embeddings where chunk_id in (select id from chunks where source_id = ?)",
                            [source_id])
            self.db.execute("delete from chunks where source_id = ?", [source_id])
            self.db.execute("delete from records where source_id = ?", [source_id])
            self.db.execute("update sources set status = 'deleted', deleted = ? where id = ?", [now(), source_id])
        sha = source["sha256"]
        if sha and not self.db.execute("select 1 from sources where sha256 = ? and status = 'ready'", [sha]).fetchone():
            (self.uploads / sha).unlink(missing_ok=True)
        return self.source(source_id)


_MARKUP = re.compile(r"^[\s>*+#\-]*(?:\d+[.)]\s+)?")  # a bullet, a quote, a heading mark or a list number
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def passage_lines(text: str, min_words: int = 3) -> list[str]:
    """A passage's lines and sentences without markdown marks, each of at least ``min_words`` words."""
    lines = []
    for raw in text.splitlines():
        for sentence in _SENTENCE_END.split(_MARKUP.sub("", raw).strip()):
            sentence = sentence.strip()
            if len(sentence.split()) >= min_words:
                lines.append(sentence)
    return lines
