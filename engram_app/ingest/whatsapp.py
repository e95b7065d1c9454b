"""WhatsApp's "Export chat" text, as the Android and the iPhone apps write it.

Android: ``12/31/23, 9:41 PM - Ana: text`` (or ``31/12/2023, 21:41 - Ana: text``);
iPhone:  ``[31/12/2023, 21:41:05] Ana: text``.

The date's order follows the phone's language settings and the file does not say which it is:
it is read day-first or month-first from the dates themselves (a first number over 12 is a day,
a second number over 12 is a day too), and when every date fits both ways, month-first with a
12-hour clock (the United States' settings) and day-first otherwise, with a warning.

A message continues on the following lines until the next stamped line. Lines without a
``Name:`` (encryption notices, "Ana created group", "Ben added Ana") and messages the iPhone marks
as system messages (their text starts with U+200E) are skipped; deleted-message placeholders too.
Media appear as ``<Media omitted>``, ``IMG-...jpg (file attached)``, ``<attached: ...>`` or
``image omitted``: never turned into text, counted in a warning, and a caption is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from engram_app.ingest.records import ImportRejected, Parsed, Record, plural

_DATE = r"(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})"
_TIME = r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)(?:[\s\u202f]*(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?"
ANDROID = re.compile(rf"^{_DATE},?\s+{_TIME}\s+[-\u2013]\s+(?P<rest>.*)$")
IOS = re.compile(rf"^\[{_DATE},?\s+{_TIME}\]\s+(?P<rest>.*)$")
MARKS = "\u200e\u200f\u202a\u202b\u202c\ufeff"  # direction marks the apps put around names and system text
MEDIA = re.compile(r"^(<Media omitted>|<attached: .+>|.+ \(file attached\)|"
                   r"(image|video|audio|sticker|GIF|document|Contact card) omitted|.+ \u2022 .*<attached: .+>)$",
                   re.IGNORECASE)
DELETED = re.compile(r"^(This message was deleted|You deleted this message)\.?$", re.IGNORECASE)
EDITED = re.compile(r"\s*<This message was edited>$", re.IGNORECASE)
MEDIA_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".opus", ".ogg", ".mp3", ".m4a", ".aac",
                  ".wav", ".mp4", ".3gp", ".mov", ".pdf", ".vcf", ".docx", ".doc", ".xlsx", ".pptx", ".zip"}


def is_media_name(name: str) -> bool:
    """A file a WhatsApp export zip carries beside the chat: photos, voice notes, videos, shared documents."""
    return PurePosixPath(name).suffix.lower() in MEDIA_SUFFIXES


def _stamp(line: str) -> re.Match | None:
    line = line.lstrip(MARKS)
    return ANDROID.match(line) or IOS.match(line)


def looks_like_whatsapp(text: str) -> bool:
    """The first line is stamped the way WhatsApp stamps it, and so are others with a ``Name: text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not _stamp(lines[0]):
        return False
    return sum(1 for line in lines[:200] if (m := _stamp(line)) and ": " in m.group("rest")) >= 2


@dataclass
class _Message:
    date: tuple[int, int, int]
    time: str
    ampm: str | None
    speaker: str
    lines: list[str] = field(default_factory=list)


def _split(text: str) -> tuple[list[_Message], int]:
    """The messages, and how many system lines were skipped."""
    messages: list[_Message] = []
    system = 0
    current: _Message | None = None
    for raw in text.splitlines():
        match = _stamp(raw)
        if match is None:
            if current is not None:
                current.lines.append(raw)
            continue
        current = None
        rest = match.group("rest")
        speaker, sep, body = rest.partition(": ")
        if not sep or not speaker.strip(MARKS + " ") or body.startswith("\u200e") and not _media(body):
            system += 1  # "Ana created group", the encryption notice (iPhone: a Name: with U+200E text)
            continue
        numbers = tuple(int(n) for n in re.split(r"[./-]", match.group("date")))
        current = _Message(numbers, match.group("time"), match.group("ampm"), speaker.strip(MARKS + " "), [body])
        messages.append(current)
    return messages, system


def _media(line: str) -> bool:
    return bool(MEDIA.match(line.strip().strip(MARKS).replace("\u200e", "")))


def _date_order(messages: list[_Message]) -> tuple[str, bool]:
    """("ymd" | "dmy" | "mdy", whether the dates fit both day-first and month-first)."""
    dates = [m.date for m in messages]
    if all(d[0] > 31 for d in dates):
        return "ymd", False
    if any(d[0] > 12 for d in dates):
        return "dmy", False
    if any(d[1] > 12 for d in dates):
        return "mdy", False
    twelve_hour = any(m.ampm for m in messages)
    return ("mdy" if twelve_hour else "dmy"), True


def _timestamp(message: _Message, order: str) -> str | None:
    a, b, c = message.date
    year, month, day = {"ymd": (a, b, c), "dmy": (c, b, a), "mdy": (c, a, b)}[order]
    year += 2000 if year < 100 else 0
    parts = [int(n) for n in re.split(r"[:.]", message.time)] + [0]
    hour, minute, second = parts[0], parts[1], parts[2]
    if message.ampm:
        pm = message.ampm.lower().startswith("p")
        hour = hour % 12 + (12 if pm else 0)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return None
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def parse(text: str, name: str) -> Parsed:
    messages, _ = _split(text)
    if not messages:
        raise ImportRejected("the WhatsApp chat has no messages (only system lines)")
    order, ambiguous = _date_order(messages)
    records: list[Record] = []
    media = deleted = 0
    for message in messages:
        kept = []
        for line in message.lines:
            if _media(line):
                media += 1
            else:
                kept.append(EDITED.sub("", line.strip(MARKS)))
        body = "\n".join(kept).strip()
        if DELETED.match(body):
            deleted += 1
        elif body:
            records.append(Record("turn", body, speaker=message.speaker, timestamp=_timestamp(message, order)))
    if not records:
        raise ImportRejected("the WhatsApp chat has no messages with text (only media or deleted messages)")
    speakers = list(dict.fromkeys(r.speaker for r in records))
    title = name if name.lower().startswith("whatsapp chat") else f"WhatsApp: {', '.join(speakers[:4])}"
    parsed = Parsed("chat", "whatsapp", title[:120], records)
    if media:
        parsed.warnings.append(f"{plural(media, 'media message')} of the chat (photos, voice notes, videos, "
                               "documents) not imported: only text is kept, with a photo's caption")
    if ambiguous:
        reading = "month/day/year" if order == "mdy" else "day/month/year"
        parsed.warnings.append(f"every date in the chat fits both day/month and month/day; they were read as "
                               f"{reading}, the way a phone set to a {'12' if order == 'mdy' else '24'}-hour clock "
                               "writes them")
    return parsed
