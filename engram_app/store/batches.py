"""Statements with one SQL parameter per source, run in batches under SQLite's variable limit.

SQLite refuses a statement with more parameters than ``SQLITE_MAX_VARIABLE_NUMBER``: 999 before
3.32, 32,766 since, and whatever a distribution compiled in. A pack that learned 40,000 sources
would otherwise fail to even be listed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

SQL_VARIABLES_PER_STATEMENT = 500  # well under every SQLite's limit, and few statements for large lists


def batched(values: Sequence, size: int = SQL_VARIABLES_PER_STATEMENT) -> Iterator[Sequence]:
    """``values`` in consecutive slices of at most ``size``: one statement's parameters each."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def placeholders(values: Sequence) -> str:
    """``?, ?, ...`` for an ``in (...)`` clause of ``values``."""
    return ", ".join("?" * len(values))
