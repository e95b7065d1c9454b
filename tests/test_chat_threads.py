"""The chat decodes on half the CPU threads while the app's training worker trains on the CPU
(inference/threads.py), and on all of them otherwise; the app's processes spin briefly at OpenMP
barriers (engram_app/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from engram_app.inference.threads import ChatThreads, worker_trains_on_cpu
from engram_app.service import Service
from engram_app.settings import Settings, device_type
from engram_app.training.queue import TrainOptions
from engram_app.training.worker import worker_info
from test_training import PROFILE_A, add_profile, stop_worker, wait_for


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def in_a_thread(work):
    """``work()`` run in a new thread (its own OpenMP settings, as a chat's request thread has)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", work()))
    thread.start()
    thread.join()
    return out["value"]


def test_half_the_threads_while_the_worker_trains_read_at_most_once_a_second_and_all_again_after():
    busy, asked, clock = [False], [], Clock()

    def probe():
        asked.append(clock.now)
        return busy[0]

    threads = ChatThreads(probe, full=4, every=1.0, clock=clock)
    assert threads.count() == 4 and threads.describe() is None
    busy[0] = True
    clock.now = 0.5
    assert threads.count() == 4  # read less than a second ago: not read again
    clock.now = 1.0
    assert threads.count() == 2
    assert threads.describe() == "chat on 2 of 4 CPU threads while the job trains on the CPU"
    assert asked == [0.0, 1.0]
    busy[0] = False
    clock.now = 2.5
    assert threads.count() == 4
    assert ChatThreads(lambda: True, full=1).count() == 1  # never below one
    assert ChatThreads(lambda: True, full=3).count() == 1

    def broken():
        raise OSError("worker.json is being rewritten")

    assert ChatThreads(broken, full=4).count() == 4  # a failed read counts as not busy


def test_a_model_call_runs_at_the_count_and_the_thread_gets_its_own_count_back_after_it():
    busy = [True]
    threads = ChatThreads(lambda: busy[0], full=2, every=0.0)

    def one_call():
        with threads.call() as count:
            during = torch.get_num_threads()
        return count, during, torch.get_num_threads()

    def failing_call():
        with pytest.raises(RuntimeError):
            with threads.call():
                raise RuntimeError("the model call failed")
        return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert in_a_thread(one_call) == (1, 1, 2)
        assert in_a_thread(failing_call) == 2  # put back after a failed call too
        busy[0] = False
        assert in_a_thread(one_call) == (2, 2, 2)
    finally:
        torch.set_num_threads(before)  # torch's process-wide default, which set_num_threads also sets


def test_a_worker_that_died_with_a_job_on_the_cpu_does_not_slow_the_chat(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "worker.json").write_text('{"pid": 999999, "state": "training", "job": 3, "device": "cpu"}')
    assert worker_info(home)["device"] is None  # no live worker holds its lock: what it wrote is stale
    assert not worker_trains_on_cpu(home)


def test_a_device_choice_is_placed_as_resolve_device_places_it_without_raising():
    assert device_type("cpu") == "cpu"
    assert device_type("cuda") == "cuda"  # asked for: the job fails where there is no GPU, with the reason
    assert device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def service(tmp_path, tiny_model_dir):
    threads = torch.get_num_threads()
    svc = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    yield svc
    stop_worker(svc.settings.home)
    torch.set_num_threads(threads)


def test_while_a_job_trains_on_the_cpu_the_chat_decodes_on_half_the_threads_and_the_status_line_says_so(
        service, tmp_path):
    from engram_app.ui.app import status_markdown

    add_profile(service, tmp_path, "a.md", PROFILE_A)
    service.create_pack("me", size="small")
    service.load()  # as the app does when it starts
    runtime = service.chat_runtime("me")
    service.chat_threads.full = 2  # as on a two-core machine, whatever this one has
    seen: list[int] = []
    runtime.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))

    service.chat("Where do I live?", pack="me")
    assert seen and set(seen) == {2}  # no job: every thread
    assert not worker_trains_on_cpu(service.settings.home)

    job = service.train("me", TrainOptions(max_steps=100_000, until_recalled=False))
    wait_for(lambda: service.job(job["id"])["step"] >= 2, 120, "the job to train")
    info = worker_info(service.settings.home)
    assert (info["job"], info["device"]) == (job["id"], "cpu")
    assert worker_trains_on_cpu(service.settings.home)
    wait_for(lambda: service.chat_threads.count() == 1, 5, "the chat to read the worker's state")
    seen.clear()
    service.chat("Where do I live?", pack="me")
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # back to every thread (``full``) after each call
    assert "running job" in status_markdown(service)
    assert "(chat on 1 of 2 CPU threads while the job trains on the CPU)" in status_markdown(service)

    service.cancel(job["id"])
    assert service.wait(job["id"], poll=0.2)["status"] == "cancelled"
    wait_for(lambda: worker_info(service.settings.home)["device"] is None, 10, "the worker to say it is idle")
    wait_for(lambda: service.chat_threads.count() == 2, 5, "the chat to take every thread again")
    seen.clear()
    service.chat("Where do I live?", pack="me")
    assert set(seen) == {2}
    assert service.status()["chat_threads"] is None


def test_the_apps_processes_spin_briefly_at_openmp_barriers_unless_the_environment_says_otherwise():
    # engram_app itself must not load torch (and libgomp with it) before it sets the variable
    show = [sys.executable, "-c", "import engram_app, os, sys; assert 'torch' not in sys.modules; "
            "print(os.environ['GOMP_SPINCOUNT'])"]
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "10000"
    mine = subprocess.run(show, env={**env, "GOMP_SPINCOUNT": "42"}, capture_output=True, text=True, check=True)
    assert mine.stdout.strip() == "42"
