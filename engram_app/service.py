"""The one facade the CLI and the UI call. Neither holds logic of its own.

A :class:`Service` owns the settings and, once loaded, the runtime (base model + tokenizer).
The model is loaded lazily on first use, or eagerly with :meth:`Service.load` (the app does so at
start-up so that the first chat message is answered at once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engram_app.inference import GeneratedToken, GenerationOptions, Message, Runtime
from engram_app.models import load_base_model, prepare_model, resolve_model
from engram_app.settings import Settings, resolve_device

if TYPE_CHECKING:
    from engram_app.ingest import ImportResult, Library

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResult:
    reply: str
    tokens: list[GeneratedToken]
    prompt_ids: list[int]

    def to_json(self) -> dict:
        return {"reply": self.reply, "tokens": [{"text": t.text, "id": t.id} for t in self.tokens]}


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._runtime: Runtime | None = None
        self._library: Library | None = None
        self._load_lock = threading.Lock()

    # --- model --------------------------------------------------------------------------

    def load(self) -> Runtime:
        """Load (and on first use convert) the base model; later calls return the same runtime."""
        with self._load_lock:
            if self._runtime is None:
                self.settings.ensure_home()
                device = resolve_device(self.settings.device)
                loaded = load_base_model(self.settings.model, self.settings.models_dir, device)
                self._runtime = Runtime(loaded)
            return self._runtime

    @property
    def runtime(self) -> Runtime:
        return self.load()

    def status(self) -> dict:
        """What the status line shows: model, device, load time (None before loading)."""
        if self._runtime is None:
            return {"model": self.settings.model or "default", "device": None, "load_seconds": None}
        loaded = self._runtime.loaded
        return {
            "model": loaded.source.name,
            "device": loaded.device.describe(),
            "load_seconds": round(loaded.load_seconds, 2),
        }

    # --- chat ---------------------------------------------------------------------------

    def stream_chat(
        self, history: Sequence[Message], message: str, options: GenerationOptions | None = None
    ) -> Iterator[GeneratedToken]:
        """Stream the reply to ``message`` after the earlier turns in ``history``."""
        return self.runtime.stream_chat([*history, Message("user", message)], options)

    def chat(self, message: str, history: Sequence[Message] = (), options: GenerationOptions | None = None) -> ChatResult:
        messages = [*history, Message("user", message)]
        prompt_ids = self.runtime.chat_ids(messages)
        tokens = list(self.runtime.stream_ids(prompt_ids, options))
        reply = self.runtime.tokenizer.decode([t.id for t in tokens], skip_special_tokens=True)
        return ChatResult(reply=reply, tokens=tokens, prompt_ids=prompt_ids)

    # --- library ------------------------------------------------------------------------

    def tokenizer(self):
        """The base model's tokenizer (without loading the model when it is not loaded yet)."""
        if self._runtime is not None:
            return self._runtime.tokenizer
        from transformers import AutoTokenizer

        self.settings.ensure_home()
        target = prepare_model(resolve_model(self.settings.model), self.settings.models_dir)
        return AutoTokenizer.from_pretrained(str(target))

    def library(self) -> Library:
        """The memory library of the data root (chunking uses the base model's tokenizer)."""
        if self._library is None:
            from engram_app.ingest import Library
            from engram_app.store import open_db

            tokenizer = self.tokenizer()
            with self._load_lock:
                if self._library is None:
                    self._library = Library(open_db(self.settings.home), self.settings.home, tokenizer,
                                            max_bytes=self.settings.max_upload_bytes)
        return self._library

    def ingest(self, paths: Sequence[str | Path], kind: str = "auto", collection: str = "default",
               progress=None) -> list[ImportResult]:
        return self.library().ingest(paths, kind=kind, collection=collection, progress=progress)

    def sources(self, collection: str | None = None, status: str | None = "ready", query: str | None = None) -> list[dict]:
        return self.library().sources(collection=collection, status=status, query=query)

    def show_source(self, source_id: int) -> dict:
        return self.library().show(source_id)

    def search(self, query: str, k: int = 5, collection: str | None = None) -> list[dict]:
        return self.library().search(query, k=k, collection=collection)

    def delete_source(self, source_id: int) -> dict:
        return self.library().delete(source_id)
