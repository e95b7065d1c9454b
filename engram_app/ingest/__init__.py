"""Getting a user's material into the library: parsing, chunking, embedding, storing."""

from engram_app.ingest.library import DEFAULT_MAX_BYTES, ImportResult, Library
from engram_app.ingest.records import KINDS, ImportRejected, Parsed, Record

__all__ = ["DEFAULT_MAX_BYTES", "ImportRejected", "ImportResult", "KINDS", "Library", "Parsed", "Record"]
