"""How much one file may cost to read: characters, facts, seconds and memory.

A file's size says little about the work it makes: a 2.6 KB YAML profile whose aliases
(``*name``) repeat each other expands to hundreds of MB of facts, and a 14 KB PDF whose pages
all draw one large compressed content stream keeps pypdf busy for hours. These limits make such
a file fail with a reason while the rest of the import goes on.

The characters and facts caps apply wherever a file is parsed. The time and memory caps apply
to the parser child process (``ingest/sandbox.py``), which reads every file whose work is not
bounded by its size: PDF and Word files (compressed containers) and any file over
:data:`ISOLATE_ABOVE_BYTES`. Smaller text files are parsed in the importing process, where the
caps on characters and facts bound them and a child process would only add its start-up time.

The archive caps bound what a zip may make the library unpack (``ingest/archives.py``): entries,
bytes in all, compression ratio of a member, and archives inside archives.
"""

from __future__ import annotations

from dataclasses import dataclass

from engram_app.ingest.records import ImportRejected, Parsed

MAX_CHARS_PER_FILE = 20_000_000  # characters of text one file may yield (about 5 million tokens)
MAX_FACTS_PER_FILE = 10_000  # facts one JSON/YAML profile may expand to
MAX_PROFILE_VALUES = 100_000  # values visited while expanding one profile (aliases count each time)
MAX_PDF_CONTENT_BYTES = 64 * 2**20  # drawing instructions of all pages, a shared stream counted per page
PARSE_SECONDS = 60.0  # wall-clock time the parser child may spend on one file
PARSE_MEMORY_BYTES = 2**30  # address space of the parser child (RLIMIT_AS)
ISOLATE_ABOVE_BYTES = 256 * 2**10  # text files larger than this are parsed in the child too
# Zip archives (ingest/archives.py): a folder of files in one, or a chat app's export.
MAX_ARCHIVE_MEMBERS = 10_000  # entries of one archive, counted from its end record before its directory is read
MAX_ARCHIVE_EXPANDED = 2 * 2**30  # bytes all the members read from one archive (and those inside it) unpack to
MAX_ARCHIVE_MEMBER_BYTES = 256 * 2**20  # one member read from an export (a ChatGPT conversations.json)
MAX_COMPRESSION_RATIO = 200  # unpacked / packed bytes of a member over 1 MiB; text compresses 3-10x, zip bombs 1000x
MAX_ARCHIVE_DEPTH = 2  # archives opened inside each other: a zip and a zip in it; one deeper is refused


@dataclass(frozen=True)
class ParseLimits:
    """The limits one import reads its files under; the defaults are the constants above."""

    max_chars: int = MAX_CHARS_PER_FILE
    max_facts: int = MAX_FACTS_PER_FILE
    max_profile_values: int = MAX_PROFILE_VALUES
    max_pdf_content: int = MAX_PDF_CONTENT_BYTES
    seconds: float = PARSE_SECONDS
    memory_bytes: int = PARSE_MEMORY_BYTES
    isolate_above: int = ISOLATE_ABOVE_BYTES
    archive_members: int = MAX_ARCHIVE_MEMBERS
    archive_expanded: int = MAX_ARCHIVE_EXPANDED
    archive_member_bytes: int = MAX_ARCHIVE_MEMBER_BYTES
    compression_ratio: float = MAX_COMPRESSION_RATIO
    archive_depth: int = MAX_ARCHIVE_DEPTH

    def to_json(self) -> dict:
        """The caps the child process applies while parsing (it gets them as JSON)."""
        return {"max_chars": self.max_chars, "max_facts": self.max_facts,
                "max_profile_values": self.max_profile_values, "max_pdf_content": self.max_pdf_content,
                "archive_members": self.archive_members, "archive_expanded": self.archive_expanded,
                "archive_member_bytes": self.archive_member_bytes, "compression_ratio": self.compression_ratio,
                "archive_depth": self.archive_depth}


DEFAULT_LIMITS = ParseLimits()


def isolated(data: bytes, limits: ParseLimits) -> bool:
    """Whether a file is parsed in the child process: PDF, Word, or text over the size threshold."""
    return data.startswith((b"%PDF-", b"PK\x03\x04")) or len(data) > limits.isolate_above


def check_chars(parsed: Parsed, limits: ParseLimits) -> Parsed:
    """Refuse a parse result with more text than one file may yield."""
    if sum(len(record.text) for record in parsed.records) > limits.max_chars:
        raise ImportRejected(too_many_chars(limits))
    return parsed


def too_many_chars(limits: ParseLimits) -> str:
    return (f"the file yields more than {limits.max_chars / 1e6:g} million characters of text, the most read "
            "from one file: split it into smaller files")
