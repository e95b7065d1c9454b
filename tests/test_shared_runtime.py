"""Packs as adapters on one shared base model: the same replies as a separate copy per pack, memory
off, one copy of the base model, LRU eviction within a budget, unloading, new versions."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import GenerationMixin, PreTrainedModel

from engram_app.cli import cli
from engram_app.engram import find_decoder_layers
from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions, Message, Runtime
from engram_app.inference.pool import pack_prefix
from engram_app.models import load_base_model
from engram_app.service import Service
from engram_app.settings import Settings, resolve_device
from engram_app.training import adapters
from test_training import DOC_B, PROFILE_A, add_profile, run_inline, stop_worker

SHORT = GenerationOptions(max_new_tokens=10)
QUESTIONS = ["What is my dog called?", "Where do I live?"]
PACKS = {"mem": "engram", "lo": "lora", "both": "engram+lora"}
# Brief and cheap: enough to move every pack's replies away from the base model's.
TRAIN = dict(max_steps=10, lr=3e-2, lora_lr=3e-2, batch_size=4, max_length=64, evaluate=False, until_recalled=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """Three packs, one per mode, trained briefly on the same sources (never changed by the tests)."""
    tmp = tmp_path_factory.mktemp("shared")
    service = Service(Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu"))
    add_profile(service, tmp, "a.md", PROFILE_A)
    add_profile(service, tmp, "garden.md", DOC_B)
    for name, mode in PACKS.items():
        service.create_pack(name, size="small", mode=mode)
        run_inline(service, name, **TRAIN)
    yield service
    stop_worker(service.settings.home)


def prompt(service: Service, question: str) -> list[int]:
    return service.runtime.chat_ids([Message("user", question)])


def copy_reply(service: Service, pack: str | None, question: str, version: int | None = None) -> list[int]:
    """Token ids of the reply of a separate copy of the base model wearing ``pack`` (how chat worked before)."""
    loaded = load_base_model(service.settings.model, service.settings.models_dir, resolve_device("cpu"))
    if pack is not None:
        store = service.packs_store()
        folder = Path(store.version(pack, version)["path"])
        adapted = adapters.load(loaded.model, loaded.tokenizer, folder, store.config(store.row(pack)))
        adapted.model.eval()
        loaded = dataclasses.replace(loaded, model=adapted.model)
    return [t.id for t in Runtime(loaded).stream_ids(prompt(service, question), SHORT)]


def shared_reply(service: Service, pack: str | None, question: str, memory: bool = True) -> list[int]:
    result = service.chat(question, options=SHORT, pack=pack, memory=memory, save=False)
    return [t.id for t in result.tokens]


@pytest.fixture(scope="module")
def copies(trained):
    """The reply of a separate copy per pack (and of the base model alone), per question."""
    return {(pack, q): copy_reply(trained, pack, q) for pack in [None, *PACKS] for q in QUESTIONS}


def test_packs_of_every_mode_on_one_model_reply_exactly_as_a_separate_copy_per_pack(trained, copies):
    for question in QUESTIONS:
        for pack in PACKS:
            assert shared_reply(trained, pack, question) == copies[(pack, question)], (pack, question)
    # The packs answer differently from the base model: the comparison above is not of base replies.
    assert any(copies[(pack, q)] != copies[(None, q)] for pack in PACKS for q in QUESTIONS)


def test_interleaved_replies_of_three_packs_and_the_base_model_are_those_of_separate_copies(trained, copies):
    runs = [(pack, q) for q in QUESTIONS for pack in [*PACKS, None]]
    streams = [trained.stream_chat([], q, SHORT, pack=pack) for pack, q in runs]
    ids: list[list[int]] = [[] for _ in runs]
    live = [True] * len(runs)
    while any(live):  # one token of each reply in turn: the active adapters switch on every call
        for i, stream in enumerate(streams):
            if live[i]:
                try:
                    ids[i].append(next(stream).id)
                except StopIteration:
                    live[i] = False
    assert ids == [copies[run] for run in runs]


def test_memory_off_is_the_base_model_with_every_adapter_off(trained, copies):
    for pack in PACKS:
        assert trained.chat_runtime(pack, memory=False) is trained.runtime
        for question in QUESTIONS:
            assert shared_reply(trained, pack, question, memory=False) == copies[(None, question)]
    assert shared_reply(trained, None, QUESTIONS[0]) == copies[(None, QUESTIONS[0])]


def models_alive() -> int:
    gc.collect()
    return sum(isinstance(o, PreTrainedModel) and isinstance(o, GenerationMixin) for o in gc.get_objects())


def test_every_pack_and_memory_off_share_one_copy_of_the_base_model(trained):
    before = models_alive()
    service = Service(trained.settings)  # a new app on the same data root: nothing loaded yet
    runtimes = [service.chat_runtime(pack, memory) for pack in PACKS for memory in (True, False)]
    runtimes.append(service.runtime)
    assert models_alive() == before + 1
    base = service.runtime.model
    assert len(service._pools) == 1
    assert all(r.model is base and (r.adapted is None or r.adapted.base is base) for r in runtimes)
    lora = service.chat_runtime("lo").adapted.lora
    assert lora is service.chat_runtime("both").adapted.lora and lora.base_model.model is base
    assert set(lora.peft_config) == {service.chat_runtime("lo").spec.key, service.chat_runtime("both").spec.key}
    memories = service.chat_runtime("mem").adapted.memory.peft_model
    assert memories is service.chat_runtime("both").adapted.memory.peft_model
    assert set(memories.peft_config) == {service.chat_runtime("mem").spec.key, service.chat_runtime("both").spec.key}


def test_past_the_budget_the_least_recently_used_pack_is_unloaded_and_reloads_with_the_same_reply(trained, copies):
    for pack in PACKS:
        trained.chat_runtime(pack)
    sizes = {row["pack"]: row["bytes"] for row in trained.loaded_packs()}
    assert set(sizes) == set(PACKS) and all(n > 0 for n in sizes.values())
    # A second app on the same data root whose budget holds the largest pack but no two packs.
    budget = max(sizes.values()) + min(sizes.values()) - 1
    small = Service(dataclasses.replace(trained.settings, adapter_budget_bytes=budget))
    question = QUESTIONS[0]
    assert shared_reply(small, "mem", question) == copies[("mem", question)]
    assert shared_reply(small, "both", question) == copies[("both", question)]
    assert [row["pack"] for row in small.loaded_packs()] == ["both"]  # "mem" was the least recently used
    assert shared_reply(small, "mem", question) == copies[("mem", question)]  # loaded again, same reply
    assert [row["pack"] for row in small.loaded_packs()] == ["mem"]
    # Two replies interleaved, each evicting the other at every call, still answer as separate copies.
    streams = {pack: small.stream_chat([], question, SHORT, pack=pack) for pack in ("mem", "both")}
    ids = {pack: [] for pack in streams}
    live = set(streams)
    while live:
        for pack in list(live):
            try:
                ids[pack].append(next(streams[pack]).id)
            except StopIteration:
                live.discard(pack)
    assert ids == {pack: copies[(pack, question)] for pack in streams}
    assert len(small.loaded_packs()) == 1


def test_unload_frees_a_packs_adapters_and_its_next_chat_loads_them_again(trained, copies):
    question = QUESTIONS[1]
    trained.chat_runtime("mem")
    loaded_before = {row["pack"]: row["bytes"] for row in trained.loaded_packs()}
    info = trained.unload_pack("mem")
    assert info == {"pack": "mem", "unloaded": 1, "freed_bytes": loaded_before["mem"]}
    assert "mem" not in {row["pack"] for row in trained.loaded_packs()}
    pool = trained._pools[trained.settings.model]
    prefix = pack_prefix(trained.packs_store().row("mem")["id"])
    assert not [key for key in pool.loaded_adapters() if key.startswith(prefix)]
    assert trained.unload_pack("mem") == {"pack": "mem", "unloaded": 0, "freed_bytes": 0}
    assert shared_reply(trained, "mem", question) == copies[("mem", question)]
    with pytest.raises(EngramError, match="No memory pack named 'nope'"):
        trained.unload_pack("nope")
    # The last pack unloaded: its memory's hooks leave the model, which is the base model again.
    alone = Service(trained.settings)
    assert shared_reply(alone, "lo", question) == copies[("lo", question)]
    assert shared_reply(alone, "mem", question) == copies[("mem", question)]
    alone.unload_pack("mem")
    alone.unload_pack("lo")
    pool = alone.model_pool(alone.settings.model)
    backbone, _, blocks = find_decoder_layers(pool.base)
    assert alone.loaded_packs() == [] and not backbone._forward_pre_hooks and not blocks[1]._forward_pre_hooks
    assert not [name for name, _ in pool.base.named_parameters() if "lora_" in name]
    assert shared_reply(alone, None, question) == copies[(None, question)]
    assert shared_reply(alone, "both", question) == copies[("both", question)]
    common = ["--home", str(trained.settings.home), "--model", trained.settings.model]
    out = CliRunner().invoke(cli, ["pack", "unload", *common, "mem", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"pack": "mem", "unloaded": 0, "freed_bytes": 0}  # a new process holds none


def test_a_new_version_of_a_pack_is_used_at_once_and_the_old_one_freed(trained, copies, tmp_path):
    question = QUESTIONS[0]
    service = trained
    service.create_pack("grow", size="small", mode="engram+lora")
    run_inline(service, "grow", **TRAIN)
    first = shared_reply(service, "grow", question)
    assert first == copy_reply(service, "grow", question)
    add_profile(service, tmp_path, "b.md", "- My favorite color is green.\n")
    run_inline(service, "grow", **TRAIN)
    assert shared_reply(service, "grow", question) == copy_reply(service, "grow", question, version=2)
    versions = [row["version"] for row in service.loaded_packs() if row["pack"] == "grow"]
    assert versions == [2]
    service.rollback("grow", 1)
    assert shared_reply(service, "grow", question) == first
    assert [row["version"] for row in service.loaded_packs() if row["pack"] == "grow"] == [1]


def test_a_pack_whose_adapters_fail_to_load_leaves_nothing_behind_and_loads_once_fixed(trained, copies, monkeypatch):
    # The memory of the engram+lora pack loads, then its LoRA fails (a broken file): the next chat
    # must not meet a half-registered adapter ("already exists") but load the pack whole.
    trained.unload_pack("both")
    pool = trained.model_pool(trained.settings.model)
    real = pool._load_lora

    def broken(key, path):
        raise OSError("truncated adapter file")

    monkeypatch.setattr(pool, "_load_lora", broken)
    with pytest.raises(OSError, match="truncated"):
        shared_reply(trained, "both", QUESTIONS[0])
    prefix = pack_prefix(trained.packs_store().row("both")["id"])
    assert pool._engram is None or not any(k.startswith(prefix) for k in pool._engram.peft_config)
    monkeypatch.setattr(pool, "_load_lora", real)
    assert shared_reply(trained, "both", QUESTIONS[0]) == copies[("both", QUESTIONS[0])]
