"""The lean decoding step (engram_app/inference/lean.py) computes the model's own decoding step.

Each test runs the same tokens through the model's Hugging Face forward with its KV cache (the
reference) and through :class:`LeanDecoder` on a :class:`StepCache`, and compares logits, tokens
and the memory's traces. The 4-bit fused path is tested in test_int4.py (it needs the C kernel).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engram_app.engram import EngramConfig, attach_engram
from engram_app.inference import GenerationOptions, Message, Runtime
from engram_app.inference.lean import INITIAL_ROOM, LeanDecoder, StepCache, lean_decoder, unsupported
from engram_app.models import load_base_model
from engram_app.settings import resolve_device
from tiny import tiny_family, tiny_tokenizer

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47]])


def family_model(family: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_family(family, seed=seed)
    if family == "mistral":
        model.config.sliding_window = None  # Mistral's default window (4096) is refused: see the next test
    return model


def decode(model, steps: int, lean: bool, capacity: int = 64) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after PROMPT and the logits of each decoding step (not the prompt's)."""
    decoder = lean_decoder(model) if lean else None
    assert (decoder is not None) == lean
    tokens, rows = [], []
    with torch.inference_mode():
        out = model(input_ids=PROMPT, use_cache=True)
        cache = StepCache.adopt(out.past_key_values, capacity, decoder) if lean else out.past_key_values
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            input_ids = torch.tensor([[tokens[-1]]])
            out = decoder.step(model, input_ids, cache) if lean else model(input_ids=input_ids, past_key_values=cache,
                                                                            use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1].clone())
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_lean_step_gives_the_models_own_decoding_logits_on_every_family_it_accepts(family):
    model = family_model(family)
    expected_tokens, expected = decode(model, 24, lean=False)
    tokens, got = decode(model, 24, lean=True)
    assert tokens == expected_tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_huge_reply_length_reserves_no_more_than_the_initial_room():
    model = family_model("llama")
    with torch.inference_mode():
        prompt_cache = model(input_ids=PROMPT, use_cache=True).past_key_values
    cache = StepCache.adopt(prompt_cache, 10**12, lean_decoder(model))  # what max_tokens=10**12 asks for
    assert cache.keys.shape[2] == PROMPT.shape[1] + INITIAL_ROOM and cache.length == PROMPT.shape[1]


def test_a_step_cache_grows_when_a_reply_outlasts_its_buffers():
    model = family_model("llama")
    _, expected = decode(model, 20, lean=False)
    _, got = decode(model, 20, lean=True, capacity=10)  # the prompt's 9 positions + 1: doubled twice
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_memory_acts_and_traces_through_the_lean_step_exactly_as_through_the_models_forward():
    model = family_model("llama")
    memory = attach_engram(model, tiny_tokenizer(), EngramConfig(layers=[0, 2], heads=4, rows_per_head=1009,
                                                                 head_dim=8))
    torch.manual_seed(123)
    with torch.no_grad():  # a memory whose zero-initialised parts moved, as training leaves them
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
            block.conv.weight.normal_(0, 0.5)
    with memory.tracing() as reference_calls:
        expected_tokens, expected = decode(model, 16, lean=False)
    with memory.tracing() as lean_calls:
        tokens, got = decode(model, 16, lean=True)
    with memory.disabled():
        _, off = decode(model, 16, lean=True)
    assert (got - off).abs().max() > 0.1  # the memory changes the steps ...
    assert tokens == expected_tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # ... as the model's forward does
    assert len(lean_calls) == len(reference_calls) == 17
    for lean_call, reference_call in zip(lean_calls, reference_calls):
        assert sorted(lean_call) == [0, 2]
        for layer, trace in lean_call.items():
            assert torch.equal(trace.rows, reference_call[layer].rows)
            torch.testing.assert_close(trace.gate, reference_call[layer].gate)


def test_a_lora_adapter_switched_on_between_steps_applies_to_the_next_lean_step():
    model = family_model("llama")
    decoder = lean_decoder(model)  # built before PEFT wraps the projections, as on the app's shared model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    wrapped = get_peft_model(model, config)
    base = wrapped.get_base_model()  # the shared model, called directly (its LoRA layers in place)
    assert lean_decoder(base) is decoder and lean_decoder(wrapped) is None
    expected_tokens, expected = decode(base, 12, lean=False)
    tokens, got = decode(base, 12, lean=True)
    assert tokens == expected_tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with wrapped.disable_adapter():
        _, without = decode(base, 12, lean=True)
    assert (got - without).abs().max() > 1e-3


def test_the_runtime_decodes_through_the_lean_step_and_replies_as_without_it(tiny_model_dir, tmp_path, monkeypatch):
    loaded = load_base_model(str(tiny_model_dir), tmp_path / "models", resolve_device("cpu"))
    runtime = Runtime(loaded)
    runtime.stop_ids = set()
    prompt = runtime.chat_ids([Message("user", "The capital of France")])
    steps = []
    original = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *args: steps.append(1) or original(self, *args))
    lean = [t.id for t in runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=30))]
    assert len(steps) == 29  # every token after the first (which the prompt's forward gives)
    monkeypatch.setenv("ENGRAM_LEAN", "0")
    assert [t.id for t in runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=30))] == lean
    assert len(steps) == 29


@pytest.mark.parametrize("family", ["gemma", "gemma2", "phi3", "qwen3", "gpt2"])
def test_families_whose_blocks_compute_something_else_decode_with_their_own_forward(family):
    assert lean_decoder(tiny_family(family)) is None
    assert "is not one of" in unsupported(tiny_family(family))


def test_what_the_lean_step_would_get_wrong_keeps_the_models_own_forward(monkeypatch):
    assert "sliding window" in unsupported(tiny_family("mistral"))
    model = family_model("llama")
    assert "not an fp32 model" in unsupported(copy.deepcopy(model).to(torch.bfloat16))
    hooked = copy.deepcopy(model)
    hooked.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *args: None)
    assert "hook on self_attn.k_proj" in unsupported(hooked)
    hooked = copy.deepcopy(model)
    hooked.model.norm.register_forward_hook(lambda *args: None)
    assert "hook on the final norm" in unsupported(hooked)
    hooked = copy.deepcopy(model)
    hooked.register_forward_pre_hook(lambda *args: None)
    assert "hook on the model" in unsupported(hooked)
    assert "training mode" in unsupported(copy.deepcopy(model).train())
    assert "not a causal LM called directly" in unsupported(get_peft_model(copy.deepcopy(model), LoraConfig(r=2)))
    assert lean_decoder(model) is not None
    monkeypatch.setenv("ENGRAM_LEAN", "0")
    assert lean_decoder(model) is None
