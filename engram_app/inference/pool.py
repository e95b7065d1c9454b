"""One loaded base model per base id, wearing the adapters of every pack in use.

A copy of the base model per pack costs a whole model's memory for each pack. Here the packs of
one base model are PEFT adapters on that one model, by adapter name: the Engram memories live in
one Engram ``PeftModel`` (engram/tuner.py: only the active memory fires), the LoRA weights in
one LoRA ``PeftModel`` (PEFT switches its adapters the same way). Before every model call, under
the pool's lock, :meth:`ModelPool.activate` switches on the adapters of the pack that call is for
(or none: memory off, the base model alone). A generation's Engram decoding state lives on its
own KV cache (engram/model.py ``DecodeState``), so replies of several packs can be interleaved
call by call.

Adapters are loaded on first use and kept in least-recently-used order; past
``budget_bytes`` (RAM on the CPU, VRAM on a GPU) the least recently used pack is unloaded. A
reply still running with an unloaded pack loads it again at its next call (same files, same
weights, same tokens).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from engram_app.engram import EngramConfig
from engram_app.engram import CONFIG_NAME, LORA_DIR, SECOND_TIME_WARNING, WEIGHTS_NAME, attach, bind, read_adapter_config
from engram_app.errors import EngramError
from engram_app.inference.runtime import Runtime
from engram_app.inference.threads import ChatThreads
from engram_app.models import LoadedModel, use_int4
from engram_app.settings import int4_chat_mode
from engram_app.training.adapters import Adapted
from engram_app.training.packs import PackConfig

log = logging.getLogger(__name__)
STALE = "<stale>"  # no adapter has this name: after it, the next activation switches whatever was on


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapters a pack's chat wears: enough to load them (again) at any time."""

    key: str  # the PEFT adapter name: unique per pack version (see adapter_key)
    folder: Path | None  # the version's adapter folder; None: a pack not trained yet (fresh adapters)
    config: PackConfig


def default_budget(device: torch.device) -> int:
    """A quarter of the GPU memory free now (on a GPU), else of the RAM available now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    import psutil

    return psutil.virtual_memory().available // 4


def pack_prefix(pack_id: int) -> str:
    """What the adapter keys of every version of a pack start with."""
    return f"pack{pack_id}_v"


def adapter_key(pack_id: int, version: int | None) -> str:
    """A PEFT adapter name for a pack version (a valid module name: no dots); version 0: not trained yet."""
    return f"{pack_prefix(pack_id)}{version or 0}"


@dataclass
class _Loaded:
    adapted: Adapted
    nbytes: int
    seconds: float


class ModelPool:
    """The one copy of a base model, and the pack adapters loaded on it (LRU, within a byte budget)."""

    def __init__(self, loaded: LoadedModel, budget_bytes: int, int4: bool | None = None,
                 threads: ChatThreads | None = None):
        """``int4``: run a GGUF model from its 4-bit blocks on the CPU (models.py ``use_int4``); None: as
        ``ENGRAM_INT4`` says (settings.py ``int4_chat_mode``: by default where the exact kernel runs).
        ``threads``: the CPU thread count of each model call (threads.py: half while the training
        worker trains on the CPU); None: torch's, untouched. The pool serves chat only, so its model
        never trains."""
        mode = int4_chat_mode() if int4 is None else "on" if int4 else "off"
        if mode != "off":
            use_int4(loaded, exact_only=mode == "auto")
        self.loaded = loaded
        self.base = loaded.model
        self.tokenizer = loaded.tokenizer
        self.budget_bytes = budget_bytes
        self.lock = threading.RLock()  # one model call at a time, for every view of this model
        self.threads = threads
        self._engram: PeftModel | None = None  # the Engram memories, by adapter name
        self._lora: PeftModel | None = None  # the LoRA adapters, by adapter name
        self._adapters: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._active: str | None = None  # whose adapters are switched on (None: the base model alone)
        self.base_runtime = PackRuntime(self, None)

    # --- views ------------------------------------------------------------------------------

    def runtime(self, spec: AdapterSpec | None) -> PackRuntime:
        """A runtime for chats with ``spec``'s adapters (None: the base model), loading them now."""
        if spec is None:
            return self.base_runtime
        view = PackRuntime(self, spec)
        with self.lock:
            view.adapted = self._ensure(spec).adapted
        return view

    # --- switching --------------------------------------------------------------------------

    def activate(self, spec: AdapterSpec | None) -> Adapted | None:
        """Switch on ``spec``'s adapters only (None: all off), loading them if needed. Hold :attr:`lock`."""
        entry = self._ensure(spec) if spec is not None else None
        key = spec.key if spec is not None else None
        if key != self._active:
            self._switch(key, entry.adapted if entry is not None else None)
        return entry.adapted if entry is not None else None

    def _switch(self, key: str | None, adapted: Adapted | None) -> None:
        if self._engram is not None:
            if adapted is not None and adapted.memory is not None:
                self._engram.set_adapter(key, inference_mode=True)
                self._engram.base_model.enable_adapter_layers()
            else:
                self._engram.base_model.disable_adapter_layers()
        if self._lora is not None:
            if adapted is not None and adapted.lora is not None:
                self._lora.set_adapter(key, inference_mode=True)
                self._lora.base_model.enable_adapter_layers()
            else:
                self._lora.base_model.disable_adapter_layers()
        self._active = key

    # --- loading and unloading --------------------------------------------------------------

    def _ensure(self, spec: AdapterSpec) -> _Loaded:
        with self.lock:
            entry = self._adapters.get(spec.key)
            if entry is not None:
                self._adapters.move_to_end(spec.key)
                return entry
            started = time.perf_counter()
            self._active = STALE  # adding an adapter may change what is switched on
            try:
                adapted = self._load(spec)
            except BaseException:  # a broken file: take off what was registered, so the next try starts clean
                self._remove(spec.key)
                raise
            entry = _Loaded(adapted, self._nbytes(spec.key, adapted), time.perf_counter() - started)
            self._adapters[spec.key] = entry
            log.info("Loaded adapters %s (%.1f MB) in %.2f s.", spec.key, entry.nbytes / 2**20, entry.seconds)
            self._evict(keep=spec.key)
            return entry

    def _load(self, spec: AdapterSpec) -> Adapted:
        memory = lora = None
        if spec.folder is None:  # not trained yet: a fresh memory (identity), seeded as training starts one
            if spec.config.uses_engram:
                torch.manual_seed(0)
                memory = self._add_memory(spec.key, spec.config.engram_config())
            # A fresh LoRA adapter is exactly the identity (its B matrices are zero): nothing to load.
        else:
            folder = Path(spec.folder)
            if (folder / CONFIG_NAME).is_file():
                memory = self._load_memory(spec.key, folder)
            if (folder / LORA_DIR).is_dir():
                lora = self._load_lora(spec.key, folder / LORA_DIR)
            if memory is None and lora is None:
                raise EngramError(f"No adapter in {folder}: the pack version's files are missing. Roll the pack "
                                  "back to another version, or train it again.")
        if memory is not None:
            memory.requires_grad_(False)
            memory.eval()
        return Adapted(self.base, lora if lora is not None else self.base, memory, lora)

    def _add_memory(self, key: str, config: EngramConfig):
        """A new memory named ``key`` on the base model (the first one creates the Engram PeftModel)."""
        if self._engram is None:
            memory = attach(self.base, self.tokenizer, config, adapter_name=key)
            self._engram = memory.peft_model
            self._engram.eval()
            return memory
        config = copy.deepcopy(config)
        config.tokenizer = self.tokenizer
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SECOND_TIME_WARNING)
            self._engram.add_adapter(key, config)
        return bind(self._engram, key)

    def _load_memory(self, key: str, folder: Path):
        """The memory saved in ``folder`` as adapter ``key`` (checked against the base model and tokenizer)."""
        meta = read_adapter_config(folder)
        if "engram" in meta:  # saved before Engram was a PEFT method: its own keys (engram/io.py)
            from safetensors.torch import load_file

            config = EngramConfig.from_dict(meta["engram"])
            config.base_model_fingerprint = meta["base_model"]
            config._source = folder
            memory = self._add_memory(key, config)
            memory.load_state_dict(load_file(folder / WEIGHTS_NAME, device=str(memory.compression.device)), strict=True)
            return memory
        memory = self._add_memory(key, EngramConfig.from_pretrained(folder))
        self._engram.load_adapter(str(folder), adapter_name=key, is_trainable=False)
        return memory

    def _load_lora(self, key: str, path: Path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SECOND_TIME_WARNING)
            if self._lora is None:
                self._lora = PeftModel.from_pretrained(self.base, str(path), adapter_name=key, is_trainable=False)
            else:
                self._lora.load_adapter(str(path), adapter_name=key, is_trainable=False)
        self._lora.eval()
        return self._lora

    def _nbytes(self, key: str, adapted: Adapted) -> int:
        """What this pack's adapters hold in RAM (or VRAM): the memory's tensors and its LoRA weights."""
        total = 0
        if adapted.memory is not None:
            total += sum(t.numel() * t.element_size() for t in [*adapted.memory.parameters(), *adapted.memory.buffers()])
        if adapted.lora is not None:
            marker = f".{key}."
            total += sum(p.numel() * p.element_size() for name, p in self._lora.named_parameters()
                         if marker in name and "lora_" in name)
        return total

    def _evict(self, keep: str) -> None:
        """Unload the least recently used packs until the loaded ones fit the budget (``keep`` always stays)."""
        while self.loaded_bytes() > self.budget_bytes:
            victim = next((k for k in self._adapters if k != keep), None)
            if victim is None:
                return
            log.info("Adapter budget %.0f MB exceeded: unloading %s.", self.budget_bytes / 2**20, victim)
            self.unload(victim)

    def unload(self, key: str) -> int:
        """Free adapter ``key`` (nothing if it is not loaded); returns the bytes it held."""
        with self.lock:
            entry = self._adapters.pop(key, None)
            if entry is None:
                return 0
            self._remove(key)
            return entry.nbytes

    def _remove(self, key: str) -> None:
        """Delete adapter ``key`` from the Engram and LoRA models that hold it (under the lock)."""
        self._switch(None, None)  # PEFT warns when the active adapter is deleted; none is active now
        if self._engram is not None and key in self._engram.peft_config:
            self._engram.delete_adapter(key)
            if not self._engram.peft_config:  # the last memory: take the Engram tuner off the model
                self._engram.base_model.unload()
                self._engram = None
        if self._lora is not None and key in self._lora.peft_config:
            self._lora.delete_adapter(key)
            if not self._lora.peft_config:  # the last LoRA adapter: the base model's own layers again
                self._lora.unload()
                self.base.__dict__.pop("peft_config", None)
                self._lora = None
        self._active = STALE

    def unload_where(self, match: Callable[[str], bool]) -> tuple[list[str], int]:
        """Unload every adapter whose key ``match`` accepts: (their keys, the bytes freed)."""
        with self.lock:
            keys = [k for k in self._adapters if match(k)]
            return keys, sum(self.unload(k) for k in keys)

    # --- what is loaded ---------------------------------------------------------------------

    def loaded_adapters(self) -> dict[str, int]:
        """Adapter key -> bytes, least recently used first."""
        with self.lock:
            return {key: entry.nbytes for key, entry in self._adapters.items()}

    def loaded_bytes(self) -> int:
        return sum(e.nbytes for e in self._adapters.values())


class PackRuntime(Runtime):
    """A :class:`Runtime` on a pool's shared model: each model call switches this pack's adapters on first.

    ``spec`` None: the base model alone (every adapter switched off).
    """

    def __init__(self, pool: ModelPool, spec: AdapterSpec | None):
        super().__init__(pool.loaded, lock=pool.lock)
        self.pool = pool
        self.spec = spec
        self.pack_version: int | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        threads = self.pool.threads.call() if self.pool.threads is not None else contextlib.nullcontext()
        with self._lock, threads:  # the thread count in the thread that makes the call (threads.py)
            self.adapted = self.pool.activate(self.spec)
            yield
