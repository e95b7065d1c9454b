"""Training jobs in SQLite: the queue the worker reads and the record the UI polls.

Statuses: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``. A job whose worker
died is still ``running`` in the table; readers show it as ``interrupted`` (no live worker holds
the worker lock), and the next worker resumes it from its last checkpoint before anything else.
Cancel is a flag the running job reads at every step.

Each pick-up counts an attempt (``attempts``); a worker that stops politely (SIGTERM) hands its
attempt back. So a ``running`` job whose attempts reached ``MAX_ATTEMPTS`` killed every worker that
ran it (out of memory, a crash in native code): it is marked ``failed`` with that reason instead
of being resumed forever while the jobs queued behind it wait.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import sqlite_utils

from engram_app.errors import EngramError
from engram_app.store.db import now

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 3  # workers a job may take down before it is given up


@dataclass
class TrainOptions:
    """What a job does; every field has a default tuned on Synthetic-Persona-Chat (docs/TRAINING.md)."""

    max_steps: int | None = None  # None: ``epochs`` passes over the examples
    max_minutes: float | None = None  # a wall-clock budget; the job stops (and saves) when it is spent
    epochs: float = 8.0
    lr: float = 1e-2  # dense Engram parts; tables train at lr x table_lr_scale (bench/train_recall.py)
    lora_lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    replay: float = 0.5  # replayed examples of earlier sources per new example
    anchors: float = 0.25  # the base model's own replies to general prompts, per new example (at most 16)
    full: bool = False  # retrain from scratch on every source (drops deleted sources' writes)
    seed: int = 0
    checkpoint_seconds: float = 30.0
    keep_on_cancel: bool = True  # a cancelled job still writes a version of what it learned
    evaluate: bool = True
    max_probes: int = 24
    # Stop as soon as the pack's own fact probes are recalled (memory on), each answer with a margin
    # (evaluate.RECALL_MARGIN), at two checks in a row,
    # ``recall_every`` steps apart; the step count and the time budget stay the caps.
    until_recalled: bool = True
    recall_every: int = 10
    # With that check (and no ``max_steps``), training goes on past ``epochs`` until the facts are
    # recalled, up to this many passes: a fixed epoch count ended Engram jobs with facts half-learned
    # (docs/BENCHMARKS.md, stop 27). None: ``epochs`` is the cap, as for jobs queued before.
    recall_epochs: float | None = 24.0
    # The learning rate falls linearly over the step cap, to this fraction of ``lr`` (and ``lora_lr``)
    # at the last step: recall 0.61 -> 0.82 of the tuning people's profiles, the same retention cost
    # (docs/BENCHMARKS.md, stop 31). 1.0: a constant rate, as for jobs queued before.
    lr_final: float = 0.1
    # Once the stop test says the facts are learned at step S, training goes on to step S x this
    # (rounded up to a check; the step cap and the time budget still bind). 1.0: stop at once. Measured
    # at 2.0 and not adopted: a ten-fact profile asked in new words recalled 7 and 8 of 10 where
    # stopping at once recalled 7 and 7, for twice the steps (docs/BENCHMARKS.md, stop 38).
    consolidate: float = 1.0

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise EngramError("max steps must be at least 1.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise EngramError("max minutes must be more than 0.")
        if self.recall_every < 1:
            raise EngramError("recall checks must be at least 1 step apart.")
        if self.batch_size < 1 or self.epochs <= 0 or self.lr <= 0:
            raise EngramError("batch size, epochs and learning rate must be positive.")
        if not 0 < self.lr_final <= 1:
            raise EngramError("the final learning rate is a fraction of the first: more than 0, at most 1.")
        if self.recall_epochs is not None and self.recall_epochs <= 0:
            raise EngramError("the passes allowed until the facts are recalled must be positive.")
        if not 1 <= self.consolidate <= 10:
            raise EngramError("training on after the facts are learned is a factor of the steps taken: 1 to 10.")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainOptions:
        """A stored job's options. A job queued before anchors (or ``recall_epochs``, or the decaying
        learning rate) existed trains without them, so that one resumed from its checkpoint draws the
        very batches, plans the very steps and takes the very step sizes it was taking."""
        known = {f.name for f in fields(cls)}
        old = {"anchors": 0.0, "recall_epochs": None, "lr_final": 1.0}
        return cls(**{**old, **{k: v for k, v in data.items() if k in known}})


class JobQueue:
    def __init__(self, db: sqlite_utils.Database, max_attempts: int = MAX_ATTEMPTS):
        self.db = db
        self.max_attempts = max_attempts

    def submit(self, pack_id: int, options: TrainOptions) -> int:
        with self.db.atomic():
            return self.db["jobs"].insert({
                "pack_id": pack_id, "status": "queued", "options": json.dumps({"train": options.to_json()}),
                "progress": 0.0, "step": 0, "total_steps": None, "error": None, "worker": None, "heartbeat": None,
                "created": now(), "started": None, "finished": None, "cancel_requested": 0, "result": None,
            }).last_pk

    def row(self, job_id: int) -> dict:
        rows = list(self.db.query("select j.*, p.name as pack from jobs j join packs p on p.id = j.pack_id "
                                  "where j.id = ?", [job_id]))
        if not rows:
            raise EngramError(f"No job {job_id}. List jobs with `jobs`.")
        return rows[0]

    def rows(self, limit: int = 50) -> list[dict]:
        return list(self.db.query("select j.*, p.name as pack from jobs j join packs p on p.id = j.pack_id "
                                  "order by j.id desc limit ?", [limit]))

    def view(self, job_id: int, worker_alive: bool, metrics: bool = False, log_tail: int = 20) -> dict:
        """A job as the UI and ``job ID`` show it: its row, the latest metrics, the log's tail and,
        with ``metrics``, every metric. ``interrupted`` when it is running without a live worker."""
        view = job_view(self.row(job_id), worker_alive)
        latest = self.db.query("select name, value from job_metrics where job_id = ? and step = (select max(step) "
                               "from job_metrics where job_id = ?)", [job_id, job_id])
        view["latest"] = {r["name"]: r["value"] for r in latest}
        view["log"] = self.logs(job_id, log_tail)
        if metrics:
            view["metrics"] = self.metrics(job_id)
        return view

    def views(self, worker_alive: bool, limit: int = 50) -> list[dict]:
        """The newest jobs, as ``jobs`` lists them."""
        return [job_view(row, worker_alive) for row in self.rows(limit)]

    def pending(self) -> int:
        """Jobs queued or left running (by a worker that died): what a new worker would take up."""
        return self.db.execute("select count(*) from jobs where status in ('queued', 'running')").fetchone()[0]

    def options(self, job: dict) -> dict:
        return json.loads(job["options"] or "{}")

    def set_options(self, job_id: int, options: dict) -> None:
        with self.db.atomic():
            self.db.execute("update jobs set options = ? where id = ?", [json.dumps(options), job_id])

    # --- the worker's side ------------------------------------------------------------------

    def claim(self, worker: str) -> dict | None:
        """The next job for this worker: an interrupted one first (to resume), else the oldest queued.

        Counts the attempt: if this worker dies with the job, the next one finds it counted.
        """
        with self.db.atomic():
            rows = list(self.db.query(
                "select id from jobs where status = 'running' order by id limit 1")) or list(self.db.query(
                    "select id from jobs where status = 'queued' order by id limit 1"))
            if not rows:
                return None
            job_id = rows[0]["id"]
            self.db.execute("update jobs set status = 'running', worker = ?, heartbeat = ?, "
                            "started = coalesce(started, ?), attempts = attempts + 1 where id = ?",
                            [worker, now(), now(), job_id])
        return self.row(job_id)

    def hand_back(self, job_id: int) -> None:
        """The worker stops politely and leaves the job to the next one: this attempt did not crash."""
        with self.db.atomic():
            self.db.execute("update jobs set attempts = max(attempts - 1, 0) where id = ? and status = 'running'",
                            [job_id])

    def fail_crashed(self) -> list[int]:
        """Mark failed the interrupted jobs that took down ``max_attempts`` workers; returns their ids.

        Only the worker calls this, holding the worker lock, so a ``running`` job here is one whose
        worker died (the worker runs one job at a time and finishes it before asking for another).
        """
        with self.db.atomic():
            rows = list(self.db.query("select id, attempts from jobs where status = 'running' and attempts >= ? "
                                      "order by id", [self.max_attempts]))
            for row in rows:
                reason = (f"The worker stopped {row['attempts']} times while running this job (it crashed or was "
                          "killed, for example for lack of memory), so the job was given up. See worker.log in the "
                          "data folder (worker.log.1 if it was rotated since), then train again (a smaller batch "
                          "size or max length needs less memory).")
                self.db.execute("update jobs set status = 'failed', error = ?, finished = ? where id = ?",
                                [reason, now(), row["id"]])
                self.db["job_logs"].insert({"job_id": row["id"], "level": "error", "message": reason,
                                            "created": now()})
        return [row["id"] for row in rows]

    def heartbeat(self, job_id: int) -> bool:
        """Record that the job's worker is alive; returns whether a cancel was requested."""
        with self.db.atomic():
            self.db.execute("update jobs set heartbeat = ? where id = ?", [now(), job_id])
        return bool(self.db.execute("select cancel_requested from jobs where id = ?", [job_id]).fetchone()[0])

    def progress(self, job_id: int, step: int, total: int, metrics: dict[str, float]) -> None:
        """One training step: the job's position and the step's metrics, in one transaction."""
        stamp = now()
        with self.db.atomic():
            self.db.execute("update jobs set step = ?, total_steps = ?, progress = ?, heartbeat = ? where id = ?",
                            [step, total, min(1.0, step / max(total, 1)), stamp, job_id])
            self.db["job_metrics"].insert_all(
                [{"job_id": job_id, "step": step, "name": k, "value": float(v), "created": stamp}
                 for k, v in metrics.items() if v is not None])

    def forget_metrics_after(self, job_id: int, step: int) -> None:
        """A resumed job repeats the steps after its checkpoint: drop their earlier records."""
        with self.db.atomic():
            self.db.execute("delete from job_metrics where job_id = ? and step > ?", [job_id, step])

    def log(self, job_id: int, message: str, level: str = "info") -> None:
        with self.db.atomic():
            self.db["job_logs"].insert({"job_id": job_id, "level": level, "message": message[:2000], "created": now()})

    def finish(self, job_id: int, status: str, result: dict | None = None, error: str | None = None) -> None:
        assert status in FINISHED
        with self.db.atomic():
            self.db.execute("update jobs set status = ?, result = ?, error = ?, finished = ? where id = ?",
                            [status, json.dumps(result) if result is not None else None, error, now(), job_id])

    # --- the user's side --------------------------------------------------------------------

    def cancel(self, job_id: int) -> dict:
        job = self.row(job_id)
        if job["status"] in FINISHED:
            raise EngramError(f"Job {job_id} is {job['status']} already.")
        with self.db.atomic():
            if job["status"] == "queued":  # never started: nothing to stop
                self.db.execute("update jobs set status = 'cancelled', cancel_requested = 1, finished = ? "
                                "where id = ? and status = 'queued'", [now(), job_id])
            self.db.execute("update jobs set cancel_requested = 1 where id = ?", [job_id])
        return self.row(job_id)

    def metrics(self, job_id: int, since_step: int = 0) -> dict[str, list[tuple[int, float]]]:
        out: dict[str, list[tuple[int, float]]] = {}
        for r in self.db.query("select step, name, value from job_metrics where job_id = ? and step > ? "
                               "order by step, id", [job_id, since_step]):
            out.setdefault(r["name"], []).append((r["step"], r["value"]))
        return out

    def logs(self, job_id: int, tail: int = 50) -> list[dict]:
        rows = list(self.db.query("select level, message, created from job_logs where job_id = ? order by id desc "
                                  "limit ?", [job_id, tail]))
        return rows[::-1]


def job_view(row: dict, worker_alive: bool) -> dict:
    """A job row as the CLI's JSON and the UI show it (options and result parsed)."""
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


def submit_training(db: sqlite_utils.Database, store, pack: str, options: TrainOptions) -> int:
    """Queue a job for ``pack`` (a name in ``store``, a PackStore); refused when it has nothing new to learn."""
    from engram_app.training.runner import plan_job

    info = store.get(pack)
    job_plan, _parent = plan_job(db, store, info, options)
    if not job_plan.new:
        where = f"collections {', '.join(info['collections'])}" if info["collections"] else "the library"
        raise EngramError(f"Nothing new to learn for pack {pack!r}: {where} has no source it has not learned. "
                          "Import files first, or retrain everything with --full.")
    return JobQueue(db).submit(info["id"], options)
