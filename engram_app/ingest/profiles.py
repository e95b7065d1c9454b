"""Profiles: statements (facts) about a named person.

From JSON or YAML objects of attributes, Markdown or text lists of statements, and the
persona/conversation CSV of the Synthetic-Persona-Chat dataset (which also holds chats).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from engram_app.ingest.chats import TURN
from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits, too_many_chars
from engram_app.ingest.records import ImportRejected, Parsed, Record

NAME_KEYS = ("name", "full_name", "fullName", "person", "username")
FIRST_PERSON = re.compile(r"^(i|i'm|i've|i'd|i'll|my|me|we|our|im)\b", re.IGNORECASE)
BULLET = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
PERSONA_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")


def _scalar(value) -> str | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float, str)):
        text = str(value).strip()
        return text or None
    return None


@dataclass
class _Budget:
    """What expanding one attribute profile has cost so far, stopped at the limits.

    A YAML alias (``*name``) stands for its anchor's whole value every time it is used, so a
    few lines of aliases can stand for millions of facts. Values are counted as they are
    visited and facts before their text is built, so a refused profile costs little.
    """

    limits: ParseLimits
    values: int = 0
    facts: int = 0
    chars: int = 0

    def visit(self, values: int, chars: int = 0) -> None:
        self.values += values
        self.chars += chars
        if self.values > self.limits.max_profile_values:
            raise ImportRejected(
                f"the profile holds more than {self.limits.max_profile_values:,} values once its YAML aliases "
                "(*name) are expanded: each use of an alias repeats its whole value; write the values out or "
                "split the profile")
        if self.chars > self.limits.max_chars:
            raise ImportRejected(too_many_chars(self.limits))

    def text(self, value: str) -> str:
        """``value``, counted as it is taken (each item of a list can be a long aliased string)."""
        self.visit(0, len(value) + 2)
        return value

    def fact(self, chars: int = 0) -> None:
        self.facts += 1
        if self.facts > self.limits.max_facts:
            raise ImportRejected(
                f"the profile expands to more than {self.limits.max_facts:,} facts, the most read from one file "
                "(YAML aliases (*name) repeat their whole value each time they are used): split it into "
                "smaller profiles")
        self.visit(0, chars)


def _attribute_facts(data: dict, budget: _Budget, prefix: str = "", depth: int = 0) -> list[str]:
    facts = []
    for key, value in data.items():
        label = f"{prefix}{str(key).replace('_', ' ').strip()}"
        budget.visit(1, len(label))
        if isinstance(value, dict) and depth < 3:
            facts += _attribute_facts(value, budget, prefix=f"{label} ", depth=depth + 1)
        elif isinstance(value, list):
            budget.visit(len(value))
            items = [budget.text(s) for s in (_scalar(v) for v in value) if s]
            if items:
                budget.fact()
                facts.append(f"My {label}: {', '.join(items)}.")
        else:
            text = _scalar(value)
            if text:
                budget.fact(len(text))
                facts.append(f"My {label} is {text}." if not text.endswith(".") else f"My {label} is {text}")
    return facts


def is_attribute_object(data) -> bool:
    """A JSON/YAML object whose values are scalars, lists of scalars or small nested objects."""
    if not isinstance(data, dict) or not data:
        return False
    simple = 0
    for value in data.values():
        if _scalar(value) is not None or (isinstance(value, list) and value and all(_scalar(v) is not None for v in value)):
            simple += 1
        elif isinstance(value, list) and not value:
            continue
        elif not isinstance(value, dict):
            return False
    return simple >= 1


def attributes(data: dict, name: str, fmt: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    """One fact per attribute ("My city is Lisbon."), within the limits on facts and characters."""
    person = next((str(data[k]).strip() for k in NAME_KEYS if _scalar(data.get(k))), None) or name
    rest = {k: v for k, v in data.items() if k not in NAME_KEYS}
    facts = _attribute_facts(rest, _Budget(limits))
    if person != name:
        facts.insert(0, f"My name is {person}.")
    if not facts:
        raise ImportRejected("the profile has no attributes with values")
    return Parsed("profile", fmt, f"Profile: {person}", [Record("fact", f, person=person) for f in facts])


def statement_lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = BULLET.sub("", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def looks_like_statements(text: str) -> bool:
    """Most non-heading lines are short first-person statements ("I have a turtle named Timothy.").

    A file of one such line is a profile too (as "Remember this" reads one typed line): read as a
    document, its fact would never be trained as a fact nor asked by the training's recall check.
    """
    lines = statement_lines(text)
    if not lines or any(len(line) > 300 for line in lines):
        return False
    if len(lines) == 1:
        return FIRST_PERSON.match(lines[0]) is not None
    return sum(1 for line in lines if FIRST_PERSON.match(line)) >= 0.6 * len(lines)


def statements(text: str, name: str) -> Parsed:
    heading = next((l.lstrip("#").strip() for l in text.splitlines() if l.strip().startswith("#")), "")
    person = heading or name
    facts = statement_lines(text)
    if not facts:
        raise ImportRejected("no statements found")
    return Parsed("profile", "statements", f"Profile: {person}"[:120], [Record("fact", f, person=person) for f in facts])


def is_persona_csv(text: str) -> bool:
    header = text.split("\n", 1)[0]
    return all(col in header for col in PERSONA_COLUMNS)


def persona_csv(text: str, name: str) -> Parsed:
    """Synthetic-Persona-Chat: per row, two personas (facts) and their conversation (turns)."""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise ImportRejected(f"the CSV is malformed ({exc})") from exc
    records: list[Record] = []
    for index, row in enumerate(rows):
        for speaker in ("User 1", "User 2"):
            person = f"{speaker} of conversation {index + 1}"
            for line in (row.get(f"{speaker.lower()} personas") or "").splitlines():
                if line.strip():
                    records.append(Record("fact", line.strip(), person=person))
        for line in (row.get("Best Generated Conversation") or "").splitlines():
            match = TURN.match(line)
            if match:
                records.append(Record("turn", match.group(2).strip(), speaker=match.group(1).strip(), conversation=index))
    if not records:
        raise ImportRejected("the persona CSV has no personas or conversations")
    return Parsed("profile", "persona-csv", f"Personas and chats: {len(rows)} conversations", records)
