"""Moving a pack to another base model (`pack migrate`, the Train tab's "Move a pack").

A pack's memory cannot be copied to another base model: its rows are addressed by that model's
tokens and read through its hidden states. What carries over is what it learned from. A
migration creates a pack on the new model with the old pack's collections, size preset and mode
(unless told otherwise), and queues a job that learns exactly the sources the old pack's active
version learned (deleted ones excepted: their text is gone). The job is an ordinary one, watched
like any other; its plan is fixed when it is queued, so sources added to the collections since do
not blur the comparison.

When that job evaluates, the runner calls :func:`compare_with_origin`: the old pack (on its own
base model) answers the very probes the new version was just asked, and both recalls are stored
in the new version's evaluation under ``"migration"``. The migration itself is recorded with the
new pack (``PackStore.record_migration``); :func:`migration_report` joins the two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from engram_app.errors import EngramError
from engram_app.models import load_base_model, resolve_model, same_model, stored_spec
from engram_app.settings import Settings, resolve_device
from engram_app.store.batches import batched, placeholders
from engram_app.store.db import now
from engram_app.training import adapters
from engram_app.training.dataset import Plan
from engram_app.training.evaluate import run_probes
from engram_app.training.packs import NAME, PackStore
from engram_app.training.queue import JobQueue, TrainOptions
from engram_app.training.text import Probe

log = logging.getLogger(__name__)


def default_name(name: str, model: str | None) -> str:
    """``NAME-on-<model slug>``, cut to the 64 characters a pack name may have."""
    return f"{name}-on-{resolve_model(model).name}"[:64].rstrip("-.")


def ready_sources(db: sqlite_utils.Database, ids: list[int]) -> list[int]:
    """Those of ``ids`` still in the library (not deleted), in order."""
    ready: set[int] = set()
    for chunk in batched(ids):
        ready |= {r["id"] for r in db.query(f"select id from sources where status = 'ready' and id in "
                                             f"({placeholders(chunk)})", chunk)}
    return [i for i in ids if i in ready]


def migrate_pack(db: sqlite_utils.Database, packs: PackStore, name: str, model: str | None, new_name: str | None = None,
                 size: str | None = None, mode: str | None = None, options: TrainOptions | None = None) -> dict:
    """Create a pack on ``model`` learning what pack ``name`` learned, and queue its job.

    Refused, before anything is written, for an unknown or untrained pack, a model that cannot be
    resolved, the pack's own base model, a taken name, and a pack whose learned sources were all
    deleted. The job always evaluates (the comparison is the point). Returns ``{"pack", "job_id",
    "migration"}``.
    """
    old = packs.get(name)  # an unknown pack: refused with the packs there are
    version = packs.version(name)
    if version is None:
        raise EngramError(f"Pack {name!r} has no trained version yet, so there is nothing to move: train it first, "
                          f"or create a pack on the other model with `pack create NAME --model MODEL`.")
    if model in (None, ""):
        raise EngramError("Name the base model to move the pack to (--model: a Hugging Face id, a model folder, a "
                          ".gguf file, or 'default' for the bundled one).")
    spec = stored_spec(model)  # a model that cannot be found: refused here with what was tried
    if _same_base(old["base_model"], model):
        raise EngramError(f"Pack {name!r} is on {old['base_model']!r} already: choose another base model to move it to.")
    new_name = new_name or default_name(name, model)
    if not NAME.match(new_name):
        raise EngramError(f"Invalid pack name {new_name!r}: use 1-64 letters, digits, '_', '.' or '-' (--name).")
    if new_name in packs.names().values():
        raise EngramError(f"A pack named {new_name!r} exists already: choose another name with --name.")
    sources = ready_sources(db, version["sources"])
    if not sources:
        raise EngramError(f"Every source pack {name!r} learned has been deleted from the library: there is nothing "
                          "left to learn on the other model.")
    config = packs.config(packs.row(name))
    info = packs.create(new_name, spec, size or config.preset, old["collections"], mode or config.mode)
    options = TrainOptions(**{**(options or TrainOptions()).to_json(), "evaluate": True, "full": False})
    record = {"from": {"pack": name, "version": version["number"], "base_model": old["base_model"]},
              "to": {"pack": new_name, "base_model": spec}, "sources": sources,
              "deleted_sources_skipped": [s for s in version["sources"] if s not in sources], "created": now()}
    try:
        job_id = queue_job(db, info["id"], options, Plan(new=sources, replay=[], learned=sources), record)
        packs.record_migration(new_name, {**record, "job": job_id})
    except BaseException:
        packs.release(info["id"])
        raise
    log.info("pack %s moved to %s as %s (job %s)", name, spec, new_name, job_id)
    return {"pack": packs.get(new_name), "job_id": job_id, "migration": packs.migration(new_name)}


def _same_base(old: str, new: str) -> bool:
    """Whether ``new`` is the old pack's base model (an old model that can no longer be found is not)."""
    try:
        resolve_model(old)  # "default" is the bundled model, as for every other caller
    except EngramError:
        return False
    return same_model(old, new)


def queue_job(db: sqlite_utils.Database, pack_id: int, options: TrainOptions, plan: Plan, record: dict) -> int:
    """Queue a job whose plan is fixed now (the runner keeps a stored plan) and which carries the migration.

    One transaction: a worker never claims the job before its plan is there.
    """
    queue = JobQueue(db)
    with db.atomic():
        job_id = queue.submit(pack_id, options)
        queue.set_options(job_id, {"train": options.to_json(), "plan": plan.to_json(), "parent": None,
                                   "migration": record})
    return job_id


# --- the comparison, run by the job once its version is evaluated (runner.py) -----------------------

def compare_with_origin(settings: Settings, packs: PackStore, record: dict, evaluation: dict,
                        say: Callable[..., None] | None = None) -> dict:
    """The old pack's recall of the probes the new version was just asked, next to the new version's.

    The new side is the evaluation's own ``recall`` (memory on and off); the old side is measured
    now, on the old pack's base model wearing the version that was moved. A failure on the old
    side (its model gone) is reported in the comparison, not raised: the new version stands.
    """
    say = say or (lambda message, level="info": log.info(message))
    origin = record["from"]
    recall = evaluation.get("recall")
    comparison = {"from": {**origin}, "to": {**record["to"]}, "probes": 0, "facts": []}
    if not recall:
        comparison["note"] = "the sources hold no facts to ask about: compare the packs by chatting with both"
        return comparison
    asked = recall["examples"]
    probes = [Probe(e["prompt"], e["answer"]) for e in asked]
    say(f"comparing with pack {origin['pack']} (version {origin['version']}) on the same {len(probes)} probes")
    comparison["probes"] = len(probes)
    comparison["to"].update(_side(recall["memory_on"], recall["memory_off"], [e["memory_on"] for e in asked]))
    try:
        report = origin_report(settings, packs, origin, probes)
    except (EngramError, OSError) as exc:
        comparison["from"]["error"] = str(exc)
        say(f"could not measure pack {origin['pack']}: {exc}", "warning")
        return comparison
    summary = report["summary"]
    comparison["from"].update(_side(summary["memory_on"], summary["memory_off"], [p["memory_on"] for p in report["probes"]]))
    comparison["facts"] = [{"prompt": e["prompt"], "answer": e["answer"], "from": old["memory_on"]["contains_answer"],
                            "to": e["memory_on"]["contains_answer"]} for e, old in zip(asked, report["probes"])]
    say(comparison_text(comparison))
    return comparison


def _side(on: dict, off: dict, results: list[dict]) -> dict:
    return {"recall": on["recall"], "recalled": sum(r["contains_answer"] for r in results),
            "mean_logprob": on["mean_logprob"], "recall_without_memory": off["recall"]}


def origin_report(settings: Settings, packs: PackStore, origin: dict, probes: list[Probe]) -> dict:
    """``run_probes`` on the moved version of the old pack, on its own base model (loaded for this, then freed)."""
    name = origin["pack"]
    version = packs.version(name, origin["version"])
    if version is None:
        raise EngramError(f"Pack {name!r} has no version {origin['version']} any more.")
    config = packs.config(packs.row(name))
    base = packs.get(name)["base_model"]
    loaded = load_base_model(base, settings.models_dir, resolve_device(settings.device))
    adapted = adapters.load(loaded.model, loaded.tokenizer, Path(version["path"]), config)
    return run_probes(adapted, loaded.tokenizer, probes)


# --- what the CLI and the app show -----------------------------------------------------------------

def migration_report(packs: PackStore, name: str) -> dict | None:
    """Where pack ``name`` was moved from, with the comparison of its newest version that has one
    (``comparison`` None until the job has evaluated); None when it was not moved."""
    record = packs.migration(name)
    if record is None:
        return None
    versions = packs.get(name)["versions"]
    comparison = next((v["evaluation"]["migration"] for v in reversed(versions)
                       if v["evaluation"] and "migration" in v["evaluation"]), None)
    return {**record, "comparison": comparison}


def comparison_text(comparison: dict) -> str:
    """The comparison in plain words: "pack me (old base) recalls 3 of 3 facts; me-on-x recalls 2 of 3"."""
    old, new, count = comparison["from"], comparison["to"], comparison["probes"]
    if not count:
        return comparison.get("note", "no facts to compare")
    text = f"on the same {count} facts: {new['pack']} recalls {new['recalled']}"
    if "error" in old:
        return text + f"; {old['pack']} could not be measured ({old['error']})"
    return (text + f", {old['pack']} (version {old['version']}, the old base model) recalls {old['recalled']} "
            f"(without memory: {new['recall_without_memory'] * count:.0f} and {old['recall_without_memory'] * count:.0f})")
