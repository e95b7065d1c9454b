"""It remembers me (#13), on the real bundled model: a ten-fact profile, trained as the app trains
it, then asked in words no training text uses, memory alone.

The profile, the ten questions and the controls are ``bench/held_out_profile.py``'s (the bench
checks that no question is a training question; so does this test). Training is bounded by steps
and seeded, and stops once the profile's own questions are recalled with a margin twice in a row:
the result does not depend on the machine's speed, only on the thread count (sums in another
order), and is the same with the CPU loaded by another process.
"""

import pytest

from bench.held_out_profile import ASKED, CONTROLS, FACTS
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import JobQueue, TrainOptions
from engram_app.training.evaluate import recalled
from engram_app.training.runner import JobRunner
from engram_app.training.text import GENERIC_QUESTIONS, fact_training_pairs

pytestmark = pytest.mark.slow


def test_ten_facts_asked_in_new_words_are_recalled_from_memory_alone_and_general_answers_kept(bundled_home,
                                                                                              tmp_path):
    trained = {q for fact in FACTS for q, _ in fact_training_pairs(fact)} | set(GENERIC_QUESTIONS)
    assert not trained & {p.prompt for p in ASKED + CONTROLS}  # asked in words its training never used
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(bundled_home / "models")
    service = Service(Settings(home=home, device="cpu"))
    profile = tmp_path / "me.md"
    profile.write_text("# About me\n" + "".join(f"- {fact}\n" for fact in FACTS))
    assert service.ingest([profile])[0].kind == "profile"
    service.create_pack("me")  # the default size: the memory at the model's middle block
    job = service.train("me", TrainOptions(max_steps=300, seed=0, evaluate=False), start_worker=False)
    queue = JobQueue(service.db())
    result = JobRunner(service.settings, service.db(), queue.claim("test")).run()
    queue.finish(job["id"], "done", result)
    print(result["evaluation"]["outcome"], result["steps"])
    assert result["evaluation"]["outcome"] == "recalled", result  # 300 steps is the cap, not the number it takes

    runtime = service.chat_runtime("me")
    probes = ASKED + CONTROLS
    with runtime.session():
        on = recalled(runtime.adapted, runtime.tokenizer, probes)
        with runtime.adapted.off():
            off = recalled(runtime.adapted, runtime.tokenizer, probes)
    for probe, a, b in zip(probes, on, off):
        print(f"{probe.prompt} ({probe.answer}): memory on {a}, off {b}")
    facts = len(ASKED)
    assert sum(on[:facts]) >= 8, "memory alone recalls at least 8 of the 10 facts asked in new words"
    assert sum(off[:facts]) <= 1, "without memory the base model knows at most one of them"
    kept = [i for i in range(facts, len(probes)) if off[i]]
    assert len(kept) >= 3 and all(on[i] for i in kept), "every general question the base model answers stays right"
