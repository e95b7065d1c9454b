"""The started worker's output, ``<home>/worker.log``, is rotated so that it never grows without bound."""

from __future__ import annotations

import subprocess

from engram_app.settings import Settings
from engram_app.training import worker
from engram_app.training.worker import rotate_log, start_worker


def fill(path, size: int, byte: bytes) -> None:
    path.write_bytes(byte * size)


def test_a_log_over_the_limit_shifts_to_dot_1_and_the_oldest_beyond_three_is_dropped(tmp_path):
    log = tmp_path / "worker.log"
    fill(log, 101, b"n")
    for number, byte in ((1, b"a"), (2, b"b"), (3, b"c")):
        fill(tmp_path / f"worker.log.{number}", 10, byte)

    assert rotate_log(log, max_bytes=100, backups=3) is True

    assert not log.exists()  # the next worker's output starts a new file
    assert (tmp_path / "worker.log.1").read_bytes() == b"n" * 101
    assert (tmp_path / "worker.log.2").read_bytes() == b"a" * 10
    assert (tmp_path / "worker.log.3").read_bytes() == b"b" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.log.1", "worker.log.2", "worker.log.3"]


def test_a_log_at_or_under_the_limit_or_missing_is_left_alone(tmp_path):
    log = tmp_path / "worker.log"
    assert rotate_log(log, max_bytes=100) is False  # no log yet
    fill(log, 100, b"x")
    assert rotate_log(log, max_bytes=100) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.log"]
    assert log.read_bytes() == b"x" * 100


class FakePopen:
    """Stands in for the worker process: records where its output went."""

    started: list[dict] = []

    def __init__(self, command, stdout, **kwargs):
        FakePopen.started.append({"command": command, "log": stdout.name, "written": stdout.tell()})
        self.pid = 4242


def test_starting_a_worker_rotates_a_full_log_and_gives_the_worker_a_fresh_one_in_append_mode(tmp_path, monkeypatch):
    settings = Settings(home=tmp_path / "home", device="cpu")
    settings.ensure_home()
    log = settings.home / "worker.log"
    fill(log, 200, b"o")
    monkeypatch.setattr(worker, "LOG_MAX_BYTES", 100)
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    FakePopen.started.clear()

    assert start_worker(settings) == 4242
    assert (settings.home / "worker.log.1").read_bytes() == b"o" * 200
    assert [(s["log"], s["written"]) for s in FakePopen.started] == [(str(log), 0)]
    assert log.read_bytes() == b""

    log.write_bytes(b"s" * 50)  # the worker wrote less than the limit: the next start appends to it
    assert start_worker(settings) == 4242
    assert [(s["log"], s["written"]) for s in FakePopen.started][1] == (str(log), 50)
    assert log.read_bytes() == b"s" * 50
    assert sorted(p.name for p in settings.home.glob("worker.log*")) == ["worker.log", "worker.log.1"]
