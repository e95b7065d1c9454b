"""Parsers are bounded and concurrent writers lose nothing.

Each hostile file is refused with the reason it broke a limit, or imported within the limits,
and every test checks that nothing else in the data root changed: the files under it, the
source rows before the import, and the records, chunks and embeddings of the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
import traceback
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest

from engram_app.ingest import Library
from engram_app.ingest.embedding import Embedder
from engram_app.ingest.limits import ParseLimits
from engram_app.store import open_db
from engram_app.store.batches import placeholders
from engram_app.store.db import DB_NAME
from engram_app.store.migrations import migrate
from engram_app.training.packs import PackConfig, PackStore
from library_fixtures import make_pdf
from tiny import tiny_tokenizer

DIARY = b"Dear diary: the heron came back to the pond today, and Pixel barked at it.\n"


def make_library(home: Path, tokenizer, embedder, limits: ParseLimits = ParseLimits()) -> Library:
    """A library with one source already in it, so that "nothing else changed" covers old content."""
    library = Library(open_db(home), home, tokenizer, embedder, limits=limits)
    seed = home.parent / "seed" / "diary.txt"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_bytes(DIARY)
    assert library.ingest([seed])[0].status == "added"
    return library


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_root(library: Library, home: Path) -> dict:
    """Everything an import can change: the files under the data root and the library's rows."""
    files = {p.relative_to(home).as_posix(): sha(p.read_bytes()) for p in sorted(home.rglob("*"))
             if p.is_file() and not p.name.startswith(DB_NAME)}
    sources = list(library.db.query("select id, collection_id, filename, sha256, status, error, records, chunks "
                                    "from sources order by id"))
    content = {table: library.db.execute(f"select count(*) from {table}").fetchone()[0]
               for table in ("collections", "records", "chunks", "embeddings")}
    return {"files": files, "sources": sources, "content": content}


def assert_only_these_changes(before: dict, after: dict, added: dict[str, bytes], failed: dict[str, str]) -> None:
    """``after`` is ``before`` plus exactly the ``added`` files (name: bytes) and ``failed`` ones (name: reason)."""
    old = len(before["sources"])
    assert after["sources"][:old] == before["sources"]
    new = after["sources"][old:]
    assert sorted((s["filename"], s["status"]) for s in new) == sorted(
        [(name, "ready") for name in added] + [(name, "failed") for name in failed])
    for source in new:
        if source["status"] == "failed":
            assert source["error"] == failed[source["filename"]]
            assert (source["records"], source["chunks"]) == (0, 0)
        else:
            assert source["sha256"] == sha(added[source["filename"]])
    assert after["files"] == {**before["files"], **{f"uploads/{sha(data)}": sha(data) for data in added.values()}}
    ready = [s for s in new if s["status"] == "ready"]
    assert after["content"] == {
        "collections": before["content"]["collections"],
        "records": before["content"]["records"] + sum(s["records"] for s in ready),
        "chunks": before["content"]["chunks"] + sum(s["chunks"] for s in ready),
        "embeddings": before["content"]["embeddings"] + sum(s["chunks"] for s in ready),
    }


def write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


# --- YAML aliases -------------------------------------------------------------------------------

def nest(inner: str, keys: int) -> str:
    """A flow mapping of ``keys`` keys that all point at the anchor ``inner``."""
    return "{" + ", ".join(f"k{i}: *{inner}" for i in range(keys)) + "}"


def alias_bomb(leaf: str, keys: int) -> bytes:
    """Four levels of mappings whose every value is an alias of the level below: keys**4 leaves."""
    return (f"name: Mallory\n"
            f"l: &l {leaf}\n"
            f"d1: &d1 {nest('l', keys)}\n"
            f"d2: &d2 {nest('d1', keys)}\n"
            f"d3: &d3 {nest('d2', keys)}\n"
            f"top: {nest('d3', keys)}\n").encode()


LONG_FACTS = (  # 11,111 facts of 20,000 characters: 222 million characters
    f"s: &s {'x' * 1000}\n".encode() + alias_bomb("[" + ", ".join(["*s"] * 20) + "]", 10))
MANY_FACTS = alias_bomb("a short value", 30)  # some 840,000 facts
EMPTY_VALUES = alias_bomb("{}", 50)  # some 130,000 values (mappings nested deeper than read): no facts


@pytest.mark.parametrize("bomb, reason", [
    (LONG_FACTS, "the file yields more than 20 million characters of text, the most read from one file: split it "
                 "into smaller files"),
    (MANY_FACTS, "the profile expands to more than 10,000 facts, the most read from one file (YAML aliases (*name) "
                 "repeat their whole value each time they are used): split it into smaller profiles"),
    (EMPTY_VALUES, "the profile holds more than 100,000 values once its YAML aliases (*name) are expanded: each use "
                   "of an alias repeats its whole value; write the values out or split the profile"),
], ids=["long-facts", "many-facts", "empty-values"])
def test_a_yaml_alias_bomb_is_refused_with_the_limit_it_broke_and_nothing_else_changes(
        bomb, reason, tmp_path, tokenizer, embedder):
    assert len(bomb) < 2600  # the size of the example
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder)
    write(tmp_path / "in", {"me.yaml": bomb})
    before = data_root(library, home)
    started = time.monotonic()
    [result] = library.ingest([tmp_path / "in" / "me.yaml"])
    assert (result.status, result.reason) == ("failed", reason)
    assert time.monotonic() - started < 10  # refused while expanding, not after
    assert_only_these_changes(before, data_root(library, home), added={}, failed={"me.yaml": reason})


def test_a_yaml_profile_with_a_few_aliases_is_imported_within_bounds(tmp_path, tokenizer, embedder):
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder)
    profile = (b"name: Ana\n"
               b"home: &home {city: Lisbon, street: Rua Augusta}\n"
               b"holiday_home: *home\n"
               b"work:\n  <<: *home\n  street: Avenida da Liberdade\n"
               b"pets: [Pixel, Timothy]\n")
    write(tmp_path / "in", {"ana.yaml": profile})
    before = data_root(library, home)
    [result] = library.ingest([tmp_path / "in" / "ana.yaml"])
    assert (result.status, result.kind, result.format) == ("added", "profile", "profile-yaml")
    facts = [r["text"] for r in library.show(result.source)["records_list"]]
    assert facts == ["My name is Ana.", "My home city is Lisbon.", "My home street is Rua Augusta.",
                     "My holiday home city is Lisbon.", "My holiday home street is Rua Augusta.",
                     "My work city is Lisbon.", "My work street is Avenida da Liberdade.", "My pets: Pixel, Timothy."]
    assert_only_these_changes(before, data_root(library, home), added={"ana.yaml": profile}, failed={})


# --- PDF ----------------------------------------------------------------------------------------

def shared_stream_pdf(pages: int, stream_bytes: int) -> bytes:
    """A PDF whose ``pages`` pages all draw one Flate-compressed content stream of ``stream_bytes``."""
    line = b"BT /F1 12 Tf 72 712 Td (The heron came back to the pond today.) Tj ET\n"
    content = line * (stream_bytes // len(line))
    content += b" " * (stream_bytes - len(content))
    packed = zlib.compress(content, 9)
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(packed), packed)]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                b"/Contents 4 0 R >>"] * pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_a_pdf_whose_pages_share_one_huge_content_stream_is_refused_at_once_and_nothing_else_changes(
        tmp_path, tokenizer, embedder):
    bomb = shared_stream_pdf(pages=300, stream_bytes=2**20)  # 300 MiB to parse: hours of pypdf
    assert len(bomb) < 64 * 2**10
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder)
    write(tmp_path / "in", {"report.pdf": bomb})
    before = data_root(library, home)
    started = time.monotonic()
    [result] = library.ingest([tmp_path / "in" / "report.pdf"])
    reason = ("the PDF's pages hold 300 MB of drawing instructions (a content stream shared by many pages counts "
              "once per page); at most 64 MB are read from one file, more would take hours: print it to a new PDF "
              "or save it as text")
    assert (result.status, result.reason) == ("failed", reason)
    assert time.monotonic() - started < 30  # the child's start-up and one decompression, not the extraction
    assert_only_these_changes(before, data_root(library, home), added={}, failed={"report.pdf": reason})


def test_a_pdf_whose_pages_share_a_small_content_stream_is_imported_within_bounds(tmp_path, tokenizer, embedder):
    pdf = shared_stream_pdf(pages=3, stream_bytes=700)  # ten lines drawn on each of three pages
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder)
    write(tmp_path / "in", {"pond.pdf": pdf})
    before = data_root(library, home)
    [result] = library.ingest([tmp_path / "in" / "pond.pdf"])
    assert (result.status, result.kind, result.format, result.records) == ("added", "document", "pdf", 1)
    [record] = library.show(result.source)["records_list"]
    assert record["text"].count("The heron came back to the pond today.") == 30
    assert_only_these_changes(before, data_root(library, home), added={"pond.pdf": pdf}, failed={})


# --- time and memory of the parser process ---------------------------------------------------------

def parser_children() -> list[int]:
    """Process ids of the parser processes this test process started and that still run."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"engram_app.ingest.sandbox" in cmdline and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find the parser processes")
def test_a_file_past_the_time_limit_fails_with_that_reason_while_the_rest_of_the_import_succeeds(
        tmp_path, tokenizer, embedder):
    slow = shared_stream_pdf(pages=4, stream_bytes=2 * 2**20)  # under the content cap, ~20 s of pypdf
    good = {"1-notes.txt": b"The heron came back today.\n", "3-report.pdf": make_pdf(["Page one of the report."]),
            "4-plans.md": b"# Plans\n\nWe walk to the pond on Sunday.\n"}
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder, ParseLimits(seconds=2))
    write(tmp_path / "in", {**good, "2-slow.pdf": slow})
    before = data_root(library, home)
    started = time.monotonic()
    results = library.ingest([tmp_path / "in"])
    elapsed = time.monotonic() - started
    reason = ("reading the file took longer than 2 s, the most one file may take (a file built to be slow to "
              "parse?): convert it to plain text or split it")
    assert [(Path(r.path).name, r.status, r.reason) for r in results] == [
        ("1-notes.txt", "added", None), ("2-slow.pdf", "failed", reason), ("3-report.pdf", "added", None),
        ("4-plans.md", "added", None)]
    assert elapsed < 20  # the slow file was stopped at its limit, not read to the end
    assert parser_children() == []  # the stopped child was killed, the second one ended with the import
    assert_only_these_changes(before, data_root(library, home), added=good, failed={"2-slow.pdf": reason})


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
def test_a_file_past_the_memory_limit_fails_with_that_reason_while_the_rest_of_the_import_succeeds(
        tmp_path, tokenizer, embedder):
    hungry = b"[" + b"[]," * 3_000_000 + b"[]]"  # 9 MB of JSON: 3 million lists, over 200 MiB in Python
    good = {"1-notes.txt": b"The heron came back today.\n", "3-report.pdf": make_pdf(["Page one of the report."])}
    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder, ParseLimits(memory_bytes=160 * 2**20))
    write(tmp_path / "in", {**good, "2-lists.json": hungry})
    before = data_root(library, home)
    results = library.ingest([tmp_path / "in"])
    reason = "reading the file needed more than 160 MiB of memory, the most one file may use"
    assert [(Path(r.path).name, r.status, r.reason) for r in results] == [
        ("1-notes.txt", "added", None), ("2-lists.json", "failed", reason), ("3-report.pdf", "added", None)]
    assert parser_children() == []
    assert_only_these_changes(before, data_root(library, home), added=good, failed={"2-lists.json": reason})


def test_small_text_files_are_read_without_starting_the_parser_process(tmp_path, tokenizer, embedder, monkeypatch):
    import engram_app.ingest.sandbox as sandbox

    def no_process(*args, **kwargs):
        raise RuntimeError("no parser process in this test")

    home = tmp_path / "home"
    library = make_library(home, tokenizer, embedder)
    monkeypatch.setattr(sandbox.subprocess, "Popen", no_process)
    write(tmp_path / "in", {"a.txt": b"The heron came back today.\n", "b.yaml": b"name: Ana\ncity: Lisbon\n",
                            "c.html": b"<html><body><p>Pixel barked.</p></body></html>",
                            "d.pdf": make_pdf(["A PDF is always read in the parser process."])})
    results = library.ingest([tmp_path / "in"])
    assert [r.status for r in results] == ["added", "added", "added", "failed"]
    assert results[3].reason == "unexpected error while parsing (RuntimeError: no parser process in this test)"


# --- concurrent imports ------------------------------------------------------------------------------

class LockstepEmbedder:
    """Holds each import before it embeds a file until the other import has reached the same file.

    Both imports have then passed the early duplicate check for that file before either writes
    it: the race of two app processes importing one folder, every time instead of by chance.
    """

    def __init__(self, inner: Embedder, barrier: threading.Barrier):
        self.inner = inner
        self.barrier = barrier

    @property
    def name(self) -> str:
        return self.inner.name

    def encode(self, texts: list[str]):
        self.barrier.wait()
        return self.inner.encode(texts)


def test_two_imports_of_one_folder_at_once_add_each_file_exactly_once(tmp_path, embedder):
    files = {f"note-{i}.txt": f"Note {i}: the heron came back to the pond, visit {i}.\n".encode() for i in range(6)}
    write(tmp_path / "in", files)
    home = tmp_path / "home"  # new: both also create the database and the collection at once
    barrier = threading.Barrier(2, timeout=120)
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def app_process(name: str) -> None:  # its own database connection, tokenizer and Library
        try:
            barrier.wait()
            library = Library(open_db(home), home, tiny_tokenizer(), LockstepEmbedder(embedder, barrier))
            results[name] = library.ingest([tmp_path / "in"])
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=app_process, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [], "".join(traceback.format_exception(errors[0]))  # where it failed, not only what
    for a, b in zip(results["a"], results["b"]):
        assert a.path == b.path and sorted([a.status, b.status]) == ["added", "duplicate"]
        assert a.source == b.source  # the duplicate names the source the other import added
    db = open_db(home)
    ready = list(db.query("select id, sha256, records, chunks from sources where status = 'ready'"))
    assert sorted(s["sha256"] for s in ready) == sorted(sha(data) for data in files.values())
    assert db.execute("select count(*) from sources where status != 'ready'").fetchone()[0] == 0
    assert db.execute("select count(*) from collections").fetchone()[0] == 1
    assert db.execute("select count(*) from records").fetchone()[0] == sum(s["records"] for s in ready)
    assert db.execute("select count(*) from chunks").fetchone()[0] == sum(s["chunks"] for s in ready)
    assert db.execute("select count(*) from embeddings").fetchone()[0] == sum(s["chunks"] for s in ready)
    assert sorted(p.name for p in (home / "uploads").iterdir()) == sorted(sha(data) for data in files.values())


def test_the_upgrade_keeps_the_first_of_duplicate_ready_sources_and_the_index_refuses_new_ones(
        tmp_path, tokenizer, embedder, monkeypatch):
    home = tmp_path / "home"
    db = open_db(home)
    # The database as it was before m005, with a file imported twice by two imports at once.
    db.execute("drop index sources_one_ready_per_file")
    db.execute("delete from _sqlite_migrations where name = 'm005_one_ready_source_per_file'")
    library = Library(db, home, tokenizer, embedder)
    write(tmp_path / "in", {"notes.txt": DIARY, "other.txt": b"Another note about the pond.\n"})
    first = library.ingest([tmp_path / "in" / "notes.txt"])[0].source
    elsewhere = library.ingest([tmp_path / "in" / "notes.txt"], collection="work")[0].source  # not a duplicate
    monkeypatch.setattr(library, "_ready_source", lambda sha, collection: None)  # the old, racy check
    [twin, other] = [r.source for r in library.ingest([tmp_path / "in"])]
    monkeypatch.undo()
    assert len({first, elsewhere, twin, other}) == 4
    before = {s["id"]: s for s in db.query("select * from sources")}

    assert migrate(db) == ["m005_one_ready_source_per_file"]

    after = {s["id"]: s for s in db.query("select * from sources")}
    assert after[twin]["status"] == "deleted" and after[twin]["deleted"]
    assert after[twin]["error"] == (f"a duplicate of source {first} (the same file in the same collection), removed "
                                    "by the upgrade that allows one ready copy of a file per collection")
    assert {i: after[i] for i in after if i != twin} == {i: before[i] for i in before if i != twin}
    for table, column in (("records", "source_id"), ("chunks", "source_id")):
        assert db.execute(f"select count(*) from {table} where {column} = ?", [twin]).fetchone()[0] == 0
        assert db.execute(f"select count(*) from {table} where {column} = ?", [first]).fetchone()[0] > 0
    assert db.execute("select count(*) from embeddings e join chunks c on c.id = e.chunk_id").fetchone()[0] == \
        db.execute("select count(*) from embeddings").fetchone()[0]
    assert (home / "uploads" / sha(DIARY)).exists()
    with pytest.raises(sqlite3.IntegrityError):
        db["sources"].insert({**{k: v for k, v in before[first].items() if k != "id"}})


# --- SQL over many sources -----------------------------------------------------------------------------

def test_a_pack_that_learned_40000_sources_is_described_past_sqlites_variable_limit(tmp_path):
    db = open_db(tmp_path)
    db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)  # stock SQLite's; this build may allow more
    ids = list(range(1, 40_001))
    with pytest.raises(sqlite3.OperationalError, match="too many SQL variables"):
        db.execute(f"select count(*) from sources where id in ({placeholders(ids)})", ids)
    collection = db["collections"].insert({"name": "me", "created": "2026-01-01"}).last_pk
    db["sources"].insert_all(({"id": i, "collection_id": collection, "sha256": f"{i:064x}", "filename": f"{i}.txt",
                               "status": "deleted" if i % 1000 == 0 else "ready"} for i in ids), batch_size=1000)
    pack = db["packs"].insert({"name": "me", "config": json.dumps(asdict(PackConfig())), "collections": "[]",
                               "active_version": 1, "created": "2026-01-01"}).last_pk
    db["pack_versions"].insert({"pack_id": pack, "number": 1, "path": str(tmp_path / "v1"), "sources": json.dumps(ids),
                                "created": "2026-01-01"})
    described = PackStore(db, tmp_path).get("me")
    assert described["learned_sources"] == 40_000
    assert described["deleted_sources_learned"] == list(range(1000, 40_001, 1000))
