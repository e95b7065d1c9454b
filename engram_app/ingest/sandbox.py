"""The parser child process: files are read under a time and a memory limit.

pypdf, python-docx, Beautiful Soup and PyYAML are large parsers in code we do not control; a
hostile file can keep them busy for hours or make them allocate gigabytes. :class:`ParserProcess`
runs them in a child Python process whose address space is capped (``RLIMIT_AS``) and waits
for each file's answer for at most ``ParseLimits.seconds``. A file that runs past the time is
refused with that reason and its child killed; the next file gets a new child, so the rest of
the import goes on. One child serves a whole import: its start-up is paid once per import that
needs it, not once per file (figures in docs/LIBRARY.md).

The protocol has no pickle: the parent writes a JSON header line and the file's bytes; the
child answers with one JSON line, ``{"parsed": {...}}`` (plain strings and numbers),
``{"rejected": reason}`` or ``{"error": ..., "traceback": ...}``.

Run as ``python -m engram_app.ingest.sandbox MEMORY_BYTES`` by :class:`ParserProcess` only.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import IO

from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits
from engram_app.ingest.records import ImportRejected, Parsed, Record

log = logging.getLogger(__name__)

START_SECONDS = 120.0  # a child that is not ready by then (imports on a very slow disk) is an error
ALARM_GRACE_SECONDS = 5  # an orphaned child (its parent killed) stops itself this long after the limit
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding engram_app/


def describe_bytes(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


# --- the parent's side -----------------------------------------------------------------------------

class ParserProcess:
    """A child process that parses files one at a time, started on first use.

    Use as a context manager (or call :meth:`close`) so that the child ends with the import.
    Not thread-safe: one import, one ``ParserProcess``.
    """

    def __init__(self, limits: ParseLimits = DEFAULT_LIMITS):
        self.limits = limits
        self._proc: subprocess.Popen | None = None
        self._answers: queue.Queue[bytes | None] = queue.Queue()

    def __enter__(self) -> ParserProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def parse(self, data: bytes, filename: str, kind: str) -> Parsed:
        """Parse one file in the child; raises :class:`ImportRejected` with the reason it failed."""
        proc = self._start()
        header = {"filename": filename, "kind": kind, "size": len(data), "limits": self.limits.to_json(),
                  "seconds": self.limits.seconds}
        try:
            proc.stdin.write(json.dumps(header).encode() + b"\n")
            proc.stdin.write(data)
            proc.stdin.flush()
        except OSError:  # the child died (BrokenPipeError)
            raise self._stopped() from None
        try:
            line = self._answers.get(timeout=self.limits.seconds)
        except queue.Empty:
            self.close(kill=True)
            raise ImportRejected(
                f"reading the file took longer than {self.limits.seconds:g} s, the most one file may take (a file "
                "built to be slow to parse?): convert it to plain text or split it") from None
        if line is None:
            raise self._stopped()
        return self._result(json.loads(line))

    def close(self, kill: bool = False) -> None:
        """End the child: by closing its input when it is idle, at once with ``kill`` (a file past its time)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                          os.environ.get("PYTHONPATH")])),
               # one thread per math library: each extra thread would reserve address space
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "engram_app.ingest.sandbox", str(self.limits.memory_bytes)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._proc = proc
        self._answers = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, self._answers), daemon=True,
                         name="parser-answers").start()
        try:
            ready = self._answers.get(timeout=START_SECONDS)
        except queue.Empty:
            ready = None
        if ready is None or json.loads(ready) != {"ready": True}:
            self.close()
            raise ImportRejected("the parser process did not start (see the log for why)")
        return proc

    def _stopped(self) -> ImportRejected:
        """The reason for a child that died while reading a file (killed for memory, most often)."""
        proc, self._proc = self._proc, None
        code = proc.wait() if proc else None
        if proc:
            proc.stdout.close()
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return ImportRejected(f"the parser process was stopped ({name}) while reading the file, most often "
                                  f"because it needed more than {describe_bytes(self.limits.memory_bytes)} of "
                                  "memory, the most one file may use")
        return ImportRejected(f"the parser process ended unexpectedly (exit code {code}) while reading the file")

    def _result(self, answer: dict) -> Parsed:
        if "parsed" in answer:
            parsed = answer["parsed"]
            return Parsed(parsed["kind"], parsed["format"], parsed["title"],
                          [Record(**record) for record in parsed["records"]], list(parsed.get("warnings") or []))
        if answer.get("restart"):
            self.close()
        if "rejected" in answer:
            raise ImportRejected(answer["rejected"])
        log.error("The parser process failed on a file:\n%s", answer.get("traceback", ""))
        raise ImportRejected(f"unexpected error while parsing ({answer['error']})")


def _pump(stream: IO[bytes], answers: queue.Queue) -> None:
    """Move the child's answer lines to a queue, so that the parent can wait with a timeout."""
    try:
        for line in stream:
            answers.put(line)
    except (OSError, ValueError):  # the pipe was closed under us
        pass
    answers.put(None)


# --- the child's side ------------------------------------------------------------------------------

def _limit_memory(memory_bytes: int) -> None:
    try:
        import resource
    except ImportError:  # Windows: only the time limit applies
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError) as exc:  # macOS refuses some values; the time limit still applies
        log.warning("Could not limit the parser's memory: %s", exc)


def _answer(data: bytes, request: dict, memory_bytes: int) -> dict:
    from engram_app.ingest.detect import parse_bytes

    if hasattr(signal, "alarm"):  # stops this process if its parent is gone and no one kills it
        signal.alarm(int(request["seconds"]) + ALARM_GRACE_SECONDS)
    try:
        parsed = parse_bytes(data, request["filename"], request["kind"], ParseLimits(**request["limits"]))
        return {"parsed": asdict(parsed)}
    except ImportRejected as exc:
        return {"rejected": str(exc)}
    except MemoryError:
        return {"rejected": f"reading the file needed more than {describe_bytes(memory_bytes)} of memory, the most "
                            "one file may use", "restart": True}
    except RecursionError as exc:
        return {"rejected": f"could not read the file (RecursionError: {exc})"}
    except Exception as exc:  # a parser bug costs this file only
        import traceback

        return {"error": f"{type(exc).__name__}: {exc}"[:300], "traceback": traceback.format_exc()}
    finally:
        if hasattr(signal, "alarm"):
            signal.alarm(0)


def main() -> None:
    memory_bytes = int(sys.argv[1])
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    logging.basicConfig(level=logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")
    # Import every parser before the limits: imports are the same for every file, not its cost.
    import bs4  # noqa: F401
    import docx  # noqa: F401
    import pypdf  # noqa: F401
    import yaml  # noqa: F401

    from engram_app.ingest import detect  # noqa: F401

    _limit_memory(memory_bytes)
    answers.write(b'{"ready": true}\n')
    answers.flush()
    requests = sys.stdin.buffer
    while header := requests.readline():
        request = json.loads(header)
        answer = _answer(requests.read(request["size"]), request, memory_bytes)
        try:
            line = json.dumps(answer).encode()
        except MemoryError:
            answer = {"rejected": f"the text of the file needed more than {describe_bytes(memory_bytes)} of "
                                  "memory, the most one file may use", "restart": True}
            line = json.dumps(answer).encode()
        answers.write(line + b"\n")
        answers.flush()
        if answer.get("restart"):
            return


if __name__ == "__main__":
    main()
