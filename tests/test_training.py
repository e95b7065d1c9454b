"""Memory training: phrasing, planning, jobs, the worker process (kill, resume, cancel, queue),
incremental packs, evaluation, the slot index and the CLI, on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import JobQueue, TrainOptions
from engram_app.training.dataset import plan
from engram_app.training.runner import JobRunner
from engram_app.training.slots import SlotIndex
from engram_app.training.text import (
    GENERIC_QUESTIONS,
    IGNORE,
    Probe,
    chat_example,
    chat_statements,
    fact_phrasings,
    fact_questions,
    fact_training_pairs,
    held_out_probes,
    second_person,
    turns_as_messages,
)
from engram_app.training.worker import worker_alive, worker_info
from tiny import tiny_tokenizer

PROFILE_A = "# About me\n- My dog is called Pixel.\n- I live in Porto.\n"
PROFILE_B = "# More about me\n- My favorite color is green.\n- I work as a nurse.\n"
DOC_B = ("Garden notes\n\nThe tomatoes need water every morning. The basil grows best in the sun, and the mint "
         "spreads everywhere if nobody cuts it back. In autumn the leaves go into the compost heap behind the shed.\n")
PROBES_A = [Probe("What is my dog called?", "Pixel"), Probe("Where do I live?", "Porto")]
QUICK = dict(max_steps=120, lr=3e-3, until_recalled=False)  # every step: the tests below count them


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def service(tmp_path, tiny_model_dir):
    svc = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    yield svc
    stop_worker(svc.settings.home)


def stop_worker(home: Path) -> None:
    info = worker_info(home)
    if info["alive"] and info["pid"]:
        try:
            os.kill(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while worker_alive(home) and time.time() < deadline:
        time.sleep(0.1)


def add_profile(service: Service, tmp_path: Path, name: str, text: str) -> int:
    path = tmp_path / name
    path.write_text(text)
    [result] = service.ingest([path])
    assert result.status == "added", result.reason
    return result.source


def run_inline(service: Service, pack: str, **options) -> dict:
    """Queue a job and run it in this process (the worker runs the same JobRunner)."""
    job = service.train(pack, TrainOptions(**options), start_worker=False)
    queue = JobQueue(service.db())
    row = queue.claim("test")
    assert row["id"] == job["id"]
    result = JobRunner(service.settings, service.db(), row).run()
    queue.finish(row["id"], "done", result)
    return result


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def worker_process(home: Path, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "engram_app", "worker", "--home", str(home), "--device", "cpu",
                             "--idle-exit", "120"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


# --- training text ------------------------------------------------------------------------------

def test_first_person_facts_become_second_person_questions_and_answers():
    assert second_person("I have a turtle named Timothy.") == "You have a turtle named Timothy."
    assert second_person("My mother was proud of me.") == "Your mother was proud of you."
    assert fact_questions("My dog is called Pixel and she loves the beach.") == [
        ("What is my dog called?", "Your dog is called Pixel and she loves the beach.", "Pixel")]
    assert fact_questions("I have a turtle named Timothy.")[0][::2] == ("What is my turtle called?", "Timothy")
    assert fact_questions("I live in Porto.")[0][2] == "Porto"
    assert fact_questions("I enjoy reading about my hometown.")[0][2] == "reading about your hometown"
    assert fact_questions("Cats are nice.") == []  # no pattern: only the generic phrasings
    phrasings = fact_phrasings("My dog is called Pixel.")
    assert phrasings[0] == [{"role": "text", "content": "My dog is called Pixel."}]
    assert [{"role": "user", "content": "What is my dog called?"},
            {"role": "assistant", "content": "Your dog is called Pixel."}] in phrasings
    assert len(fact_phrasings("Cats are nice.")) == 3  # the text, and two generic questions answered with it
    # Never the user's statement echoed back ("Noted: your dog is called Pixel."): it taught the memory
    # to answer a question by repeating it ("Remind me, what are my parents?" -> "Remind me, what are
    # your parents?"), and held-out recall rose without it (docs/BENCHMARKS.md, stop 27).
    assert not any(m["content"].startswith("Noted") for c in phrasings for m in c)


def test_a_fact_is_trained_in_several_questions_and_answers_and_probed_in_questions_it_never_saw():
    pairs = fact_training_pairs("My dog is called Pixel.")
    assert ("What is the name of my dog?", "Your dog's name is Pixel.") in pairs
    assert len(pairs) == 2 * 3  # every trained question with every answer sentence
    trained = {text for conversation in fact_phrasings("My dog is called Pixel.") for message in conversation
               for text in [message["content"]]}
    for fact in ("My dog is called Pixel.", "I have a turtle named Timothy.", "I live in Porto.", "I work as a nurse.",
                 "I was born in Kyoto.", "I was born in the early 80 s.", "I grew up in Galway.", "I like green tea.",
                 "I'm from Oslo.", "I have two cats.", "I have brown hair.", "My name is Ada.",
                 "My favourite colour is teal.", "I work at the library."):
        held_out = held_out_probes(fact)
        questions = {q for q, _ in fact_training_pairs(fact)} | set(GENERIC_QUESTIONS)
        assert len(held_out) >= 2, fact
        assert not {p.prompt for p in held_out} & questions, fact  # never a training question
        assert {p.answer for p in held_out} == {fact_questions(fact)[0][2]}
    assert held_out_probes("Cats are nice.") == []
    assert "Do you remember what my dog is called?" not in trained


def test_a_birth_time_is_not_asked_as_a_birthplace_and_a_count_is_asked_how_many():
    # Synthetic-Persona-Chat says "I was born in the early 80 s.": asked "In which place was I born?",
    # a right reply ("...in the 1980s") was scored a miss.
    for fact, asked in (("I was born in the early 80 s.", "when"), ("I was born in 1990.", "when"),
                        ("I was born in May.", "when"), ("I was born in Somalia.", "place")):
        trained = fact_training_pairs(fact)[0][0]
        assert trained == ("When was I born?" if asked == "when" else "Where was I born?"), fact
    assert fact_questions("I was born in the early 80 s.")[0][2] == "early 80 s"
    # "I have three children." is asked how many, not "What is it that I have?".
    assert fact_questions("I have three children.")[0] == ("How many children do I have?", "You have three children.",
                                                           "three")
    assert [p.prompt for p in held_out_probes("I have 2 dogs.")] == ["Do you remember how many dogs I have?",
                                                                    "What's the number of dogs I have?"]
    # Not a count: a thing with a name, or more than two words, keeps its own pattern.
    assert fact_questions("I have two dogs named Rex and Max.")[0][0] == "What do I have?"
    assert fact_questions("I have a dog named Rex.")[0][0] == "What is my dog called?"


def test_the_users_own_first_person_facts_in_a_chat_become_facts():
    turns = [("Sam", "Hi! I have a German Shepherd named Barnaby. Do you have pets?"),
             ("Bot", "I have a cat named Tom."),  # the other speaker's facts are not the user's
             ("Sam", "I live in Leeds, and we love it. I love that about you. I like action movies too!"),
             ("Bot", "Nice."), ("Sam", "What do you like?")]
    assert chat_statements(turns) == ["I have a German Shepherd named Barnaby.", "I like action movies!"]


def test_a_chat_sentence_is_cut_at_its_clauses_before_its_facts_are_taken():
    said = {
        # A question after a comma is dropped, the statement before it kept.
        "I'm from Ohio, how about you?": ["I'm from Ohio."],
        # Two facts in one sentence, with "I" said once or twice.
        "Yeah, I have a pet cow and drive a big truck.": ["I have a pet cow.", "I drive a big truck."],
        "I have three Arabians and I love them to death.": ["I have three Arabians."],  # "them": nothing said
        "I like all kinds of music, but my favorite band is Queen.": ["I like all kinds of music.",
                                                                     "My favorite band is Queen."],
        "I also like to watch the olympics.": ["I like to watch the olympics."],
        "I have one older sister.": ["I have one older sister."],  # a count is not vague
        'I love "Toxic."': ['I love "Toxic."'],  # a whole sentence is kept as it was written
        "I like that one.": [],
        "I live in Leeds, and we love it.": [],  # "we": not the user's alone
        "Hi, I'm George, what's your name?": ["My name is George."],  # an introduction after a greeting
        "Hey there, I\u2019m Jos\u00e9.": ["My name is Jos\u00e9."],  # a phone's apostrophe, any letters
        "I'm Canadian.": [],  # without a greeting, a capitalised word is not taken for a name
        "Hi! I'm Sam. I'm American.": ["My name is Sam."],  # only the first clause after it
        "Hi, I'm Canadian.": [],
        "Hello, I am Dr. Smith.": [],
        # What the second verb does not share: a wish, a past habit, a modal, someone else.
        "I want to move to Spain and work as a teacher.": [],
        "I used to live in Paris and work at Google.": [],
        "I can't sing and play guitar at the same time.": [],
        "I think my kids like cats and hate dogs.": [],
        # Said to an assistant, or pointing at something said before: nothing about the user.
        "I have a question, how do I reset it?": [],
        "Oh I love that show!": [],
        "Haha I have no idea.": [],
        "I like \u2014.": [],
        "I don't have a dog, but I have a cat.": ["I have a cat."],
        "I live in New\nYork.": ["I live in New York."],  # a wrapped line is one sentence
    }
    for sentence, statements in said.items():
        assert chat_statements([("Sam", sentence)]) == statements, sentence
    assert fact_questions("I have one older sister.")[0][2] == "one"


def test_a_hostile_chat_turn_cannot_stall_the_fact_finding():
    """Runs of whitespace made the clause rules quadratic (8,000 spaces: 2 s; a megabyte: hours)."""
    def stalled(*_):
        raise TimeoutError("chat_statements ran for 60 s")

    turns = [("Sam", "I " + " " * 1_000_000 + "x"), ("Bot", "ok"), ("Sam", "I like tea" + " " * 1_000_000 + ", too."),
             ("Bot", "ok"), ("Sam", "I have a cow and " * 60_000), ("Bot", "ok"),
             # 40,000 turns in a row from one speaker, each a new fact: joining them and checking
             # each fact against the ones found were quadratic too.
             *[("Sam", f"I live in town {i}.") for i in range(40_000)], ("Bot", "ok"),
             ("Sam", "x\n" * 200_000), ("Bot", "ok"),  # wrapped lines, joined once
             ("Sam", "I like tea\nI live in Rome")]
    previous = signal.signal(signal.SIGALRM, stalled)  # a watchdog (the regex engine checks signals): ~0.2 s here
    signal.alarm(60)
    try:
        statements = chat_statements(turns)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert statements[-2:] == ["I like tea", "I live in Rome"]  # a line that starts with "I" is a sentence
    assert statements[0] == "I like tea." and len(statements) == 1 + 40_000 + 2  # the long sentence is skipped


def test_a_turn_longer_than_a_chunk_is_trained_window_by_window_with_the_facts_at_its_end(service, tmp_path):
    """Each window of a long turn is trained (not the turn's first tokens once per window), and a
    fact at the end of the turn is found."""
    from engram_app.training.dataset import source_examples

    diary = " ".join(f"On day {i} the sky was grey." for i in range(300))
    path = tmp_path / "chat.txt"
    path.write_text(f"Sam: {diary} I live in Porto.\nBot: Nice.\nSam: Thanks.\n")
    [result] = service.ingest([path], kind="chat")
    assert result.status == "added", result.reason
    chunks = service.db().execute("select count(*) from chunks where source_id = ?", [result.source]).fetchone()[0]
    examples, probes = source_examples(service.db(), service.tokenizer(), result.source, 256)
    texts = [service.tokenizer().decode(e.ids) for e in examples]
    assert chunks > 5
    assert any("day 299" in t and "Porto" in t for t in texts)  # the last window, as a chat
    assert any("day 150" in t for t in texts)  # one in the middle
    assert ("Where do I live?", "Porto") in [(p.prompt, p.answer) for p in probes]


def test_chat_loss_covers_the_turns_and_not_the_template_preamble():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("<|system|>You are helpful.\n{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                               "{% endfor %}")
    messages = turns_as_messages([("User 1", "I grew up by the sea."), ("User 2", "Lovely."), ("User 1", "Yes, in Porto.")])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    example = chat_example(tokenizer, messages, 1, "chat", 256)
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert "You are helpful" not in learned
    for m in messages:
        assert m["content"].replace(" ", "") in learned.replace(" ", "")
    only_replies = chat_example(tokenizer, messages, 1, "chat", 256, loss_roles=("assistant",))
    text = tokenizer.decode([t for t in only_replies.labels if t != IGNORE]).replace(" ", "")
    assert "Lovely" in text and "Porto" not in text


# --- planning -----------------------------------------------------------------------------------

def test_plan_learns_new_sources_replays_old_ones_and_never_reads_deleted_ones(service, tmp_path):
    a = add_profile(service, tmp_path, "a.md", PROFILE_A)
    b = add_profile(service, tmp_path, "b.md", PROFILE_B)
    db = service.db()
    assert plan(db, [], [a], full=False).to_json() == {"new": [b], "replay": [a], "learned": [a, b]}
    assert plan(db, [], [a], full=True).to_json() == {"new": [a, b], "replay": [], "learned": [a, b]}
    service.delete_source(a)
    assert plan(db, [], [a], full=False).to_json() == {"new": [b], "replay": [], "learned": [a, b]}
    assert plan(db, [], [a], full=True).new == [b]
    assert plan(db, ["nope"], [], full=False).new == []


# --- a job from start to version ------------------------------------------------------------------

def test_a_job_writes_a_loadable_version_with_its_evaluation_and_slot_index(service, tmp_path):
    source = add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    result = run_inline(service, "me", **QUICK)
    assert result["outcome"] == "done" and result["version"] == 1
    pack = service.pack("me")
    assert pack["active_version"] == 1 and pack["learned_sources"] == 1
    evaluation = pack["versions"][0]["evaluation"]
    assert evaluation["memorisation"]["after"] < evaluation["memorisation"]["before"]
    assert evaluation["retention"]["base"] is not None and evaluation["retention"]["cost"] is not None
    assert evaluation["recall"]["probes"] == 2
    assert evaluation["recall"]["memory_on"]["recall"] > evaluation["recall"]["memory_off"]["recall"]
    # Questions in words the training text never used, asked memory on and off, each marked remembered or not.
    held_out = evaluation["held_out"]
    assert held_out["probes"] == 4 and {f["answer"] for f in held_out["facts"]} == {"Pixel", "Porto"}
    assert all(isinstance(f["remembered"], bool) for f in held_out["facts"])
    assert held_out["memory_on"]["recall"] == sum(f["remembered"] for f in held_out["facts"]) / 4

    # The job recorded its metrics at every step.
    job = service.jobs()[0]
    metrics = service.job(job["id"], metrics=True)["metrics"]
    assert [s for s, _ in metrics["loss"]] == list(range(1, 121))
    assert {"loss", "lr", "tokens_per_second", "elapsed", "eta", "rows_touched"} <= set(metrics)
    assert metrics["rows_touched"][-1][1] > 0

    # The version loads onto a fresh base model and answers from memory.
    report = service.evaluate("me", PROBES_A)
    assert report["summary"]["memory_on"]["recall"] == 1.0 and report["summary"]["memory_off"]["recall"] == 0.0

    # The slot index names the source and the n-gram that wrote a row the answer reads.
    folder = Path(pack["versions"][0]["path"])
    index = SlotIndex.open(folder / "slots")
    loaded = service.chat_runtime("me")
    memory = loaded.adapted.memory
    tokenizer = loaded.tokenizer
    ids = tokenizer("called Pixel", add_special_tokens=False)["input_ids"]
    from engram_app.engram import trace_tokens

    last = trace_tokens(memory, tokenizer, ids)[-1]
    hit = next(s for s in last.memory[0].slots if s.order == 2)
    writers = index.writers(hit.row)
    assert writers and writers[0].source_id == source
    assert any(w.ngram_ids == ids[-2:] for w in writers)  # the bigram ending at the last token


def test_anchors_are_the_base_models_own_replies_trained_with_the_facts_and_never_indexed(service, tmp_path):
    source = add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", max_steps=3, until_recalled=False, evaluate=False)
    cache = service.packs_store().folder("me") / "anchors.json"
    anchors = json.loads(cache.read_text())
    assert len(anchors) == 16 and all(item["reply_ids"] for item in anchors)  # generated once, memory off
    job = service.jobs()[0]
    log = [line["message"] for line in service.job(job["id"], log_tail=50)["log"]]
    new = len(fact_phrasings("My dog is called Pixel.")) + len(fact_phrasings("I live in Porto."))
    assert f"1 new sources ({new} examples), 0 replayed examples" in log
    assert f"{-(-new // 4)} anchors (the base model's own replies to general requests)" in log  # 0.25 per example
    version = Path(service.pack("me")["versions"][0]["path"])
    assert set(SlotIndex.open(version / "slots").gram_sources[:, 1].tolist()) == {source}  # no anchor wrote a row

    service.create_pack("plain", size="small")
    run_inline(service, "plain", max_steps=2, until_recalled=False, evaluate=False, anchors=0)
    assert not (service.packs_store().folder("plain") / "anchors.json").exists()
    # A job queued before anchors existed (its stored options lack the field) trains without them.
    assert TrainOptions.from_json({"max_steps": 5}).anchors == 0.0
    assert TrainOptions.from_json(TrainOptions().to_json()).anchors == 0.25


def test_incremental_training_keeps_what_the_first_job_taught(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", **QUICK)
    first = service.evaluate("me", PROBES_A)["summary"]["memory_on"]["recall"]
    assert first == 1.0
    b = add_profile(service, tmp_path, "garden.md", DOC_B)
    result = run_inline(service, "me", **QUICK)
    assert result["version"] == 2
    job = service.jobs()[0]
    assert job["plan"]["new"] == [b] and job["plan"]["replay"]  # only the notes are new; the profile is replayed
    second = service.evaluate("me", PROBES_A)["summary"]["memory_on"]["recall"]
    assert second >= 0.9 * first
    with pytest.raises(EngramError, match="Nothing new to learn"):
        service.train("me", TrainOptions(**QUICK), start_worker=False)

    # Replay is what keeps them: the same second job without it forgets the profile.
    service.rollback("me", 1)
    run_inline(service, "me", **QUICK, replay=0.0)
    assert service.evaluate("me", PROBES_A)["summary"]["memory_on"]["recall"] < 0.9 * first


def file_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_pack_of_a_hundred_million_rows_trains_in_jobs_with_immutable_versions(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("big", size="xlarge")
    assert service.pack("big")["storage"] == "mapped" and service.pack("big")["parameters"] == 3_200_000_000
    result = run_inline(service, "big", **QUICK)
    recall = result["evaluation"]["recall"]
    assert recall["memory_on"]["recall"] > recall["memory_off"]["recall"]
    v1 = Path(service.pack("big")["versions"][0]["path"])
    meta = json.loads((v1 / "table" / "table.json").read_text())
    assert meta["rows"] >= 10**8 and meta["base"] is None and not meta["delta"]
    assert 0 < meta["count"] <= result["evaluation"]["rows_touched"]
    disk = sum(p.stat().st_blocks * 512 for p in (v1 / "table").iterdir())
    assert disk < 2 * meta["count"] * 136 + 65536  # the written rows, not the 12.8 GB table
    before = file_bytes(v1)

    add_profile(service, tmp_path, "garden.md", DOC_B)
    assert run_inline(service, "big", **QUICK)["version"] == 2
    assert file_bytes(v1) == before  # versions are immutable: the job wrote a new one
    v2 = json.loads((v1.parent / "v2" / "table" / "table.json").read_text())
    assert v2["base"] is None and v2["count"] >= meta["count"]
    assert service.evaluate("big", PROBES_A)["summary"]["memory_on"]["recall"] == 1.0

    # Rollback, export and import work as for any pack.
    service.rollback("big", 1)
    short = GenerationOptions(max_new_tokens=8)
    on_v1 = service.chat("What is my dog called?", options=short, pack="big", save=False).reply
    exported = service.export_pack("big", tmp_path / "big.zip")
    service.import_pack(exported, "copy")
    assert service.chat("What is my dog called?", options=short, pack="copy", save=False).reply == on_v1


def test_a_size_the_machine_cannot_hold_is_refused_with_the_reason(service, tmp_path, monkeypatch):
    from engram_app.training import sizes

    ram = sizes.PRESETS["large"].needs()["ram_train"] - 1  # just too little for the large preset
    machine = {"ram": ram, "disk_free": sizes.PRESETS["huge"].needs()["disk"] - 1, "gpu": None}
    monkeypatch.setattr(sizes, "machine", lambda home: machine)
    rows = {r["name"]: r for r in sizes.describe(tmp_path)}
    assert rows["small"]["fits"] and rows["medium"]["fits"]
    assert not rows["large"]["fits"] and "RAM" in rows["large"]["refusal"]
    with pytest.raises(EngramError, match=f"needs .* GiB of RAM to train; this machine has {ram / sizes.GiB:.1f} GiB"):
        service.create_pack("big", size="large")
    machine["ram"] = 64 * sizes.GiB
    assert not sizes.describe(tmp_path)[-1]["fits"]
    with pytest.raises(EngramError, match="free disk"):
        service.create_pack("huge", size="huge")
    assert service.packs() == []
    out = CliRunner().invoke(cli, ["pack", "sizes", "--home", str(tmp_path), "--json"])
    assert out.exit_code == 0
    data = {r["name"]: r for r in json.loads(out.output)}
    assert set(data["xlarge"]["needs"]) >= {"ram_chat", "ram_train", "disk", "gpu"} and not data["huge"]["fits"]


def test_a_pack_that_learned_a_deleted_source_says_so_until_a_full_retrain(service, tmp_path):
    a = add_profile(service, tmp_path, "a.md", PROFILE_A)
    add_profile(service, tmp_path, "b.md", PROFILE_B)
    service.create_pack("me", size="small")
    run_inline(service, "me", max_steps=10)
    service.delete_source(a)
    assert service.pack("me")["deleted_sources_learned"] == [a]
    run_inline(service, "me", max_steps=10, full=True)
    pack = service.pack("me")
    assert pack["deleted_sources_learned"] == [] and pack["active_version"] == 2
    index = SlotIndex.open(Path(pack["versions"][1]["path"]) / "slots")
    assert a not in set(np.asarray(index.gram_sources)[:, 1].tolist())  # the retrain's index forgot it too


def test_rollback_points_the_pack_at_an_earlier_version(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", max_steps=5)
    add_profile(service, tmp_path, "b.md", PROFILE_B)
    run_inline(service, "me", max_steps=5)
    assert service.pack("me")["active_version"] == 2
    runner = CliRunner()
    common = ["--home", str(service.settings.home), "--model", service.settings.model]
    out = runner.invoke(cli, ["rollback", *common, "me", "1"])
    assert out.exit_code == 0, out.output
    assert service.pack("me")["active_version"] == 1
    assert [v["number"] for v in service.pack("me")["versions"]] == [1, 2]  # nothing deleted
    out = runner.invoke(cli, ["rollback", *common, "me", "7"])
    assert out.exit_code != 0 and "has no version 7" in out.output
    # The next job learns what version 1 had not learned (B) again.
    assert service.plan_training("me", TrainOptions())["parent"] == 1


def test_pack_creation_rejects_bad_names_sizes_collections_and_duplicates(service):
    for name in ("", "../x", ".hidden", "a b", "x" * 65):
        with pytest.raises(EngramError, match="Invalid pack name"):
            service.create_pack(name)
    with pytest.raises(EngramError, match="Unknown size"):
        service.create_pack("ok", size="gigantic")
    with pytest.raises(EngramError, match="No collection named 'work'"):
        service.create_pack("ok", collections=["work"])
    service.create_pack("ok", size="small")
    with pytest.raises(EngramError, match="exists already"):
        service.create_pack("ok")
    with pytest.raises(EngramError, match="No memory pack named 'nope'"):
        service.pack("nope")


def test_lora_only_and_engram_plus_lora_packs_train_and_load(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    for mode in ("lora", "engram+lora"):
        service.create_pack(mode.replace("+", "-"), size="small", mode=mode)
        result = run_inline(service, mode.replace("+", "-"), max_steps=20)
        assert result["version"] == 1
        folder = Path(service.pack(mode.replace("+", "-"))["versions"][0]["path"])
        assert (folder / "lora").is_dir()
        assert (folder / "slots").is_dir() == (mode == "engram+lora")
        reply = service.chat("Where do I live?", pack=mode.replace("+", "-")).reply
        assert isinstance(reply, str)


# --- the worker process ---------------------------------------------------------------------------

def test_train_wait_runs_a_job_to_the_end_with_a_worker_it_starts(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    runner = CliRunner()
    common = ["--home", str(service.settings.home), "--model", service.settings.model, "--device", "cpu"]
    assert runner.invoke(cli, ["pack", "create", *common, "me", "--size", "small"]).exit_code == 0
    assert not worker_alive(service.settings.home)
    out = runner.invoke(cli, ["train", *common, "--pack", "me", "--max-steps", "30", "--wait", "--json"])
    assert out.exit_code == 0, out.output
    job = json.loads(out.stdout)
    assert job["status"] == "done" and job["result"]["version"] == 1 and job["step"] == 30
    assert job["result"]["evaluation"]["recall"]["probes"] == 2
    listed = json.loads(runner.invoke(cli, ["jobs", *common, "--json"]).stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    packs = json.loads(runner.invoke(cli, ["packs", *common, "--json"]).stdout)
    assert packs[0]["active_version"] == 1
    assert worker_alive(service.settings.home)  # the worker it started waits for more work


@pytest.mark.parametrize("size", ["small", "xlarge"])
def test_a_killed_worker_leaves_the_pack_loadable_and_the_job_resumes(service, tmp_path, size):
    home = service.settings.home
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size=size)
    run_inline(service, "me", max_steps=20)
    add_profile(service, tmp_path, "b.md", PROFILE_B)
    job = service.train("me", TrainOptions(max_steps=500, checkpoint_seconds=0.5, until_recalled=False), start_worker=False)
    log = tmp_path / "worker.log"
    proc = worker_process(home, log)
    checkpoint = home / "packs" / "me" / "jobs" / str(job["id"]) / "checkpoint" / "state.json"

    def checkpointed_step():
        try:
            return json.loads(checkpoint.read_text())["step"] >= 40
        except (OSError, ValueError):
            return False

    wait_for(checkpointed_step, 180, f"a checkpoint past step 40\n{log.read_text()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    view = service.job(job["id"])
    assert view["status"] == "interrupted" and view["step"] < 500
    killed_at = json.loads(checkpoint.read_text())["step"]
    if size == "xlarge":  # a mapped table's checkpoint holds only the rows changed since version 1
        table = json.loads((checkpoint.parent / "adapter" / "table" / "table.json").read_text())
        assert table["delta"] and Path(table["base"]) == (home / "packs" / "me" / "v1" / "table").resolve()
    # The pack still loads, at its previous version.
    assert service.pack("me")["active_version"] == 1
    assert service.evaluate("me", PROBES_A[:1])["probes"][0]["memory_on"]["reply"] is not None

    proc = worker_process(home, log)
    try:
        final = wait_for(lambda: service.job(job["id"])["status"] in ("done", "failed") and service.job(job["id"]), 300,
                         f"the job to finish\n{log.read_text()[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
    assert final["status"] == "done", final
    assert final["result"]["version"] == 2 and final["step"] == 500
    messages = [line["message"] for line in service.job(job["id"], log_tail=1000)["log"]]
    assert any(m.startswith(f"resuming from the checkpoint at step {killed_at}") for m in messages), messages
    steps = [s for s, _ in service.job(job["id"], metrics=True)["metrics"]["loss"]]
    assert steps == list(range(1, 501))  # steps repeated after the kill are recorded once
    assert not (home / "packs" / "me" / "jobs" / str(job["id"])).exists()  # the checkpoint is cleaned up


def test_cancel_queue_and_chat_while_another_pack_trains(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("chatty", size="small")
    run_inline(service, "chatty", **QUICK)
    # Replies compared at one thread count: while a job trains the chat takes half the threads
    # (inference/threads.py), and sums in another order may change a near-tie of the tiny model.
    service.chat_threads.full = 1
    before = service.chat("What is my dog called?", pack="chatty").reply

    service.create_pack("busy", size="small")
    service.create_pack("next", size="small")
    long_job = service.train("busy", TrainOptions(max_steps=100_000, until_recalled=False))
    queued = service.train("next", TrainOptions(max_steps=10))
    doomed = service.train("next", TrainOptions(max_steps=10))
    wait_for(lambda: service.job(long_job["id"])["step"] >= 5, 120, "the long job to start")
    assert service.job(queued["id"])["status"] == "queued"  # one job at a time, in order

    # Chat with another pack while the worker trains: same answer as before, no interference.
    for _ in range(3):
        assert service.chat("What is my dog called?", pack="chatty").reply == before

    assert service.cancel(doomed["id"])["status"] == "cancelled"  # a queued job is cancelled at once
    service.cancel(long_job["id"])
    final = service.wait(long_job["id"], poll=0.2)
    assert final["status"] == "cancelled" and 5 <= final["step"] < 100_000
    assert final["result"]["version"] == 1  # it kept what it had learned
    assert service.pack("busy")["versions"][0]["evaluation"]["outcome"] == "stopped"
    second = service.wait(queued["id"], poll=0.2)
    assert second["status"] == "done" and second["started"] >= final["finished"]
    assert service.job(doomed["id"])["started"] is None and service.pack("next")["active_version"] == 1
    with pytest.raises(EngramError, match="done already"):
        service.cancel(queued["id"])


# --- eval -------------------------------------------------------------------------------------------

def test_eval_cli_reports_the_documented_json_shape(service, tmp_path):
    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", **QUICK)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(p.to_json()) for p in PROBES_A) + "\n")
    common = ["--home", str(service.settings.home), "--model", service.settings.model]
    out = CliRunner().invoke(cli, ["eval", *common, "--pack", "me", "--probes", str(probes), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert set(report) == {"probes", "summary"}
    for probe, expected in zip(report["probes"], PROBES_A):
        assert (probe["prompt"], probe["answer"]) == (expected.prompt, expected.answer)
        for side in ("memory_on", "memory_off"):
            assert set(probe[side]) == {"reply", "contains_answer", "logprob"}
            assert probe[side]["contains_answer"] == (expected.answer.lower() in probe[side]["reply"].lower())
            assert probe[side]["logprob"] < 0
    assert report["summary"]["memory_on"] == {"recall": 1.0, "mean_logprob": pytest.approx(
        sum(p["memory_on"]["logprob"] for p in report["probes"]) / 2, abs=1e-3)}
    assert set(report["summary"]["memory_off"]) == {"recall", "mean_logprob"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "no answer"}\n')
    out = CliRunner().invoke(cli, ["eval", *common, "--pack", "me", "--probes", str(bad)])
    assert out.exit_code != 0 and "line 2" in out.output and "Traceback" not in out.output
