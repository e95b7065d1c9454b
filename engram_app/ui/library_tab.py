"""The library view: drop files in, see what became of each, search them by meaning, browse, read
and delete sources; and the conversations kept from chat, to rename, delete and export.

Holds no logic: every action is a call to the service the CLI also calls. Text from a user's
files and chats is only ever shown in Dataframe cells and read-only text boxes, which render it as
text (never as HTML).
"""

from __future__ import annotations

import html
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from engram_app.ingest import KINDS, ImportResult
from engram_app.service import Service
from engram_app.ui.errors import user_errors
from engram_app.ui.security import discard_uploads

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "assets" / "examples"
SOURCE_COLUMNS = ["id", "title", "kind", "format", "collection", "size (kB)", "chunks", "status", "error"]
RESULT_COLUMNS = ["file", "result", "details"]
STATUS_FILTERS = ["ready", "failed", "deleted", "all"]  # as the CLI's `sources --status`
SEARCH_COLUMNS = ["source", "title", "score", "passage"]  # the source id first, as in the sources table
CONVERSATION_COLUMNS = ["id", "title", "pack", "messages", "started"]
EXPORT_SUFFIXES = {"json": ".json", "markdown": ".md"}  # the formats of `ConversationStore.export`


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
    search_query: gr.Textbox  # search by meaning (the CLI's `search`)
    search_k: gr.Number
    search_collection: gr.Textbox
    search_button: gr.Button
    search_results: gr.Dataframe
    conversations: gr.Dataframe  # the conversations kept from chat
    conversation_id: gr.Number
    conversation_title: gr.Textbox
    rename_button: gr.Button
    delete_conversation_button: gr.Button
    export_json_button: gr.Button
    export_markdown_button: gr.Button
    conversation_file: gr.File
    conversation_text: gr.Textbox


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
    rows = [[Path(r.path).name, r.status, import_details(r)] for r in imported]
    return {tab.results: rows, tab.sources: source_rows(service, query, status), tab.drop: None}


def import_details(result: ImportResult) -> str:
    """The "details" cell of one imported file: what it became (or why it failed), then each warning
    (what its reading left out or guessed: JSON read as plain text, media skipped, ambiguous dates)."""
    details = {
        "added": f"{result.kind}/{result.format}: {result.records} records, {result.chunks} chunks "
                 f"(source {result.source})",
        "duplicate": f"already in the library as source {result.source}",
        "failed": result.reason or "",
    }[result.status]
    return "".join([details, *(f". Warning: {warning}" for warning in result.warnings)])


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


def selected_id(event: gr.SelectData) -> int:
    """The id in the first column of the table row ``event`` selected (sources, passages, conversations)."""
    if not event.row_value or event.row_value[0] in (None, ""):
        raise gr.Error("Select a row of the table.")
    return int(float(event.row_value[0]))


def open_selected_source(service: Service, tab: LibraryTab, event: gr.SelectData) -> dict:
    """A row of the sources table or of the search results selected: that source opened, its id in the
    id box (so Delete acts on it)."""
    source_id = selected_id(event)
    return {tab.source_id: source_id, tab.content: open_source(service, source_id)}


def delete_source(service: Service, tab: LibraryTab, source_id: float | None, query: str, status: str) -> dict:
    """Delete a source, then show the table without it and empty the text box."""
    if not source_id:
        raise gr.Error("Enter the id of the source to delete.")
    with user_errors():
        data = service.delete_source(int(source_id))
    gr.Info(f"Deleted source {data['id']} ({html.escape(data['title'] or '')}): its text, chunks and original file "
            "are gone.")  # a pop-up renders HTML: a title from a file is escaped
    return {tab.sources: source_rows(service, query, status), tab.content: ""}


def search_library(service: Service, query: str, k: float | None, collection: str) -> list[list]:
    """Search by meaning (the CLI's `search`): the passages closest to ``query``, best first, with their
    source's id and title and the cosine similarity (in ``collection``, or all when empty)."""
    with user_errors():
        hits = service.search(query or "", k=max(1, int(k or 5)), collection=(collection or "").strip() or None)
    if not hits:
        gr.Info("No passage found: the library (or that collection) has no ready source yet.")
    return [[h["source"], h["title"] or "", round(h["score"], 3), h["text"]] for h in hits]


# --- conversations kept from chat ------------------------------------------------------------

def conversation_rows(service: Service) -> list[list]:
    """The conversations table, newest first (what the Chat tab's list reopens)."""
    return [[c["id"], c["title"], c["pack"] or "", c["messages"], c["created"]]
            for c in service.conversations(limit=500)]


def conversation_transcript(service: Service, conversation: int) -> str:
    """A conversation's turns in order, one "Speaker: text" paragraph each, for the read-only text box."""
    turns = service.conversation(conversation)
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def select_conversation(service: Service, tab: LibraryTab, event: gr.SelectData) -> dict:
    """A row of the conversations table selected: its id and title ready to rename, its turns shown."""
    conversation = selected_id(event)
    with user_errors():
        info = service.conversation_info(conversation)
        transcript = conversation_transcript(service, conversation)
    return {tab.conversation_id: conversation, tab.conversation_title: info["title"],
            tab.conversation_text: transcript, tab.conversation_file: None}


def chosen_conversation(conversation_id: float | None) -> int:
    if not conversation_id:
        raise gr.Error("Select a conversation in the table first.")
    return int(conversation_id)


def rename_conversation(service: Service, tab: LibraryTab, conversation_id: float | None, title: str) -> dict:
    """The "Rename" button: the selected conversation takes the typed title (here and in the Chat tab's list)."""
    conversation = chosen_conversation(conversation_id)
    with user_errors():
        info = service.rename_conversation(conversation, title)
    gr.Info(f"Conversation {conversation} is now called {html.escape(repr(info['title']))}.")  # pop-ups render HTML
    return {tab.conversations: conversation_rows(service), tab.conversation_title: info["title"]}


def delete_conversation(service: Service, tab: LibraryTab, conversation_id: float | None) -> dict:
    """The "Delete" button of conversations: the selected one, its messages and their traces are removed."""
    conversation = chosen_conversation(conversation_id)
    with user_errors():
        info = service.delete_conversation(conversation)
    gr.Info(f"Deleted conversation {conversation} ({html.escape(info['title'])}) and its {info['messages']} "
            "messages.")
    return {tab.conversations: conversation_rows(service), tab.conversation_id: None, tab.conversation_title: "",
            tab.conversation_text: "", tab.conversation_file: None}


def export_conversation(service: Service, tab: LibraryTab, format: str, conversation_id: float | None) -> str:
    """The export buttons: the selected conversation as a JSON or Markdown file, for the download box."""
    conversation = chosen_conversation(conversation_id)
    with user_errors():
        text = service.export_conversation(conversation, format)
    return str(download_file(tab.conversation_file.GRADIO_CACHE, f"conversation-{conversation}"
                                                                  f"{EXPORT_SUFFIXES[format]}", text))


def download_file(cache: str | Path, name: str, text: str) -> Path:
    """Write ``text`` as ``name`` in a new folder of Gradio's cache (``<home>/cache/``), for a download.

    Gradio serves a file already in its cache as it is and its cleanup removes it (an hour later, or
    when the app stops); earlier conversation exports are removed now (the box shows the newest)."""
    exports = Path(cache) / "conversation-exports"
    shutil.rmtree(exports, ignore_errors=True)
    exports.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=exports)) / name
    path.write_text(text, encoding="utf-8")
    return path


def build_library_tab(service: Service) -> LibraryTab:
    """Lay out the Library tab and connect its events (called inside the tab's ``gr.Tab``)."""
    tab = _layout()
    imported = [tab.results, tab.sources, tab.drop]
    inputs = [tab.kind, tab.collection, tab.query, tab.status]
    tab.import_button.click(partial(import_files, service, tab), [tab.drop, *inputs], imported, api_name="ingest")
    tab.examples.click(partial(import_examples, service, tab), inputs, imported, api_visibility="private")
    tab.remember_button.click(partial(remember_text, service, tab),
                              [tab.remember_text, tab.collection, tab.remember_train, tab.query, tab.status],
                              [tab.results, tab.sources, tab.remember_text], api_name="remember")
    tab.query.change(partial(source_rows, service), [tab.query, tab.status], tab.sources, api_visibility="private")
    tab.status.change(partial(source_rows, service), [tab.query, tab.status], tab.sources, api_visibility="private")
    tab.open_button.click(partial(open_source, service), tab.source_id, tab.content, api_name="show_source")
    tab.delete_button.click(partial(delete_source, service, tab), [tab.source_id, tab.query, tab.status],
                            [tab.sources, tab.content], api_name="delete_source")
    search = [tab.search_query, tab.search_k, tab.search_collection]
    tab.search_button.click(partial(search_library, service), search, tab.search_results, api_name="search")
    tab.search_query.submit(partial(search_library, service), search, tab.search_results, api_visibility="private")

    # Defs, not functools.partial: Gradio finds the SelectData parameter by its annotation, which a partial hides.
    def on_source_selected(event: gr.SelectData):
        return open_selected_source(service, tab, event)

    def on_conversation_selected(event: gr.SelectData):
        return select_conversation(service, tab, event)

    opened = [tab.source_id, tab.content]
    tab.sources.select(on_source_selected, None, opened, api_visibility="private")
    tab.search_results.select(on_source_selected, None, opened, api_visibility="private")
    chosen = [tab.conversation_id, tab.conversation_title, tab.conversation_text, tab.conversation_file]
    tab.conversations.select(on_conversation_selected, None, chosen, api_visibility="private")
    tab.rename_button.click(partial(rename_conversation, service, tab), [tab.conversation_id, tab.conversation_title],
                            [tab.conversations, tab.conversation_title], api_name="rename_conversation")
    tab.delete_conversation_button.click(partial(delete_conversation, service, tab), tab.conversation_id,
                                         [tab.conversations, *chosen], api_name="delete_conversation")
    tab.export_json_button.click(partial(export_conversation, service, tab, "json"), tab.conversation_id,
                                 tab.conversation_file, api_name="export_conversation")
    tab.export_markdown_button.click(partial(export_conversation, service, tab, "markdown"), tab.conversation_id,
                                     tab.conversation_file, api_name="export_conversation_markdown")
    return tab


def _layout() -> LibraryTab:
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
    with gr.Accordion("Search by meaning", open=True, elem_id="library-search-box"):
        with gr.Row():
            search_query = gr.Textbox(label="Find the passages closest in meaning to",
                                      placeholder="what is my dog called", scale=4, elem_id="library-search")
            search_k = gr.Number(value=5, precision=0, minimum=1, maximum=50, label="Passages", scale=1,
                                 elem_id="library-search-k")
            search_collection = gr.Textbox(label="In collection", placeholder="all collections", scale=1,
                                           elem_id="library-search-collection")
            search_button = gr.Button("Search", scale=1, elem_id="library-search-run")
        search_results = gr.Dataframe(headers=SEARCH_COLUMNS, value=[], interactive=False, wrap=True,
                                      label="Passages, best first (select one to open its source)",
                                      elem_id="library-search-results")
    with gr.Row():
        query = gr.Textbox(label="Search titles", placeholder="part of a title or file name", scale=3,
                           elem_id="library-query")
        status = gr.Dropdown(STATUS_FILTERS, value="ready", label="Status", scale=1)
    sources = gr.Dataframe(headers=SOURCE_COLUMNS, value=[], label="Sources (select one to open it)",
                           interactive=False, wrap=True, elem_id="library-sources")
    with gr.Row():
        source_id = gr.Number(label="Source id", precision=0, minimum=1, scale=1, elem_id="library-source-id")
        open_button = gr.Button("Open", scale=1, elem_id="library-open")
        delete_button = gr.Button("Delete", variant="stop", scale=1, elem_id="library-delete")
    content = gr.Textbox(label="Source", lines=12, max_lines=30, interactive=False, elem_id="library-content")
    with gr.Accordion("Conversations with the model", open=True, elem_id="library-conversations-box"):
        conversations = gr.Dataframe(headers=CONVERSATION_COLUMNS, value=[], interactive=False, wrap=True,
                                     label="Kept from the Chat tab, newest first (select one)",
                                     elem_id="library-conversations")
        with gr.Row():
            conversation_id = gr.Number(label="Conversation id", precision=0, minimum=1, scale=1,
                                        elem_id="library-conversation-id")
            conversation_title = gr.Textbox(label="Title", scale=3, elem_id="library-conversation-title")
            rename_button = gr.Button("Rename", scale=1, elem_id="library-conversation-rename")
            delete_conversation_button = gr.Button("Delete", variant="stop", scale=1,
                                                   elem_id="library-conversation-delete")
        with gr.Row():
            export_json_button = gr.Button("Export as JSON", elem_id="library-conversation-json")
            export_markdown_button = gr.Button("Export as Markdown", elem_id="library-conversation-markdown")
            conversation_file = gr.File(label="Exported conversation", interactive=False, scale=2,
                                        elem_id="library-conversation-file")
        conversation_text = gr.Textbox(label="Conversation", lines=8, max_lines=30, interactive=False,
                                       elem_id="library-conversation-text")
    return LibraryTab(drop, kind, collection, import_button, examples, results, query, status, sources, source_id,
                      open_button, delete_button, content, remember_box, remember_button, remember_train,
                      search_query, search_k, search_collection, search_button, search_results, conversations,
                      conversation_id, conversation_title, rename_button, delete_conversation_button,
                      export_json_button, export_markdown_button, conversation_file, conversation_text)
