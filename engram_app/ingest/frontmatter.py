"""YAML, read safely: profiles, and the front matter of Markdown files.

Front matter is the block of YAML between two ``---`` lines at the very top of a Markdown file
(Jekyll, Hugo, Obsidian, Zola...): metadata about the note, not its text. Its ``title`` becomes
the source's title; the rest is not turned into text (the sources table keeps no metadata).
"""

from __future__ import annotations

import re

# "---" on the first line, YAML, then "---" (or YAML's "...") on a line of its own.
FRONT_MATTER = re.compile(r"\A---[ \t]*\n(?P<yaml>.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
MARKDOWN_SUFFIXES = (".md", ".markdown")


def safe_yaml(text: str):
    """The value of a YAML text, or None when it is not YAML: plain data only (safe loading, no objects)."""
    import yaml

    # libyaml's loader when PyYAML has it: the same safe objects, several times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None


def split_front_matter(text: str) -> tuple[dict, str]:
    """(the front matter as a mapping, the text after it); ({}, text) when there is none.

    A leading ``---`` that does not open a YAML mapping (a Markdown rule above the text) is text.
    """
    match = FRONT_MATTER.match(text)
    if not match:
        return {}, text
    source = match.group("yaml") or ""
    meta = safe_yaml(source) if source.strip() else {}  # "---" twice: empty front matter, as Jekyll reads it
    if not isinstance(meta, dict):
        return {}, text
    return meta, text[match.end():]


def front_matter_title(meta: dict) -> str | None:
    title = meta.get("title")
    if isinstance(title, (str, int, float)) and str(title).strip():
        return " ".join(str(title).split())[:120]
    return None
