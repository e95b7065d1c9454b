"""The runtime: a loaded model and tokenizer, and streaming generation with the chat template.

Generation is a plain decode loop over the model's KV cache rather than ``model.generate``:
it is faster for small models on the CPU (``bench/decode_speed.py`` measures both), and it is
the place where later features observe every generated token as it is produced.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from engram_app.errors import EngramError
from engram_app.inference.lean import StepCache, lean_decoder
from engram_app.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngramError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise EngramError("temperature must be 0 (greedy) or more.")
        if not 0 < self.top_p <= 1:
            raise EngramError("top_p must be in (0, 1].")


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str  # this token decoded on its own
    delta: str  # the text this token added to the reply (may be "" mid UTF-8 sequence)


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


class Runtime:
    """Wraps a :class:`LoadedModel` for chat. One model call at a time per model (a lock).

    ``lock``: shared by every runtime on the same model (the views of a ``ModelPool``, pool.py).
    """

    def __init__(self, loaded: LoadedModel, lock: threading.RLock | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device.device
        self._lock = lock if lock is not None else threading.RLock()
        self.stop_ids = self._stop_ids()
        self.adapted = None  # set when the model wears a memory pack (engram_app.training.adapters.Adapted)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold the model for the calls made inside this block: its lock, and (on a shared model,
        pool.py) this runtime's adapters switched on. Every model call goes through it."""
        with self._lock:
            yield

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # --- prompts --------------------------------------------------------------------------

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` in the model's chat template, ending with the assistant cue."""
        if not messages:
            raise EngramError("A chat needs at least one message.")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if self.tokenizer.chat_template:
            from jinja2 import TemplateError

            try:
                text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except TemplateError:
                if not any(turn["role"] == "system" for turn in turns):
                    raise
                # A template without a system role (Gemma; Mistral's strict alternation): the system
                # text opens the first user turn instead.
                text = self.tokenizer.apply_chat_template(without_system(turns), tokenize=False,
                                                          add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        # A model without a chat template (a plain base model): plain text continuation.
        text = "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"
        return self.tokenizer.encode(text)

    # --- generation -----------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
        if options.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / options.temperature, dim=-1)
        if options.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < options.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _call(self, **inputs):
        """The model on ``inputs``: a decoding step on a :class:`StepCache` goes through the lean step."""
        cache = inputs.get("past_key_values")
        if isinstance(cache, StepCache):
            return cache.decoder.step(self.model, inputs["input_ids"], cache)
        return self.model(**inputs)

    def _forward(self, recorder, first_position: int, **inputs):
        """One model call under the lock; with a recorder, the memory's trace of it is kept."""
        with self.session(), torch.inference_mode():
            if recorder is None:
                return self._call(**inputs)
            # The memory loaded now: on a shared model it may have been unloaded and loaded again
            # since the reply began (same weights, another object), and only the loaded one traces.
            memory = self.adapted.memory if self.adapted is not None and self.adapted.memory is not None \
                else recorder.memory
            with memory.tracing() as calls:
                out = self._call(**inputs)
            recorder.add(first_position, calls[-1])
            return out

    def _decoding_cache(self, cache, capacity: int):
        """The cache the decoding steps continue: a :class:`StepCache` where the lean step applies (lean.py)."""
        with self.session():  # the model as this runtime's calls see it (its adapters switched on)
            decoder = lean_decoder(self.model)
        return cache if decoder is None else StepCache.adopt(cache, capacity, decoder)

    def stream_ids(self, prompt_ids: Sequence[int], options: GenerationOptions | None = None,
                   recorder=None) -> Iterator[GeneratedToken]:
        """Generate after ``prompt_ids``, yielding each token as soon as it is chosen.

        The lock is held for each model call, not for the whole reply, so several generations
        (each with its own KV cache, which also carries the memory's decoding state) can be
        interleaved. With a :class:`~engram_app.inference.tracing.Recorder`, every call's memory
        trace is kept; after the last token one more step traces it (its slots are read at its
        own position).
        """
        options = options or GenerationOptions()
        if not prompt_ids:
            raise EngramError("Nothing to generate from: the prompt is empty.")
        generator = None
        if options.temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(options.seed if options.seed is not None else torch.seed())
        input_ids = torch.tensor([list(prompt_ids)], device=self.device)
        out = self._forward(recorder, 0, input_ids=input_ids, use_cache=True, logits_to_keep=1)
        past = self._decoding_cache(out.past_key_values, len(prompt_ids) + options.max_new_tokens + 1)
        generated: list[int] = []
        emitted = ""
        position = len(prompt_ids)
        for step in range(options.max_new_tokens):
            if step:
                out = self._forward(recorder, position, input_ids=torch.tensor([[generated[-1]]], device=self.device),
                                    past_key_values=past, use_cache=True)
                position += 1
                past = out.past_key_values
            token = self._pick(out.logits[0, -1].float().cpu(), options, generator)
            if token in self.stop_ids:
                break
            generated.append(token)
            # Decode the whole reply and emit the new suffix: this handles tokens that are
            # only part of a UTF-8 character (held back until the character completes).
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            delta = ""
            if not text.endswith("\ufffd"):
                delta, emitted = text[len(emitted):], text
            yield GeneratedToken(token, self.tokenizer.decode([token]), delta)
        if recorder is not None and generated and recorder.covered() < len(prompt_ids) + len(generated):
            self._forward(recorder, position, input_ids=torch.tensor([[generated[-1]]], device=self.device),
                          past_key_values=past, use_cache=True)

    def stream_chat(self, messages: Sequence[Message], options: GenerationOptions | None = None) -> Iterator[GeneratedToken]:
        return self.stream_ids(self.chat_ids(messages), options)


def without_system(turns: list[dict]) -> list[dict]:
    """Chat turns with their system messages' text put at the start of the first user turn."""
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
    rest = [dict(t) for t in turns if t["role"] != "system"]
    first_user = next((t for t in rest if t["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest
