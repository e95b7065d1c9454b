"""The library view: drop files in, see what became of each, browse, read and delete sources.

Holds no logic: every action is a call to the service the CLI also calls. Text from a user's
files is only ever shown in Dataframe cells and read-only text boxes, which render it as text
(never as HTML).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from engram_app.service import Service
from engram_app.ui.errors import user_errors
from engram_app.ui.security import discard_uploads

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "assets" / "examples"
SOURCE_COLUMNS = ["id", "title", "kind", "format", "collection", "size (kB)", "chunks", "status", "error"]
RESULT_COLUMNS = ["file", "result", "details"]


def _source_rows(service: Service, query: str, status: str) -> list[list]:
    rows = service.sources(status=None if status == "all" else status, query=(query or "").strip() or None)
    return [[r["id"], r["title"] or r["filename"], r["kind"] or "", r["format"] or "", r["collection"],
             round((r["size"] or 0) / 1000, 1), r["chunks"], r["status"], r["error"] or ""] for r in rows]


def build_library_tab(service: Service):
    with gr.Row():
        with gr.Column(scale=3):
            drop = gr.File(label="Drop documents, chat exports and profiles here (many at once)",
                           file_count="multiple", type="filepath", elem_id="library-drop")
        with gr.Column(scale=1):
            kind = gr.Dropdown(["auto", "document", "chat", "profile"], value="auto", label="Read the files as",
                               info="auto: recognised from their content", elem_id="library-kind")
            collection = gr.Textbox(value="default", label="Collection", elem_id="library-collection")
            start = gr.Button("Import", variant="primary", elem_id="library-import")
            examples = gr.Button("Add the example files", elem_id="library-examples",
                                 visible=EXAMPLES.is_dir())
    results = gr.Dataframe(headers=RESULT_COLUMNS, value=[], label="What became of each file", interactive=False,
                           wrap=True, elem_id="library-results")
    with gr.Row():
        query = gr.Textbox(label="Search titles", placeholder="part of a title or file name", scale=3,
                           elem_id="library-query")
        status = gr.Dropdown(["ready", "failed", "deleted", "all"], value="ready", label="Status", scale=1)
    table = gr.Dataframe(headers=SOURCE_COLUMNS, value=[], label="Sources", interactive=False, wrap=True,
                         elem_id="library-sources")
    with gr.Row():
        source_id = gr.Number(label="Source id", precision=0, minimum=1, scale=1, elem_id="library-source-id")
        open_button = gr.Button("Open", scale=1, elem_id="library-open")
        delete_button = gr.Button("Delete", variant="stop", scale=1, elem_id="library-delete")
    content = gr.Textbox(label="Source", lines=12, max_lines=30, interactive=False, elem_id="library-content")

    def do_import(paths: list[str] | None, how: str, where: str, q: str, st: str, progress=gr.Progress()):
        if not paths:
            raise gr.Error("Drop one or more files first.")
        done: list[list] = []

        def report(count: int, result) -> None:
            progress((len(done) + 1, len(paths)), desc="Importing", unit="files")
            done.append(result)

        with user_errors():
            imported = service.ingest([Path(p) for p in paths], kind=how, collection=(where or "default").strip(),
                                      progress=report)
        discard_uploads(paths, drop.GRADIO_CACHE)  # the library keeps its own copy (uploads/)
        rows = []
        for r in imported:
            details = {
                "added": f"{r.kind}/{r.format}: {r.records} records, {r.chunks} chunks (source {r.source})",
                "duplicate": f"already in the library as source {r.source}",
                "failed": r.reason or "",
            }[r.status]
            rows.append([Path(r.path).name, r.status, details])
        return rows, _source_rows(service, q, st), None

    def do_open(sid: float | None) -> str:
        if not sid:
            raise gr.Error("Enter the id of a source (first column of the table).")
        with user_errors():
            data = service.show_source(int(sid))
        header = (f"{data['title']} [{data['kind']}/{data['format']}, {data['status']}, collection "
                  f"{data['collection']}, {data['chunks']} chunks]")
        lines = []
        for record in data["records_list"]:
            who = record["speaker"] or record["person"]
            lines.append(f"{who}: {record['text']}" if who else record["text"])
        return header + "\n\n" + "\n".join(lines)

    def do_delete(sid: float | None, q: str, st: str):
        if not sid:
            raise gr.Error("Enter the id of the source to delete.")
        with user_errors():
            data = service.delete_source(int(sid))
        gr.Info(f"Deleted source {data['id']} ({data['title']}): its text, chunks and original file are gone.")
        return _source_rows(service, q, st), ""

    def do_examples(how: str, where: str, q: str, st: str, progress=gr.Progress()):
        files = sorted(str(p) for p in EXAMPLES.iterdir() if p.suffix in (".md", ".json") and p.name != "README.md")
        return do_import(files, how, where, q, st, progress)

    refresh = lambda q, st: _source_rows(service, q, st)  # noqa: E731
    start.click(do_import, [drop, kind, collection, query, status], [results, table, drop], api_name="ingest")
    examples.click(do_examples, [kind, collection, query, status], [results, table, drop], api_visibility="private")
    query.change(refresh, [query, status], table, api_visibility="private")
    status.change(refresh, [query, status], table, api_visibility="private")
    open_button.click(do_open, source_id, content, api_name="show_source")
    delete_button.click(do_delete, [source_id, query, status], [table, content], api_name="delete_source")
    return table, query, status
