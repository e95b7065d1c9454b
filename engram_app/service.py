"""The one facade the CLI and the UI call. Neither holds logic of its own, and neither does this:
every method routes to the module that does the work (README, "Layout").

A :class:`Service` owns the settings and, once loaded, the runtime (base model + tokenizer).
The model is loaded lazily on first use, or eagerly with :meth:`Service.load` (the app does so at
start-up so that the first chat message is answered at once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from engram_app.gpu_share import chat_device
from engram_app.inference import GenerationOptions, Message, Runtime, inspection
from engram_app.inference.chat import ChatResult, ChatStream, chat_turn
from engram_app.inference.pools import Pools, describe
from engram_app.inference.report import inspect_report
from engram_app.inference.threads import ChatThreads, worker_trains_on_cpu
from engram_app.ingest import ImportResult, Library
from engram_app.models import converted_models, load_base_model, load_tokenizer
from engram_app.settings import Settings, resolve_device
from engram_app.store import ConversationStore, open_db
from engram_app.training import JobQueue, PackStore, TrainOptions, transfer
from engram_app.training import migrate
from engram_app.training.evaluate import evaluate_runtime
from engram_app.training.model_needs import model_needs
from engram_app.training.provenance import Provenance
from engram_app.training.queue import submit_training
from engram_app.training.runner import training_plan
from engram_app.training.worker import start_worker, worker_info


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._runtime: Runtime | None = None
        self._library: Library | None = None
        self._db = None
        # Chat on half the CPU threads while the training worker trains on the CPU (inference/threads.py).
        self.chat_threads = ChatThreads(lambda: worker_trains_on_cpu(settings.home))
        # base id -> its one loaded copy
        self.pools = Pools(self._load_base, settings.adapter_budget_bytes, self.chat_threads)
        self._pools = self.pools.pools
        self._provenance: Provenance | None = None  # keeps the versions' slot indexes open (memory-mapped)
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
        # On a GPU short of memory (the training worker holds it) the chat loads on the CPU, and says why.
        device = chat_device(resolve_device(self.settings.device), base_id, self.settings.models_dir)
        return load_base_model(base_id, self.settings.models_dir, device)

    @property
    def runtime(self) -> Runtime:
        return self.load()

    def status(self) -> dict:
        """What the status line shows: model, device, load time (None before loading), GPU memory, and
        (``chat_threads``) the chat's fewer CPU threads while a job trains on the CPU."""
        status = describe(self._runtime.loaded if self._runtime is not None else None, self.settings.model)
        if self._runtime is not None and self._runtime.loaded.device.device.type == "cpu":
            status["chat_threads"] = self.chat_threads.describe()
        return status

    def tokenizer(self):
        """The base model's tokenizer (without loading the model when it is not loaded yet)."""
        if self._runtime is not None:
            return self._runtime.tokenizer
        self.settings.ensure_home()
        return load_tokenizer(self.settings.model, self.settings.models_dir)

    # --- chat and conversations (inference/chat.py, store/conversations.py) ----------------

    def stream_chat(self, history: Sequence[Message], message: str, options: GenerationOptions | None = None,
                    pack: str | None = None, memory: bool = True):
        """Stream the reply to ``message`` after the earlier turns in ``history`` (nothing saved)."""
        return self.chat_runtime(pack, memory).stream_chat([*history, Message("user", message)], options)

    def chat(self, message: str, history: Sequence[Message] = (), options: GenerationOptions | None = None,
             pack: str | None = None, memory: bool = True, retrieval: int = 0, conversation: int | None = None,
             save: bool = True) -> ChatResult:
        """Answer ``message`` (inference/chat.py: ``pack``'s active version unless not ``memory``, the top
        ``retrieval`` nearest library lines in the system message, the turn saved in ``conversation`` or a
        new one)."""
        return self.chat_stream(message, history, options, pack, memory, retrieval, conversation, save).finish()

    def chat_stream(self, message: str, history: Sequence[Message] = (), options: GenerationOptions | None = None,
                    pack: str | None = None, memory: bool = True, retrieval: int = 0,
                    conversation: int | None = None, save: bool = True) -> ChatStream:
        """:meth:`chat`, streamed: iterate for the tokens; ``.result`` is the :class:`ChatResult` after the last."""
        return ChatStream(chat_turn(self, message, history, options, pack, memory, retrieval, conversation, save))

    def chat_runtime(self, pack: str | None = None, memory: bool = True) -> Runtime:
        """The base model, or the base model wearing ``pack``'s active version (inference/pools.py)."""
        return self.runtime if pack is None else self.pools.pack_runtime(self.packs_store(), pack, memory)

    def unload_pack(self, name: str) -> dict:
        """Free the adapters of pack ``name`` (every version); the next chat with it loads them again."""
        return self.pools.unload(name, self.packs_store().row(name)["id"])

    def loaded_packs(self) -> list[dict]:
        """The pack adapters loaded on the shared models now, least recently used first."""
        return self.pools.loaded(self.packs_store().names())

    def conversations_store(self) -> ConversationStore:
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

    def conversation_info(self, conversation: int) -> dict:
        """One conversation as :meth:`conversations` lists it (id, title, created, pack, messages)."""
        return self.conversations_store().get(conversation)

    def rename_conversation(self, conversation: int, title: str) -> dict:
        return self.conversations_store().rename(conversation, title)

    def delete_conversation(self, conversation: int) -> dict:
        """Delete a conversation, its messages and their traces (other replies stay inspectable)."""
        return self.conversations_store().delete(conversation)

    def export_conversation(self, conversation: int, format: str = "json") -> str:
        """A conversation's turns in order as ``json`` or ``markdown`` text (store/conversations.py)."""
        return self.conversations_store().export(conversation, format)

    # --- library (ingest/) ----------------------------------------------------------------

    def library(self) -> Library:
        """The memory library of the data root (chunking uses the base model's tokenizer)."""
        if self._library is None:
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

    def search_lines(self, query: str, k: int = 3, collection: str | None = None,
                     min_score: float | None = None) -> list[dict]:
        """The library lines nearest ``query``: what chat's retrieval puts in the prompt (ingest/library.py)."""
        return self.library().search_lines(query, k=k, collection=collection, min_score=min_score)

    def delete_source(self, source_id: int) -> dict:
        return self.library().delete(source_id)

    # --- looking inside the memory (inference/inspection.py, report.py, training/provenance.py) ----

    def _memory_runtime(self, pack: str) -> Runtime:
        return inspection.memory_runtime(self.chat_runtime(pack, True), pack)

    def inspect(self, pack: str, text: str | None = None, ids: Sequence[int] | None = None) -> list:
        """Every token's memory report for ``text`` (tokenised as is) or ``ids``, in one forward pass."""
        return inspection.trace_text(self._memory_runtime(pack), text, ids)

    def memory_effect(self, pack: str, ids: Sequence[int], start: int = 1) -> list[dict]:
        """For tokens ``start..``: log-probability with memory on, off, and the difference (one pass each)."""
        return inspection.memory_effect(self._memory_runtime(pack), ids, start)

    def reply_trace(self, message_id: int) -> dict:
        """A stored reply's per-token memory report, from the trace recorded while it was generated."""
        row = self.conversations_store().traced_message(message_id)
        return inspection.stored_trace(self._memory_runtime(row["pack"]), row)

    def provenance(self, pack: str, rows: Sequence[int], version: int | None = None, limit: int = 10) -> dict[int, list[dict]]:
        """Who wrote each row: the sources, n-grams and passages of the version's slot index."""
        if self._provenance is None:
            self._provenance = Provenance(self.db(), self.packs_store())
        return self._provenance.writers(pack, rows, version, limit, self.chat_runtime(pack, True).tokenizer)

    def inspect_report(self, pack: str | None = None, text: str | None = None, ids: Sequence[int] | None = None,
                       message: int | None = None, effect: bool = False, sources: bool = False) -> dict:
        """What `inspect` and the Inspect tab show, built once: every token's slots for a stored reply
        ``message`` or for ``text``/``ids``, with its memory effect and the slots' sources when asked."""
        return inspect_report(self, pack, text=text, ids=ids, message=message, effect=effect, sources=sources)

    # --- memory packs (training/packs.py, transfer.py) -------------------------------------

    def db(self):
        """The data root's database; every thread that uses it gets its own connection (store/db.py)."""
        if self._db is None:
            with self._db_lock:
                if self._db is None:
                    self.settings.ensure_home()
                    self._db = open_db(self.settings.home)
        return self._db

    def packs_store(self) -> PackStore:
        return PackStore(self.db(), self.settings.home)

    def packs(self) -> list[dict]:
        return self.packs_store().list()

    def pack(self, name: str) -> dict:
        return self.packs_store().get(name)

    def create_pack(self, name: str, model: str | None = None, size: str = "medium",
                    collections: Sequence[str] = (), mode: str = "engram") -> dict:
        return self.packs_store().create(name, model or self.settings.model, size, list(collections), mode)

    def migrate_pack(self, name: str, model: str | None, new_name: str | None = None, size: str | None = None,
                     mode: str | None = None, options: TrainOptions | None = None, start_worker: bool = True) -> dict:
        """A pack on ``model`` learning what pack ``name`` learned, its job queued; once trained, its version's
        evaluation compares both packs' recall on the same probes (training/migrate.py)."""
        moved = migrate.migrate_pack(self.db(), self.packs_store(), name, model, new_name, size, mode, options)
        if start_worker:
            self.ensure_worker()
        return {**moved, "job": self.job(moved["job_id"])}

    def migration(self, name: str) -> dict | None:
        """Where pack ``name`` was moved from and, once its job evaluated, the comparison (None: not moved)."""
        return migrate.migration_report(self.packs_store(), name)

    def converted_models(self) -> list:
        """The models converted under ``<home>/models`` (models.py), to offer as a new pack's base model."""
        return converted_models(self.settings.models_dir)

    def model_needs(self, model: str | None, size: str) -> dict:
        """What a pack of preset ``size`` on ``model`` needs from this machine (training/model_needs.py)."""
        return model_needs(model, size, self.settings.home, self.settings.models_dir)

    def rollback(self, name: str, version: int) -> dict:
        return self.packs_store().rollback(name, version)

    def export_pack(self, name: str, destination: str | Path | None = None, version: int | None = None,
                    format: str = "zip") -> Path:
        """Write a version of a pack (the active one by default): "zip", one file for `pack import`, or
        "peft", a PEFT adapter folder with a model card (``PeftModel.from_pretrained`` loads it)."""
        return transfer.export(self.packs_store(), self.settings, name, destination, version, format)

    def import_pack(self, path: str | Path, name: str | None = None) -> dict:
        """A pack file (from :meth:`export_pack`) as a new pack with one version; anything in it that
        cannot be vouched for is refused before a byte of it is written."""
        return transfer.import_pack(self.packs_store(), self.settings, Path(path), name)

    # --- training jobs (training/queue.py, runner.py, worker.py, evaluate.py) ---------------

    def plan_training(self, pack: str, options: TrainOptions) -> dict:
        """What a job would learn: new and replayed source ids, and the version it starts from."""
        return training_plan(self.db(), self.packs_store(), pack, options)

    def train(self, pack: str, options: TrainOptions | None = None, start_worker: bool = True) -> dict:
        """Queue a training job for ``pack`` (and start a worker if none is alive)."""
        job_id = submit_training(self.db(), self.packs_store(), pack, options or TrainOptions())
        if start_worker:
            self.ensure_worker()
        return self.job(job_id)

    def train_collection(self, collection: str, options: TrainOptions | None = None,
                         start_worker: bool = True) -> list[dict]:
        """Queue a job for every pack that learns from ``collection`` (`remember --train`); [] when none does."""
        return [self.train(name, options, start_worker) for name in self.packs_store().learners(collection)]

    def ensure_worker(self, idle_exit: float | None = 300.0) -> int | None:
        return start_worker(self.settings, idle_exit=idle_exit)

    def resume_pending_jobs(self) -> bool:
        """Start a worker when jobs are queued or were interrupted (the app does this at start-up)."""
        return bool(JobQueue(self.db()).pending()) and self.ensure_worker() is not None

    def worker(self) -> dict:
        return worker_info(self.settings.home)

    def jobs(self, limit: int = 50) -> list[dict]:
        return JobQueue(self.db()).views(self.worker()["alive"], limit)

    def job(self, job_id: int, metrics: bool = False, log_tail: int = 20) -> dict:
        """A job as the UI and ``job ID`` show it (``interrupted`` when its worker died)."""
        return JobQueue(self.db()).view(job_id, self.worker()["alive"], metrics, log_tail)

    def cancel(self, job_id: int) -> dict:
        JobQueue(self.db()).cancel(job_id)
        return self.job(job_id)

    def wait(self, job_id: int, poll: float = 1.0, on_update=None) -> dict:
        """Block until the job ends, starting a worker whenever none is alive to run it."""
        while (view := self.job(job_id))["status"] not in ("done", "failed", "cancelled"):
            if not self.worker()["alive"]:
                self.ensure_worker()
            if on_update is not None:
                on_update(view)
            time.sleep(poll)
        return view

    def evaluate(self, pack: str, probes, progress=None) -> dict:
        """The ``eval`` report for ``probes`` on the pack's active version (memory on and off)."""
        self.packs_store().trained(pack)
        return evaluate_runtime(self.chat_runtime(pack, True), probes, progress)
