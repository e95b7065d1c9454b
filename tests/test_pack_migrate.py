"""Moving a pack to another base model (`pack migrate`): a pack on the new model learns what the old
one learned, its job trains to the end, and its evaluation compares both packs on the same probes.

Two tiny random models of different families and shapes: the session's Llama (2 layers, width 64)
and a Qwen2 built here (3 layers, width 48), both with the tiny tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.errors import EngramError
from engram_app.models import resolve_model
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training.text import Probe
from test_training import PROFILE_A, add_profile, run_inline, stop_worker
from tiny import FAMILY_CONFIGS, tiny_family, tiny_tokenizer

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model folder: another family and shape than the Llama of ``tiny_model_dir``."""
    tokenizer = tiny_tokenizer()
    FAMILY_CONFIGS["qwen2-narrow"] = {**FAMILY_CONFIGS["qwen2"], "hidden_size": 48, "intermediate_size": 96}
    try:
        model = tiny_family("qwen2-narrow", vocab_size=len(tokenizer), seed=1)
    finally:
        del FAMILY_CONFIGS["qwen2-narrow"]
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A data root with pack "me" on the tiny Llama, trained on a profile until it recalls both facts."""
    folder = tmp_path_factory.mktemp("migrate")
    service = Service(Settings(home=folder / "home", model=str(tiny_model_dir), device="cpu"))
    source = add_profile(service, folder, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", max_steps=120, lr=3e-3, evaluate=False, anchors=0)  # stops once both facts are recalled
    yield service, source
    stop_worker(service.settings.home)


def test_a_pack_moved_to_another_model_family_learns_the_same_sources_and_compares_both_packs_recall(
        trained, qwen_dir):
    """`pack migrate --wait --json`: the worker trains the new pack to the end and measures both packs."""
    service, source = trained
    common = ["--home", str(service.settings.home), "--model", str(qwen_dir), "--device", "cpu"]
    out = CliRunner().invoke(cli, ["pack", "migrate", *common, "me", "--max-steps", "8", "--no-until-recalled",
                                   "--wait", "--json"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.stdout)
    new = printed["pack"]
    assert new["name"] == "me-on-tiny-qwen2" and new["active_version"] == 1
    assert new["base_model"] == str(qwen_dir.resolve())
    assert (new["preset"], new["mode"], new["collections"]) == ("small", "engram", [])  # the old pack's
    job = printed["job"]
    assert job["status"] == "done" and job["step"] == 8 and job["result"]["version"] == 1
    assert job["plan"] == {"new": [source], "replay": [], "learned": [source]}  # what the old pack learned
    migration = printed["migration"]
    assert migration["from"] == {"pack": "me", "version": 1, "base_model": service.settings.model}
    assert migration["sources"] == [source] and migration["job"] == job["id"]
    assert new["migrated_from"] == {k: v for k, v in migration.items() if k != "comparison"}

    evaluation = service.pack("me-on-tiny-qwen2")["versions"][0]["evaluation"]
    comparison = migration["comparison"]
    assert comparison == evaluation["migration"] == job["result"]["evaluation"]["migration"]
    assert comparison["probes"] == evaluation["recall"]["probes"] == 2
    asked = [Probe(f["prompt"], f["answer"]) for f in comparison["facts"]]
    assert [p.answer for p in asked] == ["Pixel", "Porto"]
    # The new side is the version's own recall; the old side is what the old pack answers to the same probes.
    assert comparison["to"]["recall"] == evaluation["recall"]["memory_on"]["recall"]
    assert comparison["to"]["recalled"] == sum(f["to"] for f in comparison["facts"])
    old = service.evaluate("me", asked)["summary"]
    assert comparison["from"]["recall"] == old["memory_on"]["recall"] == 1.0
    assert comparison["from"]["recalled"] == 2 and all(f["from"] for f in comparison["facts"])
    assert comparison["from"]["mean_logprob"] == old["memory_on"]["mean_logprob"]
    assert comparison["to"]["base_model"] == str(qwen_dir.resolve())
    # The new pack answers on its own base model, a Qwen2.
    assert type(service.chat_runtime("me-on-tiny-qwen2").adapted.base).__name__ == "Qwen2ForCausalLM"
    # Migrating again under the default name is refused: the name is taken now.
    again = CliRunner().invoke(cli, ["pack", "migrate", *common, "me", "--max-steps", "5"])
    assert again.exit_code == 1 and "A pack named 'me-on-tiny-qwen2' exists already" in again.output


def test_migrate_refuses_an_unknown_pack_an_unknown_model_the_same_model_and_a_taken_name(trained, qwen_dir, tmp_path):
    service, _source = trained
    service.create_pack("untrained", size="small")
    packs_before, jobs_before = [p["name"] for p in service.packs()], len(service.jobs())
    with pytest.raises(EngramError, match=r"No memory pack named 'nope' \(packs: me"):
        service.migrate_pack("nope", str(qwen_dir), start_worker=False)
    with pytest.raises(EngramError, match="Model 'no such model' not found"):
        service.migrate_pack("me", "no such model", start_worker=False)
    with pytest.raises(EngramError, match=f"The folder {tmp_path} holds no model"):
        service.migrate_pack("me", str(tmp_path), start_worker=False)
    with pytest.raises(EngramError, match="Pack 'me' is on .* already: choose another base model"):
        service.migrate_pack("me", service.settings.model, start_worker=False)
    with pytest.raises(EngramError, match="A pack named 'me' exists already: choose another name with --name"):
        service.migrate_pack("me", str(qwen_dir), new_name="me", start_worker=False)
    with pytest.raises(EngramError, match="Pack 'untrained' has no trained version yet, so there is nothing to move"):
        service.migrate_pack("untrained", str(qwen_dir), start_worker=False)
    with pytest.raises(EngramError, match="Name the base model to move the pack to"):
        service.migrate_pack("me", None, start_worker=False)
    # Nothing was created or queued by the refusals.
    assert [p["name"] for p in service.packs()] == packs_before and len(service.jobs()) == jobs_before


def test_the_default_name_is_the_pack_on_the_model_slug(qwen_dir):
    from engram_app.training.migrate import default_name

    assert default_name("me", str(qwen_dir)) == "me-on-tiny-qwen2"
    assert default_name("x" * 60, "org/Some-Model") == "x" * 60 + "-on"  # cut to 64 characters, no trailing "-"
    assert resolve_model("org/Some-Model").name == "org--some-model"
