"""The chat and the training worker share one GPU without running out of its memory (gpu_share.py).

No GPU is needed: ``ENGRAM_FAKE_VRAM_BYTES`` (or a probe function) simulates a card with little
free memory, and the tests assert what each side decides (proceed, wait, the CPU) and says.
"""

from __future__ import annotations

import pytest
import torch

from engram_app import gpu_share, service as service_module
from engram_app.errors import EngramError
from engram_app.gpu_share import (CPU, FAKE_VRAM_ENV, PROCEED, WAIT, CpuInstead, GpuMemory, chat_device, gpu_memory,
                                  job_training_need, parse_fake_vram, place_chat, place_training)
from engram_app.service import Service
from engram_app.settings import DevicePlan, Settings
from engram_app.store import open_db
from engram_app.training.packs import PackStore
from engram_app.training.queue import JobQueue, TrainOptions
from engram_app.training.worker import Worker

GiB = 2**30
CUDA_PLAN = DevicePlan(torch.device("cuda"), torch.bfloat16)  # what --device auto picks on a GPU machine


def test_a_simulated_card_is_read_from_the_environment_and_a_malformed_one_is_refused(monkeypatch):
    monkeypatch.setenv(FAKE_VRAM_ENV, f"{GiB // 2}/{4 * GiB}")
    assert gpu_memory() == GpuMemory(free=GiB // 2, total=4 * GiB)
    assert gpu_memory().used == 4 * GiB - GiB // 2
    assert parse_fake_vram("1000") == GpuMemory(1000, 1000)  # free only: nothing else on the card
    for bad in ("lots", "9/8", "1/2/3", "-1/8"):
        with pytest.raises(EngramError, match=FAKE_VRAM_ENV):
            parse_fake_vram(bad)
    monkeypatch.delenv(FAKE_VRAM_ENV)
    if not torch.cuda.is_available():
        assert gpu_memory() is None  # no GPU, nothing simulated: nothing to check


def test_training_proceeds_waits_or_goes_to_the_cpu_by_the_free_and_total_memory():
    need = 2 * GiB
    roomy = place_training(need, GpuMemory(free=3 * GiB, total=8 * GiB))
    assert roomy.action == PROCEED
    assert roomy.message == "GPU memory: this job needs 2.0 GiB, 3.0 GiB free of 8.0 GiB: training on the GPU"

    busy = GpuMemory(free=GiB, total=8 * GiB)
    waiting = place_training(need, busy, waited=10, wait_limit=120)
    assert waiting.action == WAIT
    assert waiting.message == ("waiting for GPU memory: chat holds 7.0 GiB of 8.0 GiB (with any other process on "
                               "the card); this job needs 2.0 GiB, 1.0 GiB free (at most 120 s, then on the CPU)")

    given_up = place_training(need, busy, waited=121, wait_limit=120)
    assert given_up.action == CPU
    assert given_up.message == ("GPU memory still short after 121 s (this job needs 2.0 GiB, 1.0 GiB free, chat holds "
                                "7.0 GiB): training on the CPU")

    too_small = place_training(need, GpuMemory(free=GiB, total=GiB), waited=0)
    assert too_small.action == CPU  # freeing memory cannot help: no wait
    assert too_small.message == "not enough GPU memory: this job needs 2.0 GiB, the card has 1.0 GiB in all: training on the CPU"


def test_the_chat_never_waits_it_loads_on_the_gpu_when_it_fits_and_on_the_cpu_with_the_reason_otherwise():
    assert place_chat(GiB, GpuMemory(free=2 * GiB, total=8 * GiB)).action == PROCEED
    short = place_chat(GiB, GpuMemory(free=GiB // 2, total=8 * GiB))
    assert short.action == CPU
    assert short.message == ("moved to the CPU: the GPU has 0.5 GiB free of 8.0 GiB (the training worker and other "
                             "processes hold 7.5 GiB), the model needs 1.0 GiB; restart the app when training is done "
                             "to chat on the GPU")


def test_the_chats_device_is_the_gpu_plan_when_the_model_fits_and_a_cpu_plan_saying_why_when_not(tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    fits = chat_device(CUDA_PLAN, str(tiny_model_dir), models, probe=lambda: GpuMemory(8 * GiB, 8 * GiB))
    assert fits is CUDA_PLAN

    short = chat_device(CUDA_PLAN, str(tiny_model_dir), models, probe=lambda: GpuMemory(GiB // 4, 8 * GiB))
    assert isinstance(short, CpuInstead)
    assert (short.device, short.dtype) == (torch.device("cpu"), torch.float32)
    assert short.describe().startswith("CPU (")
    assert "moved to the CPU: the GPU has 0.2 GiB free of 8.0 GiB" in short.describe()

    cpu = DevicePlan(torch.device("cpu"), torch.float32)
    assert chat_device(cpu, str(tiny_model_dir), models, probe=lambda: GpuMemory(0, 8 * GiB)) is cpu  # CPU asked: no check


def test_the_app_on_a_card_the_worker_fills_chats_on_the_cpu_and_its_status_line_says_why(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    from engram_app.ui.app import status_markdown

    monkeypatch.setattr(service_module, "resolve_device", lambda choice: CUDA_PLAN)  # as on a GPU machine
    monkeypatch.setenv(FAKE_VRAM_ENV, f"{GiB // 4}/{8 * GiB}")  # the worker holds all but a quarter GiB
    service = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir)))
    runtime = service.load()
    assert runtime.device == torch.device("cpu")
    assert next(runtime.model.parameters()).dtype == torch.float32
    status = service.status()
    assert status["device"].startswith("CPU (")
    assert "moved to the CPU: the GPU has 0.2 GiB free of 8.0 GiB (the training worker and other processes hold " \
           "7.8 GiB)" in status["device"]
    assert "moved to the CPU" in status_markdown(service)


# --- the worker -----------------------------------------------------------------------------------

@pytest.fixture
def queued(tmp_path, tiny_model_dir):
    """A data root with a small pack on the tiny model and one job claimed by a worker: (settings, db, queue, job)."""
    settings = Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="auto")
    settings.ensure_home()
    db = open_db(settings.home)
    pack = PackStore(db, settings.home).create("me", str(tiny_model_dir), size="small")
    queue = JobQueue(db)
    queue.submit(pack["id"], TrainOptions())
    job = queue.claim("test")
    return settings, db, queue, job


def log_lines(queue: JobQueue, job: dict) -> list[str]:
    return [row["message"] for row in queue.logs(job["id"])]


def test_a_job_knows_the_gpu_memory_it_needs_from_its_packs_model_and_size(queued):
    settings, db, queue, job = queued
    from engram_app.models import model_facts
    from engram_app.training.sizes import PRESETS

    parameters = model_facts(settings.model, settings.models_dir).parameters
    assert parameters > 0
    table = PRESETS["small"].needs()["gpu"]
    assert job_training_need(db, settings.home, settings.models_dir, job) == \
        2 * parameters + int(1.5 * table) + gpu_share.TRAINING_MARGIN


def test_a_job_short_of_gpu_memory_waits_saying_what_the_chat_holds_then_trains_on_the_gpu_once_freed(queued):
    settings, db, queue, job = queued
    cards = iter([GpuMemory(GiB // 2, 4 * GiB), GpuMemory(GiB // 2, 4 * GiB), GpuMemory(3 * GiB, 4 * GiB)])
    worker = Worker(settings, gpu_probe=lambda: next(cards), gpu_wait_seconds=60, gpu_poll_seconds=0.01)
    assert worker._job_settings(queue, db, job) is settings  # the GPU, as the worker was told
    lines = log_lines(queue, job)
    assert len(lines) == 2  # one line when it starts waiting, one when it goes on
    assert lines[0].startswith("waiting for GPU memory: chat holds 3.5 GiB of 4.0 GiB (with any other process on the "
                               "card); this job needs 1.0 GiB, 0.5 GiB free")
    assert lines[1].startswith("GPU memory: this job needs 1.0 GiB, 3.0 GiB free of 4.0 GiB: training on the GPU")


def test_a_job_still_short_after_its_wait_trains_on_the_cpu_and_says_so(queued, monkeypatch):
    settings, db, queue, job = queued
    monkeypatch.setenv(FAKE_VRAM_ENV, f"{GiB // 2}/{4 * GiB}")  # the default probe reads the simulated card
    worker = Worker(settings, gpu_wait_seconds=0.05, gpu_poll_seconds=0.01)
    placed = worker._job_settings(queue, db, job)
    assert placed.device == "cpu" and placed.home == settings.home and placed.model == settings.model
    assert settings.device == "auto"  # the worker's own settings are untouched: the next job checks again
    lines = log_lines(queue, job)
    assert lines[0].startswith("waiting for GPU memory: chat holds 3.5 GiB of 4.0 GiB")
    assert lines[-1].startswith("GPU memory still short after 0 s (this job needs 1.0 GiB, 0.5 GiB free, chat holds "
                                "3.5 GiB): training on the CPU")


def test_a_card_too_small_for_the_job_sends_it_to_the_cpu_without_waiting(queued, monkeypatch):
    settings, db, queue, job = queued
    monkeypatch.setenv(FAKE_VRAM_ENV, str(GiB // 2))
    placed = Worker(settings, gpu_wait_seconds=3600)._job_settings(queue, db, job)
    assert placed.device == "cpu"
    assert log_lines(queue, job) == ["not enough GPU memory: this job needs 1.0 GiB, the card has 0.5 GiB in all: "
                                     "training on the CPU"]


def test_a_job_that_fits_goes_on_without_a_word_and_a_cpu_worker_never_looks_at_the_gpu(queued, monkeypatch):
    settings, db, queue, job = queued
    monkeypatch.setenv(FAKE_VRAM_ENV, str(8 * GiB))
    assert Worker(settings)._job_settings(queue, db, job) is settings
    cpu_settings = Settings(home=settings.home, model=settings.model, device="cpu")

    def no_probe():
        raise AssertionError("a CPU worker probed the GPU")

    assert Worker(cpu_settings, gpu_probe=no_probe)._job_settings(queue, db, job) is cpu_settings
    assert log_lines(queue, job) == []


def test_a_cancel_while_waiting_stops_the_job_on_the_cpu_and_a_stopping_worker_hands_it_back(queued, monkeypatch):
    settings, db, queue, job = queued
    monkeypatch.setenv(FAKE_VRAM_ENV, f"{GiB // 2}/{4 * GiB}")
    worker = Worker(settings, gpu_wait_seconds=3600, gpu_poll_seconds=0.01)
    worker._cancel.set()
    assert worker._job_settings(queue, db, job).device == "cpu"
    assert log_lines(queue, job)[-1] == "cancelled while waiting for GPU memory: stopping on the CPU"

    def no_runner(*args, **kwargs):
        raise AssertionError("a job was started by a worker that is stopping")

    monkeypatch.setattr("engram_app.training.worker.JobRunner", no_runner)
    stopping = Worker(settings, gpu_wait_seconds=3600, gpu_poll_seconds=0.01)
    stopping._stop.set()
    assert queue.row(job["id"])["attempts"] == 1
    stopping._run_job(queue, db, job)
    row = queue.row(job["id"])
    assert (row["status"], row["attempts"]) == ("running", 0)  # handed back: the next worker resumes it, no crash counted
    assert stopping._job_id is None
