"""The one facade the CLI and the UI call. Neither holds logic of its own.

A :class:`Service` owns the settings and, once loaded, the runtime (base model + tokenizer).
The model is loaded lazily on first use, or eagerly with :meth:`Service.load` (the app does so at
start-up so that the first chat message is answered at once).
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engram_app.errors import EngramError
from engram_app.inference import GeneratedToken, GenerationOptions, Message, Runtime
from engram_app.models import load_base_model, prepare_model, resolve_model
from engram_app.settings import Settings, resolve_device

if TYPE_CHECKING:
    import sqlite_utils

    from engram_app.inference.pool import ModelPool
    from engram_app.ingest import ImportResult, Library
    from engram_app.training import TrainOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResult:
    reply: str
    tokens: list[GeneratedToken]
    prompt_ids: list[int]
    traces: list | None = None  # TokenTrace per generated token, when the model wears a memory
    conversation_id: int | None = None
    message_id: int | None = None
    retrieved: tuple = ()  # the library chunks put into the prompt (retrieval mode)

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


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._runtime: Runtime | None = None
        self._library: Library | None = None
        self._db: sqlite_utils.Database | None = None
        self._pools: dict[str | None, ModelPool] = {}  # base model id -> its one loaded copy and pack adapters
        self._pack_runtimes: dict[str, tuple[int, Runtime]] = {}  # pack -> (version, runtime on its pool)
        self._provenance = None  # training.provenance.Provenance, once asked
        self._load_lock = threading.Lock()
        self._db_lock = threading.Lock()  # not _load_lock: db() is called while that one is held

    # --- model --------------------------------------------------------------------------

    def load(self) -> Runtime:
        """Load (and on first use convert) the base model; later calls return the same runtime."""
        if self._runtime is None:
            self._runtime = self.model_pool(self.settings.model).base_runtime
        return self._runtime

    def model_pool(self, base_id: str | None) -> ModelPool:
        """The one loaded copy of base model ``base_id`` (None: the bundled one), shared by every pack on it."""
        from engram_app.inference.pool import ModelPool, default_budget

        with self._load_lock:
            pool = self._pools.get(base_id)
            if pool is None:
                self.settings.ensure_home()
                device = resolve_device(self.settings.device)
                loaded = load_base_model(base_id, self.settings.models_dir, device)
                budget = self.settings.adapter_budget_bytes
                pool = ModelPool(loaded, budget if budget is not None else default_budget(device.device))
                self._pools[base_id] = pool
            return pool

    @property
    def runtime(self) -> Runtime:
        return self.load()

    def status(self) -> dict:
        """What the status line shows: model, device, load time (None before loading)."""
        if self._runtime is None:
            return {"model": self.settings.model or "default", "device": None, "load_seconds": None}
        loaded = self._runtime.loaded
        gpu = None
        if loaded.device.device.type == "cuda":
            gpu = f"{torch.cuda.memory_allocated(loaded.device.device) / 2**30:.1f} GiB"
        return {
            "model": loaded.source.name,
            "device": loaded.device.describe(),
            "load_seconds": round(loaded.load_seconds, 2),
            "gpu_memory": gpu,
        }

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
        return ChatStream(self._chat(message, history, options, pack, memory, retrieval, conversation, save))

    def _chat(self, message, history, options, pack, memory, retrieval, conversation, save):
        from engram_app.inference.tracing import Recorder

        runtime = self.chat_runtime(pack, memory)
        retrieved = self.search(message, k=retrieval) if retrieval > 0 else []
        if conversation is not None and not history:
            history = self.conversation_messages(conversation)
        messages = [*history, Message("user", with_context(message, retrieved))]
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
        conversation_id = message_id = None
        if save:
            conversation_id, message_id = self._save_turn(conversation, pack if memory else None, message, reply,
                                                          arrays, runtime)
        return ChatResult(reply=reply, tokens=tokens, prompt_ids=prompt_ids, traces=traces,
                          conversation_id=conversation_id, message_id=message_id,
                          retrieved=tuple({"source": h["source"], "title": h["title"], "score": h["score"],
                                           "text": h["text"]} for h in retrieved))

    def _save_turn(self, conversation: int | None, pack: str | None, message: str, reply: str, arrays, runtime):
        from engram_app.training.packs import now

        db = self.db()
        pack_row = self.packs_store().row(pack) if pack else None
        pack_id = pack_row["id"] if pack_row else None
        version = getattr(runtime, "pack_version", None)
        with db.atomic():
            if conversation is None:
                conversation = db["conversations"].insert({"title": message[:80], "pack_id": pack_id,
                                                           "created": now()}).last_pk
            elif not db["conversations"].count_where("id = ?", [conversation]):
                raise EngramError(f"No conversation {conversation}.")
            db["messages"].insert({"conversation_id": conversation, "role": "user", "content": message,
                                   "pack_id": pack_id, "pack_version": version, "trace": None, "created": now()})
            message_id = db["messages"].insert({
                "conversation_id": conversation, "role": "assistant", "content": reply, "pack_id": pack_id,
                "pack_version": version, "trace": arrays.to_bytes() if arrays is not None else None,
                "created": now()}).last_pk
        return conversation, message_id

    def conversation_messages(self, conversation: int) -> list[Message]:
        rows = self.db().query("select role, content from messages where conversation_id = ? order by id", [conversation])
        return [Message(r["role"], r["content"]) for r in rows]

    def conversations(self, limit: int = 50) -> list[dict]:
        return list(self.db().query(
            "select c.id, c.title, c.created, p.name as pack, (select count(*) from messages m where "
            "m.conversation_id = c.id) as messages from conversations c left join packs p on p.id = c.pack_id "
            "order by c.id desc limit ?", [limit]))

    def conversation(self, conversation: int) -> list[dict]:
        """The turns of a conversation: id, role, content, the pack and version used, whether traced."""
        rows = list(self.db().query(
            "select m.id, m.role, m.content, p.name as pack, m.pack_version as version, m.trace is not null as traced "
            "from messages m left join packs p on p.id = m.pack_id where m.conversation_id = ? order by m.id",
            [conversation]))
        if not rows and not self.db()["conversations"].count_where("id = ?", [conversation]):
            raise EngramError(f"No conversation {conversation}.")
        return rows

    def replies(self, limit: int = 30) -> list[dict]:
        """Recent replies that carry a memory trace (the ones Inspect can show), newest first."""
        return list(self.db().query(
            "select m.id, m.conversation_id as conversation, m.content, p.name as pack, m.pack_version as version "
            "from messages m join packs p on p.id = m.pack_id where m.role = 'assistant' and m.trace is not null "
            "order by m.id desc limit ?", [limit]))

    def reply_trace(self, message_id: int) -> dict:
        """A stored reply's per-token memory report, from the trace recorded while it was generated."""
        from engram_app.inference.tracing import TraceArrays

        rows = list(self.db().query(
            "select m.id, m.content, m.trace, m.pack_version as version, p.name as pack from messages m "
            "left join packs p on p.id = m.pack_id where m.id = ?", [message_id]))
        if not rows:
            raise EngramError(f"No message {message_id}.")
        row = rows[0]
        if row["trace"] is None or row["pack"] is None:
            raise EngramError(f"Message {message_id} was not generated with a memory: it has no trace.")
        runtime = self._memory_runtime(row["pack"])
        arrays = TraceArrays.from_bytes(row["trace"])
        return {"message": message_id, "pack": row["pack"], "version": row["version"], "content": row["content"],
                "ids": arrays.ids.tolist(), "start": arrays.start,
                "tokens": arrays.tokens(runtime.adapted.memory, runtime.tokenizer, arrays.start)}

    def chat_runtime(self, pack: str | None = None, memory: bool = True) -> Runtime:
        """The runtime for a chat: the base model, or the base model wearing ``pack``'s active version.

        Every pack on a base model shares its one loaded copy (inference/pool.py): a pack's
        adapters are loaded on first use and switched on for each of its model calls; memory off
        is the same model with every adapter off. When the pack's active version changes (a job
        finished, or a rollback) the new version is loaded on the next call and the old one freed,
        so chat uses the new version at once.
        """
        if pack is None:
            return self.runtime
        from engram_app.inference.pool import AdapterSpec, adapter_key
        from engram_app.training.job import model_spec

        store = self.packs_store()
        info = store.get(pack)
        pool = self.model_pool(model_spec(info["base_model"]))
        if not memory:
            return pool.base_runtime
        with self._load_lock:
            cached = self._pack_runtimes.get(pack)
            if cached is not None and cached[0] == info["active_version"] and cached[1].pool is pool:
                return cached[1]
        row = store.row(pack)
        version = store.version(pack)
        spec = AdapterSpec(adapter_key(row["id"], info["active_version"]),
                           Path(version["path"]) if version is not None else None, store.config(row))
        runtime = pool.runtime(spec)
        runtime.pack_version = info["active_version"]
        with self._load_lock:
            previous = self._pack_runtimes.get(pack)
            self._pack_runtimes[pack] = (info["active_version"], runtime)
        if previous is not None and previous[1].spec.key != spec.key:
            previous[1].pool.unload(previous[1].spec.key)  # a reply still running with it loads it again
        return runtime

    def unload_pack(self, name: str) -> dict:
        """Free the adapters of pack ``name`` (every version) on the shared model; the next chat with
        it loads them again. Returns what was unloaded and the bytes freed."""
        from engram_app.inference.pool import pack_prefix

        prefix = pack_prefix(self.packs_store().row(name)["id"])  # every version of this pack
        with self._load_lock:
            self._pack_runtimes.pop(name, None)
            pools = list(self._pools.values())
        keys, freed = [], 0
        for pool in pools:
            unloaded, nbytes = pool.unload_where(lambda key: key.startswith(prefix))
            keys += unloaded
            freed += nbytes
        return {"pack": name, "unloaded": len(keys), "freed_bytes": freed}

    def loaded_packs(self) -> list[dict]:
        """The pack adapters loaded on the shared models now, least recently used first."""
        names = {r["id"]: r["name"] for r in self.db().query("select id, name from packs")}
        out = []
        with self._load_lock:
            pools = list(self._pools.items())
        for base_id, pool in pools:
            for key, nbytes in pool.loaded_adapters().items():
                pack_id, _, version = key.removeprefix("pack").partition("_v")
                out.append({"pack": names.get(int(pack_id)), "version": int(version) or None,
                            "base_model": base_id or "default", "bytes": nbytes})
        return out

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

            tokenizer = self.tokenizer()
            with self._load_lock:
                if self._library is None:
                    self._library = Library(self.db(), self.settings.home, tokenizer,
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

    # --- looking inside the memory -------------------------------------------------------------

    def _memory_runtime(self, pack: str):
        runtime = self.chat_runtime(pack, True)
        if runtime.adapted is None or runtime.adapted.memory is None:
            raise EngramError(f"Pack {pack!r} has no Engram memory to inspect (it is a LoRA-only pack).")
        return runtime

    def inspect(self, pack: str, text: str | None = None, ids: Sequence[int] | None = None) -> list:
        """Every token's memory report for ``text`` (tokenised as is) or ``ids``, in one forward pass."""
        from engram_app.engram import trace_tokens

        runtime = self._memory_runtime(pack)
        if ids is None:
            if not text:
                raise EngramError("Nothing to inspect: give a text or token ids.")
            ids = runtime.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in ids]
        vocab = runtime.model.get_input_embeddings().weight.shape[0]
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise EngramError(f"Token ids must be between 0 and {vocab - 1} (the model's vocabulary).")
        with runtime.session():
            return trace_tokens(runtime.adapted.memory, runtime.tokenizer, ids)

    def memory_effect(self, pack: str, ids: Sequence[int], start: int = 1) -> list[dict]:
        """For tokens ``start..``: log-probability with memory on, off, and the difference (one pass each)."""
        runtime = self._memory_runtime(pack)
        ids = [int(i) for i in ids]
        device = runtime.device
        tensor = torch.tensor([ids], device=device)
        with runtime.session(), torch.inference_mode():
            on = torch.log_softmax(runtime.model(input_ids=tensor).logits[0].float(), -1)
            with runtime.adapted.off():
                off = torch.log_softmax(runtime.model(input_ids=tensor).logits[0].float(), -1)
        out = []
        for p in range(max(start, 1), len(ids)):
            a, b = float(on[p - 1, ids[p]]), float(off[p - 1, ids[p]])
            out.append({"position": p, "logprob_on": round(a, 4), "logprob_off": round(b, 4), "effect": round(a - b, 4)})
        return out

    def provenance(self, pack: str, rows: Sequence[int], version: int | None = None, limit: int = 10) -> dict[int, list[dict]]:
        """Who wrote each row: the sources, n-grams and passages of the version's slot index."""
        from engram_app.training.provenance import Provenance

        if self._provenance is None:  # keeps the version's slot indexes open (memory-mapped)
            self._provenance = Provenance(self.db(), self.packs_store())
        return self._provenance.writers(pack, rows, version, limit, self.chat_runtime(pack, True).tokenizer)

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
        known = {r["name"] for r in self.db().query("select name from collections")}
        unknown = [c for c in collections if c not in known]
        if unknown:
            raise EngramError(f"No collection named {', '.join(map(repr, unknown))} in the library "
                              f"(collections: {', '.join(sorted(known)) or 'none yet'}).")
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
        from engram_app.training.transfer import export_pack

        if format not in ("zip", "peft"):
            raise EngramError(f"Unknown export format {format!r}: choose zip or peft.")
        store = self.packs_store()
        number = version or store.get(name)["active_version"]
        default = self.settings.home / "exports" / (f"{name}-v{number}" + (".zip" if format == "zip" else ""))
        destination = Path(destination) if destination else default
        if format == "zip":
            return export_pack(store, name, destination, version)
        from engram_app.training.job import model_spec
        from engram_app.training.peft_export import export_peft

        def load_base():
            loaded = load_base_model(model_spec(store.get(name)["base_model"]), self.settings.models_dir,
                                     resolve_device(self.settings.device))
            return loaded.model, loaded.tokenizer

        return export_peft(self.db(), store, name, destination, version, load_base=load_base)

    def import_pack(self, path: str | Path, name: str | None = None) -> dict:
        """A pack file (from :meth:`export_pack`) as a new pack with one version; anything in it that
        cannot be vouched for is refused before a byte of it is written (training/transfer.py)."""
        from engram_app.training.transfer import import_pack

        return import_pack(self.packs_store(), self.settings, Path(path), name)

    def plan_training(self, pack: str, options: TrainOptions) -> dict:
        """What a job would learn: new and replayed source ids, and the version it starts from."""
        from engram_app.training.job import plan_job

        store = self.packs_store()
        job_plan, parent = plan_job(self.db(), store, store.get(pack), options)
        return {**job_plan.to_json(), "parent": parent}

    def train(self, pack: str, options: TrainOptions | None = None, start_worker: bool = True) -> dict:
        """Queue a training job for ``pack`` (and start a worker if none is alive)."""
        from engram_app.training import JobQueue, TrainOptions

        options = options or TrainOptions()
        store = self.packs_store()
        info = store.get(pack)
        plan = self.plan_training(pack, options)
        if not plan["new"]:
            where = f"collections {', '.join(info['collections'])}" if info["collections"] else "the library"
            raise EngramError(f"Nothing new to learn for pack {pack!r}: {where} has no source it has not learned. "
                              "Import files first, or retrain everything with --full.")
        job_id = JobQueue(self.db()).submit(info["id"], options)
        if start_worker:
            self.ensure_worker()
        return self.job(job_id)

    def ensure_worker(self, idle_exit: float | None = 300.0) -> int | None:
        from engram_app.training.worker import start_worker

        return start_worker(self.settings, idle_exit=idle_exit)

    def resume_pending_jobs(self) -> bool:
        """Start a worker when jobs are queued or were interrupted (the app does this at start-up)."""
        pending = self.db().execute("select count(*) from jobs where status in ('queued', 'running')").fetchone()[0]
        return bool(pending) and self.ensure_worker() is not None

    def worker(self) -> dict:
        from engram_app.training.worker import worker_info

        return worker_info(self.settings.home)

    def jobs(self, limit: int = 50) -> list[dict]:
        from engram_app.training import JobQueue

        alive = self.worker()["alive"]
        return [_job_view(row, alive) for row in JobQueue(self.db()).rows(limit)]

    def job(self, job_id: int, metrics: bool = False, log_tail: int = 20) -> dict:
        """A job as the UI and ``job ID`` show it (``interrupted`` when its worker died)."""
        from engram_app.training import JobQueue

        queue = JobQueue(self.db())
        view = _job_view(queue.row(job_id), self.worker()["alive"])
        latest = list(self.db().query(
            "select name, value from job_metrics where job_id = ? and step = (select max(step) from job_metrics "
            "where job_id = ?)", [job_id, job_id]))
        view["latest"] = {r["name"]: r["value"] for r in latest}
        view["log"] = queue.logs(job_id, log_tail)
        if metrics:
            view["metrics"] = queue.metrics(job_id)
        return view

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


def with_context(message: str, retrieved: Sequence[dict]) -> str:
    """The user's message with retrieved library passages put before it (retrieval mode)."""
    if not retrieved:
        return message
    passages = "\n\n".join(f"[{i + 1}] {hit['text']}" for i, hit in enumerate(retrieved))
    return f"Here are passages from my own notes that may help:\n\n{passages}\n\nMy message: {message}"


def _job_view(row: dict, worker_alive: bool) -> dict:
    import json

    status = row["status"]
    if status == "running" and not worker_alive:
        status = "interrupted"
    options = json.loads(row["options"] or "{}")
    return {
        "id": row["id"], "pack": row["pack"], "status": status, "step": row["step"], "total_steps": row["total_steps"],
        "progress": row["progress"], "cancel_requested": bool(row["cancel_requested"]), "error": row["error"],
        "result": json.loads(row["result"]) if row["result"] else None, "options": options.get("train", {}),
        "plan": options.get("plan"), "created": row["created"], "started": row["started"],
        "finished": row["finished"], "heartbeat": row["heartbeat"],
    }
