"""Concurrent writers lose nothing: a connection per thread, a worker probe that never takes the
worker's lock, jobs that crash their worker, cancel during evaluation and save, hard-stop
leftovers, and versions on disk before their row counts. On the tiny model."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.store import open_db
from engram_app.training import JobQueue, TrainOptions
from engram_app.training.runner import JobRunner
from engram_app.training.queue import MAX_ATTEMPTS
from engram_app.training.worker import Worker, WorkerLocks, start_worker, worker_alive

PROFILE = "# About me\n- My dog is called Pixel.\n- I live in Porto.\n"
SHORT = dict(max_steps=3, evaluate=False)  # a real job, over in seconds on the tiny model


class WorkerDied(BaseException):
    """Stands for the worker process dying (killed for memory, a crash in native code).

    A BaseException, as SystemExit is: the worker's own ``except Exception`` does not catch it,
    so nothing is written to the database on the way out, as when the process dies.
    """


@pytest.fixture
def service(tmp_path, tiny_model_dir):
    svc = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    source = tmp_path / "me.md"
    source.write_text(PROFILE)
    [result] = svc.ingest([source])
    assert result.status == "added", result.reason
    return svc


def in_process_worker(service: Service, cls: type[Worker] = Worker, **kwargs) -> Worker:
    """A worker run in this process; it exits as soon as the queue is empty."""
    return cls(service.settings, idle_exit=0, **kwargs)


# --- one connection per thread --------------------------------------------------------------------

def test_every_thread_gets_its_own_connection_with_the_same_settings(tmp_path):
    db = open_db(tmp_path)
    seen: dict[str, tuple] = {}

    def look(name: str) -> None:
        conn = db.conn
        pragmas = tuple(conn.execute(f"pragma {p}").fetchone()[0]
                        for p in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout"))
        seen[name] = (conn, db.conn is conn, pragmas)

    look("main")
    threads = [threading.Thread(target=look, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
        t.join()
    connections = {name: conn for name, (conn, _, _) in seen.items()}
    assert len({id(c) for c in connections.values()}) == 3  # three threads, three connections
    assert all(same for _, same, _ in seen.values())  # a thread keeps its connection
    assert {pragmas for _, _, pragmas in seen.values()} == {("wal", 1, 2, 30000)}  # synchronous 2 = FULL


def test_two_connections_opening_a_new_data_root_at_once_both_open_it(tmp_path):
    # The switch to write-ahead logging raced: SQLite told the loser "database is locked" at once,
    # whatever the busy timeout (14 of 150 pairs here before open_db retried it).
    errors: list[BaseException] = []
    for attempt in range(100):
        home = tmp_path / str(attempt)
        barrier = threading.Barrier(2, timeout=30)

        def open_it() -> None:
            try:
                barrier.wait()
                open_db(home).close()
            except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert open_db(tmp_path / "0").execute("pragma journal_mode").fetchone()[0] == "wal"


def test_a_chat_turn_saved_in_one_thread_survives_another_threads_rollback(service):
    db = service.db()
    service.load()
    began, outcome = threading.Event(), []

    def failing_import() -> None:
        try:
            with db.atomic():
                db["collections"].insert({"name": "half-imported", "created": "now"})
                began.set()
                time.sleep(1.0)  # the chat turn is saved meanwhile
                raise RuntimeError("the import failed")
        except RuntimeError as exc:
            outcome.append(str(exc))

    other = threading.Thread(target=failing_import)
    other.start()
    assert began.wait(10)
    result = service.chat("What is my dog called?", options=GenerationOptions(max_new_tokens=3))
    other.join()

    assert outcome == ["the import failed"]
    turns = service.conversation(result.conversation_id)
    assert [(t["role"], t["content"]) for t in turns] == [("user", "What is my dog called?"),
                                                           ("assistant", result.reply)]
    with sqlite3.connect(service.settings.home / "engram.db") as fresh:  # committed, seen from outside
        assert fresh.execute("select count(*) from messages").fetchone()[0] == 2
        assert fresh.execute("select count(*) from collections where name = 'half-imported'").fetchone()[0] == 0


# --- is a worker alive? ---------------------------------------------------------------------------

def test_probing_whether_a_worker_is_alive_never_makes_a_start_fail(tmp_path):
    """Probes from other processes (the app's status line, the CLI) race a worker being started."""
    stop = tmp_path / "stop"
    probers = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # a prober: probe until told to stop; exit 0 if it saw the worker both up and down
            answers = set()
            deadline = time.monotonic() + 20
            while not stop.exists() and time.monotonic() < deadline:
                answers.add(worker_alive(tmp_path))
            os._exit(0 if answers == {True, False} else 1)
        probers.append(pid)
    refused = starts = 0
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            starts += 1
            locks = WorkerLocks.claim(tmp_path)
            if locks is None:
                refused += 1
                continue
            assert worker_alive(tmp_path)  # a worker being started counts as alive
            assert WorkerLocks.claim(tmp_path) is None  # and a second start is refused
            locks.release()
    finally:
        stop.touch()
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in probers]
    assert starts > 100 and refused == 0
    assert codes == [0, 0]  # the probes ran all along
    assert not worker_alive(tmp_path)


def test_a_starting_worker_is_alive_at_once_and_refuses_a_second_start(service):
    home = service.settings.home
    assert not worker_alive(home)
    pid = start_worker(service.settings, idle_exit=60)
    try:
        assert pid is not None
        assert worker_alive(home)  # before the child has even imported anything
        assert start_worker(service.settings) is None
        with pytest.raises(EngramError, match="A worker is already running"):
            Worker(service.settings).run()
    finally:
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while worker_alive(home) and time.time() < deadline:
        time.sleep(0.05)
    assert not worker_alive(home)  # the kernel let go of its locks


# --- a job that kills its worker ------------------------------------------------------------------

def test_a_job_that_kills_its_worker_three_times_fails_with_the_reason_and_the_queue_moves_on(service, monkeypatch):
    service.create_pack("crashy", size="small")
    service.create_pack("next", size="small")
    crashy = service.train("crashy", TrainOptions(**SHORT), start_worker=False)["id"]
    following = service.train("next", TrainOptions(**SHORT), start_worker=False)["id"]
    real_run = JobRunner.run

    def run(self):
        if self.job["pack"] == "crashy":
            raise WorkerDied()  # the process dies in the middle of this job, every time
        return real_run(self)

    monkeypatch.setattr(JobRunner, "run", run)
    queue = JobQueue(service.db())
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with pytest.raises(WorkerDied):
            in_process_worker(service).run()
        row = queue.row(crashy)
        assert (row["status"], row["attempts"]) == ("running", attempt)
        assert service.job(crashy)["status"] == "interrupted"
        assert service.job(following)["status"] == "queued"  # stuck behind it

    in_process_worker(service).run()  # the fourth worker gives it up and runs the next job
    failed, done = service.job(crashy), service.job(following)
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"The worker stopped {MAX_ATTEMPTS} times while running this job")
    assert failed["log"][-1]["message"] == failed["error"]
    assert done["status"] == "done" and done["result"]["version"] == 1 and done["step"] == 3
    assert done["started"] >= failed["finished"]
    assert service.pack("next")["active_version"] == 1


def test_a_worker_that_stops_politely_does_not_count_as_a_crash(service, monkeypatch):
    service.create_pack("me", size="small")
    job = service.train("me", TrainOptions(**SHORT), start_worker=False)["id"]
    workers: list[Worker] = []

    def run(self):
        workers[-1]._stop.set()  # SIGTERM: the job checkpoints and is left for the next worker
        return {"outcome": "interrupted", "steps": 0}

    monkeypatch.setattr(JobRunner, "run", run)
    for _ in range(MAX_ATTEMPTS + 1):
        workers.append(in_process_worker(service))
        workers[-1].run()
    row = JobQueue(service.db()).row(job)
    assert (row["status"], row["attempts"]) == ("running", 0)
    assert JobQueue(service.db()).fail_crashed() == []


# --- cancel, hard stop and what it leaves ---------------------------------------------------------

class RecordingWorker(Worker):
    """A worker whose hard stop is recorded instead of ending the test process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exits: list[tuple[int, dict]] = []
        self.exited = threading.Event()

    def _exit(self, code: int) -> None:
        self.exits.append((code, JobQueue(open_db(self.home)).row(self._job_id)))
        self.exited.set()


def test_a_cancel_during_evaluation_and_save_does_not_cut_them_short(service, monkeypatch):
    service.create_pack("me", size="small")
    job = service.train("me", TrainOptions(**SHORT), start_worker=False)["id"]
    real_evaluate, real_slots = JobRunner._evaluate, JobRunner._write_slots

    def slow_evaluate(self, *args, **kwargs):
        JobQueue(self.db).cancel(self.job_id)  # the user cancels once training is over
        time.sleep(1.5)  # the worker's heartbeat sees the cancel while the job evaluates...
        return real_evaluate(self, *args, **kwargs)

    def slow_slots(self, *args, **kwargs):
        time.sleep(1.2)  # ...and while it writes the version
        return real_slots(self, *args, **kwargs)

    monkeypatch.setattr(JobRunner, "_evaluate", slow_evaluate)
    monkeypatch.setattr(JobRunner, "_write_slots", slow_slots)
    worker = in_process_worker(service, RecordingWorker, grace_seconds=0.2)
    worker.run()

    assert worker.exits == []  # 2.7 s of evaluation and save, 0.2 s of grace: never stopped
    view = service.job(job, log_tail=100)
    assert view["cancel_requested"] and view["status"] == "done" and view["result"]["version"] == 1
    assert "version 1 written and active" in [line["message"] for line in view["log"]]
    version = service.pack("me")["versions"][0]
    assert service.pack("me")["active_version"] == 1 and (Path(version["path"]) / "slots").is_dir()


def test_a_job_still_training_after_the_grace_is_stopped_hard_and_the_next_worker_removes_its_folder(
        service, monkeypatch):
    home = service.settings.home
    service.create_pack("stuck", size="small")
    service.create_pack("next", size="small")
    stuck = service.train("stuck", TrainOptions(max_steps=50, evaluate=False), start_worker=False)["id"]
    real_on_step = JobRunner._on_step
    worker = in_process_worker(service, RecordingWorker, grace_seconds=0.2)

    def on_step(self, report):
        real_on_step(self, report)
        if self.job["pack"] == "stuck" and report.step == 2:
            JobQueue(self.db).cancel(self.job_id)
            assert worker.exited.wait(10)  # a training step that hangs past the grace period
            raise WorkerDied()  # what os._exit does to the process

    monkeypatch.setattr(JobRunner, "_on_step", on_step)
    with pytest.raises(WorkerDied):
        worker.run()
    [(code, row)] = worker.exits
    assert code == 3 and row["status"] == "cancelled" and '"hard_stop": true' in row["result"]
    leftover = home / "packs" / "stuck" / "jobs" / str(stuck)
    assert (leftover / "checkpoint").is_dir()  # the dead process could not clean up

    following = service.train("next", TrainOptions(**SHORT), start_worker=False)["id"]
    kept = home / "packs" / "next" / "jobs" / str(following) / "partial"
    kept.mkdir(parents=True)  # a folder of a job still to run is not a leftover
    seen_at_start = []
    real_run = JobRunner.run

    def run(self):
        seen_at_start.append((leftover.exists(), kept.exists()))
        return real_run(self)

    monkeypatch.setattr(JobRunner, "run", run)
    in_process_worker(service).run()
    assert seen_at_start == [(False, True)]
    assert service.job(following)["status"] == "done"
    assert not (home / "packs" / "stuck" / "jobs" / str(stuck)).exists()


# --- durable versions -----------------------------------------------------------------------------

def test_a_version_is_on_disk_before_its_database_row_counts(service, monkeypatch):
    home = service.settings.home
    service.create_pack("me", size="small")
    service.train("me", TrainOptions(**SHORT), start_worker=False)
    database = home / "engram.db"
    synced: dict[tuple[int, int], int] = {}  # (device, inode) -> versions recorded when it was synced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        with sqlite3.connect(database) as look:
            synced[(info.st_dev, info.st_ino)] = look.execute("select count(*) from pack_versions").fetchone()[0]
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    queue = JobQueue(service.db())
    row = queue.claim("test")
    result = JobRunner(service.settings, service.db(), row).run()
    assert result["version"] == 1

    folder = home / "packs" / "me" / "v1"
    must = [folder.parent.parent, folder.parent, *folder.rglob("*"), folder]
    assert len(must) > 5
    for path in must:
        info = os.stat(path)
        assert synced.get((info.st_dev, info.st_ino)) == 0, f"{path} was not flushed before the row"
    assert service.pack("me")["active_version"] == 1
