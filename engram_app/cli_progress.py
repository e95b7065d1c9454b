"""The command line's progress bars: ``ingest``'s files and ``train --wait``'s steps, drawn on stderr.

A bar is drawn only when stderr is a terminal and the command does not print JSON: piped or
captured output, and every ``--json`` shape, stay line for line what they were. The bars are
tqdm's (already installed with transformers), whose ``write`` clears the bar, prints a line on
stdout and draws the bar again below it, so the per-file lines of ``ingest`` stay readable.
Both bars vanish when done (``leave=False``): the lines printed and the summary are the record.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from engram_app.ingest.library import ImportResult, expand_paths


def stderr_is_terminal() -> bool:
    """Whether a bar would be seen (the tests replace this to draw one into a captured stream)."""
    return sys.stderr.isatty()


class ImportBar:
    """``ingest``'s bar: one step per file given or found in the folders given.

    A zip archive of files gives one result per member, all under the archive's path
    (``notes.zip/week 1/monday.md``); the archive counts as done when a result of a later
    file arrives, or when the import ends.
    """

    def __init__(self, paths: Iterable[Path]):
        self.files = [str(path) for path in expand_paths(Path(p) for p in paths)]
        self.done = 0  # files before this index are imported
        self.bar = tqdm(total=len(self.files), desc="Importing", unit="file", file=sys.stderr, leave=False,
                        dynamic_ncols=True)

    def advance(self, result: ImportResult) -> None:
        """Move the bar to the file ``result`` belongs to."""
        index = next((i for i in range(self.done, len(self.files)) if _belongs(result.path, self.files[i])), None)
        if index is None:
            return
        self.done = index + 1 if result.path == self.files[index] else index
        self.bar.set_postfix_str(Path(self.files[index]).name, refresh=False)
        self.bar.update(self.done - self.bar.n)
        self.bar.refresh()  # every result, not only after tqdm's 0.1 s between draws

    def write(self, line: str) -> None:
        """Print a line on stdout above the bar."""
        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.update(len(self.files) - self.bar.n)
        self.bar.refresh()
        self.bar.close()


def _belongs(result_path: str, file: str) -> bool:
    """Whether an import result is the file's own, or that of a member of the file (a zip archive)."""
    return result_path == file or result_path.startswith(file + "/")


class StepBar:
    """``train --wait``'s bar: the job's step out of its total, and the latest loss.

    Drawn once the job knows its total (the worker sets it when training starts).
    """

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.bar: tqdm | None = None

    def show(self, step: int, total: int, latest: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"Job {self.job_id}", unit="step", file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        self.bar.total = total
        if "loss" in latest:
            self.bar.set_postfix_str(f"loss {latest['loss']:.3f}", refresh=False)
        self.bar.update(step - self.bar.n)  # a job resumed from its checkpoint may step back
        self.bar.refresh()  # each poll's step, whatever tqdm's own pace of drawing

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
