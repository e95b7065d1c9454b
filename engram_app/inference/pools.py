"""The models the app has loaded: one :class:`ModelPool` per base model, and each pack's runtime on it.

Every pack on a base model shares that model's one loaded copy (pool.py): a pack's adapters are
loaded on first use and switched on for each of its model calls; memory off is the same model
with every adapter off. When a pack's active version changes (a job finished, or a rollback) the
new version is loaded on the next call and the old one freed, so chat uses the new version at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pool.py imports PEFT: only when a model is loaded, so the CLI starts fast
    from engram_app.inference.pool import ModelPool
    from engram_app.inference.threads import ChatThreads
    from engram_app.inference.runtime import Runtime
    from engram_app.models import LoadedModel
    from engram_app.training.packs import PackStore


class Pools:
    """Base models by id (None: the bundled one), loaded on first use by ``load(base_id)``."""

    def __init__(self, load: Callable[[str | None], LoadedModel], budget_bytes: int | None = None,
                 threads: ChatThreads | None = None):
        """``threads``: the thread count of the chat's model calls on CPU models (threads.py)."""
        self._load = load
        self.threads = threads
        self._budget = budget_bytes  # adapter budget per model; None: default_budget of its device
        self.pools: dict[str | None, ModelPool] = {}
        self._pack_runtimes: dict[str, tuple[int, Runtime]] = {}  # pack -> (version, runtime on its pool)
        self._lock = threading.Lock()

    def pool(self, base_id: str | None) -> ModelPool:
        from engram_app.inference.pool import ModelPool, default_budget

        with self._lock:
            pool = self.pools.get(base_id)
            if pool is None:
                loaded = self._load(base_id)
                budget = self._budget if self._budget is not None else default_budget(loaded.device.device)
                threads = self.threads if loaded.device.device.type == "cpu" else None
                pool = self.pools[base_id] = ModelPool(loaded, budget, threads=threads)
            return pool

    def pack_runtime(self, store: PackStore, pack: str, memory: bool = True) -> Runtime:
        """The base model of ``pack``, wearing its active version (or nothing: ``memory`` off)."""
        from engram_app.inference.pool import AdapterSpec, adapter_key
        from engram_app.training.runner import model_spec

        info = store.get(pack)
        pool = self.pool(model_spec(info["base_model"]))
        if not memory:
            return pool.base_runtime
        with self._lock:
            cached = self._pack_runtimes.get(pack)
            if cached is not None and cached[0] == info["active_version"] and cached[1].pool is pool:
                return cached[1]
        row = store.row(pack)
        version = store.version(pack)
        spec = AdapterSpec(adapter_key(row["id"], info["active_version"]),
                           Path(version["path"]) if version is not None else None, store.config(row))
        runtime = pool.runtime(spec)
        runtime.pack_version = info["active_version"]
        with self._lock:
            previous = self._pack_runtimes.get(pack)
            self._pack_runtimes[pack] = (info["active_version"], runtime)
        if previous is not None and previous[1].spec.key != spec.key:
            previous[1].pool.unload(previous[1].spec.key)  # a reply still running with it loads it again
        return runtime

    def unload(self, pack: str, pack_id: int) -> dict:
        """Free every version of a pack's adapters; the next chat with it loads them again."""
        from engram_app.inference.pool import pack_prefix

        prefix = pack_prefix(pack_id)
        with self._lock:
            self._pack_runtimes.pop(pack, None)
            pools = list(self.pools.values())
        keys, freed = [], 0
        for pool in pools:
            unloaded, nbytes = pool.unload_where(lambda key: key.startswith(prefix))
            keys += unloaded
            freed += nbytes
        return {"pack": pack, "unloaded": len(keys), "freed_bytes": freed}

    def loaded(self, names: dict[int, str]) -> list[dict]:
        """The pack adapters loaded now, least recently used first (``names``: pack names by id)."""
        out = []
        with self._lock:
            pools = list(self.pools.items())
        for base_id, pool in pools:
            for key, nbytes in pool.loaded_adapters().items():
                pack_id, _, version = key.removeprefix("pack").partition("_v")
                out.append({"pack": names.get(int(pack_id)), "version": int(version) or None,
                            "base_model": base_id or "default", "bytes": nbytes})
        return out


def describe(loaded: LoadedModel | None, model: str | None) -> dict:
    """The status line's model, device, load time and GPU memory (None before the model is loaded).

    ``gpu_memory``: what the chat's tensors hold, and the whole card's use (the training worker's too)."""
    if loaded is None:
        return {"model": model or "default", "device": None, "load_seconds": None}
    gpu = None
    if loaded.device.device.type == "cuda":
        import torch

        from engram_app.gpu_share import gpu_memory, human

        gpu = f"{torch.cuda.memory_allocated(loaded.device.device) / 2**30:.1f} GiB"
        card = gpu_memory(loaded.device.device)  # the whole card: the training worker's share shows here
        if card is not None:
            gpu += f" by the chat; {human(card.used)} of {human(card.total)} on the card"
    return {"model": loaded.source.name, "device": loaded.device.describe(),
            "load_seconds": round(loaded.load_seconds, 2), "gpu_memory": gpu}
