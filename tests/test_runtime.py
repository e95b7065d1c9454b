import pytest
import torch

from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions, Message, Runtime
from engram_app.models import load_base_model
from engram_app.settings import resolve_device


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, tmp_path_factory):
    loaded = load_base_model(str(tiny_model_dir), tmp_path_factory.mktemp("models"), resolve_device("cpu"))
    return Runtime(loaded)


def test_chat_ids_use_the_chat_template(runtime):
    ids = runtime.chat_ids([Message("user", "hello there")])
    text = runtime.tokenizer.decode(ids)
    assert text == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_stream_matches_transformers_generate(runtime):
    prompt = runtime.chat_ids([Message("user", "The capital of France")])
    ours = [t.id for t in runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=40))]
    with torch.inference_mode():
        ref = runtime.model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=sorted(runtime.stop_ids),
            pad_token_id=0,
        )[0, len(prompt):].tolist()
    ref = [t for t in ref if t not in runtime.stop_ids]
    assert ours == ref and len(ours) > 0


def test_max_new_tokens_is_respected_and_deltas_add_up_to_the_reply(runtime):
    prompt = runtime.chat_ids([Message("user", "I have a turtle")])
    tokens = list(runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=7)))
    assert len(tokens) <= 7
    reply = runtime.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True)
    assert "".join(t.delta for t in tokens) == reply.rstrip("\ufffd")


def test_generation_stops_at_end_of_turn(runtime, monkeypatch):
    eos = next(iter(runtime.stop_ids))
    original = runtime.model.forward

    def forward_always_eos(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[..., eos] = 1e9
        return out

    monkeypatch.setattr(runtime.model, "forward", forward_always_eos)
    prompt = runtime.chat_ids([Message("user", "hello")])
    assert list(runtime.stream_ids(prompt, GenerationOptions(max_new_tokens=5))) == []


def test_sampling_is_reproducible_with_a_seed(runtime):
    prompt = runtime.chat_ids([Message("user", "hello")])
    opts = GenerationOptions(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = [t.id for t in runtime.stream_ids(prompt, opts)]
    second = [t.id for t in runtime.stream_ids(prompt, opts)]
    assert first == second


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_new_tokens": 0}, "at least 1"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")],
)
def test_bad_generation_options_are_refused(kwargs, message):
    with pytest.raises(EngramError, match=message):
        GenerationOptions(**kwargs)


def test_empty_prompt_is_refused(runtime):
    with pytest.raises(EngramError):
        list(runtime.stream_ids([]))


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(runtime, monkeypatch):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    monkeypatch.setattr(runtime.tokenizer, "chat_template", strict)
    ids = runtime.chat_ids([Message("system", "Facts: a b c"), Message("user", "hello there")])
    assert runtime.tokenizer.decode(ids) == \
        "<|im_start|>user\nFacts: a b c\n\nhello there<|im_end|>\n<|im_start|>assistant\n"
    monkeypatch.setattr(runtime.tokenizer, "chat_template", strict.replace("m['role'] == 'system'", "true"))
    with pytest.raises(Exception, match="System role not supported"):  # no system text to move: the error stands
        runtime.chat_ids([Message("user", "hello there")])
