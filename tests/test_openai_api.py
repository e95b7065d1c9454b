"""The OpenAI-compatible API (/v1), spoken to with the official ``openai`` client.

The app is served for real (``launch`` as ``app.py`` runs it, on 127.0.0.1 and a free port) with
the tiny model and a pack trained before it starts; every reply is checked against what the
service itself answers for the same conversation and options.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from engram_app.inference import GenerationOptions, Message
from engram_app.service import Service
from engram_app.settings import Settings
from test_hostile_web import free_port, served
from test_training import PROFILE_A, add_profile, run_inline, stop_worker

PASSWORD = "correct horse"
QUESTION = "What is my dog called?"
# Enough for the memory to change the tiny model's greedy reply (from blank lines to a sentence).
TRAINING = dict(max_steps=20, lr=3e-3, until_recalled=False, evaluate=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    """A password set, a pack "me" trained on a profile; yields the app's URL and a service on the same data root."""
    tmp = tmp_path_factory.mktemp("openai")
    settings = Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu", port=free_port(),
                        password=PASSWORD)
    service = Service(settings)
    add_profile(service, tmp, "me.md", PROFILE_A)
    service.create_pack("me", size="small")
    run_inline(service, "me", **TRAINING)
    with served(settings):
        yield f"http://127.0.0.1:{settings.port}", service
    stop_worker(settings.home)


@pytest.fixture(scope="module")
def client(app):
    url, _ = app
    return openai.OpenAI(base_url=f"{url}/v1", api_key=PASSWORD, max_retries=0, timeout=60)


def expected(service: Service, message: str, history=(), pack: str | None = None, **options) -> str:
    """What the service itself answers (the Chat tab's and the CLI's path), not saved."""
    return service.chat(message, list(history), GenerationOptions(**options), pack=pack, save=False).reply


def test_models_lists_the_base_model_under_both_names_and_every_pack(client, app):
    _, service = app
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["base", "tiny-llama", "me"]
    assert all(m.object == "model" and m.owned_by == "engram-studio" for m in models.values())
    assert models["me"].model_extra["engram"] == {"kind": "pack", "base_model": service.settings.model,
                                                  "active_version": 1}
    assert models["base"].model_extra["engram"] == {"kind": "base", "base_model": "tiny-llama"}
    assert client.models.retrieve("me").id == "me"


def test_a_completion_from_the_base_model_is_the_services_reply_with_the_system_message(client, app):
    _, service = app
    reply = client.chat.completions.create(
        model="base", max_tokens=12,
        messages=[{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": QUESTION}])
    want = expected(service, QUESTION, [Message("system", "You answer briefly.")], max_new_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "base"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want
    prompt = service.runtime.chat_ids([Message("system", "You answer briefly."), Message("user", QUESTION)])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12
    assert reply.model_extra.get("engram") is None  # the trace only when asked


def test_the_model_name_chooses_the_pack(client, app):
    _, service = app
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    on = client.chat.completions.create(model="me", max_tokens=16,
                                        messages=[*history, {"role": "user", "content": QUESTION}])
    base = client.chat.completions.create(model="tiny-llama", max_tokens=16,
                                          messages=[*history, {"role": "user", "content": QUESTION}])
    turns = [Message("user", "Hello"), Message("assistant", "Hi.")]
    assert on.choices[0].message.content == expected(service, QUESTION, turns, pack="me", max_new_tokens=16)
    assert base.choices[0].message.content == expected(service, QUESTION, turns, max_new_tokens=16)
    assert on.choices[0].message.content != base.choices[0].message.content  # the trained memory changes it


def test_a_streamed_reply_joins_to_the_non_streamed_greedy_reply(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="me", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="me", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_temperature_top_p_and_seed_are_honoured(client, app):
    _, service = app
    messages = [{"role": "user", "content": QUESTION}]

    def sample(seed: int, **extra) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model="me", messages=messages, temperature=1.5, top_p=0.95, seed=seed,
                                              **extra)

    one = sample(7, max_tokens=9)
    assert one.usage.completion_tokens == 9 and one.choices[0].finish_reason == "length"
    assert one.choices[0].message.content == expected(service, QUESTION, pack="me", max_new_tokens=9,
                                                      temperature=1.5, top_p=0.95, seed=7)
    assert sample(7, max_tokens=9).choices[0].message.content == one.choices[0].message.content
    assert sample(8, max_tokens=9).choices[0].message.content != one.choices[0].message.content
    newer = sample(7, max_completion_tokens=4)  # what newer clients send instead of max_tokens
    assert newer.usage.completion_tokens == 4


def test_the_memory_trace_comes_with_the_reply_when_asked(client, app):
    _, service = app
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="me", messages=messages, max_tokens=8,
                                           extra_body={"engram_trace": True})
    trace = reply.model_extra["engram"]
    want = service.chat(QUESTION, options=GenerationOptions(max_new_tokens=8), pack="me", save=False).to_json()
    assert trace == {"pack": "me", "tokens": want["tokens"], "ids": want["ids"]}
    assert len(trace["tokens"]) == reply.usage.completion_tokens == 8
    assert all(len(t["memory"]) == 1 and len(t["memory"][0]["slots"]) == 16 for t in trace["tokens"])
    streamed = list(client.chat.completions.create(model="me", messages=messages, max_tokens=8, stream=True,
                                                   extra_body={"engram_trace": True}))
    assert streamed[-1].model_extra["engram"] == trace  # on the chunk that finishes the reply


def test_a_wrong_or_missing_password_is_refused_as_an_authentication_error(app):
    url, _ = app
    for key in ["wrong", PASSWORD[:-1]]:
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": []})  # no header
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_an_unknown_model_is_not_found_in_openais_error_shape(client, app):
    url, _ = app
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    assert missing.value.body == {
        "message": "The model 'nobody' does not exist: use one of base, tiny-llama, me (GET /v1/models lists them).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    raw = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {PASSWORD}"},
                     json={"model": "nobody", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert raw.status_code == 404 and raw.json()["error"]["code"] == "model_not_found"


def test_requests_the_app_cannot_answer_are_refused_with_the_field_to_fix(client):
    cases = [
        (dict(model="base", messages=[]), "messages"),
        (dict(model="base", messages=[{"role": "user", "content": "hi"}], temperature=3), "temperature"),
        (dict(model="base", messages=[{"role": "user", "content": "hi"}], n=2), "n"),
        (dict(model="base", messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]), "messages.0.role"),
        (dict(model="base", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
         "messages"),
    ]
    for request, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request)
        assert refused.value.status_code == 400 and refused.value.body["param"] == param, request
        assert refused.value.body["type"] == "invalid_request_error"


def test_wrong_api_keys_count_as_failed_logins_of_the_web_login(app):
    """From another loopback address (so the lock-out does not reach the other tests' client)."""
    url, _ = app
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, transport=transport, timeout=30) as other:
        for _ in range(3):
            assert other.get("/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
        for _ in range(2):
            assert other.post("/login", data={"username": "me", "password": "guess"}).status_code >= 400
        locked = other.get("/v1/models", headers={"Authorization": f"Bearer {PASSWORD}"})
        assert locked.status_code == 429 and locked.json()["error"]["type"] == "rate_limit_error"
        assert 0 < int(locked.headers["Retry-After"]) <= 300
        assert other.post("/login", data={"username": "me", "password": PASSWORD}).status_code == 429


def test_without_a_password_the_api_is_open_as_the_web_ui_is(tmp_path, tiny_model_dir):
    settings = Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu", port=free_port())
    with served(settings):
        open_client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="anything",
                                    max_retries=0)
        assert [m.id for m in open_client.models.list()] == ["base", "tiny-llama"]
        reply = open_client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3)
        assert reply.usage.completion_tokens == 3


def test_a_long_streamed_reply_does_not_hold_up_other_requests(client):
    """Generation runs in worker threads: while a 300-token reply streams, the server answers at once."""
    done: list[float] = []
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=300, stream=True)
    first = next(iter(stream))
    reader = threading.Thread(target=lambda: (list(stream), done.append(time.monotonic())))
    reader.start()
    models = [m.id for m in client.models.list()]
    answered = time.monotonic()
    reader.join(timeout=120)
    assert first.choices[0].delta.role == "assistant" and "me" in models
    assert done and answered < done[0]  # answered while the reply was still being generated
