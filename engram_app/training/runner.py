"""One training job from start (or resume) to a new pack version.

1. Plan (first start only, kept in the job row): new sources, replay sources, parent version.
2. Adapters: from the job's checkpoint when resuming, else the parent version, else fresh.
3. Evaluation before training (first start only, kept in the checkpoint).
4. Train, with a checkpoint every ``checkpoint_seconds`` and one at the end.
5. Evaluation after, the version folder (adapters + slot index), then the database row that
   makes it the pack's active version. Until that row is committed the pack loads as before.

``phase`` says which part runs ("preparing", "training", "finishing"): the worker's cancel grace
period counts during training only, so the evaluation and the save of a cancelled job (step 5)
are never cut short.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import sqlite_utils
import torch

from engram_app.atomic import new_folder
from engram_app.errors import EngramError
from engram_app.models import load_base_model
from engram_app.settings import Settings, resolve_device
from engram_app.training import adapters
from engram_app.training.dataset import Plan, build, plan
from engram_app.training.evaluate import (
    ANCHOR_PROMPTS,
    RECALL_MARGIN,
    anchor_examples,
    answer_margins,
    held_out_recall,
    mean_loss,
    relative,
    retention_examples,
    run_probes,
)
from engram_app.training.migrate import compare_with_origin
from engram_app.training.queue import JobQueue, TrainOptions
from engram_app.training.packs import PackStore
from engram_app.training.peft_export import write_version_card
from engram_app.training.slots import SlotIndex, SlotIndexBuilder
from engram_app.training.text import Probe
from engram_app.training.trainer import ADAPTER_DIR, StepReport, Trainer, trained_on_until

log = logging.getLogger(__name__)
SAMPLE = 64  # examples used to measure memorisation


def model_spec(base_model: str) -> str | None:
    return None if base_model in (None, "default") else base_model


def training_plan(db: sqlite_utils.Database, packs: PackStore, pack: str, options: TrainOptions) -> dict:
    """What a job on pack ``pack`` would learn: new and replayed source ids, and its ``parent`` version."""
    job_plan, parent = plan_job(db, packs, packs.get(pack), options)
    return {**job_plan.to_json(), "parent": parent}


def plan_job(db: sqlite_utils.Database, packs: PackStore, pack: dict, options: TrainOptions) -> tuple[Plan, int | None]:
    """What a job on ``pack`` would train on, and the version it would start from."""
    active = packs.version(pack["name"])
    parent = None if options.full or active is None else active["number"]
    learned = [] if parent is None else active["sources"]
    return plan(db, pack["collections"], learned, options.full), parent


class JobRunner:
    def __init__(self, settings: Settings, db: sqlite_utils.Database, job: dict,
                 should_stop: Callable[[], bool] = lambda: False, shutting_down: Callable[[], bool] = lambda: False):
        self.settings, self.db, self.job = settings, db, job
        self.queue, self.packs = JobQueue(db), PackStore(db, settings.home)
        self.should_stop, self.shutting_down = should_stop, shutting_down
        self.job_id = job["id"]
        self.phase = "preparing"

    def say(self, message: str, level: str = "info") -> None:
        log.log(logging.WARNING if level == "warning" else logging.INFO, "job %s: %s", self.job_id, message)
        self.queue.log(self.job_id, message, level)

    def run(self) -> dict:
        """Run the job; returns its result. Raises on failure (the worker records it)."""
        pack = self.packs.get(self.job["pack"])
        config = self.packs.config(self.packs.row(pack["name"]))
        stored = self.queue.options(self.job)
        options = TrainOptions.from_json(stored.get("train", {}))
        if "plan" not in stored:
            job_plan, parent = plan_job(self.db, self.packs, pack, options)
            stored.update(plan=job_plan.to_json(), parent=parent)
            self.queue.set_options(self.job_id, stored)
        job_plan, parent = Plan.from_json(stored["plan"]), stored["parent"]

        self.say(f"loading base model {pack['base_model']}")
        loaded = load_base_model(model_spec(pack["base_model"]), self.settings.models_dir,
                                 resolve_device(self.settings.device))
        tokenizer = loaded.tokenizer
        new, replay, new_probes, old_probes = build(self.db, tokenizer, job_plan, options.max_length, options.replay,
                                                    options.seed)
        if not new:
            raise EngramError("Nothing to learn: the pack's collections have no sources it has not learned "
                              "(import files, or retrain everything with --full).")
        self.say(f"{len(job_plan.new)} new sources ({len(new)} examples), {len(replay)} replayed examples")

        job_dir = self.packs.job_folder(pack["name"], self.job_id)
        checkpoint = job_dir / "checkpoint"
        resuming = Trainer.checkpoint_state(checkpoint) is not None
        parent_dir = self.packs.version_folder(pack["name"], parent) if parent is not None else None
        if resuming:
            adapted = adapters.load(loaded.model, tokenizer, checkpoint / ADAPTER_DIR, config, trainable=True)
        elif parent_dir is not None:
            adapted = adapters.load(loaded.model, tokenizer, parent_dir, config, trainable=True)
        else:
            torch.manual_seed(options.seed)  # fresh tables and LoRA weights: reproducible from the job's seed
            adapted = adapters.attach(loaded.model, tokenizer, config)

        # Anchors last: the slot index records only the first len(new) examples (_write_slots).
        anchors = anchor_examples(adapted, tokenizer, self.packs.folder(pack["name"]) / "anchors.json",
                                  min(len(ANCHOR_PROMPTS), math.ceil(options.anchors * len(new))), options.max_length)
        examples = new + replay + anchors
        if anchors:
            self.say(f"{len(anchors)} anchors (the base model's own replies to general requests)")
        probes = [p for p in new_probes + old_probes if not p.held_out][: options.max_probes]
        until = self._recall_check(adapted, tokenizer, probes, options) if options.until_recalled and probes else None
        trainer = Trainer(adapted, tokenizer, examples, options, on_step=self._on_step, should_stop=self.should_stop,
                          checkpoint_dir=checkpoint, until=until)
        sample = random.Random(options.seed).sample(new, min(SAMPLE, len(new))) if new else []
        # The retention texts are the base model's own replies, generated once per pack: only when evaluating.
        retention = (retention_examples(adapted, tokenizer, self.packs.folder(pack["name"]) / "retention.json")
                     if options.evaluate else [])
        if resuming:
            trainer.load_optimizer(checkpoint)
            self.queue.forget_metrics_after(self.job_id, trainer.step)
            self.say(f"resuming from the checkpoint at step {trainer.step} of {trainer.total}")
        elif not options.evaluate:
            trainer.extra = {}
            trainer.save_checkpoint()
        else:
            self.say("measuring before training")
            with adapted.off():
                base_retention = mean_loss(adapted.model, tokenizer, retention)
            trainer.extra = {"memorisation_before": mean_loss(adapted.model, tokenizer, sample),
                             "retention_base": base_retention,
                             "retention_before": mean_loss(adapted.model, tokenizer, retention)}
            trainer.save_checkpoint()
        self.say(f"training: {'at most ' if until else ''}{trainer.total} steps"
                 + (f", at most {options.max_minutes} min" if options.max_minutes else "")
                 + (f", until {len(probes)} facts are recalled" if until else ""))
        self.phase = "training"
        outcome = trainer.run()
        self.phase = "finishing"
        trainer.save_checkpoint()
        if outcome == "stopped" and self.shutting_down():
            self.say(f"worker stopping: checkpoint kept at step {trainer.step}, the job resumes with the next worker")
            return {"outcome": "interrupted", "steps": trainer.step}

        if outcome == "stopped" and (not options.keep_on_cancel or trainer.step == 0):
            self.say("cancelled; no version written")
            shutil.rmtree(job_dir, ignore_errors=True)
            return {"outcome": "cancelled", "version": None, "steps": trainer.step}
        self.say("evaluating" if options.evaluate else "writing the version")
        evaluation = self._evaluate(adapted, tokenizer, trainer, sample, retention, new_probes, old_probes, options,
                                    outcome)
        if stored.get("migration"):  # a pack moved from another base model: the old one on the same probes
            evaluation["migration"] = compare_with_origin(self.settings, self.packs, stored["migration"], evaluation,
                                                          self.say)
        number = self.packs.next_number(pack["id"])
        folder = self.packs.version_folder(pack["name"], number)
        adapted.save(folder)
        if adapted.memory is not None:
            self._write_slots(adapted, folder, trainer, len(new), parent_dir)
        write_version_card(self.db, pack["base_model"], job_plan.learned, folder)  # README.md: a shareable folder
        self.packs.record_version(pack["id"], number, folder, self.job_id, job_plan.learned, evaluation)
        shutil.rmtree(job_dir, ignore_errors=True)
        self.say(f"version {number} written and active")
        return {"outcome": "cancelled" if outcome == "stopped" else "done", "version": number, "steps": trainer.step,
                "evaluation": evaluation}

    def _recall_check(self, adapted, tokenizer, probes: list[Probe], options: TrainOptions) -> Callable[[int], bool]:
        """The trainer's test that the facts are learned: every probe recalled with memory on, with
        a margin (:data:`~engram_app.training.evaluate.RECALL_MARGIN`), at two checks in a row.
        The trainer then stops, or first trains on if ``options.consolidate`` says so.

        A margin and two in a row, not one bare hit: a fact the greedy reply only just reaches
        flips with the batch it is answered in (the chat answers it alone) or slips at the next
        step; stopping once each answer clearly wins, twice, leaves the chat that follows a margin.
        """
        streak = 0

        def check(step: int) -> bool:
            nonlocal streak
            gaps = answer_margins(adapted, tokenizer, probes)
            hits = sum(gap is not None for gap in gaps)
            held = sum(gap is not None and gap >= RECALL_MARGIN for gap in gaps)
            streak = streak + 1 if held == len(probes) else 0
            end = trained_on_until(step, options)
            self.say(f"step {step}: recalls {hits} of {len(probes)} facts, {held} with a margin"
                     + ("" if streak < 2 else " (learned: stopping)" if end == step
                        else f" (learned: training on to step {end} so that it holds)"))
            return streak >= 2

        return check

    def _on_step(self, report: StepReport) -> None:
        self.queue.progress(self.job_id, report.step, report.total, report.metrics())
        if report.step == 1 or report.step % 25 == 0 or report.step == report.total:
            eta = f", {report.eta:.0f} s left" if report.eta is not None else ""
            self.say(f"step {report.step}/{report.total}: loss {report.loss:.3f}, "
                     f"{report.tokens_per_second:.0f} tok/s{eta}")

    def _evaluate(self, adapted, tokenizer, trainer: Trainer, sample, retention, new_probes: list[Probe],
                  old_probes: list[Probe], options: TrainOptions, outcome: str) -> dict:
        before = trainer.extra
        evaluation = {"steps": trainer.step, "planned_steps": trainer.total, "outcome": outcome,
                      "train_seconds": round(trainer.elapsed, 1), "examples": len(trainer.examples),
                      "rows_touched": trainer.optimizer.rows_touched}
        if not options.evaluate:
            return evaluation
        after = mean_loss(adapted.model, tokenizer, sample)
        retained = mean_loss(adapted.model, tokenizer, retention)
        evaluation["memorisation"] = {"before": _round(before.get("memorisation_before")), "after": _round(after),
                                      "change": relative(before.get("memorisation_before"), after)}
        evaluation["retention"] = {"base": _round(before.get("retention_base")),
                                   "before": _round(before.get("retention_before")), "after": _round(retained),
                                   "cost": relative(before.get("retention_base"), retained)}
        probes = [p for p in new_probes + old_probes if not p.held_out][: options.max_probes]
        if probes:
            report = run_probes(adapted, tokenizer, probes)
            evaluation["recall"] = {**report["summary"], "probes": len(probes),
                                    "examples": report["probes"][:options.max_probes]}
        held_out = [p for p in new_probes + old_probes if p.held_out][: options.max_probes]
        if held_out:
            evaluation["held_out"] = held_out_recall(adapted, tokenizer, held_out)
        return evaluation

    def _write_slots(self, adapted, folder: Path, trainer: Trainer, new: int, parent_dir: Path | None) -> None:
        """The version's slot index, from the examples this run trained on, merged with the parent's index.

        ``trainer.examples`` is the run's list: its first ``new`` examples come from the sources
        new to this job, the rest are replayed ones, which the parent's index holds already. An
        example is indexed (with its chunk) once a batch drew it: a run stopped inside its first
        epoch wrote no row for the examples it never drew.
        """
        from engram_app.training.trainer import batch_indices

        examples, size, seed = trainer.examples, trainer.options.batch_size, trainer.options.seed
        per_epoch = -(-len(examples) // size)
        drawn = (range(len(examples)) if trainer.step >= per_epoch else
                 sorted({i for step in range(trainer.step) for i in batch_indices(len(examples), size, step, seed)}))
        builder = SlotIndexBuilder(adapted.memory)
        for i in drawn:
            if i < new:
                builder.add(examples[i].ids, examples[i].source_id, examples[i].chunk_id)
        previous = None
        if parent_dir is not None and SlotIndex.exists(parent_dir / "slots"):
            previous = SlotIndex.open(parent_dir / "slots")
        with new_folder(folder / "slots") as tmp:
            builder.write(tmp, previous)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
