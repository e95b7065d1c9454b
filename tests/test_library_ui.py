"""The Library tab's handlers on a tiny model: search by meaning, a source opened by selecting its row
(in the sources table or the search results), import warnings in the results, and the conversations
kept from chat renamed, deleted (with their messages and traces) and exported as JSON and Markdown,
from the tab, the service and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.ui.chat_tab import conversation_choices
from engram_app.ui.library_tab import (
    build_library_tab,
    conversation_rows,
    delete_conversation,
    delete_source,
    export_conversation,
    import_files,
    open_selected_source,
    rename_conversation,
    search_library,
    select_conversation,
    source_rows,
)
from test_training import stop_worker

SHORT = GenerationOptions(max_new_tokens=6)
NOTES = {
    "dog": "My dog is called Pixel.",
    "garden": "The basil on the balcony grows best in full sun and needs water every morning.",
    "taxes": "The tax return for the year is due at the end of April, with the bank statements.",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    """A service on a data root of its own holding the three notes (the tests add to it, never remove
    them), and the Library tab built on it."""
    svc = Service(Settings(home=tmp_path_factory.mktemp("library-ui") / "home", model=str(tiny_model_dir),
                           device="cpu"))
    for text in NOTES.values():
        assert svc.remember(text).status == "added"
    with gr.Blocks():
        tab = build_library_tab(svc)
    yield svc, tab
    stop_worker(svc.settings.home)


def selected(rows: list[list], i: int, column: int = 1) -> gr.SelectData:
    """The event Gradio sends when cell (``i``, ``column``) of a Dataframe showing ``rows`` is clicked."""
    return gr.SelectData(None, {"index": [i, column], "value": rows[i][column], "row_value": rows[i]})


def source_of(service: Service, text: str) -> int:
    return next(s["id"] for s in service.sources() if any(r["text"] == text for r in
                                                            service.show_source(s["id"])["records_list"]))


# --- search by meaning ---------------------------------------------------------------------------

def test_searching_by_meaning_puts_the_passage_on_the_querys_topic_first_with_its_source(service):
    svc, _ = service
    for query, topic in [("What is the name of my pet?", "dog"), ("When do I have to file my taxes?", "taxes"),
                         ("How should I water the plants?", "garden")]:
        rows = search_library(svc, query, 3, "")
        source = source_of(svc, NOTES[topic])
        assert len(rows) == 3
        assert rows[0][0] == source and rows[0][1] == svc.show_source(source)["title"], (query, rows)
        assert NOTES[topic] in rows[0][3]
        assert rows[0][2] == round(svc.search(query, k=1)[0]["score"], 3)
        assert rows[0][2] > rows[1][2] >= rows[2][2]


def test_a_search_keeps_to_k_passages_and_the_chosen_collection_and_an_empty_query_is_refused(service):
    svc, _ = service
    assert len(search_library(svc, "my dog", 1, "")) == 1
    assert search_library(svc, "my dog", 5, "no such collection") == []
    with pytest.raises(gr.Error, match="empty"):
        search_library(svc, "   ", 5, "")


# --- opening a source by selecting its row -------------------------------------------------------

def test_selecting_row_i_of_the_sources_table_opens_source_i_and_delete_then_acts_on_it(service):
    svc, tab = service
    extra = svc.remember("A throwaway note to delete after reading.", collection="scratch").source
    rows = source_rows(svc, "", "ready")
    assert len(rows) == 4
    for i, row in enumerate(rows):
        out = open_selected_source(svc, tab, selected(rows, i))
        assert out[tab.source_id] == row[0]
        [record] = svc.show_source(row[0])["records_list"]
        assert out[tab.content].startswith(f"{row[1]} [") and out[tab.content].endswith(record["text"])
    out = open_selected_source(svc, tab, selected(rows, [r[0] for r in rows].index(extra), column=4))
    assert "A throwaway note" in out[tab.content]
    after = delete_source(svc, tab, out[tab.source_id], "", "ready")
    assert extra not in [r[0] for r in after[tab.sources]] and after[tab.content] == ""
    assert svc.show_source(extra)["status"] == "deleted"


def test_selecting_a_search_result_opens_the_source_of_that_passage(service):
    svc, tab = service
    rows = search_library(svc, "When do I have to file my taxes?", 3, "")
    for i, row in enumerate(rows):
        out = open_selected_source(svc, tab, selected(rows, i, column=3))
        assert out[tab.source_id] == row[0] and row[3] in out[tab.content]
    with pytest.raises(gr.Error, match="Select a row"):
        open_selected_source(svc, tab, gr.SelectData(None, {"index": [0, 0], "value": None, "row_value": None}))


# --- import warnings --------------------------------------------------------------------------------

def test_the_import_results_show_a_files_warnings_after_what_it_became(service, tmp_path):
    svc, tab = service
    settings = tmp_path / "settings.json"
    settings.write_text('{"items": [{"sku": "A1", "description": "<b>blue</b> kettle"}], "count": 1}')
    out = import_files(svc, tab, [str(settings)], "auto", "imports", "", "ready", progress=lambda *a, **k: None)
    [result] = svc.ingest([settings], collection="imports")  # the same file again: its source, for the id
    [[name, status, details]] = out[tab.results]
    assert (name, status) == ("settings.json", "added")
    assert details == (f"document/json-text: 1 records, 1 chunks (source {result.source}). Warning: read as plain "
                       "text: this JSON is no chat export, message list or profile the library knows "
                       "(docs/LIBRARY.md lists them), so its keys, quotes and brackets become training text as "
                       "they are")


# --- conversations ----------------------------------------------------------------------------------

@pytest.fixture
def chats(service):
    """Two conversations with a pack (every reply traced): the first of two turns, the second of one."""
    svc, tab = service
    if "talk" not in [p["name"] for p in svc.packs()]:
        svc.create_pack("talk", size="small")
    first = svc.chat("Where do I live?", options=SHORT, pack="talk")
    follow = svc.chat("And my dog?", options=SHORT, pack="talk", conversation=first.conversation_id)
    other = svc.chat("What is the capital of France?", options=SHORT, pack="talk")
    return svc, tab, first, follow, other


def test_the_conversations_table_lists_them_and_selecting_one_shows_its_turns_for_renaming(chats):
    svc, tab, first, follow, other = chats
    rows = conversation_rows(svc)
    started = {c: svc.conversation_info(c)["created"] for c in (first.conversation_id, other.conversation_id)}
    assert rows[:2] == [
        [other.conversation_id, "What is the capital of France?", "talk", 2, started[other.conversation_id]],
        [first.conversation_id, "Where do I live?", "talk", 4, started[first.conversation_id]],
    ]
    out = select_conversation(svc, tab, selected(rows, 1))
    assert out[tab.conversation_id] == first.conversation_id and out[tab.conversation_title] == "Where do I live?"
    assert out[tab.conversation_text] == (f"User: Where do I live?\n\nAssistant: {first.reply}\n\n"
                                          f"User: And my dog?\n\nAssistant: {follow.reply}")


def test_renaming_a_conversation_shows_the_new_title_here_and_in_the_chat_tabs_list(chats):
    svc, tab, first, _, _ = chats
    out = rename_conversation(svc, tab, first.conversation_id, "  Where I live\n and my dog ")
    assert out[tab.conversation_title] == "Where I live and my dog"
    assert [r[1] for r in out[tab.conversations] if r[0] == first.conversation_id] == ["Where I live and my dog"]
    assert any(label.startswith(f"#{first.conversation_id} Where I live and my dog [talk]") and value ==
               first.conversation_id for label, value in conversation_choices(svc))
    with pytest.raises(gr.Error, match="cannot be empty"):
        rename_conversation(svc, tab, first.conversation_id, "  \n ")
    with pytest.raises(gr.Error, match="Select a conversation"):
        rename_conversation(svc, tab, None, "A title")


def test_deleting_a_conversation_removes_it_and_its_messages_and_the_other_replies_stay_inspectable(chats):
    svc, tab, first, follow, other = chats
    out = delete_conversation(svc, tab, first.conversation_id)
    assert first.conversation_id not in [r[0] for r in out[tab.conversations]]
    assert other.conversation_id in [r[0] for r in out[tab.conversations]]
    assert (out[tab.conversation_id], out[tab.conversation_title], out[tab.conversation_text]) == (None, "", "")
    assert first.conversation_id not in [value for _, value in conversation_choices(svc)]
    messages = svc.db().execute("select count(*) from messages where conversation_id = ?",
                                [first.conversation_id]).fetchone()[0]
    assert messages == 0
    replies = [r["id"] for r in svc.replies(100)]
    assert first.message_id not in replies and follow.message_id not in replies and other.message_id in replies
    report = svc.inspect_report(message=other.message_id)  # what Inspect shows for the other reply
    assert "".join(t["text"] for t in report["tokens"]).endswith(other.reply)
    with pytest.raises(EngramError, match="No message"):
        svc.reply_trace(follow.message_id)
    with pytest.raises(gr.Error, match=f"No conversation {first.conversation_id}"):
        delete_conversation(svc, tab, first.conversation_id)


def test_a_conversation_exported_as_json_holds_its_turns_in_order(chats):
    svc, tab, first, follow, _ = chats
    path = Path(export_conversation(svc, tab, "json", first.conversation_id))
    assert path.name == f"conversation-{first.conversation_id}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (data["id"], data["title"], data["pack"]) == (first.conversation_id, "Where do I live?", "talk")
    assert [(m["role"], m["content"], m["pack"], m["version"]) for m in data["messages"]] == [
        ("user", "Where do I live?", "talk", None), ("assistant", first.reply, "talk", None),
        ("user", "And my dog?", "talk", None), ("assistant", follow.reply, "talk", None)]


def test_a_conversation_exported_as_markdown_names_each_speaker_before_their_turn(chats):
    svc, tab, first, follow, _ = chats
    path = Path(export_conversation(svc, tab, "markdown", first.conversation_id))
    assert path.suffix == ".md"
    created = svc.conversation_info(first.conversation_id)["created"]
    assert path.read_text(encoding="utf-8") == (
        f"# Where do I live?\n\nConversation {first.conversation_id}, started {created}, with pack talk.\n\n"
        f"**User**:\n\nWhere do I live?\n\n**Assistant** (talk):\n\n{first.reply}\n\n"
        f"**User**:\n\nAnd my dog?\n\n**Assistant** (talk):\n\n{follow.reply}\n")
    second = Path(export_conversation(svc, tab, "json", first.conversation_id))
    assert not path.exists() and second.exists()  # the download box holds the newest export only
    with pytest.raises(gr.Error, match="Select a conversation"):
        export_conversation(svc, tab, "json", None)


def test_the_cli_renames_exports_and_deletes_a_conversation(chats, tmp_path):
    svc, _, first, follow, _ = chats
    common = ["--home", str(svc.settings.home), "--model", svc.settings.model]
    runner = CliRunner()
    done = runner.invoke(cli, ["conversation", "rename", *common, str(first.conversation_id), "Home and dog"])
    assert done.exit_code == 0 and f"Conversation {first.conversation_id} renamed: Home and dog" in done.output
    target = tmp_path / "talk.md"
    done = runner.invoke(cli, ["conversation", "export", *common, str(first.conversation_id), "--format", "markdown",
                               "-o", str(target)])
    assert done.exit_code == 0, done.output
    assert target.read_text(encoding="utf-8").startswith("# Home and dog\n")
    done = runner.invoke(cli, ["conversation", "export", *common, str(first.conversation_id)])
    assert [m["content"] for m in json.loads(done.stdout)["messages"]] == [
        "Where do I live?", first.reply, "And my dog?", follow.reply]
    done = runner.invoke(cli, ["conversation", "delete", *common, str(first.conversation_id)])
    assert done.exit_code == 0 and "4 messages" in done.output
    done = runner.invoke(cli, ["conversation", "export", *common, str(first.conversation_id)])
    assert done.exit_code != 0 and f"No conversation {first.conversation_id}" in done.output


def test_a_message_sent_in_a_conversation_deleted_meanwhile_starts_a_new_one(chats):
    """The Chat tab still holds the id of a conversation the Library tab deleted: the next message there
    starts a new conversation (with a note) instead of failing with "No conversation N"."""
    from engram_app.ui.chat_tab import build_chat_tab, send_message

    svc, _, first, _, _ = chats
    with gr.Blocks():
        chat = build_chat_tab(svc)
    svc.delete_conversation(first.conversation_id)
    old_history = [{"role": "user", "content": "Where do I live?"}, {"role": "assistant", "content": first.reply}]
    *_, last = send_message(svc, chat, "Hello again", old_history, first.conversation_id, "talk", True, 0, 6, 0.0, 1.0)
    new = last[chat.conversation]
    assert new is not None and new != first.conversation_id
    assert [t["content"] for t in svc.conversation(new)][0] == "Hello again"
    assert last[chat.chatbot][0] == {"role": "user", "content": "Hello again"} and len(last[chat.chatbot]) == 2
