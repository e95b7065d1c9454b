"""Engram as a PEFT method: registration, PEFT's standard calls, several memories, LoRA beside it,
mapped tables, the pre-PEFT format, and the pack's PEFT export, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import ROOT
from engram_app.engram import (
    EngramAttachError,
    EngramConfig,
    EngramOptimizer,
    EngramTuner,
    add_peft_type,
    attach_engram,
    load_engram,
    register_engram,
)
from engram_app.engram.storage import MappedTable
from tiny import tiny_family, tiny_tokenizer

IDS = torch.arange(3, 40)[None]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def small(tokenizer, **overrides) -> EngramConfig:
    return EngramConfig(**{"tokenizer": tokenizer, "layers": [1], "heads": 2, "rows_per_head": 1009, "head_dim": 8,
                           **overrides})


def randomise(memory, seed: int) -> None:
    """Move the zero-initialised projections away from zero, as training would (a memory of its own)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in memory.blocks.values():
            block.value.weight.copy_(torch.randn(block.value.weight.shape, generator=generator) * 0.5)
            block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=generator) * 0.5)
        if hasattr(memory.table, "weight"):
            memory.table.weight.copy_(torch.randn(memory.table.weight.shape, generator=generator))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.clone()


@pytest.fixture(scope="module")
def saved_adapter(tiny_model_dir, tokenizer, tmp_path_factory):
    """A randomised memory on the tiny model loaded from its folder, saved with save_pretrained."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, small(tokenizer))
    randomise(model.base_model.memory("default"), seed=1)
    folder = tmp_path_factory.mktemp("adapter") / "memory"
    model.save_pretrained(folder)
    return folder, logits(model)


# --- registration -------------------------------------------------------------------------------

def test_registration_adds_one_engram_peft_type_and_can_be_repeated(saved_adapter):
    register_engram()
    register_engram()
    assert add_peft_type("engram") is PeftType.ENGRAM is PeftType("ENGRAM") is PeftType["ENGRAM"]
    assert list(PeftType).count(PeftType.ENGRAM) == 1 and PeftType.ENGRAM == "ENGRAM"
    assert json.dumps({"peft_type": PeftType.ENGRAM}) == '{"peft_type": "ENGRAM"}'
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ENGRAM"] is EngramConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ENGRAM"] is EngramTuner and PEFT_TYPE_TO_PREFIX_MAPPING["ENGRAM"] == "engram_"
    folder, _ = saved_adapter
    config = PeftConfig.from_pretrained(folder)
    assert isinstance(config, EngramConfig) and config.peft_type == "ENGRAM"
    assert (config.layers, config.heads, config.rows_per_head, config.head_dim) == ([1], 2, 1009, 8)


# --- PEFT's standard calls ----------------------------------------------------------------------

def test_get_peft_model_starts_as_the_base_model_and_trains_only_the_memory(tokenizer):
    base = tiny_family("llama")
    before = logits(base)
    model = get_peft_model(base, small(tokenizer))
    assert torch.equal(logits(model), before)  # identity at initialisation
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("base_model.engram_memory.memories.default.") for name in trainable)
    randomise(model.base_model.memory("default"), seed=1)
    assert not torch.allclose(logits(model), before)


FRESH_PROCESS = """
import sys, torch
from peft.utils import PeftType
assert "ENGRAM" not in PeftType.__members__  # PEFT alone does not know Engram ...
import engram_app.engram  # ... importing the engine registers it
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({model!r}), {adapter!r})
with torch.no_grad():
    save_file({{"logits": model(input_ids=torch.arange(3, 40)[None]).logits}}, {out!r})
"""


def test_save_pretrained_writes_a_peft_folder_that_reloads_bit_identically_in_a_fresh_process(
        saved_adapter, tiny_model_dir, tmp_path):
    folder, expected = saved_adapter
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ENGRAM" and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert "tokenizer" not in config and config["task_type"] == "CAUSAL_LM"
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.engram_memory.memories.table.embedding.weight" in keys
    assert "base_model.engram_memory.memories.compression" in keys  # the token map: no tokenizer needed to load
    assert not any(".default." in key for key in keys)  # PEFT's files do not name the adapter
    code = FRESH_PROCESS.format(model=str(tiny_model_dir), adapter=str(folder), out=str(tmp_path / "out.safetensors"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], expected)


def test_several_memories_on_one_model_switch_and_each_gives_its_own_logits(tokenizer, tmp_path):
    alone = {}
    for name, seed in (("first", 1), ("second", 2)):
        model = get_peft_model(tiny_family("llama"), small(tokenizer, seed=seed))
        randomise(model.base_model.memory("default"), seed=seed)
        model.save_pretrained(tmp_path / name)
        alone[name] = logits(model)
    base = tiny_family("llama")
    plain = logits(base)
    model = PeftModel.from_pretrained(base, tmp_path / "first", adapter_name="first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    model.add_adapter("third", small(None))  # a new, untrained memory: the token map comes from the others
    tuner = model.base_model
    tables = [tuner.memory(name).table.weight for name in ("first", "second", "third")]
    assert len({t.data_ptr() for t in tables}) == 3  # every memory has a table of its own
    assert torch.equal(logits(model), alone["first"])  # adding adapters does not change the active one
    model.set_adapter("second")
    assert torch.equal(logits(model), alone["second"])
    model.set_adapter("first")
    assert torch.equal(logits(model), alone["first"])
    model.set_adapter("third")
    assert torch.equal(logits(model), plain)  # an untrained memory is the identity
    model.set_adapter("second")
    with model.disable_adapter():
        assert torch.equal(logits(model), plain)
    assert torch.equal(logits(model), alone["second"])
    with pytest.raises(ValueError, match="one Engram memory"):
        tuner.set_adapter(["first", "second"])


def test_an_engram_memory_and_a_lora_adapter_share_one_model_and_save_apart(tokenizer, tmp_path):
    base = tiny_family("llama")
    plain = logits(base)
    engram = get_peft_model(base, small(tokenizer))
    randomise(engram.base_model.memory("default"), seed=1)
    memory_only = logits(base)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    both = logits(lora)
    assert not torch.allclose(both, memory_only) and not torch.allclose(both, plain)
    with engram.disable_adapter():
        lora_only = logits(lora)
    engram.save_pretrained(tmp_path / "engram")
    lora.save_pretrained(tmp_path / "lora")
    assert not any("lora_" in key for key in load_file(tmp_path / "engram" / "adapter_model.safetensors"))
    assert not any("engram" in key for key in load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    # Loaded back in the other order onto a fresh model: the same logits, each adapter alone or both.
    fresh = tiny_family("llama")
    engram_again = PeftModel.from_pretrained(fresh, tmp_path / "engram")
    assert torch.equal(logits(fresh), memory_only)
    lora_again = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert torch.equal(logits(lora_again), both)
    with engram_again.disable_adapter():
        assert torch.equal(logits(lora_again), lora_only)
    assert set(engram_again.peft_config) == {"default"} and engram_again.peft_config["default"].peft_type == "ENGRAM"
    assert lora_again.peft_config["default"].peft_type == "LORA"


def test_a_mapped_table_trains_saves_and_reloads_through_peft_without_densifying(tokenizer, tmp_path):
    rows_per_head = 1_000_003  # 2 orders x 2 heads: 4 million rows, 128 MB if it were dense
    base = tiny_family("llama")
    model = get_peft_model(base, small(tokenizer, rows_per_head=rows_per_head, storage="mapped"))
    memory = model.base_model.memory("default")
    optimizer = EngramOptimizer(memory, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    expected = logits(model)
    written = memory.table.written_rows()
    assert 0 < written < 200
    model.save_pretrained(tmp_path / "mapped")
    folder = tmp_path / "mapped"
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert not any("table" in key for key in f.keys())  # the rows are not in PEFT's weights file
    assert weights.stat().st_size < 1_000_000
    assert json.loads((folder / "table" / "table.json").read_text())["count"] == written  # only written rows
    again = PeftModel.from_pretrained(tiny_family("llama"), folder)
    table = again.base_model.memory("default").table
    assert isinstance(table, MappedTable) and table.stored_rows() == written and len(table.changed) == 0
    assert torch.equal(logits(again), expected)


def test_a_memory_saved_before_engram_was_a_peft_method_still_loads(tokenizer, tmp_path):
    """The format-1 folder layout, as save_engram wrote it before: the memory's own keys."""
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, EngramConfig(layers=[1], heads=2, rows_per_head=1009, head_dim=8))
    randomise(memory, seed=3)
    expected = logits(model)
    old = tmp_path / "v1"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in memory.state_dict().items()}, old / "adapter_model.safetensors")
    settings = {k: v for k, v in memory.config.to_dict().items() if k in (
        "layers", "orders", "heads", "rows_per_head", "head_dim", "kernel_size", "use_conv", "init_std", "seed",
        "table_lr_scale", "storage")}
    (old / "adapter_config.json").write_text(json.dumps({
        "peft_type": "ENGRAM", "format_version": 1, "engram": {**settings, "format_version": 1},
        "base_model": {k: v for k, v in memory.fingerprint().items() if k != "blocks_sha256"}, "lora": False}))
    fresh = tiny_family("llama")
    load_engram(fresh, tokenizer, old)
    assert torch.equal(logits(fresh), expected)
    with pytest.raises(EngramAttachError, match="trained for another base model"):
        load_engram(tiny_family("llama", seed=1), tokenizer, old)
    with pytest.raises(ValueError, match="earlier Engram Studio.*load_engram"):
        PeftModel.from_pretrained(tiny_family("llama"), old)


def test_a_saved_memory_refuses_another_base_model_through_peft(saved_adapter):
    folder, _ = saved_adapter
    with pytest.raises(EngramAttachError, match="trained for another base model"):
        PeftModel.from_pretrained(tiny_family("llama"), folder)


# --- a pack version as a PEFT folder ------------------------------------------------------------

PROFILE = "# About me\n- My dog is called Pixel.\n- I live in Porto.\n"


def test_pack_export_format_peft_writes_a_folder_peft_loads_with_a_card_and_no_user_text(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from engram_app.cli import cli
    from engram_app.service import Service
    from engram_app.settings import Settings
    from engram_app.training import JobQueue, TrainOptions
    from engram_app.training.runner import JobRunner

    service = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    (tmp_path / "me.md").write_text(PROFILE)
    [added] = service.ingest([tmp_path / "me.md"])
    assert added.status == "added", added.reason
    service.create_pack("me", size="small")
    job = service.train("me", TrainOptions(max_steps=8, evaluate=False, until_recalled=False), start_worker=False)
    queue = JobQueue(service.db())
    row = queue.claim("test")
    assert row["id"] == job["id"]
    queue.finish(row["id"], "done", JobRunner(service.settings, service.db(), row).run())
    version = Path(service.pack("me")["versions"][0]["path"])

    out = tmp_path / "shared"
    common = ["--home", str(service.settings.home), "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(cli, ["pack", "export", *common, "me", "--format", "peft", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    # A local base model is named, never located: a path tells where the user keeps their files.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir.name
    assert str(tiny_model_dir) not in (out / "README.md").read_text()

    # PEFT loads the export and the version folder itself; both give what the app's own loader gives.
    tokenizer = tiny_tokenizer()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_engram(reference, tokenizer, version)
    expected = logits(reference)
    assert not torch.equal(expected, logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))  # it learned
    for folder in (out, version):
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
        assert torch.equal(logits(loaded), expected)

    # The model card: the Hub's metadata, what the memory is and learned from, how to load it; no user text.
    for card in ((out / "README.md").read_text(), (version / "README.md").read_text()):
        assert card.startswith("---\n") and "library_name: peft" in card and "- engram" in card
        assert f"Base model: `{tiny_model_dir.name}`" in card and "Learned from: 1 profile" in card
        assert "PeftModel.from_pretrained(base" in card and "import engram_app.engram" in card
        assert not any(text in card for text in ("Pixel", "Porto", "dog", "me.md"))
    result = CliRunner().invoke(cli, ["pack", "export", *common, "me", "--format", "peft", str(out)])
    assert result.exit_code != 0 and "not an empty folder" in result.output
