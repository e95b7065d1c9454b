"""Token compression that strips surrounding whitespace (``EngramConfig.compression_strip``).

Off by default, so saved memories keep their addressing; on, " the" and "the" share a canonical
id as in DeepSeek's reference code. The option must survive save/load like every other field.
"""

from __future__ import annotations

import json

import pytest
import torch

from engram_app.engram import EngramConfig, attach_engram, load_engram, save_engram
from engram_app.engram.compression import build_compression, normalise
from tiny import tiny_family, tiny_tokenizer

SMALL = dict(layers=[1], heads=2, rows_per_head=101, head_dim=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def single_token(tokenizer, text: str) -> int:
    """The id of ``text`` when the tiny tokenizer has it as one token (the test relies on it)."""
    ids = tokenizer.encode(text)
    assert len(ids) == 1, f"{text!r} is not one token of the tiny tokenizer: {ids}"
    return ids[0]


def test_with_strip_a_spaced_word_and_the_bare_word_share_a_compressed_id(tokenizer):
    spaced, bare = single_token(tokenizer, " the"), single_token(tokenizer, "The")  # "The" normalises to "the"
    mapping = build_compression(tokenizer, strip=True)
    assert int(mapping[spaced]) == int(mapping[bare])


def test_without_strip_a_spaced_word_and_the_bare_word_stay_apart(tokenizer):
    spaced, bare = single_token(tokenizer, " the"), single_token(tokenizer, "The")
    mapping = build_compression(tokenizer)
    assert int(mapping[spaced]) != int(mapping[bare])
    assert int(mapping[spaced]) == int(mapping[single_token(tokenizer, " The")])  # case still merges


def test_strip_keeps_whitespace_only_tokens_as_one_space_and_shrinks_the_vocabulary(tokenizer):
    assert normalise("  \t", strip=True) == " "
    assert normalise(" Café ", strip=True) == "cafe"
    assert normalise(" Café ") == " cafe "
    kept = int(build_compression(tokenizer).max()) + 1
    stripped = int(build_compression(tokenizer, strip=True).max()) + 1
    assert stripped < kept


def test_the_strip_option_survives_save_and_load(tokenizer, tmp_path):
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(compression_strip=True, **SMALL))
    expected = build_compression(tokenizer, strip=True)
    assert torch.equal(memory.compression[: len(expected)], expected)
    folder = save_engram(memory, tmp_path / "memory")
    assert json.loads((folder / "adapter_config.json").read_text())["compression_strip"] is True
    assert EngramConfig.from_pretrained(folder).compression_strip is True
    loaded = load_engram(tiny_family("llama", seed=0), tokenizer, folder)
    assert loaded.config.compression_strip is True
    assert torch.equal(loaded.compression, memory.compression)


def test_a_default_config_saves_no_strip_field_and_reads_back_unstripped(tokenizer):
    config = EngramConfig(**SMALL)
    assert "compression_strip" not in config.to_dict()  # old readers and pack checks see the same fields
    assert EngramConfig.from_dict(config.to_dict()).compression_strip is False
    assert EngramConfig.from_dict(EngramConfig(compression_strip=True).to_dict()).compression_strip is True


def test_a_strip_value_that_is_not_a_boolean_is_refused():
    with pytest.raises(ValueError, match="compression_strip must be true or false"):
        EngramConfig(compression_strip="yes")


def test_a_new_packs_memory_strips_and_a_pack_file_made_before_keeps_its_addressing(tmp_path):
    from pathlib import Path

    from engram_app.errors import EngramError
    from engram_app.training.sizes import PRESETS
    from engram_app.training.transfer import PackFile, engram_config

    preset = PRESETS["medium"]
    assert preset.engram_config().compression_strip is True  # what a pack created now gets
    pack = PackFile(Path("old.zip"), None, {})
    saved_now = preset.engram_config().to_dict()
    saved_before = {k: v for k, v in saved_now.items() if k != "compression_strip"}  # field absent: not stripped
    assert engram_config(pack, saved_now, preset, "pack.json").compression_strip is True
    assert engram_config(pack, saved_before, preset, "pack.json").compression_strip is False
    with pytest.raises(EngramError, match="compression_strip .* must be true or false"):
        engram_config(pack, {**saved_now, "compression_strip": "yes"}, preset, "pack.json")
