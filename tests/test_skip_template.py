"""N-grams that skip the chat template's tokens (``EngramConfig.skip_template``).

Without it, the n-grams at the assistant's turn header ("<|im_end|>\\n<|im_start|>assistant\\n")
are the same for every question, so the memory cannot key the first token of a reply on what was
asked. With it, the header's tokens are transparent: the n-grams reach back to the last words of
the user's message. The decoding paths (one call, a KV cache, a single step) are checked against
each other in test_engram_decoding.py, which runs every test once with skipping.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engram_app.engram import EngramConfig, attach_engram, load_engram, save_engram
from engram_app.engram.compression import template_token_ids
from engram_app.engram.hashing import shifted_ngrams, skipping_ngrams, visible_tail
from tiny import tiny_family, tiny_tokenizer

SMALL = dict(layers=[1], heads=2, rows_per_head=101, head_dim=4)
BOUNDARY = 99


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def reference_grams(sequence: list[int], skip: set[int], order: int) -> list[list[int]]:
    """Per position: its own id, then the ids before it with the skipped ones dropped (BOUNDARY
    before the start), most recent first: the definition, by plain lists."""
    out = []
    for t, token in enumerate(sequence):
        kept = [BOUNDARY] * order + [i for i in sequence[:t] if i not in skip]
        out.append([token, *reversed(kept[-(order - 1):])])
    return out


def test_skipping_ngrams_reach_over_the_skipped_ids_to_the_tokens_before_them():
    rng = random.Random(0)
    skip = {3, 4, 5}
    for _ in range(50):
        sequence = [rng.choice([3, 4, 5, 10, 11, 12, 13]) for _ in range(rng.randint(1, 20))]
        history = torch.full((1, 2), BOUNDARY)
        grams = skipping_ngrams(torch.tensor([sequence]), history, 3, torch.tensor(sorted(skip)))
        assert grams[0].tolist() == reference_grams(sequence, skip, 3)


def test_a_sequence_split_over_two_calls_keys_as_one_call_does():
    """The second call's history is the last ids of the first that were not skipped (a KV cache's state)."""
    rng = random.Random(1)
    skip = torch.tensor([3, 4, 5])
    for _ in range(80):  # up to 60 ids: runs of skipped ids longer than the tail's first window (16)
        sequence = torch.tensor([[rng.choice([3, 4, 5, 10] if rng.random() < 0.5 else [3, 4, 5, 3, 4, 5, 3, 11])
                                  for _ in range(rng.randint(2, 60))]])
        cut = rng.randint(1, sequence.shape[1] - 1)
        start = torch.full((1, 2), BOUNDARY)
        whole = skipping_ngrams(sequence, start, 3, skip)
        history = visible_tail(sequence[:, :cut], skip, 2, BOUNDARY)
        second = skipping_ngrams(sequence[:, cut:], history, 3, skip)
        assert torch.equal(second, whole[:, cut:])


def test_with_nothing_skipped_the_ngrams_are_the_plain_shifted_ones():
    sequence = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(2))
    history = torch.full((3, 2), BOUNDARY)
    assert torch.equal(skipping_ngrams(sequence, history, 3, torch.tensor([], dtype=torch.long)),
                       shifted_ngrams(sequence, history, 3))


def test_removing_the_template_tokens_from_a_rendered_chat_leaves_the_messages(tokenizer):
    skipped = set(template_token_ids(tokenizer))
    # Words with none of the letters of "system", "user", "assistant": no piece of them is the template's.
    messages = [{"role": "user", "content": "good dog"}, {"role": "assistant", "content": "hold doll"}]
    ids = prompt_ids(tokenizer, messages)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in skipped
    assert tokenizer.decode([i for i in ids if i not in skipped]) == "good doghold doll"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def question_rows(memory, tokenizer, question: str) -> torch.Tensor:
    """The rows the memory reads at the last position of the prompt: where the reply's first token is chosen."""
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": question}])])
    return memory._address(ids, None, None).rows[0, -1]


def test_the_first_token_of_a_reply_is_keyed_on_the_last_words_of_the_question(tokenizer):
    plain = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(**SMALL))
    skipping = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(skip_template=True, **SMALL))
    dog, home = "what is the dog called?", "where is the home?"
    assert torch.equal(question_rows(plain, tokenizer, dog), question_rows(plain, tokenizer, home))  # the flaw
    assert not torch.equal(question_rows(skipping, tokenizer, dog), question_rows(skipping, tokenizer, home))
    # The same last words, the same rows: the key is the end of the question, not the whole of it.
    assert torch.equal(question_rows(skipping, tokenizer, dog), question_rows(skipping, tokenizer, "the cat is called?"))


def test_the_skipped_ids_are_saved_and_a_loaded_memory_addresses_the_same_rows(tokenizer, tmp_path):
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(skip_template=True, **SMALL))
    assert memory.config.template_ids
    folder = save_engram(memory, tmp_path / "memory")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["skip_template"] is True and saved["template_ids"] == memory.config.template_ids
    loaded = load_engram(tiny_family("llama", seed=0), tokenizer, folder)
    question = "what is the dog called?"
    assert torch.equal(question_rows(loaded, tokenizer, question), question_rows(memory, tokenizer, question))


def test_a_default_config_saves_no_skip_fields():
    data = EngramConfig(**SMALL).to_dict()
    assert "skip_template" not in data and "template_ids" not in data  # earlier memories keep their config
    assert EngramConfig.from_dict(data).skip_template is False


@pytest.mark.parametrize("bad", [{"skip_template": "yes"}, {"template_ids": [1, -2]}, {"template_ids": "1,2"}])
def test_a_malformed_skip_setting_is_refused(bad):
    with pytest.raises(ValueError, match="skip_template|template_ids"):
        EngramConfig(**bad)


def test_a_documents_words_that_compress_with_the_templates_are_not_skipped(tokenizer):
    """The template's tokens get canonical ids of their own: " user" in a document keeps its id and
    stays in the n-grams, though compression would merge it with the template's "user"."""
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer,
                           EngramConfig(skip_template=True, compression_strip=True, **SMALL))
    plain = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(compression_strip=True, **SMALL))
    template = set(memory.config.template_ids)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in template
    classes = {int(plain.compression[t]) for t in template}
    merged = [i for i in range(len(tokenizer)) if i not in template and int(plain.compression[i]) in classes]
    assert merged  # tokens compression merges with a template token (whitespace runs, " user", ...)
    assert not set(memory.compression[merged].tolist()) & set(memory.skip_ids.tolist())
    assert torch.equal(memory.compression[merged], plain.compression[merged])  # their ids are unchanged


def test_left_padding_and_one_token_steps_key_as_one_unpadded_call(tokenizer):
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer, EngramConfig(skip_template=True, **SMALL))
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "what is the dog called?"}])])
    whole = memory._address(ids, None, None).rows
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    assert torch.equal(memory._address(padded, mask, None).rows[:, 5:], whole)
    with torch.no_grad():
        cache = memory.base_model(ids[:, :-1], use_cache=True).past_key_values
    assert torch.equal(memory._address(ids[:, -1:], None, cache).rows, whole[:, -1:])  # the step fast path
