"""The library view: drop files in, see what became of each, browse, read and delete sources.

Holds no logic: every action is a call to the service the CLI also calls. Text from a user's
files is only ever shown in Dataframe cells and read-only text boxes, which render it as text
(never as HTML).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from engram_app.ingest import KINDS
from engram_app.service import Service
from engram_app.ui.errors import user_errors
from engram_app.ui.security import discard_uploads

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "assets" / "examples"
SOURCE_COLUMNS = ["id", "title", "kind", "format", "collection", "size (kB)", "chunks", "status", "error"]
RESULT_COLUMNS = ["file", "result", "details"]
STATUS_FILTERS = ["ready", "failed", "deleted", "all"]  # as the CLI's `sources --status`


@dataclass
class LibraryTab:
    """The Library tab's components, by name: its handlers write them, the app refreshes ``sources``."""

    drop: gr.File
    kind: gr.Dropdown
    collection: gr.Textbox
    import_button: gr.Button
    examples: gr.Button
    results: gr.Dataframe
    query: gr.Textbox
    status: gr.Dropdown
    sources: gr.Dataframe
    source_id: gr.Number
    open_button: gr.Button
    delete_button: gr.Button
    content: gr.Textbox
    remember_text: gr.Textbox
    remember_button: gr.Button
    remember_train: gr.Checkbox


def source_rows(service: Service, query: str, status: str) -> list[list]:
    """The sources table: those whose title or file name contains ``query``, with ``status`` ("all": any)."""
    rows = service.sources(status=None if status == "all" else status, query=(query or "").strip() or None)
    return [[r["id"], r["title"] or r["filename"], r["kind"] or "", r["format"] or "", r["collection"],
             round((r["size"] or 0) / 1000, 1), r["chunks"], r["status"], r["error"] or ""] for r in rows]


def import_files(service: Service, tab: LibraryTab, paths: list[str] | None, kind: str, collection: str, query: str,
                 status: str, progress=gr.Progress()) -> dict:
    """Import the dropped files: what became of each, the refreshed sources, and the drop box emptied."""
    if not paths:
        raise gr.Error("Drop one or more files first.")
    done: list = []

    def report(count: int, result) -> None:
        progress((len(done) + 1, len(paths)), desc="Importing", unit="files")
        done.append(result)

    with user_errors():
        imported = service.ingest([Path(p) for p in paths], kind=kind, collection=(collection or "default").strip(),
                                  progress=report)
    discard_uploads(paths, tab.drop.GRADIO_CACHE)  # the library keeps its own copy (uploads/)
    rows = []
    for r in imported:
        details = {
            "added": f"{r.kind}/{r.format}: {r.records} records, {r.chunks} chunks (source {r.source})",
            "duplicate": f"already in the library as source {r.source}",
            "failed": r.reason or "",
        }[r.status]
        rows.append([Path(r.path).name, r.status, details])
    return {tab.results: rows, tab.sources: source_rows(service, query, status), tab.drop: None}


def import_examples(service: Service, tab: LibraryTab, kind: str, collection: str, query: str, status: str,
                    progress=gr.Progress()) -> dict:
    """The "Add the example files" button: import the samples in assets/examples/ as if dropped."""
    files = sorted(str(p) for p in EXAMPLES.iterdir() if p.suffix in (".md", ".json") and p.name != "README.md")
    return import_files(service, tab, files, kind, collection, query, status, progress)


def remember_text(service: Service, tab: LibraryTab, text: str, collection: str, then_train: bool, query: str,
                  status: str) -> dict:
    """The "Remember this" button: the typed fact or note as a source (statements become facts), and with
    "then train" a job for every pack that learns from the collection; shown in the results area."""
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a fact or a note to remember first.")
    collection = (collection or "default").strip()
    with user_errors():
        result = service.remember(text, collection)
        jobs = service.train_collection(collection) if then_train and result.status == "added" else []
    if result.status == "added":
        rows = [["typed text", "added", f"{result.kind}: {result.records} records (source {result.source})"]]
    else:
        rows = [["typed text", "duplicate", f"already in the library as source {result.source}"]]
    rows += [["training", "queued", f"job {job['id']} for pack {job['pack']} (Memory & training tab)"]
             for job in jobs]
    if then_train and result.status == "added" and not jobs:
        rows.append(["training", "not queued", f"no pack learns from collection {collection}: create one first"])
    return {tab.results: rows, tab.sources: source_rows(service, query, status),
            tab.remember_text: "" if result.status == "added" else text}


def open_source(service: Service, source_id: float | None) -> str:
    """One source's details and text, for the read-only text box."""
    if not source_id:
        raise gr.Error("Enter the id of a source (first column of the table).")
    with user_errors():
        data = service.show_source(int(source_id))
    header = (f"{data['title']} [{data['kind']}/{data['format']}, {data['status']}, collection "
              f"{data['collection']}, {data['chunks']} chunks]")
    lines = []
    for record in data["records_list"]:
        who = record["speaker"] or record["person"]
        lines.append(f"{who}: {record['text']}" if who else record["text"])
    return header + "\n\n" + "\n".join(lines)


def delete_source(service: Service, tab: LibraryTab, source_id: float | None, query: str, status: str) -> dict:
    """Delete a source, then show the table without it and empty the text box."""
    if not source_id:
        raise gr.Error("Enter the id of the source to delete.")
    with user_errors():
        data = service.delete_source(int(source_id))
    gr.Info(f"Deleted source {data['id']} ({data['title']}): its text, chunks and original file are gone.")
    return {tab.sources: source_rows(service, query, status), tab.content: ""}


def build_library_tab(service: Service) -> LibraryTab:
    """Lay out the Library tab and connect its events (called inside the tab's ``gr.Tab``)."""
    with gr.Row():
        with gr.Column(scale=3):
            drop = gr.File(label="Drop documents, chat exports and profiles here (many at once)",
                           file_count="multiple", type="filepath", elem_id="library-drop")
        with gr.Column(scale=1):
            kind = gr.Dropdown(["auto", *KINDS], value="auto", label="Read the files as",
                               info="auto: recognised from their content", elem_id="library-kind")
            collection = gr.Textbox(value="default", label="Collection", elem_id="library-collection")
            import_button = gr.Button("Import", variant="primary", elem_id="library-import")
            examples = gr.Button("Add the example files", elem_id="library-examples", visible=EXAMPLES.is_dir())
    with gr.Row():
        remember_box = gr.Textbox(label="Remember this", placeholder="A fact (My dog is called Pixel.) or a note",
                                  lines=2, max_lines=6, scale=4, elem_id="library-remember-text")
        with gr.Column(scale=1):
            remember_train = gr.Checkbox(value=False, label="then train",
                                         info="queue a job for the packs that learn this collection",
                                         elem_id="library-remember-train")
            remember_button = gr.Button("Remember this", elem_id="library-remember")
    results = gr.Dataframe(headers=RESULT_COLUMNS, value=[], label="What became of each file", interactive=False,
                           wrap=True, elem_id="library-results")
    with gr.Row():
        query = gr.Textbox(label="Search titles", placeholder="part of a title or file name", scale=3,
                           elem_id="library-query")
        status = gr.Dropdown(STATUS_FILTERS, value="ready", label="Status", scale=1)
    sources = gr.Dataframe(headers=SOURCE_COLUMNS, value=[], label="Sources", interactive=False, wrap=True,
                           elem_id="library-sources")
    with gr.Row():
        source_id = gr.Number(label="Source id", precision=0, minimum=1, scale=1, elem_id="library-source-id")
        open_button = gr.Button("Open", scale=1, elem_id="library-open")
        delete_button = gr.Button("Delete", variant="stop", scale=1, elem_id="library-delete")
    content = gr.Textbox(label="Source", lines=12, max_lines=30, interactive=False, elem_id="library-content")
    tab = LibraryTab(drop, kind, collection, import_button, examples, results, query, status, sources, source_id,
                     open_button, delete_button, content, remember_box, remember_button, remember_train)

    imported = [tab.results, tab.sources, tab.drop]
    tab.import_button.click(partial(import_files, service, tab), [drop, kind, collection, query, status], imported,
                            api_name="ingest")
    tab.examples.click(partial(import_examples, service, tab), [kind, collection, query, status], imported,
                       api_visibility="private")
    tab.remember_button.click(partial(remember_text, service, tab),
                              [remember_box, collection, remember_train, query, status],
                              [tab.results, tab.sources, tab.remember_text], api_name="remember")
    query.change(partial(source_rows, service), [query, status], sources, api_visibility="private")
    status.change(partial(source_rows, service), [query, status], sources, api_visibility="private")
    tab.open_button.click(partial(open_source, service), source_id, content, api_name="show_source")
    tab.delete_button.click(partial(delete_source, service, tab), [source_id, query, status], [sources, content],
                            api_name="delete_source")
    return tab
