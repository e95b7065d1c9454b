"""The worker process: takes jobs from SQLite in order and runs them, one at a time.

Exactly one worker runs per data root. It holds two ``flock`` locks for its whole life (the kernel
releases them when the process dies, however it dies):

- ``<home>/worker.lock``, exclusive: the one-worker rule. Only whoever starts a worker takes it,
  without waiting: if it is held, a worker is running (or being started) and the start is refused.
- ``<home>/worker.alive``, exclusive: what "is a worker alive?" asks. A probe tries to take it
  *shared*, without waiting, and lets go at once: refused means alive. A probe never touches
  ``worker.lock``, so it can never make a starting worker believe another one is running; a
  starter that meets a probe on ``worker.alive`` waits the microseconds the probe lasts.

The process that starts a worker takes both locks first and hands the locked descriptors to the
child, so there is no moment when a starting worker is not seen as alive, and two callers cannot
start two. The worker also writes ``<home>/worker.json`` (pid, state, heartbeat) for display.

A thread beats every second: it stamps the job's heartbeat and reads its cancel flag. A cancel
stops the job at its next training step (the job then evaluates and writes what it learned, when
asked to). The grace period counts training time only: if the job is still training
``grace_seconds`` after the cancel, the worker records it as cancelled and exits at once (hard
stop; the pack keeps its previous version). Its evaluation and save are never cut short.

Each job a worker picks up counts an attempt (queue.py); a job that took down ``MAX_ATTEMPTS``
workers is marked failed instead of being resumed again, and the queue moves on. When a worker
starts it removes the job folders (checkpoints) that a hard stop or a crash left behind.

On a GPU the chat (another process) may hold the card's memory: before a job loads its model
there, the worker checks the free memory against what the job needs (gpu_share.py) and, short
of it, waits (the job log says ``waiting for GPU memory: chat holds ...``) or trains on the CPU.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO, Callable

from engram_app.atomic import write_text
from engram_app.errors import EngramError
from engram_app.gpu_share import (CPU, GPU_POLL_SECONDS, GPU_WAIT_SECONDS, PROCEED, GpuMemory, gpu_memory,
                                  job_training_need, place_training)
from engram_app.settings import Settings, device_type
from engram_app.store import open_db
from engram_app.store.db import now
from engram_app.training.runner import JobRunner
from engram_app.training.queue import ACTIVE, JobQueue

log = logging.getLogger(__name__)
LOCK_NAME = "worker.lock"
ALIVE_NAME = "worker.alive"
INFO_NAME = "worker.json"
BEAT_SECONDS = 1.0
GRACE_SECONDS = 30.0
PROBE_WAIT_SECONDS = 2.0  # far more than a probe holds worker.alive; only a live worker holds it longer
LOG_NAME = "worker.log"  # the started worker's stdout and stderr
LOG_MAX_BYTES = 5 * 2**20  # past this when a worker starts, the log is rotated
LOG_BACKUPS = 3  # worker.log.1 (the newest) to worker.log.3 kept


def worker_alive(home: Path) -> bool:
    """Whether a worker process is alive (or being started) for this data root.

    Takes ``worker.alive`` shared for an instant, never ``worker.lock``: see the module docstring.
    """
    try:
        handle = open(Path(home) / ALIVE_NAME, "rb")
    except FileNotFoundError:
        return False  # no worker ever ran here
    with handle:  # closing the file lets go of the shared lock
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


@dataclass
class WorkerLocks:
    """The two locked files that make a process the data root's worker."""

    lock: IO
    alive: IO

    @classmethod
    def claim(cls, home: Path) -> WorkerLocks | None:
        """Both locks, or None when a worker holds them (or is being started)."""
        lock = open(home / LOCK_NAME, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        alive = open(home / ALIVE_NAME, "a+")
        if not _lock_waiting(alive, PROBE_WAIT_SECONDS):  # a worker started before worker.lock was replaced
            alive.close()
            lock.close()
            return None
        return cls(lock, alive)

    @classmethod
    def adopt(cls, home: Path, lock_fd: int, alive_fd: int | None) -> WorkerLocks:
        """The locks the starting process took and handed to us as descriptors."""
        lock = os.fdopen(lock_fd, "a+")
        if alive_fd is not None:
            return cls(lock, os.fdopen(alive_fd, "a+"))
        alive = open(home / ALIVE_NAME, "a+")  # a starter that handed only worker.lock
        _lock_waiting(alive, PROBE_WAIT_SECONDS)
        return cls(lock, alive)

    def fds(self) -> tuple[int, int]:
        return self.lock.fileno(), self.alive.fileno()

    def release(self) -> None:
        self.alive.close()
        self.lock.close()


def _lock_waiting(handle: IO, seconds: float) -> bool:
    """Take an exclusive lock, waiting up to ``seconds`` for probes to let go of it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)


def worker_info(home: Path) -> dict:
    """What the status line shows about the worker."""
    alive = worker_alive(home)
    info = {}
    try:
        info = json.loads((Path(home) / INFO_NAME).read_text())
    except (OSError, ValueError):
        pass
    return {"alive": alive, "pid": info.get("pid") if alive else None,
            "state": info.get("state") if alive else "stopped", "job": info.get("job") if alive else None,
            "device": info.get("device") if alive else None, "heartbeat": info.get("heartbeat")}


def start_worker(settings: Settings, idle_exit: float | None = 300.0) -> int | None:
    """Start a worker in its own session (it outlives the caller); None if one is alive already.

    The caller takes the worker's locks and hands the locked descriptors to the child, so there
    is no moment when a starting worker does not hold them: two callers cannot start two.
    """
    settings.ensure_home()
    locks = WorkerLocks.claim(settings.home)
    if locks is None:
        return None
    try:
        lock_fd, alive_fd = locks.fds()
        command = [sys.executable, "-m", "engram_app", "worker", "--home", str(settings.home), "--device",
                   settings.device, "--lock-fd", str(lock_fd), "--alive-fd", str(alive_fd)]
        if settings.model:
            command += ["--model", settings.model]
        if idle_exit is not None:
            command += ["--idle-exit", str(idle_exit)]
        log_path = settings.home / LOG_NAME
        rotate_log(log_path, LOG_MAX_BYTES, LOG_BACKUPS)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, pass_fds=(lock_fd, alive_fd),
                                    cwd=Path(__file__).resolve().parents[2])
        return proc.pid
    finally:
        locks.release()  # the child's copies of the descriptors keep the locks


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Rotate the worker's log when it is over ``max_bytes``; returns whether it did.

    The worker writes its log through its stdout and stderr (so that a crash's traceback, a
    warning from a library or a message from native code land there too), a descriptor a
    logging handler cannot reopen; so the log is rotated when a worker is started, not while it
    runs: ``worker.log`` becomes ``worker.log.1``, ``.1`` becomes ``.2`` ..., the oldest beyond
    ``backups`` is removed, with the naming of :class:`~logging.handlers.RotatingFileHandler`,
    whose rollover does it. Only a starter holding the worker's locks calls this, so no worker
    is writing to the file meanwhile. One worker's life is not cut short: a log grows past the
    limit by what one worker writes at most.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, delay=True)
    try:
        handler.doRollover()
    finally:
        handler.close()
    log.info("Rotated %s (over %d bytes): the previous output is in %s.1", path, max_bytes, path.name)
    return True


class Worker:
    def __init__(self, settings: Settings, idle_exit: float | None = None, grace_seconds: float = GRACE_SECONDS,
                 lock_fd: int | None = None, alive_fd: int | None = None,
                 gpu_probe: Callable[[], GpuMemory | None] = gpu_memory, gpu_wait_seconds: float = GPU_WAIT_SECONDS,
                 gpu_poll_seconds: float = GPU_POLL_SECONDS):
        """``gpu_probe``: the GPU's free and total memory (None: no GPU), checked before a job loads its model;
        a job short of it waits up to ``gpu_wait_seconds`` (polling every ``gpu_poll_seconds``), then trains
        on the CPU."""
        self.settings, self.idle_exit, self.grace = settings, idle_exit, grace_seconds
        self.gpu_probe, self.gpu_wait, self.gpu_poll = gpu_probe, gpu_wait_seconds, gpu_poll_seconds
        # descriptors of the lock files, already locked by the process that started us
        self.lock_fd, self.alive_fd = lock_fd, alive_fd
        self.home = settings.home
        self._locks: WorkerLocks | None = None
        self._stop = threading.Event()  # ask the worker to exit (SIGTERM)
        self._cancel = threading.Event()  # the current job was cancelled
        self._job_id: int | None = None
        self._runner: JobRunner | None = None
        self._cancel_clock: float | None = None  # when a cancelled job was first seen training
        self._device: str | None = None  # where the current job trains ("cpu", "cuda"), once placed

    def _acquire(self) -> bool:
        self.settings.ensure_home()
        if self.lock_fd is not None:
            self._locks = WorkerLocks.adopt(self.home, self.lock_fd, self.alive_fd)
        else:
            self._locks = WorkerLocks.claim(self.home)
        return self._locks is not None

    def _write_info(self, state: str) -> None:
        info = {"pid": os.getpid(), "state": state, "job": self._job_id, "device": self._device, "heartbeat": now()}
        write_text(self.home / INFO_NAME, json.dumps(info))

    def _try_write_info(self, state: str) -> None:
        """:meth:`_write_info`, where a failure (a full disk) must not take the job down: the next
        heartbeat writes it again."""
        try:
            self._write_info(state)
        except OSError:
            log.exception("could not write %s", INFO_NAME)

    def _beat(self, queue: JobQueue) -> None:
        while not self._stop.is_set():
            job_id = self._job_id
            try:
                self._write_info("training" if job_id else "idle")
                if job_id is not None and queue.heartbeat(job_id):
                    self._cancel.set()
                    if self._grace_spent(job_id) and self._job_id == job_id:
                        self._hard_stop(queue, job_id)
            except Exception:  # a locked database or a full disk must not kill the heartbeat
                log.exception("heartbeat failed")
            self._stop.wait(BEAT_SECONDS)

    def _grace_spent(self, job_id: int) -> bool:
        """Whether the cancelled job has kept training for ``grace`` seconds since the cancel was seen.

        Only training counts: the clock starts when a beat sees the job training with its cancel
        pending, and once the job has left training (it evaluates and writes its version) it is
        never stopped.
        """
        runner = self._runner
        if runner is None or runner.job_id != job_id or runner.phase != "training":
            return False
        self._cancel_clock = self._cancel_clock or time.monotonic()
        return time.monotonic() - self._cancel_clock > self.grace

    def _hard_stop(self, queue: JobQueue, job_id: int) -> None:
        log.warning("job %s did not stop within %.0f s of its cancel: stopping hard", job_id, self.grace)
        queue.log(job_id, f"cancel: no stop within {self.grace:.0f} s, the worker stopped it", "warning")
        queue.finish(job_id, "cancelled", {"outcome": "cancelled", "version": None, "hard_stop": True})
        self._exit(3)

    def _exit(self, code: int) -> None:
        """End the process at once, whatever its other threads are doing (the training step)."""
        os._exit(code)

    def run(self) -> int:
        if not self._acquire():
            raise EngramError(f"A worker is already running for {self.home}.")
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            return self._serve()
        finally:
            self._stop.set()
            signal.signal(signal.SIGTERM, previous)
            self._locks.release()  # as the kernel would when the process ends

    def _serve(self) -> int:
        db = open_db(self.home)  # each thread below uses its own connection to it
        queue = JobQueue(db)
        self._clean_leftovers(db)
        beat = threading.Thread(target=self._beat, args=(queue,), name="heartbeat", daemon=True)
        beat.start()
        idle_since = time.monotonic()
        name = f"{os.uname().nodename}:{os.getpid()}"
        log.info("worker %s started for %s", name, self.home)
        while not self._stop.is_set():
            given_up = queue.fail_crashed()
            if given_up:
                log.warning("gave up jobs %s: each took down %d workers", given_up, queue.max_attempts)
                self._clean_leftovers(db)
            job = queue.claim(name)
            if job is None:
                if self.idle_exit is not None and time.monotonic() - idle_since > self.idle_exit:
                    break
                self._stop.wait(0.5)
                continue
            self._run_job(queue, db, job)
            idle_since = time.monotonic()
        self._stop.set()
        beat.join()
        self._write_info("stopped")
        return 0

    def _clean_leftovers(self, db) -> None:
        """Remove the job folders (checkpoints) of jobs that are over.

        A job removes its folder when it ends; a hard stop or a crash cannot, and a job given up
        after crashing never ends by itself. Folders of queued and interrupted jobs stay: an
        interrupted job resumes from its checkpoint.
        """
        marks = ",".join("?" * len(ACTIVE))
        active = {r["id"] for r in db.query(f"select id from jobs where status in ({marks})", list(ACTIVE))}
        for folder in sorted((self.home / "packs").glob("*/jobs/*")):
            if folder.is_dir() and not (folder.name.isdigit() and int(folder.name) in active):
                log.info("removing %s, left by a job that is over", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _run_job(self, queue: JobQueue, db, job: dict) -> None:
        self._cancel.clear()
        self._cancel_clock = None
        if job["cancel_requested"]:
            self._cancel.set()
        self._job_id = job["id"]  # heartbeats and cancels reach the job while it waits for GPU memory too
        settings = self._job_settings(queue, db, job)
        if settings is None:  # the worker is stopping while the job waited: the next worker takes it up
            self._job_id = None
            queue.hand_back(job["id"])
            return
        self._device = device_type(settings.device)  # the chat takes fewer CPU threads while it is "cpu"
        self._try_write_info("training")
        runner = JobRunner(settings, db, job, should_stop=lambda: self._cancel.is_set() or self._stop.is_set(),
                           shutting_down=lambda: self._stop.is_set() and not self._cancel.is_set())
        self._runner = runner
        try:
            result = runner.run()
            if result["outcome"] == "interrupted":
                queue.hand_back(job["id"])  # a polite stop, not a crash: the next worker resumes the job
                return
            queue.finish(job["id"], "cancelled" if result["outcome"] == "cancelled" else "done", result)
        except EngramError as exc:
            runner.say(str(exc), "error")
            queue.finish(job["id"], "failed", error=str(exc))
        except Exception as exc:  # anything else: record it with the traceback, keep the worker alive
            runner.say(traceback.format_exc(limit=8), "error")
            queue.finish(job["id"], "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._job_id = None
            self._runner = None
            self._device = None
            self._try_write_info("idle")  # the chat takes every thread again without waiting for a beat

    def _job_settings(self, queue: JobQueue, db, job: dict) -> Settings | None:
        """The settings ``job`` trains with: the worker's own, or the CPU's when the GPU is short of memory
        for it (after waiting for the chat to free some, see gpu_share.py); None: the worker is stopping."""
        memory = self.gpu_probe() if self.settings.device != "cpu" else None
        if memory is None:
            return self.settings
        try:
            need = job_training_need(db, self.home, self.settings.models_dir, job)
        except Exception:  # noqa: BLE001 - a missing pack or model fails in the job itself, with its reason
            log.exception("job %s: could not tell what GPU memory it needs", job["id"])
            need = None
        if need is None:
            return self.settings
        started, waited = time.monotonic(), False
        while True:
            placement = place_training(need, memory, time.monotonic() - started, self.gpu_wait)
            if placement.action == PROCEED:
                if waited:
                    queue.log(job["id"], placement.message)
                return self.settings
            if placement.action == CPU:
                queue.log(job["id"], placement.message, "warning")
                return replace(self.settings, device="cpu")
            if self._cancel.is_set():  # stopping needs no GPU: the job ends (and keeps what it learned) on the CPU
                queue.log(job["id"], "cancelled while waiting for GPU memory: stopping on the CPU", "warning")
                return replace(self.settings, device="cpu")
            if not waited:
                log.info("job %s: %s", job["id"], placement.message)
                queue.log(job["id"], placement.message, "warning")
                waited = True
            if self._stop.wait(self.gpu_poll):
                return None
            memory = self.gpu_probe() or memory
