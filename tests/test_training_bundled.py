"""Memory training on the real bundled model (SmolLM2-135M-Instruct): what a person gave it, a profile
file, a fact typed into "Remember this" and a chat saved to memory, is recalled."""

import pytest

from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import JobQueue, TrainOptions
from engram_app.training.runner import JobRunner
from engram_app.training.text import Probe

pytestmark = pytest.mark.slow

PROFILE = "# About me\n- I have a turtle named Timothy.\n"
PROBES = [Probe("What is my turtle called?", "Timothy"), Probe("What is my dog called?", "Pixel"),
          Probe("Where do I live?", "Porto")]


def test_a_profile_a_remembered_fact_and_a_saved_chat_are_trained_and_recalled_with_memory_on_only(bundled_home,
                                                                                                    tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(bundled_home / "models")
    service = Service(Settings(home=home, device="cpu"))
    profile = tmp_path / "me.md"
    profile.write_text(PROFILE)
    assert service.ingest([profile])[0].kind == "profile"  # one first-person line: a profile
    assert service.remember("My dog is called Pixel.").kind == "profile"  # "Remember this" (Library tab, CLI)
    said = service.chat("I live in Porto.", options=GenerationOptions(max_new_tokens=12))  # a chat with the model
    saved = service.remember_conversation(said.conversation_id)  # "Save this conversation to memory"
    assert saved.status == "added" and saved.kind == "chat"
    service.create_pack("me")
    # Bounded by steps only (a time budget would make the result depend on the machine's speed), and
    # stopped once the facts are recalled with a margin twice in a row: a cap, not the number of steps it takes.
    job = service.train("me", TrainOptions(max_steps=200, evaluate=False), start_worker=False)
    queue = JobQueue(service.db())
    row = queue.claim("test")
    result = JobRunner(service.settings, service.db(), row).run()
    queue.finish(job["id"], "done", result)
    assert result["version"] == 1
    print(result["evaluation"]["outcome"], result["steps"])
    assert result["evaluation"]["outcome"] in ("recalled", "finished"), result  # 50 steps here; 200 is the cap

    report = service.evaluate("me", PROBES)
    for probe in report["probes"]:
        print(probe["prompt"], "| on:", probe["memory_on"]["reply"][:60], "| off:", probe["memory_off"]["reply"][:60])
    assert report["summary"]["memory_on"]["recall"] >= 2 / 3
    assert report["summary"]["memory_off"]["recall"] == 0.0
    # Memory on, the reply streams from the pack's active version.
    assert "Porto" in service.chat("Where do I live?", pack="me").reply
