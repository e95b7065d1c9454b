"""The memory view: packs and their versions, training jobs with live progress, cancel, rollback.

Holds no logic: it calls the service and polls the job rows in SQLite (a ``gr.Timer``), so a
reload, a closed tab or a restarted app finds the job where it is: training runs in the worker
process, never in an event handler.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from engram_app.errors import EngramError
from engram_app.service import Service
from engram_app.ui.errors import user_errors
from engram_app.ui.security import discard_uploads
from engram_app.training import PRESETS, TrainOptions
from engram_app.training.sizes import describe, summary

PACK_COLUMNS = ["pack", "mode", "size", "active version", "versions", "base model", "learns from", "warning"]
VERSION_COLUMNS = ["version", "active", "steps", "memorisation loss", "forgetting cost", "recall", "created"]
PRESET_HELP = " | ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
BUDGETS = {"quick (2 min)": 2.0, "thorough (10 min)": 10.0}


def _size_needs(service: Service, size: str) -> str:
    """What the chosen size preset needs from this machine, and whether it has it (before creating)."""
    row = next((r for r in describe(service.settings.home) if r["name"] == size), None)
    return summary(row) if row else ""


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


def _pack_rows(service: Service) -> list[list]:
    rows = []
    for p in service.packs():
        warning = (f"learned {len(p['deleted_sources_learned'])} deleted source(s): retrain from scratch"
                   if p["deleted_sources_learned"] else "")
        rows.append([p["name"], p["mode"], p["preset"], p["active_version"] or "not trained", len(p["versions"]),
                     p["base_model"], ", ".join(p["collections"]) or "all collections", warning])
    return rows


def _recall_verdict(recall: dict) -> str:
    """'recalls 2 of 3 facts; train longer (without memory: 0)': plain words, not ratios."""
    count = recall["probes"]
    on, off = (round(recall[side]["recall"] * count) for side in ("memory_on", "memory_off"))
    advice = "" if on == count else "; train longer"
    return f"recalls {on} of {count} facts{advice} (without memory: {off})"


def _version_rows(service: Service, pack: str | None) -> list[list]:
    if not pack:
        return []
    info = service.pack(pack)
    rows = []
    for v in reversed(info["versions"]):
        ev = v["evaluation"] or {}
        mem, ret, rec = ev.get("memorisation") or {}, ev.get("retention") or {}, ev.get("recall") or {}
        recall = _recall_verdict(rec) if rec else ""
        rows.append([v["number"], "yes" if v["number"] == info["active_version"] else "", ev.get("steps", ""),
                     f"{mem['before']} -> {mem['after']}" if mem else "",
                     f"{ret['cost']:+.1%}" if ret.get("cost") is not None else "", recall, v["created"][:19]])
    return rows


def _job_text(job: dict | None) -> str:
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


def _bar_html(job: dict | None) -> str:
    """The progress bar: numbers only (nothing from a user's files reaches this HTML)."""
    if job is None or not job["total_steps"]:
        return ""
    share = max(0.0, min(1.0, int(job["step"]) / int(job["total_steps"])))
    return (f'<div class="train-bar" role="progressbar" aria-valuenow="{int(job["step"])}" aria-valuemin="0" '
            f'aria-valuemax="{int(job["total_steps"])}"><div style="width: {share * 100:.1f}%"></div></div>')


def _loss_frame(service: Service, job: dict | None) -> pd.DataFrame:
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


def build_train_tab(service: Service):
    packs_table = gr.Dataframe(headers=PACK_COLUMNS, value=[], label="Memory packs", interactive=False,
                               elem_id="packs-table")
    with gr.Accordion("Create a pack", open=False, elem_id="pack-create-box"):
        with gr.Row():
            name = gr.Textbox(label="Name", placeholder="me", elem_id="pack-name")
            size = gr.Dropdown(list(PRESETS), value="medium", label="Size", info=PRESET_HELP, elem_id="pack-size")
            mode = gr.Dropdown(["engram", "lora", "engram+lora"], value="engram", label="What trains")
            create = gr.Button("Create", elem_id="pack-create")
        size_needs = gr.Markdown(_size_needs(service, "medium"), elem_id="pack-size-needs")
    with gr.Accordion("Export or import a pack", open=False, elem_id="pack-transfer-box"):
        with gr.Row():
            with gr.Column():
                export = gr.Button("Export the chosen pack's active version", elem_id="pack-export")
                exported = gr.File(label="Pack file", interactive=False, elem_id="pack-exported")
            with gr.Column():
                upload = gr.File(label="A pack file (.zip) to import", file_types=[".zip"], elem_id="pack-upload")
                import_name = gr.Textbox(label="Name for the imported pack (default: its own)", elem_id="pack-import-name")
                do_import_button = gr.Button("Import", elem_id="pack-import")
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
    with gr.Row():
        version = gr.Number(label="Version", precision=0, minimum=1, scale=1)
        rollback = gr.Button("Make this version active", scale=1, elem_id="train-rollback")

    def refresh_packs(current: str | None):
        names = [p["name"] for p in service.packs()]
        value = current if current in names else (names[0] if names else None)
        return _pack_rows(service), gr.update(choices=names, value=value)

    def do_create(n: str, s: str, m: str):
        with user_errors():
            service.create_pack((n or "").strip(), size=s, mode=m)
        return refresh_packs(n.strip())

    def do_start(p: str | None, b: str, f: bool, steps: float, rate: float, ev: bool, until: bool = True):
        if not p:
            raise gr.Error("Create or choose a pack first.")
        with user_errors():
            options = TrainOptions(max_minutes=BUDGETS[b], max_steps=int(steps) or None, lr=float(rate), full=f,
                                   evaluate=ev, until_recalled=until)
            job = service.train(p, options)
        return job["id"], run_choices(p, job["id"])

    def latest_job(current: int | None, p: str | None) -> dict | None:
        if current is not None:
            return service.job(current)
        jobs = [j for j in service.jobs(limit=20) if not p or j["pack"] == p]
        return service.job(jobs[0]["id"]) if jobs else None

    def poll(current: int | None, p: str | None, plotted: tuple | None):
        job = latest_job(current, p)
        text = "\n".join(line["message"] for line in job["log"]) if job else ""
        key = (job["id"], job["step"], job["status"]) if job else None
        # Redraw the plot only when there is something new: a chart redrawn every second flickers.
        # Never send an empty frame: Gradio 6.31's LinePlot draws no lines for any later update after
        # an empty one (reproduced in isolation), so the chart keeps its last curve until points come.
        frame = None if key == plotted else _loss_frame(service, job)
        plot = gr.skip() if frame is None or frame.empty else frame
        return _job_text(job), _bar_html(job), plot, text, _version_rows(service, p), _pack_rows(service), key

    def run_choices(p: str | None, current: int | None = None):
        jobs = [j for j in service.jobs(limit=200) if j["pack"] == p] if p else []
        choices = [(f"job {j['id']}: {j['status']}, step {j['step']}/{j['total_steps'] or '?'}, {j['created'][:16]}",
                    j["id"]) for j in jobs]
        return gr.update(choices=choices, value=current if current in [c for _, c in choices] else None)

    def do_export(p: str | None):
        if not p:
            raise gr.Error("Choose a pack to export.")
        with user_errors():
            info = service.pack(p)
            if not info["active_version"]:
                raise EngramError(f"Pack {p!r} has no trained version yet: train it before exporting it.")
            folder = export_folder(exported.GRADIO_CACHE)
            return str(service.export_pack(p, folder / f"{p}-v{info['active_version']}.zip"))

    def do_import(file: str | None, n: str | None):
        if not file:
            raise gr.Error("Drop a pack file (.zip) first.")
        with user_errors():
            info = service.import_pack(file, (n or "").strip() or None)
        discard_uploads([file], upload.GRADIO_CACHE)
        gr.Info(f"Imported pack {info['name']} at version {info['active_version']}.")
        return (*refresh_packs(info["name"]), None)

    def do_cancel(current: int | None, p: str | None):
        job = latest_job(current, p)
        if job is None or job["status"] not in ("queued", "running", "interrupted"):
            raise gr.Error("No job is running.")
        service.cancel(job["id"])
        gr.Info(f"Job {job['id']} stops at its next step and keeps what it learned.")

    def do_rollback(p: str | None, number: float | None):
        if not p or not number:
            raise gr.Error("Choose a pack and a version number.")
        with user_errors():
            service.rollback(p, int(number))
        return _version_rows(service, p), _pack_rows(service)

    create.click(do_create, [name, size, mode], [packs_table, pack], api_name="create_pack")
    size.change(lambda s: _size_needs(service, s), size, size_needs, api_visibility="private")
    start.click(do_start, [pack, budget, full, max_steps, lr, evaluate, until_recalled], [job_id, runs], api_name="train")
    export.click(do_export, pack, exported, api_name="export_pack")
    do_import_button.click(do_import, [upload, import_name], [packs_table, pack, upload], api_name="import_pack")
    runs.input(lambda j: (j, None), runs, [job_id, plotted], api_visibility="private")
    cancel.click(do_cancel, [job_id, pack], None, api_name="cancel_job")
    rollback.click(do_rollback, [pack, version], [versions, packs_table], api_name="rollback")
    pack.change(lambda p: (None, _version_rows(service, p), run_choices(p)), pack, [job_id, versions, runs],
                api_visibility="private")
    timer = gr.Timer(1.0)
    timer.tick(poll, [job_id, pack, plotted], [progress, bar, loss_plot, log, versions, packs_table, plotted],
               api_visibility="private", show_progress="hidden")
    return refresh_packs, pack, packs_table
