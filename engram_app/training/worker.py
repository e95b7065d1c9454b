"""The worker process: takes jobs from SQLite in order and runs them, one at a time.

Exactly one worker runs per data root: it holds an exclusive ``flock`` on ``<home>/worker.lock``
for its whole life, so "is a worker alive?" is "is the lock held?" (the kernel releases it when
the process dies, however it dies). The worker also writes ``<home>/worker.json`` (pid, state,
heartbeat) for display.

A thread beats every second: it stamps the job's heartbeat and reads its cancel flag. A cancel
stops the job at its next step (the job writes what it learned when asked to); if the job has
not stopped ``grace_seconds`` later, the worker records the job as cancelled and exits at once
(hard stop); the pack keeps its previous version.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from engram_app.errors import EngramError
from engram_app.settings import Settings
from engram_app.store import open_db
from engram_app.training.job import JobRunner
from engram_app.training.jobs import JobQueue
from engram_app.training.packs import now

log = logging.getLogger(__name__)
LOCK_NAME = "worker.lock"
INFO_NAME = "worker.json"
BEAT_SECONDS = 1.0
GRACE_SECONDS = 30.0


def worker_alive(home: Path) -> bool:
    """Whether a worker process holds this data root's worker lock."""
    path = Path(home) / LOCK_NAME
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


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
            "heartbeat": info.get("heartbeat")}


def start_worker(settings: Settings, idle_exit: float | None = 300.0) -> int | None:
    """Start a worker in its own session (it outlives the caller); None if one is alive already.

    The caller takes the worker lock and hands the locked file descriptor to the child, so there
    is no moment when a starting worker does not hold the lock: two callers cannot start two.
    """
    settings.ensure_home()
    handle = open(settings.home / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        fd = handle.fileno()
        command = [sys.executable, "-m", "engram_app", "worker", "--home", str(settings.home), "--device",
                   settings.device, "--lock-fd", str(fd)]
        if settings.model:
            command += ["--model", settings.model]
        if idle_exit is not None:
            command += ["--idle-exit", str(idle_exit)]
        with open(settings.home / "worker.log", "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, pass_fds=(fd,), cwd=Path(__file__).resolve().parents[2])
        return proc.pid
    finally:
        handle.close()  # the child's copy of the descriptor keeps the lock


class Worker:
    def __init__(self, settings: Settings, idle_exit: float | None = None, grace_seconds: float = GRACE_SECONDS,
                 lock_fd: int | None = None):
        self.settings, self.idle_exit, self.grace = settings, idle_exit, grace_seconds
        self.lock_fd = lock_fd  # a descriptor of the lock file, already locked by the process that started us
        self.home = settings.home
        self._lock_handle = None
        self._stop = threading.Event()  # ask the worker to exit (SIGTERM)
        self._cancel = threading.Event()  # the current job was cancelled
        self._job_id: int | None = None
        self._cancel_seen: float | None = None

    def _acquire(self) -> bool:
        self.settings.ensure_home()
        if self.lock_fd is not None:
            self._lock_handle = os.fdopen(self.lock_fd, "a+")
            return True
        handle = open(self.home / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock_handle = handle
        return True

    def _write_info(self, state: str) -> None:
        info = {"pid": os.getpid(), "state": state, "job": self._job_id, "heartbeat": now()}
        tmp = self.home / f".{INFO_NAME}.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.home / INFO_NAME)

    def _beat(self) -> None:
        db = open_db(self.home)
        queue = JobQueue(db)
        while not self._stop.is_set():
            job_id = self._job_id
            try:
                self._write_info("training" if job_id else "idle")
                if job_id is not None and queue.heartbeat(job_id):
                    self._cancel.set()
                    self._cancel_seen = self._cancel_seen or time.monotonic()
                    if time.monotonic() - self._cancel_seen > self.grace and self._job_id == job_id:
                        log.warning("job %s did not stop within %.0f s of its cancel: stopping hard", job_id, self.grace)
                        queue.log(job_id, f"cancel: no stop within {self.grace:.0f} s, the worker stopped it", "warning")
                        queue.finish(job_id, "cancelled", {"outcome": "cancelled", "version": None, "hard_stop": True})
                        os._exit(3)
            except Exception:  # a locked database or a full disk must not kill the heartbeat
                log.exception("heartbeat failed")
            time.sleep(BEAT_SECONDS)

    def run(self) -> int:
        if not self._acquire():
            raise EngramError(f"A worker is already running for {self.home}.")
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        db = open_db(self.home)
        queue = JobQueue(db)
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        idle_since = time.monotonic()
        name = f"{os.uname().nodename}:{os.getpid()}"
        log.info("worker %s started for %s", name, self.home)
        while not self._stop.is_set():
            job = queue.claim(name)
            if job is None:
                if self.idle_exit is not None and time.monotonic() - idle_since > self.idle_exit:
                    break
                self._stop.wait(0.5)
                continue
            self._run_job(queue, db, job)
            idle_since = time.monotonic()
        self._write_info("stopped")
        return 0

    def _run_job(self, queue: JobQueue, db, job: dict) -> None:
        self._cancel.clear()
        self._cancel_seen = None
        self._job_id = job["id"]
        if job["cancel_requested"]:
            self._cancel.set()
        runner = JobRunner(self.settings, db, job, should_stop=lambda: self._cancel.is_set() or self._stop.is_set(),
                           shutting_down=lambda: self._stop.is_set() and not self._cancel.is_set())
        try:
            result = runner.run()
            if result["outcome"] == "interrupted":
                return  # the worker is shutting down: the job stays running, the next worker resumes it
            queue.finish(job["id"], "cancelled" if result["outcome"] == "cancelled" else "done", result)
        except EngramError as exc:
            runner.say(str(exc), "error")
            queue.finish(job["id"], "failed", error=str(exc))
        except Exception as exc:  # anything else: record it with the traceback, keep the worker alive
            runner.say(traceback.format_exc(limit=8), "error")
            queue.finish(job["id"], "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._job_id = None
