"""The command line's progress bars (on a terminal only) and ``ingest``'s warnings under each file's line.

CliRunner's stderr is no terminal; ``cli_progress.stderr_is_terminal`` is replaced to stand for one,
and tqdm draws into the captured stream as it would on the terminal.
"""

from __future__ import annotations

import json
import zipfile

import pytest
from click.testing import CliRunner

import engram_app.service
from engram_app import cli_progress
from engram_app.cli import cli
from engram_app.ingest.detect import AS_TEXT_WARNINGS
from engram_app.ingest.library import ImportResult

WAITING = "Job 7 queued; waiting for it (Ctrl-C stops waiting, not the job).\n"


@pytest.fixture
def terminal(monkeypatch):
    """stderr stands for a terminal."""
    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)


@pytest.fixture
def import_folder(tmp_path):
    """A note, a CSV read as plain text (a warning), a zip of two notes and an empty file (it fails)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a note.txt").write_text("The pond behind the house froze over in January.\n")
    (folder / "b table.csv").write_text("city,year\nLisbon,2019\nPorto,2021\n")
    with zipfile.ZipFile(folder / "c notes.zip", "w") as archive:
        archive.writestr("monday.md", "Monday: walked to the river and back.\n")
        archive.writestr("tuesday.md", "Tuesday: planted tomatoes by the fence.\n")
    (folder / "d empty.txt").write_bytes(b"")
    return folder


def ingest(tmp_path, tiny_model_dir, folder, home: str, *extra: str):
    args = ["ingest", "--home", str(tmp_path / home), "--model", str(tiny_model_dir), *extra, str(folder)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


# --- ingest --------------------------------------------------------------------------------------


def test_ingest_prints_each_warning_under_its_files_line(tmp_path, tiny_model_dir, import_folder):
    out = ingest(tmp_path, tiny_model_dir, import_folder, "home")

    lines = out.stdout.splitlines()
    csv = lines.index(next(line for line in lines if line.startswith(f"added     {import_folder / 'b table.csv'}: ")))
    assert lines[csv + 1] == f"          warning: {AS_TEXT_WARNINGS['csv-text']}"
    assert [line.split()[0] for line in lines] == ["added", "added", "warning:", "added", "added", "failed", "4"]
    assert lines[-1] == "4 added, 0 duplicate, 1 failed"
    assert "Importing" not in out.stderr  # no terminal: no bar (stderr has the embedding model's loading)


def test_ingest_on_a_terminal_draws_a_bar_of_files_on_stderr_and_prints_the_same_lines(
        tmp_path, tiny_model_dir, import_folder, monkeypatch):
    plain = ingest(tmp_path, tiny_model_dir, import_folder, "plain")
    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)
    drawn = ingest(tmp_path, tiny_model_dir, import_folder, "drawn")

    assert drawn.stdout == plain.stdout
    assert "Importing" in drawn.stderr and "4/4" in drawn.stderr and "file" in drawn.stderr


def test_ingest_json_is_the_same_on_a_terminal_and_draws_no_bar(tmp_path, tiny_model_dir, import_folder, monkeypatch):
    piped = ingest(tmp_path, tiny_model_dir, import_folder, "piped", "--json")
    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)
    drawn = ingest(tmp_path, tiny_model_dir, import_folder, "drawn", "--json")

    assert drawn.stdout == piped.stdout
    assert "Importing" not in drawn.stderr
    report = json.loads(drawn.stdout)
    assert [r["warnings"] for r in report["results"]] == [[], [AS_TEXT_WARNINGS["csv-text"]], [], [], []]


def test_the_import_bar_counts_files_and_a_zip_of_files_once_its_members_are_done(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.txt", "b.zip", "c.txt"):
        (folder / name).write_bytes(b"x")
    given = tmp_path / "given.txt"
    given.write_bytes(b"x")
    bar = cli_progress.ImportBar([folder, given])
    assert bar.bar.total == 4

    positions = []
    for path in (folder / "a.txt", f"{folder / 'b.zip'}/one.md", f"{folder / 'b.zip'}/two.md", folder / "c.txt",
                 given):
        bar.advance(ImportResult(str(path), "added"))
        positions.append(bar.bar.n)
    bar.close()

    assert positions == [1, 1, 1, 3, 4]


# --- train --wait --------------------------------------------------------------------------------


FINAL = {"id": 7, "pack": "me", "status": "done", "step": 30, "total_steps": 30, "error": None,
         "result": {"version": 2}, "log": [{"message": "training finished"}], "latest": {"loss": 1.25}}
UPDATES = [  # what the wait loop hands its callback: before the worker starts, then twice per step
    {"id": 7, "step": 0, "total_steps": None},
    {"id": 7, "step": 10, "total_steps": 30},
    {"id": 7, "step": 10, "total_steps": 30},
    {"id": 7, "step": 20, "total_steps": 30},
]
LATEST = {10: {"loss": 2.5, "eta": 12.0}, 20: {"loss": 1.75}}


class FakeService:
    """The service as ``train --wait`` sees it, its job stepping through ``UPDATES``."""

    def __init__(self, settings):
        self.step = 0

    queued: list = []

    def train(self, pack, options):
        FakeService.queued.append(options)
        return {"id": 7, "pack": pack, "status": "queued", "step": 0, "total_steps": None}

    def wait(self, job_id, poll=1.0, on_update=None):
        for view in UPDATES:
            self.step = view["step"]
            on_update(view)
        self.step = 30
        return FINAL

    def job(self, job_id, metrics=False, log_tail=20):
        return FINAL if self.step == 30 else {**FINAL, "status": "running", "latest": LATEST[self.step]}


def train(monkeypatch, *extra: str):
    monkeypatch.setattr(engram_app.service, "Service", FakeService)
    result = CliRunner().invoke(cli, ["train", "--pack", "me", "--wait", *extra])
    assert result.exit_code == 0, result.output
    return result


def test_train_wait_without_a_terminal_prints_the_step_lines_as_before(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_HOME", str(tmp_path))
    out = train(monkeypatch)
    assert out.stderr == WAITING + "step 10/30 loss 2.500, 12 s left\nstep 20/30 loss 1.750\n"
    assert out.stdout == ("Job 7 (me): done, step 30/30\n  wrote version 2\n  | training finished\n")


def test_train_wait_on_a_terminal_draws_the_steps_and_loss_as_a_bar_instead(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_HOME", str(tmp_path))
    plain = train(monkeypatch)
    monkeypatch.setattr(cli_progress, "stderr_is_terminal", lambda: True)
    drawn = train(monkeypatch)

    assert drawn.stdout == plain.stdout
    assert drawn.stderr.startswith(WAITING)
    assert "Job 7" in drawn.stderr and "10/30" in drawn.stderr and "loss 2.500" in drawn.stderr
    assert "20/30" in drawn.stderr and "loss 1.750" in drawn.stderr
    assert "step 10/30" not in drawn.stderr  # the bar, not the lines


def test_train_wait_json_is_the_final_job_alone_on_a_terminal_too(monkeypatch, tmp_path, terminal):
    monkeypatch.setenv("ENGRAM_HOME", str(tmp_path))
    out = train(monkeypatch, "--json")
    assert out.stdout == json.dumps(FINAL, ensure_ascii=False) + "\n"
    assert out.stderr == ""


def test_train_passes_the_learning_rate_schedule_on_to_the_job(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGRAM_HOME", str(tmp_path))
    train(monkeypatch, "--json", "--lr-final", "0.5")
    assert FakeService.queued[-1].lr_final == 0.5
    train(monkeypatch, "--json")
    assert FakeService.queued[-1].lr_final == 0.1  # the default: a decaying rate
