"""A saved memory loads only onto the model it was trained with, down to the blocks' weights.

The embeddings alone do not tell a base model from its fine-tune with frozen embeddings, or from
the base with a LoRA merged into it: a memory trained on one would silently load onto the other.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engram_app.engram import EngramAttachError, EngramConfig, attach_engram, load_engram, save_engram
from engram_app.engram.model import find_decoder_layers, model_fingerprint
from tiny import tiny_family, tiny_tokenizer

CONFIG = EngramConfig(layers=[1], heads=4, rows_per_head=1009, head_dim=8)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A memory saved from the tiny Llama of seed 0."""
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer, CONFIG)
    return save_engram(memory, tmp_path_factory.mktemp("fingerprint") / "memory")


def fine_tuned(seed: int = 0) -> torch.nn.Module:
    """The same model with one block's MLP weight moved a little (~1% of its scale); embeddings frozen."""
    model = tiny_family("llama", seed=0)
    _, _, blocks = find_decoder_layers(model)
    weight = blocks[2].mlp.down_proj.weight
    with torch.no_grad():
        weight += 2e-4 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return model


def lora_merged() -> torch.nn.Module:
    """The same model with a small rank-4 LoRA on the query projections merged into its weights."""
    peft_model = get_peft_model(tiny_family("llama", seed=0), LoraConfig(r=4, target_modules=["q_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    return peft_model.merge_and_unload()


@pytest.mark.parametrize("make", [fine_tuned, lora_merged], ids=["fine-tuned block", "merged LoRA"])
def test_a_memory_refuses_a_model_with_the_same_embeddings_but_other_block_weights(saved, tokenizer, make):
    other = make()
    original = tiny_family("llama", seed=0)
    assert torch.equal(other.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert model_fingerprint(other)["embedding_signs_sha256"] == model_fingerprint(original)["embedding_signs_sha256"]
    with pytest.raises(EngramAttachError, match=r"trained for another base model.*blocks_sha256: saved '[0-9a-f]{16}'"):
        load_engram(other, tokenizer, saved)


def test_a_memory_loads_onto_an_identical_model(saved, tokenizer):
    memory = load_engram(tiny_family("llama", seed=0), tokenizer, saved)
    assert memory.fingerprint()["blocks_sha256"] == model_fingerprint(tiny_family("llama", seed=0))["blocks_sha256"]


def test_the_fingerprint_is_the_same_in_bf16_and_with_an_unmerged_lora_wrapped_around_the_model():
    reference = model_fingerprint(tiny_family("llama", seed=0))
    assert model_fingerprint(tiny_family("llama", seed=0).to(torch.bfloat16)) == reference
    # LoRA trained beside the memory (saved in lora/, loaded after it): its own weights are not the base's.
    base = tiny_family("llama", seed=0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-2)
    assert model_fingerprint(base) == reference
    # The test can fail: a model with other weights has another fingerprint.
    assert model_fingerprint(tiny_family("llama", seed=1))["blocks_sha256"] != reference["blocks_sha256"]


def without_key(data, key: str):
    if isinstance(data, dict):
        return {k: without_key(v, key) for k, v in data.items() if k != key}
    if isinstance(data, list):
        return [without_key(v, key) for v in data]
    return data


def test_a_memory_saved_before_blocks_were_fingerprinted_still_loads_onto_its_model(saved, tokenizer, tmp_path):
    old = tmp_path / "old-memory"
    old.mkdir()
    for path in saved.iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((saved / "adapter_config.json").read_text())
    assert "blocks_sha256" in json.dumps(config)
    (old / "adapter_config.json").write_text(json.dumps(without_key(config, "blocks_sha256")))
    load_engram(tiny_family("llama", seed=0), tokenizer, old)
    # Its embeddings are still checked.
    with pytest.raises(EngramAttachError, match="embedding_signs_sha256"):
        load_engram(tiny_family("llama", seed=1), tokenizer, old)
