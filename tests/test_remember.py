""""Remember this" and conversations as memory: typed facts and notes as sources, `remember --train`,
the CLI keeping every chat turn (`conversations`, `chat -c`), and a conversation saved as a chat source,
from the CLI and from the Library and Chat tabs' handlers."""

from __future__ import annotations

import json

import gradio as gr
import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.inference import chat as chat_module
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import JobQueue
from engram_app.training.dataset import source_examples
from engram_app.training.runner import JobRunner
from engram_app.ui.chat_tab import build_chat_tab, save_to_memory
from engram_app.ui.library_tab import build_library_tab, remember_text
from test_training import stop_worker


@pytest.fixture
def service(tmp_path, tiny_model_dir, monkeypatch):
    """A service on a fresh data root; queued jobs never start a worker (the tests run them inline)."""
    monkeypatch.setattr(Service, "ensure_worker", lambda self, idle_exit=300.0: None)
    svc = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    yield svc
    stop_worker(svc.settings.home)


def run(service: Service, *args: str) -> str:
    """A CLI command on the service's data root and model; its stdout."""
    result = CliRunner().invoke(cli, [args[0], "--home", str(service.settings.home), "--model",
                                      service.settings.model, *args[1:]])
    assert result.exit_code == 0, result.output
    return result.stdout


def records(service: Service, source: int) -> list[tuple]:
    return [(r["kind"], r["speaker"] or r["person"], r["text"]) for r in service.show_source(source)["records_list"]]


# --- "Remember this" ------------------------------------------------------------------------------

def test_a_remembered_profile_statement_becomes_a_profile_source_holding_that_fact(service):
    result = service.remember("My dog is called Pixel.\nI live in Porto.")
    assert (result.status, result.kind, result.format, result.records) == ("added", "profile", "statements", 2)
    assert records(service, result.source) == [("fact", "me", "My dog is called Pixel."),
                                               ("fact", "me", "I live in Porto.")]
    assert service.show_source(result.source)["collection"] == "default"


def test_a_remembered_note_that_is_not_first_person_statements_becomes_a_document(service):
    note = "Buy oat milk on Tuesday.\nThe plumber comes at nine."
    result = service.remember(note, collection="errands")
    assert (result.status, result.kind, result.records) == ("added", "document", 1)
    assert records(service, result.source) == [("text", None, note)]
    assert service.show_source(result.source)["collection"] == "errands"


def test_the_same_text_remembered_twice_is_a_duplicate_of_the_first_and_empty_text_is_refused(service):
    first = service.remember("I live in Porto.")
    again = service.remember("  I live in Porto.\n")
    assert (again.status, again.source) == ("duplicate", first.source)
    assert [s["id"] for s in service.sources()] == [first.source]
    with pytest.raises(EngramError, match="empty"):
        service.remember("   ")


def test_remember_train_json_queues_a_job_per_learning_pack_whose_version_learns_the_fact(service):
    service.remember("A note about work.", collection="work")
    service.create_pack("me", size="small")  # no collections: the whole library
    service.create_pack("worker", size="small", collections=["work"])  # another collection: not queued
    data = json.loads(run(service, "remember", "--train", "--json", "My dog is called Pixel."))
    assert (data["result"]["status"], data["result"]["kind"]) == ("added", "profile")
    assert [(j["pack"], j["status"]) for j in data["jobs"]] == [("me", "queued")]

    queue = JobQueue(service.db())
    row = queue.claim("test")
    assert row["id"] == data["jobs"][0]["id"]
    result = JobRunner(service.settings, service.db(), row).run()
    queue.finish(row["id"], "done", result)
    version = service.packs_store().version("me")
    source = data["result"]["source"]
    assert result["version"] == version["number"] == 1 and source in version["sources"]
    examples, probes = source_examples(service.db(), service.tokenizer(), source, 256)
    text = [service.tokenizer().decode(e.ids) for e in examples]
    assert any("My dog is called Pixel." in t for t in text)
    assert [(p.prompt, p.answer) for p in probes if not p.held_out] == [("What is my dog called?", "Pixel")]
    assert [p.answer for p in probes if p.held_out] == ["Pixel", "Pixel"]  # asked in new words, for evaluation
    # Nothing new, nothing queued: the same text again is a duplicate.
    again = json.loads(run(service, "remember", "--train", "--json", "My dog is called Pixel."))
    assert (again["result"]["status"], again["jobs"]) == ("duplicate", [])


# --- conversations in the CLI ---------------------------------------------------------------------

def test_the_cli_chat_keeps_every_streamed_turn_and_conversations_lists_them(service):
    before = run(service, "conversations", "--json")
    assert json.loads(before) == []
    run(service, "chat", "--max-tokens", "4", "hello there")
    [listed] = json.loads(run(service, "conversations", "--json"))
    assert (listed["title"], listed["messages"], listed["pack"]) == ("hello there", 2, None)
    assert set(listed) == {"id", "title", "created", "pack", "messages"}
    assert [t["role"] for t in service.conversation(listed["id"])] == ["user", "assistant"]
    assert "1 conversations" in run(service, "conversations", "--limit", "5")


def test_chat_continue_sends_the_last_conversations_history_and_stores_the_turn_in_it(service, monkeypatch):
    run(service, "chat", "--max-tokens", "4", "first question")
    run(service, "chat", "--max-tokens", "4", "second question")
    [last, _first] = json.loads(run(service, "conversations", "--json"))
    sent = []
    real = chat_module.generate_turn

    def spy(runtime, messages, options):
        sent.append([(m.role, m.content) for m in messages])
        return (yield from real(runtime, messages, options))

    monkeypatch.setattr(chat_module, "generate_turn", spy)
    run(service, "chat", "-c", "--max-tokens", "4", "and a follow-up")
    turns = service.conversation(last["id"])
    assert [(t["role"], t["content"]) for t in turns if t["role"] == "user"] == [
        ("user", "second question"), ("user", "and a follow-up")]
    assert sent == [[("user", "second question"), ("assistant", turns[1]["content"]), ("user", "and a follow-up")]]
    assert len(json.loads(run(service, "conversations", "--json"))) == 2  # no new conversation


def test_chat_continue_without_any_conversation_says_to_chat_first(service):
    result = CliRunner().invoke(cli, ["chat", "--home", str(service.settings.home), "--model",
                                      service.settings.model, "-c", "hi"])
    assert result.exit_code == 1 and "no conversation to continue" in result.output


# --- saving a conversation to memory ------------------------------------------------------------

def test_remember_conversation_adds_a_chat_source_with_both_speakers(service):
    store = service.conversations_store()
    conversation, _ = store.save_turn(None, None, None, "My dog is called Pixel.", "What a lovely name!", None)
    store.save_turn(conversation, None, None, "She loves the beach.", "Dogs often do.", None)
    result = service.remember_conversation(conversation)
    assert (result.status, result.kind, result.format, result.records) == ("added", "chat", "messages", 4)
    assert records(service, result.source) == [
        ("turn", "user", "My dog is called Pixel."), ("turn", "assistant", "What a lovely name!"),
        ("turn", "user", "She loves the beach."), ("turn", "assistant", "Dogs often do.")]
    assert service.show_source(result.source)["filename"] == f"conversation {conversation}.json"
    assert service.remember_conversation(conversation).status == "duplicate"  # no new turns
    with pytest.raises(EngramError, match="No conversation 999"):
        service.remember_conversation(999)


def test_chat_remember_saves_the_conversation_so_far_as_a_chat_source(service):
    run(service, "chat", "--max-tokens", "4", "I grew up in Porto.")
    run(service, "chat", "-c", "--remember", "--max-tokens", "4", "By the sea.")
    [source] = service.sources()
    assert (source["kind"], source["collection"]) == ("chat", "default")
    said = [(speaker, text) for kind, speaker, text in records(service, source["id"]) if speaker == "user"]
    assert said == [("user", "I grew up in Porto."), ("user", "By the sea.")]


# --- the tabs' handlers ---------------------------------------------------------------------------

def test_the_library_tabs_remember_button_adds_the_text_queues_training_and_refreshes_the_sources(service):
    with gr.Blocks():
        tab = build_library_tab(service)
    service.create_pack("me", size="small")
    out = remember_text(service, tab, "I live in Porto.", "default", True, "", "ready")
    [[source_id, *_]] = out[tab.sources]
    assert out[tab.results][0] == ["typed text", "added", f"profile: 1 records (source {source_id})"]
    [job] = service.jobs()
    assert out[tab.results][1:] == [["training", "queued", f"job {job['id']} for pack me (Memory & training tab)"]]
    assert out[tab.remember_text] == ""
    again = remember_text(service, tab, "I live in Porto.", "default", True, "", "ready")
    assert again[tab.results] == [["typed text", "duplicate", f"already in the library as source {source_id}"]]
    assert again[tab.remember_text] == "I live in Porto." and len(service.jobs()) == 1
    with pytest.raises(gr.Error):
        remember_text(service, tab, "  ", "default", False, "", "ready")


def test_the_chat_tabs_save_button_saves_the_open_conversation_as_a_chat_source(service):
    with gr.Blocks():
        build_chat_tab(service)
    with pytest.raises(gr.Error):
        save_to_memory(service, None)
    conversation, _ = service.conversations_store().save_turn(None, None, None, "I live in Porto.", "Nice city.", None)
    save_to_memory(service, conversation)
    [source] = service.sources()
    assert records(service, source["id"]) == [("turn", "user", "I live in Porto."),
                                              ("turn", "assistant", "Nice city.")]
