"""An OpenAI-compatible API on the app's own server, so that other tools can chat with a memory pack.

Any client of OpenAI's chat API (the ``openai`` Python package, open-webui, SillyTavern, ``llm``,
Continue) can use the app: point it at ``http://127.0.0.1:7860/v1`` with the app's password as the
API key. Two routes, mounted beside the Gradio app (``engram_app/ui/app.py``):

- ``GET /v1/models``: the base model (as ``base`` and under its own name) and every memory pack
  (by its name), as OpenAI model objects.
- ``POST /v1/chat/completions``: ``model`` chooses the pack (or the base model), the messages are
  the conversation (system, user and assistant turns; the last one is the user's message), and
  ``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``) and ``seed`` are
  honoured; ``stream: true`` sends Server-Sent Events (``chat.completion.chunk``, then
  ``[DONE]``). ``engram_trace: true`` (an extra field: ``extra_body`` in the ``openai`` client)
  adds ``engram``: every generated token's memory trace, in the shape ``chat --json`` prints.

Every request goes through :meth:`Service.chat_stream`, like the Chat tab: model calls take the
runtime's lock one at a time, so API replies interleave with the app's. Generation runs in a
worker thread, never on the event loop. API turns are not saved as conversations: an OpenAI
client sends the whole conversation with every request, so each request would start a new one.

With a password set (``--password``/``ENGRAM_PASSWORD``), every request needs
``Authorization: Bearer <password>``; wrong keys count as failed logins in the web login's
limiter (``ui/security.py``), so guesses through the API and the login page share one limit.
Errors come in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from engram_app.errors import EngramError
from engram_app.inference import GeneratedToken, GenerationOptions, Message
from engram_app.inference.chat import ChatResult
from engram_app.service import Service

log = logging.getLogger(__name__)

PREFIX = "/v1"
BASE_MODEL = "base"  # the model name of the base model without a pack (besides its own name)
OWNER = "engram-studio"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_END = object()  # what next() returns when a reply has no more tokens


# --- errors -------------------------------------------------------------------------------------

class APIError(Exception):
    """A request refused, answered in OpenAI's error shape (what OpenAI's clients parse)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def user_error(error: EngramError) -> APIError:
    """A problem the client can fix (the app's own message, which says how)."""
    return APIError(400, str(error))


def server_error() -> APIError:
    log.exception("The OpenAI-compatible API failed on a request.")
    return APIError(500, "The server failed to answer: see the app's log.", type="server_error")


# --- requests -----------------------------------------------------------------------------------

class ContentPart(BaseModel):
    """One part of a message's content in the list form (``[{"type": "text", "text": ...}]``)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted, not used
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message's text; image and audio parts are refused (the models here read text only)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text":
                raise APIError(400, f"messages[{index}] has a {part.type!r} part: only text is supported.",
                               param=f"messages.{index}.content")
            parts.append(part.text or "")
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that the app honours (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (the default)")
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer clients' name for max_tokens")
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one reply per request")
    engram_trace: bool = Field(False, description="add `engram`: every generated token's memory trace")

    def options(self) -> GenerationOptions:
        """The generation options; what the request leaves out is the app's default (greedy, 256 tokens)."""
        chosen: dict[str, Any] = {"seed": self.seed}
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            chosen["max_new_tokens"] = limit
        if self.temperature is not None:
            chosen["temperature"] = self.temperature
        if self.top_p == 0:
            chosen["temperature"] = 0.0  # nucleus sampling over 0% of the mass keeps the likeliest token: greedy
        elif self.top_p is not None:
            chosen["top_p"] = self.top_p
        return GenerationOptions(**chosen)

    def conversation(self) -> tuple[list[Message], str]:
        """The turns before the last message, and the last one: the user's message to answer."""
        turns = []
        for index, message in enumerate(self.messages):
            role = ROLES.get(message.role)
            if role is None:
                raise APIError(400, f"messages[{index}] has role {message.role!r}: use system, user or assistant "
                                    "(tools are not supported).", param=f"messages.{index}.role")
            turns.append(Message(role, message.text(index)))
        if turns[-1].role != "user":
            raise APIError(400, "The last message must be the user's: it is the one the model answers.",
                           param="messages")
        return turns[:-1], turns[-1].content


def parse_request(body: Any) -> ChatCompletionRequest:
    """The request, or a 400 in OpenAI's shape naming the first wrong field (FastAPI's own 422 is not)."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"Invalid request: {param or 'body'}: {first['msg']}.", param=param) from None


# --- models -------------------------------------------------------------------------------------

def timestamp(created: str | None) -> int:
    """A stored ISO 8601 time as Unix seconds (what OpenAI's ``created`` fields hold)."""
    try:
        return int(datetime.fromisoformat(created).timestamp()) if created else 0
    except ValueError:
        return 0


def base_names(service: Service) -> list[str]:
    """The names of the base model: ``base``, and its own name (``smollm2-135m-instruct``)."""
    return list(dict.fromkeys([BASE_MODEL, service.status()["model"]]))


def model_objects(service: Service, started: int) -> list[dict]:
    """OpenAI model objects: the base model under each of its names, then every pack.

    A pack's name always means the pack: a base-model name that a pack also has is left out."""
    packs = service.packs()
    taken = {p["name"] for p in packs}
    base = service.status()["model"]
    models = [{"id": name, "object": "model", "created": started, "owned_by": OWNER,
               "engram": {"kind": "base", "base_model": base}} for name in base_names(service) if name not in taken]
    for pack in packs:
        models.append({"id": pack["name"], "object": "model", "created": timestamp(pack.get("created")),
                       "owned_by": OWNER, "engram": {"kind": "pack", "base_model": pack["base_model"] or base,
                                                      "active_version": pack["active_version"]}})
    return models


def resolve_pack(service: Service, model: str) -> str | None:
    """The pack that ``model`` names, or None for the base model; 404 for a name that is neither."""
    packs = set(service.packs_store().names().values())
    if model in packs:
        return model
    if model in base_names(service):
        return None
    known = ", ".join([*base_names(service), *sorted(packs)])
    raise APIError(404, f"The model {model!r} does not exist: use one of {known} (GET /v1/models lists them).",
                   param="model", code="model_not_found")


# --- auth ---------------------------------------------------------------------------------------

class BearerAuth:
    """``Authorization: Bearer <password>`` when the app has a password; open when it has none (as the web UI).

    ``limiter``: the web login's :class:`~engram_app.ui.security.LoginLimiter` (shared, so that a
    client gets the same number of guesses through the API and the login page together).
    """

    def __init__(self, password: str | None, limiter=None):
        self.expected = password.encode() if password else None
        self.limiter = limiter

    def check(self, request: Request) -> None:
        if self.expected is None:
            return
        client = request.client.host if request.client else "unknown"
        wait = self.limiter.retry_after(client) if self.limiter is not None else 0.0
        if wait > 0:
            seconds = math.ceil(wait)
            log.warning("Refused an API request from %s: too many failed logins.", client)
            raise APIError(429, f"Too many failed logins from your address: try again in {seconds} s.",
                           type="rate_limit_error", code="too_many_failed_logins",
                           headers={"Retry-After": str(seconds)})
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "This app has a password: send it as the API key (Authorization: Bearer <password>).",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), self.expected):
            if self.limiter is not None:
                self.limiter.failed(client)
            raise APIError(401, "Incorrect API key: use the password the app was started with.",
                           code="invalid_api_key")
        if self.limiter is not None:
            self.limiter.succeeded(client)


# --- responses ----------------------------------------------------------------------------------

def finish_reason(result: ChatResult, options: GenerationOptions) -> Literal["stop", "length"]:
    return "length" if len(result.tokens) >= options.max_new_tokens else "stop"


def usage(result: ChatResult) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engram_trace(result: ChatResult, pack: str | None) -> dict:
    """The reply's memory trace: per generated token its slots and gates (empty ``memory`` without a pack),
    and ``ids``, the whole sequence the model ran (for ``inspect --ids``)."""
    data = result.to_json()
    return {"pack": pack, "tokens": data["tokens"], "ids": data["ids"]}


def completion(request: ChatCompletionRequest, pack: str | None, result: ChatResult, options: GenerationOptions) -> dict:
    body = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.reply},
                         "logprobs": None, "finish_reason": finish_reason(result, options)}],
            "usage": usage(result)}
    if request.engram_trace:
        body["engram"] = engram_trace(result, pack)
    return body


def sse(data: dict | str) -> str:
    """One Server-Sent Event, as OpenAI streams them (``data: <json>`` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class ChunkStream:
    """A streamed reply as ``chat.completion.chunk`` events: the role, each token's text, the finish
    reason (with ``engram`` when asked), usage when asked, then ``[DONE]``.

    The service's token generator is blocking (the model runs in it), so each step runs in a worker
    thread; the first token is made before the response starts (:meth:`start`), so that a request
    that fails at once (a pack that cannot be loaded) gets an HTTP error rather than a broken stream.
    """

    def __init__(self, request: ChatCompletionRequest, pack: str | None, stream, options: GenerationOptions):
        self.request, self.pack, self.stream, self.options = request, pack, stream, options
        self.tokens: Iterator[GeneratedToken] = iter(stream)
        self.first: Any = _END
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())

    async def start(self) -> None:
        self.first = await run_in_threadpool(next, self.tokens, _END)

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.request.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

    async def events(self) -> AsyncIterator[str]:
        try:
            yield sse(self.chunk({"role": "assistant", "content": ""}))
            token = self.first
            while token is not _END:
                if token.delta:
                    yield sse(self.chunk({"content": token.delta}))
                token = await run_in_threadpool(next, self.tokens, _END)
            result = self.stream.result
            extra = {"engram": engram_trace(result, self.pack)} if self.request.engram_trace else {}
            yield sse(self.chunk({}, finish_reason(result, self.options), **extra))
            if self.request.stream_options is not None and self.request.stream_options.include_usage:
                yield sse({**self.chunk({}), "choices": [], "usage": usage(result)})
            yield sse("[DONE]")
        except EngramError as error:
            yield sse(user_error(error).body())  # OpenAI's clients raise an APIError for an error event
        except Exception:
            yield sse(server_error().body())
        finally:
            self.close()

    def close(self) -> None:
        """Stop a reply the client stopped reading (a disconnect): the generator ends, nothing more runs."""
        try:
            self.tokens.close()
        except ValueError:  # still running in its thread (cannot happen: the thread is awaited), left to end
            pass


# --- the routes ---------------------------------------------------------------------------------

def openai_router(service: Service, limiter=None) -> APIRouter:
    """The ``/v1`` routes for ``service`` (the password is the service's settings'); ``limiter``: the
    web login's failed-login limiter, to share it."""
    router = APIRouter(prefix=PREFIX)
    auth = BearerAuth(service.settings.password, limiter)
    started = int(time.time())

    async def answer(request: Request, work) -> Response:
        """``work()``'s response once the API key is checked; any failure as an OpenAI error."""
        try:
            auth.check(request)
            return await work()
        except APIError as error:
            return error.response()
        except EngramError as error:
            return user_error(error).response()
        except Exception:
            return server_error().response()

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        async def work():
            models = await run_in_threadpool(model_objects, service, started)
            return JSONResponse({"object": "list", "data": models})

        return await answer(request, work)

    @router.get("/models/{model}")
    async def get_model(model: str, request: Request) -> Response:
        async def work():
            models = await run_in_threadpool(model_objects, service, started)
            found = next((m for m in models if m["id"] == model), None)
            if found is None:
                resolve_pack(service, model)  # raises the 404 naming the models there are
            return JSONResponse(found)

        return await answer(request, work)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def work():
            try:
                body = await request.json()
            except ValueError:
                raise APIError(400, "The request body is not JSON: send a chat completion request.") from None
            chat = parse_request(body)
            history, message = chat.conversation()
            options = chat.options()
            pack = await run_in_threadpool(resolve_pack, service, chat.model)
            if not chat.stream:
                result = await run_in_threadpool(
                    lambda: service.chat(message, history, options=options, pack=pack, save=False))
                return JSONResponse(completion(chat, pack, result, options))
            stream = ChunkStream(chat, pack, service.chat_stream(message, history, options=options, pack=pack,
                                                                 save=False), options)
            try:
                await stream.start()
            except BaseException:
                stream.close()
                raise
            return StreamingResponse(stream.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return await answer(request, work)

    return router
