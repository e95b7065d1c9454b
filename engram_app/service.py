"""The one facade the CLI and the UI call. Neither holds logic of its own.

A :class:`Service` owns the settings and, once loaded, the runtime (base model + tokenizer).
The model is loaded lazily on first use, or eagerly with :meth:`Service.load` (the app does so at
start-up so that the first chat message is answered at once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engram_app.errors import EngramError
from engram_app.inference import GeneratedToken, GenerationOptions, Message, Runtime
from engram_app.inference.chat import ChatResult, ChatStream, chat_turn
from engram_app.inference.pools import Pools
from engram_app.models import load_base_model, load_tokenizer, resolve_model
from engram_app.settings import Settings, resolve_device

if TYPE_CHECKING:
    import sqlite_utils

    from engram_app.ingest import ImportResult, Library
    from engram_app.training import TrainOptions


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._runtime: Runtime | None = None
        self._library: Library | None = None
        self._db: sqlite_utils.Database | None = None
        self.pools = Pools(self._load_base, settings.adapter_budget_bytes)  # base id -> its one loaded copy
        self._pools = self.pools.pools
        self._provenance = None  # training.provenance.Provenance, once asked
        self._load_lock = threading.Lock()
        self._db_lock = threading.Lock()  # not _load_lock: db() is called while that one is held

    # --- model --------------------------------------------------------------------------

    def load(self) -> Runtime:
        """Load (and on first use convert) the base model; later calls return the same runtime."""
        if self._runtime is None:
            self._runtime = self.pools.pool(self.settings.model).base_runtime
        return self._runtime

    def model_pool(self, base_id: str | None):
        """The one loaded copy of base model ``base_id`` (None: the bundled one), shared by every pack on it."""
        return self.pools.pool(base_id)

    def _load_base(self, base_id: str | None):
        self.settings.ensure_home()
        return load_base_model(base_id, self.settings.models_dir, resolve_device(self.settings.device))

    @property
    def runtime(self) -> Runtime:
        return self.load()

    def status(self) -> dict:
        """What the status line shows: model, device, load time (None before loading), GPU memory."""
        from engram_app.inference.pools import describe

        return describe(self._runtime.loaded if self._runtime is not None else None, self.settings.model)

    # --- chat ---------------------------------------------------------------------------

    def stream_chat(
        self, history: Sequence[Message], message: str, options: GenerationOptions | None = None,
        pack: str | None = None, memory: bool = True,
    ) -> Iterator[GeneratedToken]:
        """Stream the reply to ``message`` after the earlier turns in ``history``."""
        return self.chat_runtime(pack, memory).stream_chat([*history, Message("user", message)], options)

    def chat(self, message: str, history: Sequence[Message] = (), options: GenerationOptions | None = None,
             pack: str | None = None, memory: bool = True, retrieval: int = 0, conversation: int | None = None,
             save: bool = True) -> ChatResult:
        """Answer ``message``; with ``pack``, the model wears that pack's active version (unless not ``memory``).

        ``retrieval``: put the top-k library chunks for the message into the prompt. With a
        memory, every generated token's trace is recorded while generating. With ``save`` the
        turn is kept in the conversation (a new one unless ``conversation`` is given).
        """
        stream = self.chat_stream(message, history, options, pack, memory, retrieval, conversation, save)
        for _ in stream:
            pass
        return stream.result

    def chat_stream(self, message: str, history: Sequence[Message] = (), options: GenerationOptions | None = None,
                    pack: str | None = None, memory: bool = True, retrieval: int = 0,
                    conversation: int | None = None, save: bool = True) -> ChatStream:
        """:meth:`chat`, streamed: iterate for the tokens; ``.result`` is the :class:`ChatResult` after the last."""
        return ChatStream(chat_turn(self, message, history, options, pack, memory, retrieval, conversation, save))

    def conversations_store(self):
        from engram_app.store import ConversationStore

        return ConversationStore(self.db())

    def conversation_messages(self, conversation: int) -> list[Message]:
        return [Message(role, content) for role, content in self.conversations_store().history(conversation)]

    def conversations(self, limit: int = 50) -> list[dict]:
        return self.conversations_store().list(limit)

    def conversation(self, conversation: int) -> list[dict]:
        """The turns of a conversation: id, role, content, the pack and version used, whether traced."""
        return self.conversations_store().turns(conversation)

    def replies(self, limit: int = 30) -> list[dict]:
        """Recent replies that carry a memory trace (the ones Inspect can show), newest first."""
        return self.conversations_store().traced_replies(limit)

    def reply_trace(self, message_id: int) -> dict:
        """A stored reply's per-token memory report, from the trace recorded while it was generated."""
        from engram_app.inference.inspection import stored_trace

        row = self.conversations_store().message(message_id)
        if row["trace"] is None or row["pack"] is None:
            raise EngramError(f"Message {message_id} was not generated with a memory: it has no trace.")
        return stored_trace(self._memory_runtime(row["pack"]), row)

    def chat_runtime(self, pack: str | None = None, memory: bool = True) -> Runtime:
        """The base model, or the base model wearing ``pack``'s active version (inference/pools.py)."""
        return self.runtime if pack is None else self.pools.pack_runtime(self.packs_store(), pack, memory)

    def unload_pack(self, name: str) -> dict:
        """Free the adapters of pack ``name`` (every version); the next chat with it loads them again."""
        return self.pools.unload(name, self.packs_store().row(name)["id"])

    def loaded_packs(self) -> list[dict]:
        """The pack adapters loaded on the shared models now, least recently used first."""
        return self.pools.loaded(self.packs_store().names())

    # --- library ------------------------------------------------------------------------

    def tokenizer(self):
        """The base model's tokenizer (without loading the model when it is not loaded yet)."""
        if self._runtime is not None:
            return self._runtime.tokenizer
        self.settings.ensure_home()
        return load_tokenizer(self.settings.model, self.settings.models_dir)

    def library(self) -> Library:
        """The memory library of the data root (chunking uses the base model's tokenizer)."""
        if self._library is None:
            from engram_app.ingest import Library

            tokenizer = self.tokenizer()
            with self._load_lock:
                if self._library is None:
                    self._library = Library(self.db(), self.settings.home, tokenizer,
                                            max_bytes=self.settings.max_upload_bytes)
        return self._library

    def ingest(self, paths: Sequence[str | Path], kind: str = "auto", collection: str = "default",
               progress=None) -> list[ImportResult]:
        return self.library().ingest(paths, kind=kind, collection=collection, progress=progress)

    def remember(self, text: str, collection: str = "default") -> ImportResult:
        """A typed fact or note as a source of its own (first-person statements become facts)."""
        return self.library().remember(text, collection)

    def remember_conversation(self, conversation_id: int, collection: str = "default") -> ImportResult:
        """A stored conversation with the model (its user and assistant turns) as a chat source."""
        return self.library().remember_chat(self.conversation(conversation_id), f"conversation {conversation_id}",
                                            collection)

    def sources(self, collection: str | None = None, status: str | None = "ready", query: str | None = None) -> list[dict]:
        return self.library().sources(collection=collection, status=status, query=query)

    def show_source(self, source_id: int) -> dict:
        return self.library().show(source_id)

    def search(self, query: str, k: int = 5, collection: str | None = None) -> list[dict]:
        return self.library().search(query, k=k, collection=collection)

    def delete_source(self, source_id: int) -> dict:
        return self.library().delete(source_id)

    # --- looking inside the memory -------------------------------------------------------------

    def _memory_runtime(self, pack: str):
        runtime = self.chat_runtime(pack, True)
        if runtime.adapted is None or runtime.adapted.memory is None:
            raise EngramError(f"Pack {pack!r} has no Engram memory to inspect (it is a LoRA-only pack).")
        return runtime

    def inspect(self, pack: str, text: str | None = None, ids: Sequence[int] | None = None) -> list:
        """Every token's memory report for ``text`` (tokenised as is) or ``ids``, in one forward pass."""
        from engram_app.inference.inspection import trace_text

        return trace_text(self._memory_runtime(pack), text, ids)

    def memory_effect(self, pack: str, ids: Sequence[int], start: int = 1) -> list[dict]:
        """For tokens ``start..``: log-probability with memory on, off, and the difference (one pass each)."""
        from engram_app.inference.inspection import memory_effect

        return memory_effect(self._memory_runtime(pack), ids, start)

    def provenance(self, pack: str, rows: Sequence[int], version: int | None = None, limit: int = 10) -> dict[int, list[dict]]:
        """Who wrote each row: the sources, n-grams and passages of the version's slot index."""
        from engram_app.training.provenance import Provenance

        if self._provenance is None:  # keeps the version's slot indexes open (memory-mapped)
            self._provenance = Provenance(self.db(), self.packs_store())
        return self._provenance.writers(pack, rows, version, limit, self.chat_runtime(pack, True).tokenizer)

    def inspect_report(self, pack: str | None = None, text: str | None = None, ids: Sequence[int] | None = None,
                       message: int | None = None, effect: bool = False, sources: bool = False) -> dict:
        """What `inspect` and the Inspect tab show, built once (inference/report.py): every token's slots
        for a stored reply ``message`` or for ``text``/``ids``, with its memory effect and the slots'
        sources when asked."""
        from engram_app.inference.report import inspect_report

        return inspect_report(self, pack, text=text, ids=ids, message=message, effect=effect, sources=sources)

    # --- memory packs and training -----------------------------------------------------------

    def db(self) -> sqlite_utils.Database:
        """The data root's database; every thread that uses it gets its own connection (store/db.py)."""
        if self._db is None:
            from engram_app.store import open_db

            with self._db_lock:
                if self._db is None:
                    self.settings.ensure_home()
                    self._db = open_db(self.settings.home)
        return self._db

    def packs_store(self):
        from engram_app.training import PackStore

        return PackStore(self.db(), self.settings.home)

    def packs(self) -> list[dict]:
        return self.packs_store().list()

    def pack(self, name: str) -> dict:
        return self.packs_store().get(name)

    def create_pack(self, name: str, model: str | None = None, size: str = "medium",
                    collections: Sequence[str] = (), mode: str = "engram") -> dict:
        model = model or self.settings.model
        if model is not None:
            resolve_model(model)  # fails now, with a clear message, for a model that cannot be found
        return self.packs_store().create(name, model, size=size, collections=list(collections), mode=mode)

    def rollback(self, name: str, version: int) -> dict:
        return self.packs_store().rollback(name, version)

    def export_pack(self, name: str, destination: str | Path | None = None, version: int | None = None,
                    format: str = "zip") -> Path:
        """Write a version of a pack (the active one by default); returns its path.

        ``format``: "zip", one file for `pack import`; or "peft", a PEFT adapter folder with a model
        card, to load with ``PeftModel.from_pretrained`` or push to the Hugging Face Hub as it is.
        """
        from engram_app.training.transfer import export

        return export(self.packs_store(), self.settings, name, destination, version, format)

    def import_pack(self, path: str | Path, name: str | None = None) -> dict:
        """A pack file (from :meth:`export_pack`) as a new pack with one version; anything in it that
        cannot be vouched for is refused before a byte of it is written (training/transfer.py)."""
        from engram_app.training.transfer import import_pack

        return import_pack(self.packs_store(), self.settings, Path(path), name)

    def plan_training(self, pack: str, options: TrainOptions) -> dict:
        """What a job would learn: new and replayed source ids, and the version it starts from."""
        from engram_app.training.runner import plan_job

        store = self.packs_store()
        job_plan, parent = plan_job(self.db(), store, store.get(pack), options)
        return {**job_plan.to_json(), "parent": parent}

    def train(self, pack: str, options: TrainOptions | None = None, start_worker: bool = True) -> dict:
        """Queue a training job for ``pack`` (and start a worker if none is alive)."""
        from engram_app.training.queue import TrainOptions, submit_training

        job_id = submit_training(self.db(), self.packs_store(), pack, options or TrainOptions())
        if start_worker:
            self.ensure_worker()
        return self.job(job_id)

    def train_collection(self, collection: str, options: TrainOptions | None = None,
                         start_worker: bool = True) -> list[dict]:
        """Queue a job for every pack that learns from ``collection`` (its collections name it, or it has
        none: it learns the whole library), as `remember --train` and "then train" do; [] when none does."""
        learners = [p["name"] for p in self.packs() if not p["collections"] or collection in p["collections"]]
        return [self.train(name, options, start_worker) for name in learners]

    def ensure_worker(self, idle_exit: float | None = 300.0) -> int | None:
        from engram_app.training.worker import start_worker

        return start_worker(self.settings, idle_exit=idle_exit)

    def resume_pending_jobs(self) -> bool:
        """Start a worker when jobs are queued or were interrupted (the app does this at start-up)."""
        from engram_app.training import JobQueue

        return bool(JobQueue(self.db()).pending()) and self.ensure_worker() is not None

    def worker(self) -> dict:
        from engram_app.training.worker import worker_info

        return worker_info(self.settings.home)

    def jobs(self, limit: int = 50) -> list[dict]:
        from engram_app.training import JobQueue

        return JobQueue(self.db()).views(self.worker()["alive"], limit)

    def job(self, job_id: int, metrics: bool = False, log_tail: int = 20) -> dict:
        """A job as the UI and ``job ID`` show it (``interrupted`` when its worker died)."""
        from engram_app.training import JobQueue

        return JobQueue(self.db()).view(job_id, self.worker()["alive"], metrics, log_tail)

    def cancel(self, job_id: int) -> dict:
        from engram_app.training import JobQueue

        JobQueue(self.db()).cancel(job_id)
        return self.job(job_id)

    def wait(self, job_id: int, poll: float = 1.0, on_update=None) -> dict:
        """Block until the job ends, starting a worker whenever none is alive to run it."""
        while True:
            view = self.job(job_id)
            if view["status"] in ("done", "failed", "cancelled"):
                return view
            if not self.worker()["alive"]:
                self.ensure_worker()
            if on_update is not None:
                on_update(view)
            time.sleep(poll)

    def evaluate(self, pack: str, probes, progress=None) -> dict:
        """The ``eval`` report for ``probes`` on the pack's active version (memory on and off)."""
        from engram_app.training.evaluate import run_probes

        if self.packs_store().version(pack) is None:
            raise EngramError(f"Pack {pack!r} has no trained version yet: train it first (`train --pack {pack}`).")
        runtime = self.chat_runtime(pack, True)  # on the shared base model; chats wait while it runs
        with runtime.session():
            return run_probes(runtime.adapted, runtime.tokenizer, probes, progress)

