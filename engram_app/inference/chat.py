"""What a chat turn returns: the reply, its tokens, their memory traces, and where it was saved."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engram_app.inference.prompting import RETRIEVAL_MIN_SCORE, with_retrieved
from engram_app.inference.runtime import GeneratedToken, GenerationOptions, Message, Runtime

if TYPE_CHECKING:
    from engram_app.service import Service


@dataclass(frozen=True)
class ChatResult:
    reply: str
    tokens: list[GeneratedToken]
    prompt_ids: list[int]
    traces: list | None = None  # TokenTrace per generated token, when the model wears a memory
    conversation_id: int | None = None
    message_id: int | None = None
    retrieved: tuple = ()  # the library lines put into the prompt (retrieval mode)

    @property
    def ids(self) -> list[int]:
        """The whole sequence the model ran: the templated prompt, then the reply."""
        return [*self.prompt_ids, *(t.id for t in self.tokens)]

    def to_json(self) -> dict:
        tokens = []
        for i, t in enumerate(self.tokens):
            memory = [m.to_json() for m in self.traces[i].memory] if self.traces else []
            tokens.append({"text": t.text, "id": t.id, "memory": memory})
        return {"reply": self.reply, "tokens": tokens, "ids": self.ids, "conversation": self.conversation_id,
                "message": self.message_id, "retrieved": list(self.retrieved)}


class ChatStream:
    """The tokens of a reply as they are generated; ``result`` holds the :class:`ChatResult` once done."""

    def __init__(self, steps: Iterator):
        self._steps = steps
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[GeneratedToken]:
        self.result = yield from self._steps

    def finish(self) -> ChatResult:
        """Generate the whole reply (the tokens not iterated yet) and return its result."""
        for _ in self:
            pass
        return self.result


@dataclass(frozen=True)
class Turn:
    """One generated reply: its tokens and text, the prompt it answered, and its memory trace."""

    tokens: list[GeneratedToken]
    reply: str
    prompt_ids: list[int]
    arrays: object | None  # inference.tracing.TraceArrays, when the model wears a memory
    traces: list | None  # TokenTrace per generated token, when the model wears a memory


def generate_turn(runtime: Runtime, messages: list[Message],
                  options: GenerationOptions | None) -> Iterator[GeneratedToken]:
    """Yield the reply's tokens as they are generated, recording the memory trace on the way; the
    generator's return value (``yield from``) is the finished :class:`Turn`."""
    from engram_app.inference.tracing import Recorder

    prompt_ids = runtime.chat_ids(messages)
    engram = runtime.adapted.memory if runtime.adapted is not None else None
    recorder = Recorder(engram) if engram is not None else None
    tokens = []
    for token in runtime.stream_ids(prompt_ids, options, recorder):
        tokens.append(token)
        yield token
    reply = runtime.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True)
    ids = [*prompt_ids, *(t.id for t in tokens)]
    arrays = recorder.arrays(ids, start=len(prompt_ids)) if recorder is not None else None
    traces = arrays.tokens(engram, runtime.tokenizer, len(prompt_ids), len(ids)) if arrays is not None else None
    return Turn(tokens, reply, prompt_ids, arrays, traces)


def chat_turn(service: Service, message: str, history: Sequence[Message], options: GenerationOptions | None,
              pack: str | None, memory: bool, retrieval: int, conversation: int | None,
              save: bool) -> Iterator[GeneratedToken]:
    """A whole chat turn, as :meth:`Service.chat_stream` runs it: the library lines nearest the
    message (top ``retrieval``) in the system message (inference/prompting.py), the reply streamed
    with its memory trace, and the turn
    saved to ``conversation`` (a new one when None) with ``save``. Returns the :class:`ChatResult`."""
    runtime = service.chat_runtime(pack, memory)
    retrieved = service.search_lines(message, k=retrieval, min_score=RETRIEVAL_MIN_SCORE) if retrieval > 0 else []
    if conversation is not None and not history:
        history = service.conversation_messages(conversation)
    turn = yield from generate_turn(runtime, with_retrieved([*history, Message("user", message)], retrieved), options)
    conversation_id = message_id = None
    if save:
        pack_id = service.packs_store().row(pack)["id"] if pack and memory else None
        conversation_id, message_id = service.conversations_store().save_turn(
            conversation, pack_id, getattr(runtime, "pack_version", None), message, turn.reply,
            turn.arrays.to_bytes() if turn.arrays is not None else None)
    return ChatResult(reply=turn.reply, tokens=turn.tokens, prompt_ids=turn.prompt_ids, traces=turn.traces,
                      conversation_id=conversation_id, message_id=message_id,
                      retrieved=tuple({k: h[k] for k in ("source", "title", "score", "text")} for h in retrieved))
