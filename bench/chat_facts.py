"""How many of a person's facts does the app find in their chat? (No model: text rules only.)

For the people of ``bench/recall.py`` (same order, same halves), the facts asked about with a chat
source (held-out questions whose answer words User 1 says in one line of the conversation) and,
of those, the facts whose answer is the short answer of a statement ``text.chat_statements`` takes
from the chat: only those are trained as facts (the rest reach the memory only as chat turns).
Prints the count and every miss with the lines that hold its answer, so a change to the rules can
be judged on the tuning half before the held-out half is run.

    python bench/chat_facts.py --data ../shared/data/ --people 80 --split tuning
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recall import add_people_arguments, choose_probes, people_of, words  # noqa: E402
from bench.results_table import publish  # noqa: E402
from engram_app.training.text import _match, chat_statements  # noqa: E402


def turns(conversation: str) -> list[tuple[str, str]]:
    return [(line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in conversation.splitlines() if ":" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_people_arguments(parser, people=80, split="tuning")
    args = parser.parse_args()

    people = people_of(args.data, args.people, args.split)
    asked = found = statements = 0
    for person in people:
        choose_probes(person, "chat")
        taken = chat_statements(turns(person.conversation))
        statements += len(taken)
        shorts = {found_[2].lower() for found_ in map(_match, taken) if found_}
        for fact in dict.fromkeys(probe["fact"] for probe in person.probes):
            answer = next(p["answer"] for p in person.probes if p["fact"] == fact)
            asked += 1
            if answer.lower() in shorts:
                found += 1
                continue
            lines = [line.strip() for line in person.user_lines() if words(answer) <= words(line)]
            print(f"row {person.row}: {fact!r} (answer {answer!r}) not taken from {lines}; taken: {taken}")
    publish(f"chat-facts-{args.split}-{args.people}", [
        f"Chat facts, {args.split} half of {args.people} people ({len(people)} people):",
        "",
        "| people | statements taken | facts asked | facts whose answer a statement names |",
        "|---|---|---|---|",
        f"| {len(people)} | {statements} | {asked} | {found} ({found / max(asked, 1):.2f}) |",
    ])


if __name__ == "__main__":
    main()
