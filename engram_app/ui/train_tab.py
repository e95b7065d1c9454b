"""The memory view: packs and their versions, training jobs with live progress, cancel, rollback.

Holds no logic: it calls the service and polls the job rows in SQLite (a ``gr.Timer``), so a
reload, a closed tab or a restarted app finds the job where it is: training runs in the worker
process, never in an event handler.
"""

from __future__ import annotations

import html
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from engram_app.errors import EngramError
from engram_app.models import BUNDLED_NAME, bundled_gguf
from engram_app.service import Service
from engram_app.training import PRESETS, TrainOptions
from engram_app.training.migrate import comparison_text
from engram_app.training.model_needs import needs_summary
from engram_app.training.packs import MODES
from engram_app.training.sizes import DEFAULT_PRESET, describe, summary
from engram_app.ui.errors import user_errors
from engram_app.ui.security import discard_uploads

PACK_COLUMNS = ["pack", "mode", "size", "active version", "versions", "base model", "learns from", "warning"]
VERSION_COLUMNS = ["version", "active", "steps", "memorisation loss", "forgetting cost", "recall", "created"]
PRESET_HELP = " | ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
# Minutes of training per preset; None: no time limit (the step cap, the epochs or the recall check end it,
# so the same memory comes out on a busy machine as on an idle one).
BUDGETS = {"quick (2 min)": 2.0, "thorough (10 min)": 10.0, "until learned (no time limit)": None}


@dataclass
class TrainTab:
    """The Memory & training tab's components, by name: its handlers write them, the app refreshes the packs."""

    packs_table: gr.Dataframe
    name: gr.Textbox
    model: gr.Dropdown  # the new pack's base model: a choice, a folder path or a Hugging Face id typed in
    size: gr.Dropdown
    mode: gr.Dropdown
    create: gr.Button
    size_needs: gr.Markdown  # what the chosen size and model need from this machine
    migrate_model: gr.Dropdown  # the base model to move the chosen pack to
    migrate_name: gr.Textbox
    migrate: gr.Button
    migration: gr.Markdown  # where the chosen pack was moved from, and both packs' recall
    create_box: gr.Accordion
    migrate_box: gr.Accordion
    export: gr.Button
    exported: gr.File
    upload: gr.File
    import_name: gr.Textbox
    import_button: gr.Button
    pack: gr.Dropdown
    budget: gr.Dropdown
    full: gr.Checkbox
    start: gr.Button
    cancel: gr.Button
    max_steps: gr.Number
    lr: gr.Number
    evaluate: gr.Checkbox
    until_recalled: gr.Checkbox
    runs: gr.Dropdown
    job_id: gr.State  # the job followed (None: the pack's latest)
    plotted: gr.State  # (job, step, status) the loss chart last drew, so it is redrawn only when that changes
    progress: gr.Markdown
    bar: gr.HTML
    loss_plot: gr.LinePlot
    log: gr.Textbox
    versions: gr.Dataframe
    version: gr.Number
    rollback: gr.Button


# --- what the tab shows --------------------------------------------------------------------------

def size_needs(service: Service, size: str, model: str | None = None) -> str:
    """What the chosen size preset, and the base model the pack would be on, need from this machine, and whether
    it has them (before creating). A model that cannot be found says why, here, rather than failing."""
    row = next((r for r in describe(service.settings.home) if r["name"] == size), None)
    if row is None:
        return ""
    try:
        model_line = needs_summary(service.model_needs(model_value(service, model), size))
    except EngramError as exc:
        model_line = f"Model: {exc}"
    return f"{summary(row)}\n\n{model_line}"


def model_value(service: Service, model: str | None) -> str:
    """The model a picker's value names: the app's own model when nothing is chosen."""
    return (model or "").strip() or service.settings.model or "default"


def model_choices(service: Service) -> list[tuple[str, str]]:
    """A new pack's base models to pick from: the app's model, the bundled one, every model converted under
    ``<home>/models``; a folder path or a Hugging Face id can be typed in as well."""
    choices: list[tuple[str, str]] = []
    if service.settings.model not in (None, "", "default", BUNDLED_NAME):
        choices.append((f"{service.settings.model} (the app's model)", service.settings.model))
    if bundled_gguf() is not None:
        choices.append(("SmolLM2-135M-Instruct (bundled)", "default"))
    for converted in service.converted_models():
        if converted.spec not in [value for _, value in choices]:
            choices.append((f"{converted.name} (converted, in {converted.folder.parent})", converted.spec))
    return choices


def refresh_model_choices(service: Service, tab: TrainTab) -> dict:
    """The model pickers' lists as they are now (a model converted since the page was built), values kept."""
    choices = model_choices(service)
    return {tab.model: gr.update(choices=choices),
            tab.migrate_model: gr.update(choices=[c for c in choices if c[1] != model_value(service, None)])}


def migration_text(service: Service, pack: str | None) -> str:
    """Where the chosen pack was moved from and, once its job has evaluated, both packs' recall of the same facts."""
    moved = service.migration(pack) if pack else None
    if not moved:
        return ""
    if "from" not in moved:  # the record could not be read
        return f"Moved from another pack: {moved.get('error', 'its record is incomplete')}."
    origin = moved["from"]
    head = f"Moved from pack **{origin['pack']}** (version {origin['version']}, base {origin['base_model']})"
    if moved.get("comparison") is None:
        return f"{head}: the comparison comes when job {moved.get('job', '?')} has trained and evaluated it."
    return f"{head}: {comparison_text(moved['comparison'])}."


def export_folder(cache: str | Path) -> Path:
    """A new folder for a pack exported for download, inside Gradio's cache (``<home>/cache/``).

    Gradio serves a file already in its cache as it is (no copy elsewhere) and its cache cleanup
    removes it (an hour later, or when the app stops). Earlier exports are removed now: the
    download box shows the newest one only.
    """
    exports = Path(cache) / "exports"
    shutil.rmtree(exports, ignore_errors=True)
    exports.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=exports))


def pack_rows(service: Service) -> list[list]:
    rows = []
    for p in service.packs():
        warning = (f"learned {len(p['deleted_sources_learned'])} deleted source(s): retrain from scratch"
                   if p["deleted_sources_learned"] else "")
        rows.append([p["name"], p["mode"], p["preset"], p["active_version"] or "not trained", len(p["versions"]),
                     p["base_model"], ", ".join(p["collections"]) or "all collections", warning])
    return rows


def recall_verdict(recall: dict, held_out: dict | None = None) -> str:
    """'recalls 2 of 3 facts; train longer (without memory: 0)': plain words, not ratios; with the
    recall of questions in new words when the version measured it ('asked in new words: 5 of 6')."""
    count = recall["probes"]
    on, off = (round(recall[side]["recall"] * count) for side in ("memory_on", "memory_off"))
    verdict = f"recalls {on} of {count} facts" + ("" if on == count else "; train longer")
    if held_out:
        asked = held_out["probes"]
        new = round(held_out["memory_on"]["recall"] * asked)
        verdict += f"; asked in new words: {new} of {asked}" + ("" if new >= 0.8 * asked or on < count else
                                                                 ", not yet reliable: train longer")
    return f"{verdict} (without memory: {off})"


def version_rows(service: Service, pack: str | None) -> list[list]:
    """The versions table of ``pack``, newest first, each with its evaluation in words."""
    if not pack:
        return []
    info = service.pack(pack)
    rows = []
    for v in reversed(info["versions"]):
        ev = v["evaluation"] or {}
        mem, ret, rec = ev.get("memorisation") or {}, ev.get("retention") or {}, ev.get("recall") or {}
        recall = recall_verdict(rec, ev.get("held_out")) if rec else ""
        rows.append([v["number"], "yes" if v["number"] == info["active_version"] else "", ev.get("steps", ""),
                     f"{mem['before']} -> {mem['after']}" if mem else "",
                     f"{ret['cost']:+.1%}" if ret.get("cost") is not None else "", recall, v["created"][:19]])
    return rows


def job_text(job: dict | None) -> str:
    """The progress line of a job: status, step, time, speed, error, the version it wrote."""
    if job is None:
        return "No training job yet."
    latest = job.get("latest", {})
    parts = [f"Job {job['id']} ({job['pack']}): **{job['status']}**"]
    if job["total_steps"]:
        parts.append(f"step {job['step']} / {job['total_steps']}")
    if "elapsed" in latest:
        parts.append(f"{latest['elapsed']:.0f} s elapsed")
    if latest.get("eta") is not None and job["status"] == "running":
        parts.append(f"about {latest['eta']:.0f} s left")
    if "tokens_per_second" in latest:
        parts.append(f"{latest['tokens_per_second']:.0f} tokens/s")
    if job["error"]:
        parts.append(f"error: {job['error']}")
    result = job.get("result") or {}
    if result.get("version"):
        parts.append(f"wrote version {result['version']}")
    return ", ".join(parts)


def bar_html(job: dict | None) -> str:
    """The progress bar: numbers only (nothing from a user's files reaches this HTML)."""
    if job is None or not job["total_steps"]:
        return ""
    share = max(0.0, min(1.0, int(job["step"]) / int(job["total_steps"])))
    return (f'<div class="train-bar" role="progressbar" aria-valuenow="{int(job["step"])}" aria-valuemin="0" '
            f'aria-valuemax="{int(job["total_steps"])}"><div style="width: {share * 100:.1f}%"></div></div>')


def loss_frame(service: Service, job: dict | None) -> pd.DataFrame:
    """The loss curve of a job, raw and smoothed, as the chart reads it."""
    if job is None:  # typed even when empty: an untyped empty column makes the chart's colour scale numeric
        return pd.DataFrame({"step": pd.Series([], dtype="int64"), "loss": pd.Series([], dtype="float64"),
                             "curve": pd.Series([], dtype=object)})
    points = service.job(job["id"], metrics=True)["metrics"].get("loss", [])
    steps = [s for s, _ in points]
    raw = [v for _, v in points]
    smooth, value = [], None
    for v in raw:  # exponential moving average, as training dashboards draw it
        value = v if value is None else 0.9 * value + 0.1 * v
        smooth.append(value)
    return pd.DataFrame({"step": steps * 2, "loss": raw + smooth,
                         "curve": pd.Series(["raw"] * len(raw) + ["smoothed"] * len(raw), dtype=object)})


def latest_job(service: Service, job_id: int | None, pack: str | None) -> dict | None:
    """The job followed: the one chosen, else the newest of ``pack`` (of any pack without one)."""
    if job_id is not None:
        return service.job(job_id)
    jobs = [j for j in service.jobs(limit=20) if not pack or j["pack"] == pack]
    return service.job(jobs[0]["id"]) if jobs else None


def run_choices(service: Service, pack: str | None, current: int | None = None):
    """The list of a pack's runs (jobs), newest first, keeping ``current`` chosen while it is there."""
    jobs = [j for j in service.jobs(limit=200) if j["pack"] == pack] if pack else []
    choices = [(f"job {j['id']}: {j['status']}, step {j['step']}/{j['total_steps'] or '?'}, {j['created'][:16]}",
                j["id"]) for j in jobs]
    return gr.update(choices=choices, value=current if current in [c for _, c in choices] else None)


# --- handlers ------------------------------------------------------------------------------------

def refresh_packs(service: Service, tab: TrainTab, current_pack: str | None) -> dict:
    """The packs table and the pack list as they are now (the chosen pack kept while it exists)."""
    names = [p["name"] for p in service.packs()]
    value = current_pack if current_pack in names else (names[0] if names else None)
    return {tab.packs_table: pack_rows(service), tab.pack: gr.update(choices=names, value=value)}


def create_pack(service: Service, tab: TrainTab, name: str, size: str, mode: str, model: str | None = None) -> dict:
    """Create a pack on the chosen base model (the app's own when none is chosen)."""
    with user_errors():
        service.create_pack((name or "").strip(), model=model_value(service, model), size=size, mode=mode)
    return refresh_packs(service, tab, name.strip())


def migrate_pack(service: Service, tab: TrainTab, pack: str | None, model: str | None, new_name: str | None,
                 budget: str, max_steps: float, lr: float, until_recalled: bool = True) -> dict:
    """Move the chosen pack to another base model: a new pack learning the same sources, its job queued
    (with the training preset and advanced options) and followed; the comparison comes with its evaluation."""
    if not pack:
        raise gr.Error("Choose the pack to move first.")
    if not (model or "").strip():
        raise gr.Error("Choose or type the base model to move the pack to.")
    with user_errors():
        options = TrainOptions(max_minutes=BUDGETS[budget], max_steps=int(max_steps) or None, lr=float(lr),
                               until_recalled=until_recalled)
        moved = service.migrate_pack(pack, model.strip(), (new_name or "").strip() or None, options=options)
    name = moved["pack"]["name"]
    gr.Info(f"Created pack {name} on {html.escape(moved['pack']['base_model'], quote=False)}: job {moved['job_id']} trains it.")
    return {**refresh_packs(service, tab, name), tab.job_id: moved["job_id"],
            tab.runs: run_choices(service, name, moved["job_id"]), tab.migration: migration_text(service, name)}


def start_training(service: Service, tab: TrainTab, pack: str | None, budget: str, full: bool, max_steps: float,
                   lr: float, evaluate: bool, until_recalled: bool = True) -> dict:
    """Queue a job for the worker (started if needed) and follow it."""
    if not pack:
        raise gr.Error("Create or choose a pack first.")
    with user_errors():
        options = TrainOptions(max_minutes=BUDGETS[budget], max_steps=int(max_steps) or None, lr=float(lr), full=full,
                               evaluate=evaluate, until_recalled=until_recalled)
        job = service.train(pack, options)
    return {tab.job_id: job["id"], tab.runs: run_choices(service, pack, job["id"])}


def poll_job(service: Service, tab: TrainTab, job_id: int | None, pack: str | None, plotted: tuple | None) -> dict:
    """Every second: the followed job's progress, bar, log and loss chart, and the tables it changes."""
    job = latest_job(service, job_id, pack)
    log = "\n".join(line["message"] for line in job["log"]) if job else ""
    key = (job["id"], job["step"], job["status"]) if job else None
    views = {tab.progress: job_text(job), tab.bar: bar_html(job), tab.log: log,
             tab.versions: version_rows(service, pack), tab.packs_table: pack_rows(service), tab.plotted: key,
             tab.migration: migration_text(service, pack)}
    # Redraw the plot only when there is something new: a chart redrawn every second flickers.
    # Never send an empty frame: Gradio 6.31's LinePlot draws no lines for any later update after
    # an empty one (reproduced in isolation), so the chart keeps its last curve until points come.
    frame = None if key == plotted else loss_frame(service, job)
    if frame is not None and not frame.empty:
        views[tab.loss_plot] = frame
    return views


def follow_run(tab: TrainTab, job_id: int | None) -> dict:
    """A run chosen in the list: follow it, and draw its curve afresh."""
    return {tab.job_id: job_id, tab.plotted: None}


def pack_chosen(service: Service, tab: TrainTab, pack: str | None) -> dict:
    """Another pack chosen: its versions and runs, following its latest job."""
    return {tab.job_id: None, tab.versions: version_rows(service, pack), tab.runs: run_choices(service, pack),
            tab.migration: migration_text(service, pack)}


def export_pack(service: Service, tab: TrainTab, pack: str | None) -> str:
    """Write the pack's active version as one .zip in Gradio's cache, for the download box."""
    if not pack:
        raise gr.Error("Choose a pack to export.")
    with user_errors():
        info = service.pack(pack)
        if not info["active_version"]:
            raise EngramError(f"Pack {pack!r} has no trained version yet: train it before exporting it.")
        folder = export_folder(tab.exported.GRADIO_CACHE)
        return str(service.export_pack(pack, folder / f"{pack}-v{info['active_version']}.zip"))


def import_pack(service: Service, tab: TrainTab, file: str | None, name: str | None) -> dict:
    """Import a dropped pack file as a new pack, then drop the upload."""
    if not file:
        raise gr.Error("Drop a pack file (.zip) first.")
    with user_errors():
        info = service.import_pack(file, (name or "").strip() or None)
    discard_uploads([file], tab.upload.GRADIO_CACHE)
    gr.Info(f"Imported pack {info['name']} at version {info['active_version']}.")
    return {**refresh_packs(service, tab, info["name"]), tab.upload: None}


def cancel_job(service: Service, job_id: int | None, pack: str | None) -> None:
    job = latest_job(service, job_id, pack)
    if job is None or job["status"] not in ("queued", "running", "interrupted"):
        raise gr.Error("No job is running.")
    service.cancel(job["id"])
    gr.Info(f"Job {job['id']} stops at its next step and keeps what it learned.")


def make_active(service: Service, tab: TrainTab, pack: str | None, number: float | None) -> dict:
    """Roll the pack back (or forward) to version ``number``."""
    if not pack or not number:
        raise gr.Error("Choose a pack and a version number.")
    with user_errors():
        service.rollback(pack, int(number))
    return {tab.versions: version_rows(service, pack), tab.packs_table: pack_rows(service)}


# --- layout and events ---------------------------------------------------------------------------

def _layout(service: Service) -> TrainTab:
    packs_table = gr.Dataframe(headers=PACK_COLUMNS, value=[], label="Memory packs", interactive=False,
                               elem_id="packs-table")
    choices = model_choices(service)
    default_model = model_value(service, None)
    with gr.Accordion("Create a pack", open=False, elem_id="pack-create-box") as create_box:
        with gr.Row():
            name = gr.Textbox(label="Name", placeholder="me", elem_id="pack-name")
            model = gr.Dropdown(choices, value=default_model, label="Base model", allow_custom_value=True,
                                info="a model here, or type a model folder, a .gguf file or a Hugging Face id (org/name)",
                                elem_id="pack-model")
            size = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Size", info=PRESET_HELP, elem_id="pack-size")
            mode = gr.Dropdown(list(MODES), value="engram", label="What trains")
            create = gr.Button("Create", elem_id="pack-create")
        needs = gr.Markdown(size_needs(service, DEFAULT_PRESET, default_model), elem_id="pack-size-needs")
    with gr.Accordion("Move a pack to another base model", open=False, elem_id="pack-migrate-box") as migrate_box:
        gr.Markdown("A new pack on the other model learns the sources the chosen pack learned (a training job with "
                    "the Train preset and advanced options of this tab); once trained, both packs are asked the same facts.")
        with gr.Row():
            migrate_model = gr.Dropdown([c for c in choices if c[1] != default_model], value=None, label="Base model",
                                        allow_custom_value=True, elem_id="pack-migrate-model",
                                        info="a model here, or type a model folder, a .gguf file or a Hugging Face id")
            migrate_name = gr.Textbox(label="New pack's name (default: NAME-on-<model>)", elem_id="pack-migrate-name")
            migrate = gr.Button("Move the chosen pack", elem_id="pack-migrate")
    with gr.Accordion("Export or import a pack", open=False, elem_id="pack-transfer-box"):
        with gr.Row():
            with gr.Column():
                export = gr.Button("Export the chosen pack's active version", elem_id="pack-export")
                exported = gr.File(label="Pack file", interactive=False, elem_id="pack-exported")
            with gr.Column():
                upload = gr.File(label="A pack file (.zip) to import", file_types=[".zip"], elem_id="pack-upload")
                import_name = gr.Textbox(label="Name for the imported pack (default: its own)", elem_id="pack-import-name")
                import_button = gr.Button("Import", elem_id="pack-import")
    with gr.Row():
        pack = gr.Dropdown([], label="Pack", elem_id="train-pack", scale=2, allow_custom_value=False)
        budget = gr.Dropdown(list(BUDGETS), value="quick (2 min)", label="Preset", scale=1, elem_id="train-budget")
        full = gr.Checkbox(label="Retrain from scratch", value=False, scale=1)
        start = gr.Button("Train", variant="primary", elem_id="train-start", scale=1)
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel", scale=1)
    with gr.Accordion("Advanced options", open=False):
        with gr.Row():
            max_steps = gr.Number(label="Max steps (0: from epochs)", value=0, precision=0, elem_id="train-max-steps")
            lr = gr.Number(label="Learning rate", value=TrainOptions().lr)
            evaluate = gr.Checkbox(label="Evaluate at the end", value=True, elem_id="train-evaluate")
            until_recalled = gr.Checkbox(label="Stop when the facts are recalled", value=True,
                                         info="checked every 10 steps; the preset's time stays the cap",
                                         elem_id="train-until-recalled")
    runs = gr.Dropdown([], value=None, label="Runs of this pack, newest first (none chosen: the latest)", elem_id="train-runs")
    job_id = gr.State(None)
    plotted = gr.State(None)
    progress = gr.Markdown("No training job yet.", elem_id="train-progress")
    bar = gr.HTML("", elem_id="train-bar")
    loss_plot = gr.LinePlot(x="step", y="loss", color="curve", color_map={"raw": "#a5b4fc", "smoothed": "#4f46e5"},
                            title="Loss", height=260, elem_id="train-loss")
    log = gr.Textbox(label="Log", lines=6, max_lines=6, interactive=False, elem_id="train-log")
    versions = gr.Dataframe(headers=VERSION_COLUMNS, value=[], label="Versions of the pack", interactive=False,
                            elem_id="train-versions")
    migration = gr.Markdown("", elem_id="pack-migration")
    with gr.Row():
        version = gr.Number(label="Version", precision=0, minimum=1, scale=1)
        rollback = gr.Button("Make this version active", scale=1, elem_id="train-rollback")
    return TrainTab(packs_table=packs_table, name=name, model=model, size=size, mode=mode, create=create,
                    size_needs=needs, migrate_model=migrate_model, migrate_name=migrate_name, migrate=migrate,
                    migration=migration, create_box=create_box, migrate_box=migrate_box, export=export, exported=exported, upload=upload, import_name=import_name,
                    import_button=import_button, pack=pack, budget=budget, full=full, start=start, cancel=cancel,
                    max_steps=max_steps, lr=lr, evaluate=evaluate, until_recalled=until_recalled, runs=runs,
                    job_id=job_id, plotted=plotted, progress=progress, bar=bar, loss_plot=loss_plot, log=log,
                    versions=versions, version=version, rollback=rollback)


def build_train_tab(service: Service) -> TrainTab:
    """Lay out the Memory & training tab and connect its events (called inside the tab's ``gr.Tab``)."""
    tab = _layout(service)
    tab.create.click(partial(create_pack, service, tab), [tab.name, tab.size, tab.mode, tab.model],
                     [tab.packs_table, tab.pack], api_name="create_pack")
    for box in (tab.create_box, tab.migrate_box):
        box.expand(partial(refresh_model_choices, service, tab), None, [tab.model, tab.migrate_model],
                   api_visibility="private")
    for picker in (tab.size, tab.model):
        picker.change(partial(size_needs, service), [tab.size, tab.model], tab.size_needs, api_visibility="private")
    tab.migrate.click(partial(migrate_pack, service, tab),
                      [tab.pack, tab.migrate_model, tab.migrate_name, tab.budget, tab.max_steps, tab.lr, tab.until_recalled],
                      [tab.packs_table, tab.pack, tab.job_id, tab.runs, tab.migration], api_name="migrate_pack")
    tab.start.click(partial(start_training, service, tab),
                    [tab.pack, tab.budget, tab.full, tab.max_steps, tab.lr, tab.evaluate, tab.until_recalled],
                    [tab.job_id, tab.runs], api_name="train")
    tab.export.click(partial(export_pack, service, tab), tab.pack, tab.exported, api_name="export_pack")
    tab.import_button.click(partial(import_pack, service, tab), [tab.upload, tab.import_name],
                            [tab.packs_table, tab.pack, tab.upload], api_name="import_pack")
    tab.runs.input(partial(follow_run, tab), tab.runs, [tab.job_id, tab.plotted], api_visibility="private")
    tab.cancel.click(partial(cancel_job, service), [tab.job_id, tab.pack], None, api_name="cancel_job")
    tab.rollback.click(partial(make_active, service, tab), [tab.pack, tab.version], [tab.versions, tab.packs_table],
                       api_name="rollback")
    tab.pack.change(partial(pack_chosen, service, tab), tab.pack, [tab.job_id, tab.versions, tab.runs, tab.migration],
                    api_visibility="private")
    gr.Timer(1.0).tick(partial(poll_job, service, tab), [tab.job_id, tab.pack, tab.plotted],
                       [tab.progress, tab.bar, tab.loss_plot, tab.log, tab.versions, tab.packs_table, tab.plotted,
                        tab.migration],
                       api_visibility="private", show_progress="hidden")
    return tab
