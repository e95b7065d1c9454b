"""What a parser returns: the kind of a file, its format, and its records."""

from __future__ import annotations

from dataclasses import dataclass, field

from engram_app.errors import EngramError

KINDS = ("document", "chat", "profile")


class ImportRejected(EngramError):
    """A file that cannot be imported, with the reason shown to the user."""


@dataclass
class Record:
    kind: str  # "text" (a document's text), "turn" (one chat message), "fact" (a statement about a person)
    text: str
    speaker: str | None = None  # turns: the role or name of who said it
    person: str | None = None  # facts: who the statement is about
    conversation: int = 0  # turns: which conversation of the file
    timestamp: str | None = None  # turns: when it was said, ISO 8601 ("...Z" when the export gave UTC)


@dataclass
class Parsed:
    kind: str  # document | chat | profile
    format: str  # txt, markdown, rst, html, pdf, docx, json-text, csv-text, yaml-text, chatgpt, claude, telegram,
    #              whatsapp, messages, jsonl-messages, transcript, profile-json, profile-yaml, statements, persona-csv
    title: str
    records: list[Record] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the user should know: read as plain text, media skipped


def plural(n: int, noun: str) -> str:
    """"1 file", "3 files": counts in the notes an import gives."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
