"""Chat with a memory pack: traces while generating vs one forward pass, provenance, memory off,
untrained packs, interleaved conversations, stored traces, retrieval, version pickup."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.inference.prompting import RETRIEVAL_HEADER, with_retrieved
from engram_app.inference.tracing import TraceArrays
from engram_app.service import Service
from engram_app.settings import Settings
from test_training import DOC_B, PROFILE_A, QUICK, add_profile, run_inline, stop_worker

SHORT = GenerationOptions(max_new_tokens=12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One pack trained once for the module (tests add packs and versions beside it, never change it)."""
    tmp = tmp_path_factory.mktemp("chat")
    service = Service(Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu"))
    profile = add_profile(service, tmp, "a.md", PROFILE_A)
    notes = add_profile(service, tmp, "garden.md", DOC_B)
    service.create_pack("me", size="small")
    run_inline(service, "me", **QUICK)
    yield service, profile, notes
    stop_worker(service.settings.home)


def slots_of(token: dict) -> list:
    return [[(s["order"], s["head"], s["row"], s["ngram"]) for s in m["slots"]] for m in token["memory"]]


def test_chat_traces_equal_inspect_on_the_same_ids(trained, tmp_path):
    service, _, _ = trained
    common = ["--home", str(service.settings.home), "--model", service.settings.model]
    runner = CliRunner()
    out = runner.invoke(cli, ["chat", *common, "--pack", "me", "--max-tokens", "12", "--json", "What is my dog called?"])
    assert out.exit_code == 0, out.output
    chat = json.loads(out.stdout)
    assert chat["tokens"] and all(len(t["memory"]) == 1 and len(t["memory"][0]["slots"]) == 16 for t in chat["tokens"])
    ids_file = tmp_path / "chat.json"
    ids_file.write_text(out.stdout)
    out = runner.invoke(cli, ["inspect", *common, "--pack", "me", "--ids", str(ids_file), "--json"])
    assert out.exit_code == 0, out.output
    inspected = json.loads(out.stdout)["tokens"]
    assert [t["id"] for t in inspected] == chat["ids"]
    reply_part = inspected[len(chat["ids"]) - len(chat["tokens"]):]
    for generated, single in zip(chat["tokens"], reply_part):
        assert generated["id"] == single["id"]
        assert slots_of(generated) == slots_of(single)  # cached generation and one forward read the same slots
        assert generated["memory"][0]["gate"] == pytest.approx(single["memory"][0]["gate"], abs=1e-4)
    out = runner.invoke(cli, ["inspect", *common, "--pack", "me", "hello"])
    assert out.exit_code == 0 and "gate" in out.output
    assert runner.invoke(cli, ["inspect", *common, "--pack", "me"]).exit_code != 0  # neither TEXT nor --ids


def test_a_phrase_only_one_source_contains_is_attributed_to_it(trained):
    service, profile, notes = trained
    traces = service.inspect("me", text="compost heap behind the shed")
    last = traces[-1]  # "shed": its trigram "behind the shed" occurs only in the garden notes
    trigrams = [s for s in last.memory[0].slots if s.order == 3]
    who = service.provenance("me", [s.row for s in trigrams])
    for slot in trigrams:
        sources = {w["source"] for w in who[slot.row]}
        assert notes in sources and profile not in sources
        assert any(w["ngram"] == slot.ngram for w in who[slot.row] if w["source"] == notes)
    common = ["--home", str(service.settings.home), "--model", service.settings.model]
    out = CliRunner().invoke(cli, ["inspect", *common, "--pack", "me", "--sources", "--effect", "--json",
                                   "behind the shed"])
    assert out.exit_code == 0, out.output
    tokens = json.loads(out.stdout)["tokens"]
    assert "effect" not in tokens[0] and {"logprob_on", "logprob_off", "effect"} <= set(tokens[-1]["effect"])
    slot = next(s for s in tokens[-1]["memory"][0]["slots"] if s["order"] == 3)
    assert slot["sources"][0]["title"] == "Garden notes"


def test_memory_off_and_an_untrained_pack_give_the_base_models_reply(trained):
    service, _, _ = trained
    base = service.chat("Tell me about my garden.", options=SHORT).reply
    assert service.chat("Tell me about my garden.", options=SHORT, pack="me", memory=False).reply == base
    service.create_pack("fresh", size="small")
    fresh = service.chat("Tell me about my garden.", options=SHORT, pack="fresh")
    assert fresh.reply == base
    assert all(t.memory[0].ratio == 0 for t in fresh.traces)  # an untrained memory adds nothing


def test_two_conversations_on_two_packs_interleaved_do_not_affect_each_other(trained):
    service, _, _ = trained
    service.create_pack("other", size="small")
    alone_a = service.chat("What is my dog called?", options=SHORT, pack="me").reply
    alone_b = service.chat("Where do I live?", options=SHORT, pack="other").reply
    alone_a2 = service.chat("Where do I live?", options=SHORT, pack="me").reply
    streams = [service.stream_chat([], "What is my dog called?", SHORT, pack="me"),
               service.stream_chat([], "Where do I live?", SHORT, pack="other"),
               service.stream_chat([], "Where do I live?", SHORT, pack="me")]  # same pack, second conversation
    texts = ["", "", ""]
    live = [True, True, True]
    while any(live):
        for i, stream in enumerate(streams):
            if live[i]:
                try:
                    texts[i] += next(stream).delta
                except StopIteration:
                    live[i] = False
    assert texts == [alone_a, alone_b, alone_a2]


def test_the_turn_is_stored_with_a_compact_trace_and_the_version_used(trained):
    service, _, _ = trained
    result = service.chat("What is my dog called?", options=GenerationOptions(max_new_tokens=40), pack="me")
    row = next(service.db().query("select * from messages where id = ?", [result.message_id]))
    assert row["role"] == "assistant" and row["content"] == result.reply and row["pack_version"] == 1
    arrays = TraceArrays.from_bytes(row["trace"])
    assert arrays.ids.tolist() == result.ids
    per_token = len(row["trace"]) / len(result.ids)
    assert per_token < 100, f"{per_token:.0f} bytes per token"
    runtime = service.chat_runtime("me")
    stored = arrays.tokens(runtime.adapted.memory, runtime.tokenizer, len(result.prompt_ids))
    assert [[(s.row, s.ngram) for s in t.memory[0].slots] for t in stored] == \
        [[(s.row, s.ngram) for s in t.memory[0].slots] for t in result.traces]
    # The next turn continues the conversation.
    follow = service.chat("And where do I live?", options=SHORT, pack="me", conversation=result.conversation_id)
    assert follow.conversation_id == result.conversation_id
    assert next(c for c in service.conversations() if c["id"] == result.conversation_id)["messages"] == 4


def test_retrieval_puts_the_nearest_library_line_alone_into_the_system_message(trained):
    service, _, notes = trained
    result = service.chat("What grows best in the sun?", options=SHORT, retrieval=1)
    assert [(r["source"], r["text"]) for r in result.retrieved] == \
        [(notes, "The basil grows best in the sun, and the mint spreads everywhere if nobody cuts it back.")]
    prompt = service.runtime.tokenizer.decode(result.prompt_ids)
    system = prompt[:prompt.index("What grows best in the sun?")]
    assert f"{RETRIEVAL_HEADER}\n- The basil grows best in the sun" in system  # before the user's message
    assert "tomatoes" not in prompt and "compost" not in prompt  # the line, not its passage
    # A general question is near no line (RETRIEVAL_MIN_SCORE): no system message of lines at all.
    general = service.chat("Who painted the Mona Lisa?", options=SHORT, retrieval=3)
    assert general.retrieved == ()
    assert RETRIEVAL_HEADER not in service.runtime.tokenizer.decode(general.prompt_ids)


def test_chat_picks_up_a_new_version_without_a_restart(trained, tmp_path):
    service, _, _ = trained
    assert service.chat_runtime("me").pack_version == 1
    add_profile(service, tmp_path, "b.md", "- My favorite color is green.\n")
    run_inline(service, "me", max_steps=10)
    assert service.chat_runtime("me").pack_version == 2
    service.rollback("me", 1)
    assert service.chat_runtime("me").pack_version == 1
    service.create_pack("loraonly", size="small", mode="lora")
    with pytest.raises(EngramError, match="no Engram memory"):
        service.inspect("loraonly", text="hello")


# --- what the browser's Chat and Inspect views call --------------------------------------------

def test_a_streamed_reply_is_the_reply_and_its_stored_trace_is_what_inspect_shows(trained):
    service, _, _ = trained
    stream = service.chat_stream("What is my dog called?", options=SHORT, pack="me")
    deltas = [token.delta for token in stream]
    result = stream.result
    assert result is not None and "".join(deltas) == result.reply and len(deltas) == len(result.tokens)
    assert result.message_id is not None
    stored = service.reply_trace(result.message_id)
    assert stored["pack"] == "me" and stored["start"] == len(result.prompt_ids) and stored["ids"] == result.ids
    saved, live = [t.to_json() for t in stored["tokens"]], [t.to_json() for t in result.traces]
    assert [slots_of(t) for t in saved] == [slots_of(t) for t in live]
    assert [t["memory"][0]["gate"] for t in saved] == pytest.approx([t["memory"][0]["gate"] for t in live], abs=1e-3)
    assert [r["id"] for r in service.replies()][0] == result.message_id
    turns = service.conversation(result.conversation_id)
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[1]["traced"] and turns[1]["pack"] == "me"
    plain = service.chat("hello", options=SHORT)  # the base model: nothing to inspect
    with pytest.raises(EngramError, match="no trace"):
        service.reply_trace(plain.message_id)
    with pytest.raises(EngramError, match="No conversation"):
        service.conversation(10**6)


def test_provenance_shows_the_passage_of_the_source_that_wrote_a_slot(trained):
    service, _, notes = trained
    last = service.inspect("me", text="compost heap behind the shed")[-1]
    trigram = next(s for s in last.memory[0].slots if s.order == 3)
    writers = [w for w in service.provenance("me", [trigram.row])[trigram.row] if w["source"] == notes]
    assert writers and "compost heap behind the shed" in writers[0]["passage"]


def test_the_inspect_report_of_a_stored_reply_is_the_report_of_its_ids_from_the_reply_on(trained):
    # Service.inspect_report is what the Inspect tab shows and `inspect --json` prints.
    service, _, _ = trained
    result = service.chat("Where do I live?", options=SHORT, pack="me")
    stored = service.inspect_report(message=result.message_id, effect=True, sources=True)
    whole = service.inspect_report("me", ids=result.ids, effect=True, sources=True)
    start = len(result.prompt_ids)
    version = service.pack("me")["active_version"]
    assert (stored["pack"], stored["version"], stored["start"], whole["start"]) == ("me", version, start, 0)
    assert [t["id"] for t in stored["tokens"]] == [t.id for t in result.tokens]
    reply_part = whole["tokens"][start:]
    assert [slots_of(t) for t in stored["tokens"]] == [slots_of(t) for t in reply_part]
    assert [t["effect"] for t in stored["tokens"]] == [t["effect"] for t in reply_part]
    assert [t["effect"]["position"] for t in stored["tokens"]] == list(range(start, len(result.ids)))
    assert ([[s["sources"] for m in t["memory"] for s in m["slots"]] for t in stored["tokens"]]
            == [[s["sources"] for m in t["memory"] for s in m["slots"]] for t in reply_part])
    assert "effect" not in whole["tokens"][0]  # nothing comes before the first token
    plain = service.inspect_report("me", text="hello there")  # neither asked for: the trace alone
    assert "effect" not in plain["tokens"][-1] and "sources" not in plain["tokens"][-1]["memory"][0]["slots"][0]


def test_the_inspect_tab_shows_a_selected_tokens_position_effect_and_the_sources_of_its_slots(trained):
    from engram_app.ui.inspect_tab import token_details

    service, _, notes = trained
    report = service.inspect_report("me", text="compost heap behind the shed", effect=True)
    shed = report["tokens"][-1]
    details, text, slots, sources = token_details(service, report, len(report["tokens"]) - 1)
    assert text == shed["text"] and len(slots) == 16
    assert f"position {len(report['tokens']) - 1}, id {shed['id']}" in details
    assert f"memory effect {shed['effect']['effect']:+.2f} nats" in details
    garden = [row for row in sources if row[0] == f"Garden notes (source {notes})"]
    assert garden and any("behind the shed" in row[4] for row in garden)
    reply = service.chat("Where do I live?", options=SHORT, pack="me")
    stored = service.inspect_report(message=reply.message_id, effect=True)
    details, *_ = token_details(service, stored, 0)  # a reply's first token comes after its prompt
    assert f"Token 1 of {len(reply.tokens)}, position {len(reply.prompt_ids)}," in details


def test_a_pack_exported_and_imported_answers_the_same_and_bad_files_are_refused(trained, tmp_path):
    import zipfile

    service, _, _ = trained
    path = service.export_pack("me", tmp_path / "me.zip")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "pack.json" in names and "adapter/adapter_model.safetensors" in names
    assert not any("slots" in n for n in names)  # source ids mean nothing in another library
    info = service.import_pack(path, name="me-copy")
    assert info["active_version"] == 1 and info["mode"] == "engram"
    original = service.chat("Where do I live?", options=SHORT, pack="me", save=False)
    copy = service.chat("Where do I live?", options=SHORT, pack="me-copy", save=False)
    assert copy.reply == original.reply and [t.to_json() for t in copy.traces] == [t.to_json() for t in original.traces]
    assert service.provenance("me-copy", [copy.traces[0].memory[0].slots[0].row]) == {
        copy.traces[0].memory[0].slots[0].row: []}
    with pytest.raises(EngramError, match="exists already"):
        service.import_pack(path, name="me-copy")
    common = ["--home", str(service.settings.home), "--model", service.settings.model]
    out = CliRunner().invoke(cli, ["pack", "export", *common, "me", "-o", str(tmp_path / "cli.zip")])
    assert out.exit_code == 0 and (tmp_path / "cli.zip").is_file(), out.output
    out = CliRunner().invoke(cli, ["pack", "import", *common, str(tmp_path / "cli.zip"), "--name", "me-cli", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["active_version"] == 1, out.output

    def bad(name: str, members: dict) -> str:
        target = tmp_path / name
        with zipfile.ZipFile(target, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        with pytest.raises(EngramError) as caught:
            service.import_pack(target, name="bad")
        return str(caught.value)

    with zipfile.ZipFile(path) as archive:
        manifest, weights = archive.read("pack.json"), archive.read("adapter/adapter_model.safetensors")
        config = archive.read("adapter/adapter_config.json")
    assert "holds files a pack never has" in bad("slip.zip", {"pack.json": manifest, "../../evil.json": b"{}"})
    assert "holds files a pack never has" in bad("pickle.zip", {"pack.json": manifest, "adapter/model.pt": b"x"})
    assert "no pack.json" in bad("nomanifest.zip", {"adapter/adapter_config.json": config})
    assert "not valid JSON" in bad("json.zip", {"pack.json": b"{", "adapter/adapter_config.json": config})
    broken = config.replace(b'"fingerprint"', b'"fingerprint_"') if b'"fingerprint"' in config else b"{}"
    assert "does not load" in bad("wrongbase.zip", {"pack.json": manifest, "adapter/adapter_config.json": broken,
                                                    "adapter/adapter_model.safetensors": weights})
    (tmp_path / "plain.zip").write_text("not a zip")
    with pytest.raises(EngramError, match="not a pack file"):
        service.import_pack(tmp_path / "plain.zip")
    assert "bad" not in [p["name"] for p in service.packs()]
    assert not (service.settings.home / "packs" / "bad").exists()


def test_retrieved_lines_go_first_in_one_system_message_with_the_conversations_own():
    from engram_app.inference import Message

    hits = [{"text": "My dog is called   Pixel."}, {"text": "I live in Porto."}]
    chat = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
            Message("user", "What is my dog called?")]
    messages = with_retrieved(chat, hits)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content == f"Be brief.\n\n{RETRIEVAL_HEADER}\n- My dog is called Pixel.\n- I live in Porto."
    assert with_retrieved(chat[1:], []) == chat[1:]
