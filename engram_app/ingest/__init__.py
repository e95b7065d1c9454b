"""Getting a user's material into the library: parsing, chunking, embedding, storing."""

from engram_app.ingest.records import KINDS, ImportRejected, Parsed, Record

__all__ = ["DEFAULT_MAX_BYTES", "ImportRejected", "ImportResult", "KINDS", "Library", "Parsed", "Record"]


def __getattr__(name: str):
    """The library's names, imported on first use: the parser child process (``sandbox.py``)
    imports this package and should not pay for SQLite and numpy, which only the library needs."""
    if name in ("DEFAULT_MAX_BYTES", "ImportResult", "Library"):
        from engram_app.ingest import library

        return getattr(library, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
