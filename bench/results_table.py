"""Every benchmark ends the same way: print its table and keep it in bench/results/NAME.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, lines: list[str]) -> Path:
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.md"
    out.write_text(table + "\n")
    return out
