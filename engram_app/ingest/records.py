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


@dataclass
class Parsed:
    kind: str  # document | chat | profile
    format: str  # txt, markdown, rst, html, pdf, docx, json-text, csv-text, chatgpt, messages, transcript,
    #              profile-json, profile-yaml, statements, persona-csv
    title: str
    records: list[Record] = field(default_factory=list)
