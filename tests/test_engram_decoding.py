"""The memory's decoding state follows its KV cache: beam search, rollbacks, batch operations.

Every test compares a run that goes through a KV cache (and so through the state the memory keeps
on it) with the same computation done without a cache, where each call sees the whole sequence
and there is no state to get wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engram_app.engram import EngramAttachError, EngramConfig, attach_engram
from engram_app.engram.model import STATE_ATTR
from tiny import tiny_family, tiny_tokenizer

CONFIG = EngramConfig(layers=[0, 2], heads=4, rows_per_head=1009, head_dim=8)


SKIPPED = list(range(0, 400, 5))  # with skip_template: a fifth of the token ids, so sequences hold runs of them


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip_template"])
def memory(request):
    """A tiny Llama with a memory whose zero-initialised parts were moved (as training would); once
    plain, once with n-grams that skip some ids (as they skip the chat template's tokens)."""
    model = tiny_family("llama")
    config = copy.deepcopy(CONFIG)
    if request.param:
        config.skip_template, config.template_ids = True, SKIPPED
    memory = attach_engram(model, tiny_tokenizer(), config)
    torch.manual_seed(123)
    with torch.no_grad():
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
            block.conv.weight.normal_(0, 0.5)
    return memory


def ids_of(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 400, (rows, n), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position, one call, no cache: the reference."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def step(model, ids: torch.Tensor, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True)


# --- beam search --------------------------------------------------------------------------------

def test_beam_search_with_the_cache_finds_the_same_beams_and_scores_as_without_it(memory):
    model = memory.base_model
    prompt = ids_of(12, seed=0)
    settings = dict(max_new_tokens=10, min_new_tokens=10, num_beams=4, num_return_sequences=4, do_sample=False,
                    pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.sequences_scores, uncached.sequences_scores, atol=1e-5)
    # Beam search did move beams between rows here (a beam's row changed from one step to the next).
    slots = cached.beam_indices[:, :10]
    assert (slots[:, 1:] != slots[:, :-1]).any()


def test_reordering_the_cache_reorders_the_memory_state(memory):
    model = memory.base_model
    prompts = torch.cat([ids_of(15, seed=s) for s in (1, 2, 3)])
    out = step(model, prompts, None)
    cache = out.past_key_values
    beams = torch.tensor([2, 0, 0])  # row 0 continues prompt 2; rows 1 and 2 both continue prompt 0
    cache.reorder_cache(beams)
    new = torch.tensor([[5], [6], [7]])
    logits = step(model, new, cache).logits[:, -1]
    expected = full_logits(model, torch.cat([prompts[beams], new], dim=1))[:, -1]
    assert torch.allclose(logits, expected, atol=1e-5)


def test_batch_repeat_and_select_move_the_memory_state_with_the_cache(memory):
    model = memory.base_model
    prompts = torch.cat([ids_of(11, seed=s) for s in (4, 5)])
    cache = step(model, prompts, None).past_key_values
    cache.batch_repeat_interleave(2)  # rows: p0, p0, p1, p1
    cache.batch_select_indices(torch.tensor([3, 0]))  # rows: p1, p0
    new = torch.tensor([[9, 10], [11, 12]])
    logits = step(model, new, cache).logits
    expected = full_logits(model, torch.cat([prompts[[1, 0]], new], dim=1))[:, -2:]
    assert torch.allclose(logits, expected, atol=1e-5)


def test_a_copied_cache_moves_its_own_state_not_the_original(memory):
    model = memory.base_model
    prompts = torch.cat([ids_of(10, seed=s) for s in (6, 7)])
    cache = step(model, prompts, None).past_key_values
    duplicate = copy.deepcopy(cache)
    duplicate.reorder_cache(torch.tensor([1, 0]))
    new = torch.tensor([[13], [14]])
    swapped = step(model, new, duplicate).logits[:, -1]
    kept = step(model, new, cache).logits[:, -1]
    assert torch.allclose(swapped, full_logits(model, torch.cat([prompts[[1, 0]], new], dim=1))[:, -1], atol=1e-5)
    assert torch.allclose(kept, full_logits(model, torch.cat([prompts, new], dim=1))[:, -1], atol=1e-5)


# --- rollbacks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("removed", [2, 14])  # within and beyond the convolution's reach (9 positions)
def test_after_crop_the_state_and_the_next_step_match_a_fresh_run(memory, removed):
    model = memory.base_model
    kept, new = ids_of(20, seed=8), torch.tensor([[21, 22, 23]])
    drafted = torch.cat([kept, ids_of(removed, seed=9)], dim=1)  # positions that will be rejected
    cache = step(model, drafted, None).past_key_values
    cache.crop(-removed)
    logits = step(model, new, cache).logits
    fresh = step(model, torch.cat([kept, new], dim=1), None)
    assert torch.allclose(logits, fresh.logits[:, -3:], atol=1e-5)
    state, expected = getattr(cache, STATE_ATTR), getattr(fresh.past_key_values, STATE_ATTR)
    assert state.length == expected.length == 23
    assert torch.equal(state.ids, expected.ids)
    assert state.conv.keys() == expected.conv.keys() == {0, 2}
    for layer in (0, 2):
        assert torch.allclose(state.conv[layer], expected.conv[layer], atol=1e-5)


def test_assisted_decoding_with_the_memory_matches_greedy_decoding_without_a_cache(memory):
    """The draft model proposes tokens the target mostly rejects: the cache is cropped nearly every step."""
    model = memory.base_model
    assistant = tiny_family("llama", seed=1)
    prompt = ids_of(14, seed=10)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    crops = []
    state_lengths = []

    def record(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            state_lengths.append((getattr(cache, STATE_ATTR).length, cache.get_seq_length()))

    handle = memory.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            assisted = model.generate(prompt, assistant_model=assistant, num_assistant_tokens=4, **settings)
    finally:
        handle.remove()
    crops = [(s, c) for s, c in state_lengths if s > c]
    assert crops, "the cache was never rolled back: this test would prove nothing"
    with torch.no_grad():
        greedy = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(assisted, greedy)


def test_continuing_a_cache_that_grew_with_the_memory_off_is_refused(memory):
    model = memory.base_model
    ids = ids_of(12, seed=11)
    cache = step(model, ids[:, :10], None).past_key_values
    with memory.disabled():
        step(model, ids[:, 10:11], cache)
    with pytest.raises(EngramAttachError, match="holds 11 positions but the Engram memory saw only 10"):
        step(model, ids[:, 11:12], cache)


# --- one decoding step -------------------------------------------------------------------------

def test_a_single_decoding_step_is_addressed_to_exactly_the_rows_of_the_general_path(memory):
    """The step's rows come from Python integers (_address_step); a mask sends it down the tensor path."""
    with torch.no_grad():
        cache = memory.base_model(ids_of(12, seed=3), use_cache=True).past_key_values
    checked = 0
    for past in (None, cache):
        for token in range(0, 512, 29):
            step = torch.tensor([[token]])
            fast = memory._address(step, None, past)
            general = memory._address(step, torch.ones(1, 13, dtype=torch.long), past)
            assert fast.mask is None and general.mask is not None
            assert torch.equal(fast.rows, general.rows) and torch.equal(fast.compressed, general.compressed)
            checked += 1
    assert checked == 36


def test_the_decoding_state_grows_in_place_and_no_other_state_sees_positions_change():
    from engram_app.engram.model import DecodeState

    def conv(value: float, n: int = 1) -> dict[int, torch.Tensor]:
        return {0: torch.full((1, n, 4), value)}

    first = DecodeState(torch.tensor([[5, 6]]), conv(0.0, 2)).extend(torch.tensor([[7]]), conv(1.0))
    second = first.extend(torch.tensor([[8]]), conv(2.0))
    assert second.room is first.room and second.ids.data_ptr() == first.ids.data_ptr()  # written in place
    assert first.ids.tolist() == [[5, 6, 7]] and second.ids.tolist() == [[5, 6, 7, 8]]
    other = first.extend(torch.tensor([[9]]), conv(3.0))  # first again: second's position 3 must not change
    assert other.room is not first.room
    assert second.ids.tolist() == [[5, 6, 7, 8]] and float(second.conv[0][0, 3, 0]) == 2.0
    assert other.ids.tolist() == [[5, 6, 7, 9]] and float(other.conv[0][0, 3, 0]) == 3.0
    rolled_back = second.crop(2).extend(torch.tensor([[4]]), conv(4.0))
    assert rolled_back.ids.tolist() == [[5, 6, 4]] and second.ids.tolist() == [[5, 6, 7, 8]]
    long = second
    for step in range(100):  # past the first buffers' capacity
        long = long.extend(torch.tensor([[step]]), conv(float(step)))
    assert long.length == 104 and long.ids[0, 4:].tolist() == list(range(100))
    assert torch.equal(long.conv[0][0, 4:, 0], torch.arange(100, dtype=torch.float32))
