"""Chat speed while the app's own worker trains a pack on the CPU, and the job's speed beside the
chat: with and without the chat's thread rule (engram_app/inference/threads.py: the chat's model
calls take half the CPU threads while a job trains on the CPU), at several OpenMP spin counts
(``GOMP_SPINCOUNT``, set for the app's processes in engram_app/__init__.py).

A scratch data root on the bundled model: one profile, a ``medium`` pack, the app's default chat
runtime (the 4-bit one on the CPU, with the pack's memory on). First the chat alone, then a
training job in the real worker process (stopped at the end), and in turns beside it: the chat
with the rule (the app's default) and with it switched off (every thread, as before the rule),
and no chat at all. Each turn decodes (or waits) for ``--seconds``; the turns repeat ``--rounds``
times, interleaved, so the noise of a shared CPU falls on all alike. Chat tok/s = tokens / seconds
of decoding (64-token replies to three prompts in turn, prefill included); the job's seconds per
step come from the moments its step count changed inside each turn. Each spin count runs in a
child process of its own (the chat's and the worker's: libgomp reads it when it loads); speeds are
ratios to the chat alone and to the job beside no chat at the first spin count, in this one
invocation. ``passive`` is ``OMP_WAIT_POLICY=PASSIVE`` (no spinning), ``300000`` libgomp's default.

    python bench/chat_beside_training.py [--seconds 30] [--rounds 2] [--spins 300000,10000,passive]

Prints a table and writes it to bench/results/chat_beside_training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from decode_int4 import SPEED_PROMPTS  # noqa: E402
from engram_app.inference import GenerationOptions, Message  # noqa: E402
from engram_app.training.queue import TrainOptions  # noqa: E402
from engram_app.training.worker import worker_info  # noqa: E402
from train_recall import scratch_service  # noqa: E402

PROFILE = ("# About me\n- My dog is called Pixel.\n- I live in Porto.\n- I work as a glassblower.\n"
           "- My favourite colour is teal.\n- I have two sisters.\n")


class StepClock:
    """Polls a job's step count and keeps the moment each new step was first seen."""

    def __init__(self, service, job_id: int, poll: float = 0.1):
        self.service, self.job_id, self.poll = service, job_id, poll
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            step = self.service.job(self.job_id)["step"] or 0
            if step != last:
                self.seen.append((time.perf_counter(), step))
                last = step
            self._stop.wait(self.poll)

    def seconds_per_step(self, start: float, end: float) -> float | None:
        inside = [(t, s) for t, s in self.seen if start <= t <= end]
        if len(inside) < 2 or inside[-1][1] == inside[0][1]:
            return None
        return (inside[-1][0] - inside[0][0]) / (inside[-1][1] - inside[0][1])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def decode_for(runtime, prompts: list[list[int]], seconds: float) -> tuple[float, float, float]:
    """Decode replies in turn for about ``seconds``: (tokens per second, start, end)."""
    runtime.stop_ids = set()  # full-length replies
    tokens, start = 0, time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        for _ in runtime.stream_ids(prompts[i % len(prompts)], GenerationOptions(max_new_tokens=64)):
            tokens += 1
        i += 1
    end = time.perf_counter()
    return tokens / (end - start), start, end


def child(args) -> None:
    """One spin count: every turn's chat tok/s and job s/step, printed as JSON."""
    service, home = scratch_service("cpu")
    try:
        (home / "profile.md").write_text(PROFILE)
        [imported] = service.ingest([home / "profile.md"])
        assert imported.status == "added", imported.reason
        service.create_pack("me", size="medium")
        service.load()
        runtime = service.chat_runtime("me")
        prompts = [runtime.chat_ids([Message("user", p)]) for p in SPEED_PROMPTS]
        decode_for(runtime, prompts, 3)  # warm up
        rule = service.chat_threads
        probe = rule.busy
        full = rule.full

        def set_rule(on: bool) -> None:
            rule.busy = probe if on else (lambda: False)
            rule._checked = None  # read the worker's state again at the next call

        alone = [decode_for(runtime, prompts, args.seconds)[0] for _ in range(args.rounds)]

        job = service.train("me", TrainOptions(max_steps=100_000, until_recalled=False, evaluate=False))
        deadline = time.time() + 600
        while (service.job(job["id"])["step"] or 0) < 2:
            if time.time() > deadline or service.job(job["id"])["status"] not in ("queued", "running"):
                raise SystemExit(f"the job did not start training: {service.job(job['id'])}")
            time.sleep(0.5)
        assert worker_info(home)["device"] == "cpu"
        clock = StepClock(service, job["id"])
        rows: dict[str, dict[str, list[float]]] = {}

        def record(name: str, threads: int | None, tps: float | None, start: float, end: float) -> None:
            row = rows.setdefault(name, {"threads": [], "tps": [], "step": []})
            row["threads"].append(threads or 0)
            if tps is not None:
                row["tps"].append(tps)
            row["step"].append(clock.seconds_per_step(start, end))  # None: no step finished in the turn

        for _ in range(args.rounds):
            set_rule(True)
            tps, start, end = decode_for(runtime, prompts, args.seconds)
            record("the job training, chat on half the threads (the rule)", rule.count(), tps, start, end)
            set_rule(False)
            tps, start, end = decode_for(runtime, prompts, args.seconds)
            record("the job training, chat on every thread (no rule)", rule.count(), tps, start, end)
            start = time.perf_counter()
            time.sleep(args.seconds)
            record("the job training, no chat", None, None, start, time.perf_counter())
        set_rule(True)
        clock.stop()
        service.cancel(job["id"])
        service.wait(job["id"], poll=0.5)
    finally:
        info = worker_info(home)
        if info["alive"] and info["pid"]:
            os.kill(info["pid"], 15)
        shutil.rmtree(home, ignore_errors=True)

    print(json.dumps({"threads": full, "alone": alone, "rows": rows,
                      "spin": os.environ.get("GOMP_SPINCOUNT"), "wait": os.environ.get("OMP_WAIT_POLICY")}))


def environment(spin: str) -> dict:
    if spin == "passive":
        return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    return {**os.environ, "GOMP_SPINCOUNT": spin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each turn")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each kind beside the job")
    parser.add_argument("--spins", default="300000,10000,passive",
                        help="GOMP_SPINCOUNT values (passive: OMP_WAIT_POLICY=PASSIVE), the first the baseline")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from results_table import publish

    runs = {}
    for spin in [s.strip() for s in args.spins.split(",") if s.strip()]:
        done = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(args.seconds),
                               "--rounds", str(args.rounds)], env=environment(spin), capture_output=True, text=True,
                              timeout=3600)
        if done.returncode:
            raise SystemExit(f"spin {spin}: the child failed:\n{done.stderr[-4000:]}")
        runs[spin] = json.loads(done.stdout.strip().splitlines()[-1])
    base = next(iter(runs.values()))
    idle = statistics.mean(base["alone"])
    alone_steps = [v for v in base["rows"]["the job training, no chat"]["step"] if v is not None]
    if not alone_steps:
        raise SystemExit(f"the job finished no step in a {args.seconds:.0f} s turn alone: make --seconds longer")
    alone_step = statistics.mean(alone_steps)
    lines = [f"Chat beside the app's training worker, smollm2-135m-instruct on CPU ({os.cpu_count()} cores, torch "
             f"{base['threads']} threads), a medium pack, the 4-bit runtime; {args.rounds} turns of "
             f"{args.seconds:.0f} s each, interleaved. Ratios to spin count {next(iter(runs))}'s chat alone "
             f"({idle:.1f} tok/s) and job alone ({alone_step:.2f} s/step).", "",
             "| spin count | condition | chat threads | chat tok/s | vs chat alone | job s/step | vs job alone |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for spin, run in runs.items():
        tps = statistics.mean(run["alone"])
        lines.append(f"| {spin} | chat alone (no job) | {run['threads']} | {tps:.1f} | {tps / idle:.2f}x |  |  |")
        for name, row in run["rows"].items():
            chat = (f"{statistics.mean(row['tps']):.1f} | {statistics.mean(row['tps']) / idle:.2f}x"
                    if row["tps"] else " | ")
            finished = [v for v in row["step"] if v is not None]
            step = statistics.mean(finished) if finished else None
            if None in row["step"]:  # a turn without a finished step: slower than the turn's length
                job = f"> {args.seconds:.0f} | < {alone_step / args.seconds:.2f}x" if step is None else \
                    f"{step:.2f} (a turn without a step) | "
            else:
                job = f"{step:.2f} | {alone_step / step:.2f}x" if step else " | "
            lines.append(f"| {spin} | {name} | {row['threads'][0] or ''} | {chat} | {job} |")
    lines += ["", "Per turn (chat tok/s; job s/step):"]
    for spin, run in runs.items():
        turns = []
        for name, row in run["rows"].items():
            chat = [f"{', '.join(f'{v:.1f}' for v in row['tps'])} tok/s"] if row["tps"] else []
            job = [f"{', '.join('none' if v is None else f'{v:.2f}' for v in row['step'])} s/step"]
            turns.append(f"{name}: " + ", ".join(chat + job))
        lines.append(f"- {spin}: chat alone {', '.join(f'{v:.1f}' for v in run['alone'])} tok/s; " + "; ".join(turns))
    publish("chat_beside_training", lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
