"""How many CPU threads the chat's model calls use: all of them, or half while the app's own training
worker trains on the CPU beside it.

Both processes compute through OpenMP threads that wait for each other at every barrier. With
the worker's training steps on the same cores, a chat decoding at every core's thread waits on
threads the kernel has given to the worker: on 2 cores, beside a real job, the chat at both
threads decoded at 0.23x of its speed alone (0.03x before the app's shorter spin count,
engram_app/__init__.py), at one thread 0.75x (``bench/chat_beside_training.py``; docs/BENCHMARKS.md
"Chat beside a busy process"). Half the threads on larger machines is the same rule, unmeasured
there.

The count is set for each model call in the thread that makes it (``torch.set_num_threads`` sets
the calling thread's OpenMP and MKL counts, and torch's process-wide default that a thread takes
when it first computes) and set back to ``full`` after it, so a reply started before a job began
drops to half as soon as the job trains and gets every thread back within about two seconds of
its end (the worker's state is written every second and read at most every second), and a thread
that first computed during a throttled call does not keep half the threads. A greedy reply can
differ in a near-tie between the two counts: the sums run in another order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0  # how often the worker's state is read (a lock probe and a small JSON file)


def worker_trains_on_cpu(home: Path) -> bool:
    """Whether the training worker of data root ``home`` is running a job on the CPU now (its device
    is None when no worker is alive, between jobs and while a job waits for GPU memory)."""
    from engram_app.training.worker import worker_info

    return worker_info(home)["device"] == "cpu"


class ChatThreads:
    """The thread count of the chat's model calls on the CPU: ``full`` (every thread torch has at
    start), or half of it, at least one, while ``busy()`` says the training worker trains there.

    ``busy`` is asked at most once every ``every`` seconds; an error in it counts as not busy."""

    def __init__(self, busy: Callable[[], bool], full: int | None = None, every: float = CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.busy = busy
        self.full = full if full is not None else torch.get_num_threads()
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._checked: float | None = None
        self._busy = False

    def shared(self) -> bool:
        """Whether the worker trains on the CPU (as last read, at most ``every`` seconds ago)."""
        with self._lock:
            now = self.clock()
            if self._checked is None or now - self._checked >= self.every:
                try:
                    self._busy = bool(self.busy())
                except Exception:  # noqa: BLE001 - a status file being rewritten must not stop a reply
                    log.debug("could not read the training worker's state", exc_info=True)
                    self._busy = False
                self._checked = now
            return self._busy

    def count(self) -> int:
        return max(1, self.full // 2) if self.shared() else self.full

    @contextlib.contextmanager
    def call(self) -> Iterator[int]:
        """One model call at :meth:`count` threads, set in the calling thread for the block and set
        back to ``full`` after it (an exception in the call included)."""
        threads = self.count()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            if threads != self.full:
                torch.set_num_threads(self.full)

    def describe(self) -> str | None:
        """The status line's words while the chat runs on fewer threads (None otherwise)."""
        threads = self.count()
        if threads == self.full:
            return None
        return f"chat on {threads} of {self.full} CPU threads while the job trains on the CPU"
