"""Sharing one GPU between the chat and the training worker: two processes, one card's memory.

The app (chat) and the worker (training) are separate processes, and either may load its model
onto the GPU first. Each checks the card's free memory (``torch.cuda.mem_get_info``, the whole
card's, other processes included) against what it needs *before* it loads, instead of running
out of memory halfway through:

- the worker, short of memory, waits (its job log says ``waiting for GPU memory: chat holds
  ...``) for at most :data:`GPU_WAIT_SECONDS`, polling; then, or at once when the card is too
  small for the job whatever is freed, it trains on the CPU and says so;
- the chat, short of memory, loads on the CPU and says so in the status line (the device's
  description carries the reason).

What a model needs is an estimate made before loading it (no weight is read): its parameters
in bf16, the memory table when it lives on the GPU, and a margin for activations, the KV cache
and the CUDA context. :data:`FAKE_VRAM_ENV` replaces the card with a simulated one (free and
total bytes), so that the decisions can be exercised on a machine without a GPU (tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engram_app.errors import EngramError
from engram_app.settings import DevicePlan

log = logging.getLogger(__name__)

GiB = 2**30
FAKE_VRAM_ENV = "ENGRAM_FAKE_VRAM_BYTES"  # "FREE" or "FREE/TOTAL" bytes: a simulated card (tests, rehearsals)
GPU_WAIT_SECONDS = 120.0  # how long a job waits for the chat (or anything else) to free GPU memory
GPU_POLL_SECONDS = 5.0
GPU_BYTES_PER_PARAMETER = 2  # the app runs models in bf16 on a GPU (settings.resolve_device)
TRAINING_MARGIN = 1 * GiB  # activations of a batch (the logits alone: 8 x 256 x 49k x 6 bytes for SmolLM2), CUDA context
CHAT_MARGIN = GiB // 2  # KV caches, one call's activations, the CUDA context

PROCEED, WAIT, CPU = "proceed", "wait", "cpu"


def human(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class GpuMemory:
    """The card's memory now: what is free and what it has in all (bytes)."""

    free: int
    total: int

    @property
    def used(self) -> int:
        """Held by every process on the card (before we load: by the others)."""
        return self.total - self.free


def gpu_memory(device: int | torch.device = 0) -> GpuMemory | None:
    """The GPU's free and total memory (``torch.cuda.mem_get_info``); None without a GPU.

    ``ENGRAM_FAKE_VRAM_BYTES`` set: that simulated card instead, GPU or not.
    """
    fake = os.environ.get(FAKE_VRAM_ENV, "").strip()
    if fake:
        return parse_fake_vram(fake)
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(int(free), int(total))


def parse_fake_vram(text: str) -> GpuMemory:
    """``"FREE"`` (a card with nothing else on it) or ``"FREE/TOTAL"``, in bytes."""
    try:
        numbers = [int(part) for part in text.split("/")]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or not 0 <= numbers[0] <= numbers[1]:
        raise EngramError(f"{FAKE_VRAM_ENV}={text!r} is not a simulated card: give free bytes, or free/total "
                          "bytes with free at most total (e.g. 2000000000/8000000000), or unset it.")
    return GpuMemory(*numbers)


def training_need(parameters: int | None, table_bytes: int = 0) -> int | None:
    """GPU bytes to train a pack: bf16 weights, the table and its row optimiser's share (1.5x, as
    sizes.py counts it for RAM), and :data:`TRAINING_MARGIN`. None: the model's size is unknown."""
    if parameters is None:
        return None
    return GPU_BYTES_PER_PARAMETER * parameters + int(1.5 * table_bytes) + TRAINING_MARGIN


def chat_need(parameters: int | None) -> int | None:
    """GPU bytes to chat with a model: bf16 weights and :data:`CHAT_MARGIN` (packs' adapters are
    loaded later, within a quarter of the memory then free: pool.py). None: size unknown."""
    if parameters is None:
        return None
    return GPU_BYTES_PER_PARAMETER * parameters + CHAT_MARGIN


@dataclass(frozen=True)
class Placement:
    """Where a model goes: ``proceed`` (the GPU), ``wait`` (for memory to be freed) or ``cpu``; and why."""

    action: str
    message: str


def place_training(need: int, memory: GpuMemory, waited: float = 0.0,
                   wait_limit: float = GPU_WAIT_SECONDS) -> Placement:
    """Whether a training job loads onto the GPU now, waits for memory, or trains on the CPU."""
    if need <= memory.free:
        return Placement(PROCEED, f"GPU memory: this job needs {human(need)}, {human(memory.free)} free of "
                                  f"{human(memory.total)}: training on the GPU")
    if need > memory.total:
        return Placement(CPU, f"not enough GPU memory: this job needs {human(need)}, the card has "
                              f"{human(memory.total)} in all: training on the CPU")
    if waited >= wait_limit:
        return Placement(CPU, f"GPU memory still short after {waited:.0f} s (this job needs {human(need)}, "
                              f"{human(memory.free)} free, chat holds {human(memory.used)}): training on the CPU")
    return Placement(WAIT, f"waiting for GPU memory: chat holds {human(memory.used)} of {human(memory.total)} "
                           f"(with any other process on the card); this job needs {human(need)}, "
                           f"{human(memory.free)} free (at most {wait_limit:.0f} s, then on the CPU)")


def place_chat(need: int, memory: GpuMemory) -> Placement:
    """Whether the chat's model loads onto the GPU or, short of memory, on the CPU (chat never waits)."""
    if need <= memory.free:
        return Placement(PROCEED, f"GPU memory: the model needs {human(need)}, {human(memory.free)} free of "
                                  f"{human(memory.total)}")
    if need > memory.total:
        return Placement(CPU, f"on the CPU: the model needs {human(need)} of GPU memory, the card has "
                              f"{human(memory.total)} in all")
    return Placement(CPU, f"moved to the CPU: the GPU has {human(memory.free)} free of {human(memory.total)} (the "
                          f"training worker and other processes hold {human(memory.used)}), the model needs "
                          f"{human(need)}; restart the app when training is done to chat on the GPU")


@dataclass(frozen=True)
class CpuInstead(DevicePlan):
    """The CPU plan the chat fell back to, carrying why: the status line shows it with the device."""

    reason: str = ""

    def describe(self) -> str:
        return f"{super().describe()}, {self.reason}"


def chat_device(plan: DevicePlan, model: str | None, models_dir: Path,
                probe: Callable[[], GpuMemory | None] = gpu_memory) -> DevicePlan:
    """The device the chat loads ``model`` on: ``plan``, or the CPU when the GPU lacks the memory for it."""
    if plan.device.type != "cuda":
        return plan
    memory = probe()
    if memory is None:
        return plan
    from engram_app.models import model_facts

    need = chat_need(model_facts(model, models_dir).parameters)
    if need is None:
        log.info("GPU memory not checked: the size of %s is unknown until it is downloaded.", model)
        return plan
    placement = place_chat(need, memory)
    if placement.action == CPU:
        log.warning("Chat %s", placement.message)
        return CpuInstead(torch.device("cpu"), torch.float32, placement.message)
    log.info(placement.message)
    return plan


def job_training_need(db, home: Path, models_dir: Path, job: dict) -> int | None:
    """GPU bytes a queued job needs (from its pack's base model and size); None: unknown."""
    from engram_app.models import model_facts
    from engram_app.training.packs import PackStore
    from engram_app.training.runner import model_spec
    from engram_app.training.sizes import PRESETS

    packs = PackStore(db, home)
    pack = packs.get(job["pack"])
    config = packs.config(packs.row(pack["name"]))
    preset = PRESETS.get(config.preset)
    table = preset.needs()["gpu"] if config.uses_engram and preset is not None else 0
    return training_need(model_facts(model_spec(pack["base_model"]), models_dir).parameters, table)
