"""The memory library: store, import of every format, hostile input, delete, search, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from engram_app.cli import cli
from engram_app.inference.prompting import RETRIEVAL_MIN_SCORE
from engram_app.ingest import Library
from engram_app.ingest.chunking import chunk_records
from engram_app.ingest.library import passage_lines
from engram_app.ingest.records import Record
from engram_app.store import open_db
from engram_app.store.migrations import applied, migrate, registered
from library_fixtures import hostile_files, valid_files

SIZE_LIMIT = 1 << 20


@pytest.fixture
def library(tmp_path, tokenizer, embedder):
    home = tmp_path / "home"
    return Library(open_db(home), home, tokenizer, embedder, max_bytes=SIZE_LIMIT)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    return folder, valid_files(folder)


# --- store --------------------------------------------------------------------------------------

def test_schema_is_migrated_once_with_wal_and_foreign_keys(tmp_path):
    db = open_db(tmp_path)
    assert applied(db) == registered()
    assert migrate(db) == []  # a second start applies nothing
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert db.execute("pragma foreign_keys").fetchone()[0] == 1
    for table in ("sources", "chunks", "embeddings", "records", "collections", "packs", "pack_versions", "jobs",
                  "job_metrics", "conversations", "messages"):
        assert db[table].exists()
    with pytest.raises(sqlite3.IntegrityError):
        db["chunks"].insert({"source_id": 999, "position": 0, "text": "orphan", "token_count": 1})


# --- every format -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "notes.txt", "latin1.txt", "readme.md", "guide.rst", "page.html", "report.pdf", "letter.docx", "data.json",
    "table.csv", "conversations.json", "messages.json", "chat.jsonl", "transcript.txt", "me.json", "me.yaml",
    "about-me.md", "personas.csv"])
def test_round_trip(name, files, library):
    folder, expected = files
    info = expected[name]
    [result] = library.ingest([folder / name])
    assert result.status == "added", result.reason
    assert (result.kind, result.format) == (info["kind"], info["format"])
    shown = library.show(result.source)
    text = "\n".join(r["text"] for r in shown["records_list"])
    assert info["contains"] in text
    if "absent" in info:
        assert info["absent"] not in text
    if "title" in info:
        assert shown["title"] == info["title"]
    if "person" in info:
        assert {r["person"] for r in shown["records_list"]} == {info["person"]}
        assert all(r["kind"] == "fact" for r in shown["records_list"])
    if "speakers" in info:
        assert {r["speaker"] for r in shown["records_list"] if r["kind"] == "turn"} == info["speakers"]
    # The original is kept byte for byte; the chunks and embeddings exist and search finds them.
    assert (library.uploads / shown["sha256"]).read_bytes() == (folder / name).read_bytes()
    assert shown["chunks"] == len(shown["chunks_list"]) > 0
    assert library.search(info["contains"], k=1)[0]["source"] == result.source


def test_chatgpt_export_keeps_the_active_branch_and_turn_order(files, library):
    folder, _ = files
    [result] = library.ingest([folder / "conversations.json"])
    records = library.show(result.source)["records_list"]
    turns = [(r["conversation"], r["speaker"], r["text"]) for r in records]
    assert turns == [
        (0, "user", "I want to visit Lisbon in May with my dog Pixel."),
        (0, "assistant", "Lisbon in May is lovely; many cafes welcome dogs."),
        (0, "user", "Which neighbourhood should we stay in?"),
        (0, "assistant", "Try Alfama: hilly, quiet, close to the river."),
        (1, "user", "My favourite dish is bacalhau."),
        (1, "assistant", "A classic! Try it with chickpeas."),
    ]


def test_persona_csv_gives_facts_per_person_and_conversations(files, library):
    folder, _ = files
    [result] = library.ingest([folder / "personas.csv"])
    records = library.show(result.source)["records_list"]
    facts = [(r["person"], r["text"]) for r in records if r["kind"] == "fact"]
    assert ("User 1 of conversation 1", "I have a turtle named Timothy.") in facts
    assert ("User 2 of conversation 2", "I have two cats.") in facts
    assert {r["conversation"] for r in records if r["kind"] == "turn"} == {0, 1}


# --- duplicates, kinds, collections ---------------------------------------------------------------

def test_same_bytes_twice_is_a_duplicate(files, library, tmp_path):
    folder, _ = files
    first = library.ingest([folder / "notes.txt"])[0]
    copy = tmp_path / "renamed.txt"
    copy.write_bytes((folder / "notes.txt").read_bytes())
    second = library.ingest([copy])[0]
    assert (second.status, second.source) == ("duplicate", first.source)
    assert library.ingest([copy], collection="work")[0].status == "added"
    assert {c["name"]: c["sources"] for c in library.collections()} == {"default": 1, "work": 1}
    assert [s["collection"] for s in library.sources(collection="work")] == ["work"]


def test_a_file_of_one_first_person_statement_is_a_profile_and_one_other_line_a_document(library, tmp_path):
    """A profile of one fact is still a profile (its fact is trained and asked as a fact); one line
    that is not about the writer stays a document, as "Remember this" reads typed text."""
    one_fact = tmp_path / "about-me.md"
    one_fact.write_text("# About me\n- I have a turtle named Timothy.\n")
    [result] = library.ingest([one_fact])
    assert (result.kind, result.format) == ("profile", "statements")
    assert [r["text"] for r in library.show(result.source)["records_list"]] == ["I have a turtle named Timothy."]
    note = tmp_path / "note.md"
    note.write_text("# Shed\n- The spare key hangs on a hook behind the door.\n")
    assert library.ingest([note])[0].kind == "document"


def test_kind_override(files, library):
    folder, _ = files
    forced = library.ingest([folder / "transcript.txt"], kind="document")[0]
    assert (forced.status, forced.kind) == ("added", "document")
    as_chat = library.ingest([folder / "table.csv"], kind="chat")[0]
    assert as_chat.status == "failed" and "Speaker: text" in as_chat.reason
    pdf_as_profile = library.ingest([folder / "report.pdf"], kind="profile")[0]
    assert pdf_as_profile.status == "failed" and "only be imported as a document" in pdf_as_profile.reason
    statements = library.ingest([folder / "notes.txt"], kind="profile")[0]
    assert statements.kind == "profile"


# --- hostile input --------------------------------------------------------------------------------

def test_hostile_corpus_fails_file_by_file_and_valid_files_still_import(files, library, tmp_path):
    valid_folder, expected = files
    bad_folder = tmp_path / "bad"
    bad = hostile_files(bad_folder, SIZE_LIMIT)
    assert len(bad) >= 30
    results = library.ingest([bad_folder, valid_folder, tmp_path / "does-not-exist.txt"])
    by_name = {Path(r.path).name: r for r in results}
    for name in bad + ["does-not-exist.txt"]:
        assert by_name[name].status == "failed", f"{name} was {by_name[name].status}"
        assert by_name[name].reason and len(by_name[name].reason) > 10
    for name in expected:
        assert by_name[name].status == "added", f"{name}: {by_name[name].reason}"
    assert library.db.execute("pragma integrity_check").fetchone()[0] == "ok"
    failed = library.sources(status="failed")
    assert len(failed) == len(bad) + 1 and all(s["error"] for s in failed)
    # Nothing of a failed file was stored.
    assert library.db.execute(
        "select count(*) from chunks where source_id in (select id from sources where status = 'failed')").fetchone()[0] == 0


def test_a_parser_crash_costs_only_its_file(files, library, monkeypatch):
    import engram_app.ingest.documents as documents

    def boom(*args, **kwargs):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(documents, "html", boom)
    folder, _ = files
    results = library.ingest([folder / "page.html", folder / "notes.txt"])
    assert [r.status for r in results] == ["failed", "added"]
    assert "parser bug" in results[0].reason


# --- chunking ---------------------------------------------------------------------------------------

def test_documents_chunk_with_overlap_and_chats_at_turn_boundaries(tokenizer):
    text = " ".join(f"word{i}" for i in range(600))
    chunks = chunk_records([Record("text", text)], tokenizer, size=64, overlap=8)
    assert len(chunks) > 5 and all(c.token_count <= 64 for c in chunks)
    assert chunks[0].text.split()[-1] in chunks[1].text  # the overlap repeats the end of the previous chunk
    turns = [Record("turn", f"message number {i}, with some more words about it.", speaker="user" if i % 2 else "assistant",
                    conversation=i // 10) for i in range(30)]
    chunks = chunk_records(turns, tokenizer, size=64, overlap=8)
    for c in chunks:
        assert c.token_count <= 64
        assert turns[c.first_record].conversation == turns[c.last_record].conversation
        assert c.text.count("message number") == c.last_record - c.first_record + 1  # whole turns only


# --- delete -------------------------------------------------------------------------------------

def test_delete_forgets_the_content_but_remembers_the_source(files, library):
    folder, _ = files
    [result] = library.ingest([folder / "me.json"])
    sha = library.source(result.source)["sha256"]
    deleted = library.delete(result.source)
    assert deleted["status"] == "deleted" and deleted["deleted"]
    for table in ("records", "chunks"):
        assert library.db.execute(f"select count(*) from {table} where source_id = ?", [result.source]).fetchone()[0] == 0
    assert library.db.execute("select count(*) from embeddings").fetchone()[0] == 0
    assert not (library.uploads / sha).exists()
    assert library.search("Lisbon nurse") == []
    assert library.ingest([folder / "me.json"])[0].status == "added"  # can be imported again


def test_a_failure_while_writing_a_source_writes_none_of_it(files, library, monkeypatch):
    folder, _ = files
    real_insert_all = library.db["embeddings"].insert_all.__func__

    def failing_insert_all(self, *args, **kwargs):
        if self.name == "embeddings":
            raise OSError("disk full")
        return real_insert_all(self, *args, **kwargs)

    monkeypatch.setattr(type(library.db["embeddings"]), "insert_all", failing_insert_all)
    with pytest.raises(OSError):
        library._write(folder / "transcript.txt", "0" * 64, 10, library.collection_id("default"),
                       *_parsed_chunks_vectors(library, folder / "transcript.txt"))
    for table in ("sources", "records", "chunks", "embeddings"):
        assert library.db.execute(f"select count(*) from {table}").fetchone()[0] == 0, table


def _parsed_chunks_vectors(library, path):
    from engram_app.ingest.chunking import chunk_records
    from engram_app.ingest.detect import parse_bytes
    parsed = parse_bytes(path.read_bytes(), path.name)
    chunks = chunk_records(parsed.records, library.tokenizer)
    return parsed, chunks, library.embedder.encode([c.text for c in chunks])


def test_write_transactions_of_two_processes_wait_for_each_other(tmp_path):
    import threading

    first, second = open_db(tmp_path), open_db(tmp_path)
    first["counter"].insert({"id": 1, "n": 0}, pk="id")
    holding = threading.Event()

    def writer():
        with first.atomic():
            first.execute("update counter set n = n + 1 where id = 1")
            holding.set()
            time.sleep(1.0)

    thread = threading.Thread(target=writer)
    thread.start()
    holding.wait()
    # Read, then write, in one transaction, while the other connection holds the write lock: a
    # deferred BEGIN would fail at once ("database is locked"); BEGIN IMMEDIATE waits its turn.
    with second.atomic():
        n = second.execute("select n from counter where id = 1").fetchone()[0]
        second.execute("update counter set n = ? where id = 1", [n + 1])
    thread.join()
    assert second.execute("select n from counter").fetchone()[0] == 2


# --- a kill in the middle of an import ------------------------------------------------------------

def test_a_killed_import_leaves_no_partial_source(tmp_path, tiny_model_dir):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        (folder / f"note{i:03}.txt").write_text(f"Note {i}. " + "The quick brown fox jumps over the lazy dog. " * 200)
    home = tmp_path / "home"
    log = tmp_path / "ingest.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engram_app", "ingest", str(folder), "--home", str(home), "--model", str(tiny_model_dir)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 300
    count = 0
    while time.time() < deadline and count < 3 and proc.poll() is None:
        time.sleep(0.2)
        if not (home / "engram.db").exists():
            continue  # never create the database from here: the importer does
        try:
            con = sqlite3.connect(f"file:{home / 'engram.db'}?mode=ro", uri=True, timeout=5)
            count = con.execute("select count(*) from sources where status = 'ready'").fetchone()[0]
            con.close()
        except sqlite3.Error:
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= count < 400, f"the import was not interrupted in the middle ({count} sources):\n{log.read_text()[-2000:]}"
    db = open_db(home)
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    for source in db["sources"].rows:
        assert source["status"] == "ready", f"{source}\n{log.read_text()[-2000:]}"
        sid = source["id"]
        assert db.execute("select count(*) from records where source_id = ?", [sid]).fetchone()[0] == source["records"]
        assert db.execute("select count(*) from chunks where source_id = ?", [sid]).fetchone()[0] == source["chunks"]
        assert db.execute("select count(*) from embeddings e join chunks c on c.id = e.chunk_id where c.source_id = ?",
                          [sid]).fetchone()[0] == source["chunks"]
    assert db.execute("select count(*) from chunks where source_id not in (select id from sources)").fetchone()[0] == 0


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_ingest_sources_show_search_delete(files, tmp_path, tiny_model_dir):
    folder, _ = files
    common = ["--home", str(tmp_path / "home"), "--model", str(tiny_model_dir)]
    runner = CliRunner()
    bad = tmp_path / "empty.txt"
    bad.write_bytes(b"")
    out = runner.invoke(cli, ["ingest", *common, "--json", str(folder / "me.json"), str(folder / "transcript.txt"), str(bad)])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert [r["status"] for r in report["results"]] == ["added", "added", "failed"]
    assert (report["added"], report["duplicate"], report["failed"]) == (2, 0, 1)
    assert set(report["results"][0]) >= {"path", "status", "reason", "source", "kind", "format"}

    out = runner.invoke(cli, ["sources", *common, "--json"])
    listed = json.loads(out.stdout)
    assert [s["title"] for s in listed] == ["Profile: Maria Silva", "Chat: I just adopted a parrot."]

    out = runner.invoke(cli, ["show", *common, str(listed[1]["id"])])
    assert "User 1: Kiwi. She talks a lot." in out.stdout

    out = runner.invoke(cli, ["search", *common, "--json", "parrot named Kiwi"])
    assert json.loads(out.stdout)[0]["source"] == listed[1]["id"]

    out = runner.invoke(cli, ["delete", *common, str(listed[0]["id"])])
    assert out.exit_code == 0 and "Deleted" in out.stdout
    assert len(json.loads(runner.invoke(cli, ["sources", *common, "--json"]).stdout)) == 1

    out = runner.invoke(cli, ["show", *common, "999"])
    assert out.exit_code == 1 and "no source 999" in out.output and "Traceback" not in out.output


def test_thousands_of_files_in_one_call(library, tmp_path):
    folder = tmp_path / "many"
    for i in range(1500):
        sub = folder / f"part{i // 500}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04}.txt").write_bytes(b"" if i % 3 == 0 else f"Entry {i}: the heron came back today.".encode())
    (folder / ".hidden.txt").write_text("skipped: hidden files are not imported")
    results = library.ingest([folder])
    assert len(results) == 1500
    assert sum(r.status == "failed" for r in results) == 500
    assert sum(r.status == "added" for r in results) == 1000
    assert library.db.execute("pragma integrity_check").fetchone()[0] == "ok"


# --- the lines chat's retrieval puts in the prompt ----------------------------------------------

def test_passage_lines_are_sentences_without_markdown_marks_and_never_fragments():
    text = ("# About me\n- My dog is called Pixel.\n* I live in Porto. I work as a glassblower!\n"
            "2. My sister is called Amelia\n> A quoted line of mine.\nok then\n")
    assert passage_lines(text) == ["My dog is called Pixel.", "I live in Porto.", "I work as a glassblower!",
                                   "My sister is called Amelia", "A quoted line of mine."]


def test_search_lines_ranks_the_lines_of_the_nearest_passages_one_by_one(tmp_path, library):
    profile = tmp_path / "me.md"
    profile.write_text("# About me\n- My dog is called Pixel.\n- I live in Porto.\n- I work as a glassblower.\n"
                       "- My favourite colour is teal.\n")
    notes = tmp_path / "garden.md"
    notes.write_text("Garden notes\n\nThe tomatoes need water every morning. The basil grows best in the sun.\n")
    library.ingest([profile, notes])
    [job] = library.search_lines("What's my occupation?", k=1)
    assert job["text"] == "I work as a glassblower." and job["title"].startswith("Profile")
    lines = library.search_lines("Which plant likes the sun?", k=2)
    assert lines[0]["text"] == "The basil grows best in the sun." and lines[0]["score"] >= lines[1]["score"]
    found = [line["text"] for line in library.search_lines("me", k=20)]
    assert len(found) == len(set(found)) == 6  # every line once; the headings are no lines
    # Chat's threshold: a question about the user keeps its line, a general one gets none.
    [job] = library.search_lines("What's my occupation?", k=3, min_score=RETRIEVAL_MIN_SCORE)
    assert job["text"] == "I work as a glassblower." and job["score"] >= RETRIEVAL_MIN_SCORE
    assert library.search_lines("Who painted the Mona Lisa?", k=3, min_score=RETRIEVAL_MIN_SCORE) == []
    assert len(library.search_lines("Who painted the Mona Lisa?", k=3)) == 3  # no threshold: the k nearest


def test_a_passage_of_short_lines_only_is_retrieved_whole_rather_than_not_at_all(tmp_path, library):
    pets = tmp_path / "pets.txt"
    pets.write_text("Dog: Rex\nCat: Tom\n")
    library.ingest([pets])
    [hit] = library.search_lines("What is my dog called?", k=1)
    assert hit["text"] == "Dog: Rex Cat: Tom"
