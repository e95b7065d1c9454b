"""Recognising a file from its content (the extension is only a hint) and parsing it.

Order of tests, most specific first: PDF and zip signatures (a Word file, or a chat app's export
archive: ``archives.py``; the library unpacks other zips itself); JSON (ChatGPT, Claude and
Telegram exports, message lists, JSON Lines chats, attribute profiles); YAML profiles; the persona
CSV; HTML; WhatsApp chats; transcripts; statement lists; and finally plain text. Markdown front
matter is set aside first (``frontmatter.py``). The user can force a kind; the parser for that
kind is then used, or the file is rejected with the reason it does not fit. JSON, CSV and YAML
that fit no shape are read as plain text with a warning saying so.
"""

from __future__ import annotations

import json
from pathlib import PurePath

from engram_app.ingest import archives, chats, documents, exports, profiles, whatsapp
from engram_app.ingest.decode import decode_text
from engram_app.ingest.frontmatter import MARKDOWN_SUFFIXES, front_matter_title, safe_yaml, split_front_matter
from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits, check_chars
from engram_app.ingest.records import KINDS, ImportRejected, Parsed

TEXT_FORMATS = {".md": "markdown", ".markdown": "markdown", ".rst": "rst", ".txt": "txt", ".json": "json-text",
                ".jsonl": "json-text", ".csv": "csv-text", ".yaml": "yaml-text", ".yml": "yaml-text"}
# Structured data read as plain text: said so, since its syntax then becomes training text.
AS_TEXT_WARNINGS = {
    "json-text": "read as plain text: this JSON is no chat export, message list or profile the library knows "
                 "(docs/LIBRARY.md lists them), so its keys, quotes and brackets become training text as they are",
    "csv-text": "read as plain text: this CSV is not the persona format, so its header, commas and quotes become "
                "training text as they are",
    "yaml-text": "read as plain text: this YAML is not an object of attributes (a profile), so its keys and "
                 "punctuation become training text as they are",
}


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _is_scalar_json(text: str) -> bool:
    """null, a number or a boolean: valid JSON with nothing to read."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return not _has_text(value)


def _has_text(value, depth: int = 0) -> bool:
    if isinstance(value, str):
        return any(ch.isalnum() for ch in value)
    if depth > 50:
        return False
    if isinstance(value, dict):
        return any(_has_text(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_has_text(v, depth + 1) for v in value)
    return False


def _json_lines(text: str) -> list | None:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    try:
        return [json.loads(line) for line in lines]
    except (ValueError, RecursionError):
        return None


def parse_bytes(data: bytes, filename: str, kind: str = "auto", limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    """Parse one file's bytes; raises :class:`ImportRejected` with a reason.

    Bounded by ``limits`` in characters and facts (not in time or memory: the parser child
    process of ``sandbox.py`` adds those).
    """
    return check_chars(_parse(data, filename, kind, limits), limits)


def _parse(data: bytes, filename: str, kind: str, limits: ParseLimits) -> Parsed:
    if kind != "auto" and kind not in KINDS:
        raise ImportRejected(f"unknown kind {kind!r}: use auto, {', '.join(KINDS)}")
    name = PurePath(filename).stem or "untitled"
    suffix = PurePath(filename).suffix.lower()
    if not data:
        raise ImportRejected("the file is empty")

    if data.startswith(b"%PDF-"):
        return _only(documents.pdf(data, name, limits), kind)
    if archives.is_zip(data):
        if archives.classify(data, filename, limits) == "word":
            return _only(documents.docx(data, name), kind)
        return archives.parse_export(data, name, kind, limits)
    if suffix in (".pdf", ".docx"):
        raise ImportRejected(f"the file is named {suffix} but is not a {suffix[1:].upper()} file")

    text = decode_text(data)
    if suffix not in MARKDOWN_SUFFIXES:
        return _parse_text(text, suffix, name, kind, limits)
    meta, body = split_front_matter(text)
    if not body.strip():
        raise ImportRejected("the Markdown file holds front matter (its --- block of metadata) and no text")
    parsed = _parse_text(body, suffix, name, kind, limits)
    parsed.title = front_matter_title(meta) or parsed.title
    return parsed


def _parse_text(text: str, suffix: str, name: str, kind: str, limits: ParseLimits) -> Parsed:
    stripped = text.lstrip()
    if suffix == ".json" and stripped[:1] not in "[{" and _is_scalar_json(text):
        raise ImportRejected("the JSON holds no text (no string values)")
    if kind == "document":
        return _as_document(text, suffix, name)

    if stripped[:1] in "[{":
        data_obj = _json(text)
        if data_obj is not None:
            if kind in ("auto", "chat"):
                if exports.is_chatgpt_export(data_obj):
                    return exports.chatgpt(data_obj, name)
                if exports.is_claude_export(data_obj):
                    return exports.claude(data_obj, name)
                if exports.is_telegram_export(data_obj):
                    return exports.telegram(data_obj, name)
            msgs = chats.message_list(data_obj)
            if msgs is not None and kind in ("auto", "chat"):
                return chats.messages(msgs, name)
            if profiles.is_attribute_object(data_obj) and kind in ("auto", "profile"):
                return profiles.attributes(data_obj, name, "profile-json", limits)
            if kind != "auto":
                raise ImportRejected(f"this JSON has no {kind} shape (expected "
                                     + ("a ChatGPT, Claude or Telegram export or a list of {role, content} messages)"
                                        if kind == "chat" else "an object of attributes)"))
            if not _has_text(data_obj):
                raise ImportRejected("the JSON holds no text (no string values)")
            return _as_text(text, "json-text", name)
        lines = _json_lines(text)
        if lines is not None:
            msgs = chats.message_list(lines)
            if msgs is not None and kind in ("auto", "chat"):
                return chats.messages(msgs, name, fmt="jsonl-messages")
    if suffix in (".yaml", ".yml") and kind in ("auto", "profile"):
        obj = safe_yaml(text)
        if profiles.is_attribute_object(obj):
            return profiles.attributes(obj, name, "profile-yaml", limits)
        if kind == "profile":
            raise ImportRejected("this YAML is not an object of attributes")
    if profiles.is_persona_csv(text) and kind in ("auto", "profile", "chat"):
        return profiles.persona_csv(text, name)

    if whatsapp.looks_like_whatsapp(text) and kind in ("auto", "chat"):
        return whatsapp.parse(text, name)
    if kind == "chat":
        return chats.transcript(text, name)
    if kind == "profile":
        return profiles.statements(text, name)

    if suffix in (".html", ".htm") or stripped[:15].lower().startswith(("<!doctype html", "<html")):
        return documents.html(text, name)
    if chats.looks_like_transcript(text):
        return chats.transcript(text, name)
    if profiles.looks_like_statements(text):
        return profiles.statements(text, name)
    return _as_document(text, suffix, name)


def _as_document(text: str, suffix: str, name: str) -> Parsed:
    if suffix in (".html", ".htm") or text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        return documents.html(text, name)
    return _as_text(text, TEXT_FORMATS.get(suffix, "txt"), name)


def _as_text(text: str, fmt: str, name: str) -> Parsed:
    """A plain-text document; structured data (JSON, CSV, YAML) read this way carries a warning."""
    parsed = documents.plain(text, fmt, name)
    if fmt in AS_TEXT_WARNINGS:
        parsed.warnings.append(AS_TEXT_WARNINGS[fmt])
    return parsed


def _only(parsed: Parsed, kind: str) -> Parsed:
    if kind not in ("auto", parsed.kind):
        raise ImportRejected(f"a {parsed.format.upper()} file can only be imported as a document, not as a {kind}")
    return parsed
