"""Does the app remember a person? Recall of held-out questions, one person per user, every method.

A PERSON is one row of Synthetic-Persona-Chat: its "user 1 personas" lines (first-person facts)
and its conversation, in which the person is "User 1". The first ``--people`` rows whose persona
has at least two facts with a held-out question (``held_out_probes``: phrased in words the
training text never uses) are taken in file order and split alternately: indexes 0, 2, 4, ... are
the TUNING half, 1, 3, 5, ... the HELD-OUT half. ``--split`` picks the half that runs; the
default is held-out, the half to report. Never tune on it.

Each person is one user of the app: a scratch data root of its own (``scratch_service``), the
persona imported as a profile (``--source profile``) or the conversation as a chat
(``--source chat``: then only facts whose answer words User 1 actually says in one line are
asked), and its own packs trained with the app's budget (``--budget quick`` = 2 min, ``thorough``
= 10 min, as the Train tab's presets, or ``--steps N``). The methods, all in one run:

- base: the model alone (no memory).
- profile-prompt: the persona lines in a system message (always the persona lines, also with
  ``--source chat``: the upper bound of putting everything in the prompt).
- retrieval: the app's retrieval mode (the nearest ``--k`` library lines, those at least
  ``RETRIEVAL_MIN_SCORE`` similar to the question, in the system message).
- engram: an Engram pack (mode "engram").
- lora: a LoRA pack (mode "lora", the rank of the app's PackConfig; the table says which).
- engram+retrieval: the Engram pack and retrieval together (the same pack as "engram").

Reported per method: recall (held-out probes whose greedy reply, at most 40 new tokens, contains
the answer, case-insensitive; a question that two facts of one person would answer differently
is dropped), controls (general questions with a short answer, out of those the base model gets
right: does the method keep the model's general knowledge?), retention cost (trained methods:
the job's loss rise on the base model's own replies, mean over people), and wall-clock and CPU
minutes (``time.process_time`` of this process, training threads included) for training and
answering.

    python bench/recall.py --data ../shared/data/ --people 20 --budget quick
    python bench/recall.py --data ../shared/data/ --people 20 --budget quick --source chat

Smoke run (tiny): ``--people 2 --steps 3 --split tuning``. ``--json PATH`` writes every reply.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import re
import shlex
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import held_out_levers  # noqa: E402
from bench.results_table import publish  # noqa: E402
from bench.train_recall import run_job, scratch_service  # noqa: E402
from engram_app.inference import GenerationOptions, Message  # noqa: E402
from engram_app.models import BUNDLED_NAME  # noqa: E402
from engram_app.service import Service  # noqa: E402
from engram_app.training import TrainOptions  # noqa: E402
from engram_app.training.evaluate import contains_answer  # noqa: E402
from engram_app.training.text import held_out_probes  # noqa: E402

log = logging.getLogger("bench.recall")

METHODS = ("base", "profile-prompt", "retrieval", "engram", "lora", "engram+retrieval")
BUDGETS = {"quick": 2.0, "thorough": 10.0}  # minutes, as engram_app/ui/train_tab.py BUDGETS
REPLY_TOKENS = 40
WANTED_LORA_RANK = 16

# General questions with one short, unambiguous answer (any of the spellings counts, as a whole
# word). None is a retention or anchor prompt of engram_app/training/evaluate.py: the anchors are
# trained on, the retention prompts already give the retention cost.
CONTROLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Japan?", ("Tokyo",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What colour is the sky on a clear day?", ("blue",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What gas do plants take in from the air to make food?", ("carbon dioxide", "CO2")),
    ("What is the capital of Italy?", ("Rome",)),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
)


@dataclass
class Person:
    """One row of the data set: the person's facts, their conversation, and the questions asked."""

    row: int  # index of the row in the CSV (0-based, header excluded)
    facts: list[str]
    conversation: str  # "User 1: ..." / "User 2: ..." lines, starting at the person's first turn
    probes: list[dict] = field(default_factory=list)  # {fact, prompt, answer}
    dropped_ambiguous: int = 0  # held-out questions two facts would answer differently

    def user_lines(self) -> list[str]:
        return [line.split(":", 1)[1] for line in self.conversation.splitlines() if line.startswith("User 1:")]


@dataclass
class Tally:
    """One method's totals over the people run."""

    hits: int = 0
    probes: int = 0
    controls_right: int = 0
    controls: int = 0
    costs: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0


@dataclass
class Shared:
    """What is the same for every person, worked out once: the base model does not change between them.

    ``base_replies``: the base model's greedy reply to a question (the "base" method, the
    controls). ``pack_files``: the files a training job caches in its pack folder on first use,
    the base model's own replies (memory off) to the fixed anchor and retention prompts
    (engram_app/training/runner.py); every later pack gets copies instead of generating them again.
    """

    controls: list[int] | None = None  # indexes into CONTROLS the base model answers right
    base_replies: dict[str, str] = field(default_factory=dict)
    pack_files: dict[str, bytes] = field(default_factory=dict)


PACK_CACHE_FILES = ("anchors.json", "retention.json")


# --- the people ----------------------------------------------------------------------------------

def read_people(data: Path, count: int) -> list[Person]:
    """The first ``count`` rows whose persona has at least two facts with a held-out question."""
    path = data / "synthetic-persona-chat-valid.csv" if data.is_dir() else data
    people: list[Person] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row, record in enumerate(csv.DictReader(handle)):
            facts = [line.strip() for line in record["user 1 personas"].splitlines() if line.strip()]
            if sum(1 for fact in facts if held_out_probes(fact)) < 2:
                continue
            people.append(Person(row, facts, from_first_user_turn(record["Best Generated Conversation"])))
            if len(people) == count:
                break
    return people


def add_people_arguments(parser: argparse.ArgumentParser, people: int, split: str) -> None:
    """--data, --people and --split, as every bench on these people takes them."""
    parser.add_argument("--data", type=Path, required=True, help="folder or CSV of Synthetic-Persona-Chat")
    parser.add_argument("--people", type=int, default=people, help="people in both halves together")
    parser.add_argument("--split", choices=("held-out", "tuning"), default=split)


def people_of(data: Path, count: int, split: str) -> list[Person]:
    """The half ``split`` of the first ``count`` people: tuning = indexes 0, 2, 4, ..., held-out = 1, 3, 5, ..."""
    everyone = read_people(data, count)
    return everyone[0::2] if split == "tuning" else everyone[1::2]


def from_first_user_turn(conversation: str) -> str:
    """The conversation from User 1's first turn: the chat importer takes the first speaker for the user."""
    lines = [line.strip() for line in conversation.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("User 1:")), len(lines))
    return "\n".join(lines[start:])


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def said_by_user(person: Person, answer: str) -> bool:
    """Whether every word of ``answer`` is in one of User 1's lines of the conversation."""
    wanted = words(answer)
    return any(wanted <= words(line) for line in person.user_lines())


def choose_probes(person: Person, source: str) -> None:
    """The person's held-out questions; with a chat source only those about facts User 1 says."""
    probes = [{"fact": fact, "prompt": p.prompt, "answer": p.answer}
              for fact in person.facts for p in held_out_probes(fact)]
    answers: dict[str, set[str]] = {}
    for probe in probes:
        answers.setdefault(probe["prompt"], set()).add(probe["answer"].lower())
    kept = [p for p in probes if len(answers[p["prompt"]]) == 1]
    person.dropped_ambiguous = len(probes) - len(kept)
    if source == "chat":
        kept = [p for p in kept if said_by_user(person, p["answer"])]
    person.probes = kept


# --- one person as one user of the app -------------------------------------------------------------

def import_person(service: Service, home: Path, person: Person, source: str) -> None:
    """The persona as a profile file, or the conversation as a chat transcript, in the library."""
    if source == "profile":
        path = home / f"profile-{person.row}.md"
        path.write_text("".join(f"- {fact}\n" for fact in person.facts), encoding="utf-8")
    else:
        path = home / f"chat-{person.row}.txt"
        path.write_text(person.conversation + "\n", encoding="utf-8")
    result = service.ingest([path], kind=source)
    log.info("row %d: imported %s", person.row, result)


def train(service: Service, mode: str, size: str, options: TrainOptions, shared: Shared) -> dict:
    """A pack of ``mode`` trained on the person's library; the job's result, its rank and times."""
    name = mode.replace("+", "-")
    service.create_pack(name, size=size, mode=mode)
    store = service.packs_store()
    rank = store.config(store.row(name)).lora_r
    folder = store.folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in shared.pack_files.items():
        (folder / file).write_bytes(data)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_job(service, name, options)
    for file in PACK_CACHE_FILES:
        if file not in shared.pack_files and (folder / file).is_file():
            shared.pack_files[file] = (folder / file).read_bytes()
    return {"pack": name, "lora_r": rank, "result": result,
            "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def reply(service: Service, method: str, question: str, person: Person, k: int, shared: Shared) -> str:
    """The greedy reply of ``method`` to ``question`` (nothing saved)."""
    options = GenerationOptions(max_new_tokens=REPLY_TOKENS)
    if method == "base":
        if question not in shared.base_replies:
            shared.base_replies[question] = service.chat(question, options=options, save=False).reply
        return shared.base_replies[question]
    if method == "profile-prompt":
        system = "What the user has told you about themselves:\n" + "\n".join(f"- {f}" for f in person.facts)
        return service.chat(question, [Message("system", system)], options, save=False).reply
    pack = "engram" if method in ("engram", "engram+retrieval") else "lora" if method == "lora" else None
    retrieval = k if method in ("retrieval", "engram+retrieval") else 0
    return service.chat(question, options=options, pack=pack, retrieval=retrieval, save=False).reply


def control_right(answer: str, spellings: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(s)}\b", answer, re.I) for s in spellings)


def base_controls(service: Service, person: Person, shared: Shared) -> list[int]:
    """The indexes of the controls the base model answers right (the others are not asked)."""
    return [i for i, (question, spellings) in enumerate(CONTROLS)
            if control_right(reply(service, "base", question, person, 0, shared), spellings)]


def run_person(person: Person, args, methods: list[str], shared: Shared, tallies: dict[str, Tally],
               options: TrainOptions) -> dict:
    """Import, train and ask for one person in a scratch data root; adds to ``tallies``."""
    service, home = scratch_service(args.device)
    record: dict = {"model": service.settings.model or BUNDLED_NAME, "row": person.row, "facts": person.facts,
                    "probes": person.probes, "dropped_ambiguous": person.dropped_ambiguous, "training": {},
                    "answers": {}}
    try:
        import_person(service, home, person, args.source)
        if shared.controls is None:
            shared.controls = base_controls(service, person, shared)
        trained: dict[str, dict] = {}
        for mode in ("engram", "lora"):
            if mode in methods or (mode == "engram" and "engram+retrieval" in methods):
                trained[mode] = train(service, mode, args.size, options, shared)
                record["training"][mode] = trained[mode]
        for method in methods:
            tally = tallies[method]
            wall, cpu = time.perf_counter(), time.process_time()
            answers = {"probes": [], "controls": []}
            for probe in person.probes:
                text = reply(service, method, probe["prompt"], person, args.k, shared)
                hit = contains_answer(text, probe["answer"])
                answers["probes"].append({"prompt": probe["prompt"], "reply": text, "hit": hit})
                log.info("row %d, %s: %r -> %r (%s)", person.row, method, probe["prompt"], text,
                         "hit" if hit else f"no {probe['answer']!r}")
                tally.hits += hit
                tally.probes += 1
            for i in shared.controls:
                question, spellings = CONTROLS[i]
                text = reply(service, method, question, person, args.k, shared)
                right = control_right(text, spellings)
                answers["controls"].append({"prompt": question, "reply": text, "right": right})
                tally.controls_right += right
                tally.controls += 1
            tally.wall += time.perf_counter() - wall
            tally.cpu += time.process_time() - cpu
            job = trained.get("engram" if method == "engram+retrieval" else method)
            if job is not None:  # engram+retrieval: the engram pack's training counts for it too
                tally.wall += job["wall"]
                tally.cpu += job["cpu"]
                evaluation = job["result"].get("evaluation", {})
                cost = evaluation.get("retention", {}).get("cost")
                if cost is not None:
                    tally.costs.append(cost)
                tally.steps.append(job["result"].get("steps", 0))
            record["answers"][method] = answers
            log.info("row %d, %s: %d/%d probes", person.row, method,
                     sum(a["hit"] for a in answers["probes"]), len(answers["probes"]))
    finally:
        del service
        gc.collect()
        shutil.rmtree(home, ignore_errors=True)  # the models symlink is removed, not followed
    return record


# --- the table ---------------------------------------------------------------------------------------

def fraction(right: int, total: int) -> str:
    return f"{right / total:.2f} ({right}/{total})" if total else "- (0/0)"


def table(args, methods: list[str], tallies: dict[str, Tally], people: list[Person], asked: list[Person],
          controls: list[int], lora_r: int | None, budget: str, model: str) -> list[str]:
    command = "python bench/recall.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    facts = sum(len(p.facts) for p in asked)
    probe_facts = sum(len({q["fact"] for q in p.probes}) for p in asked)
    lines = [
        f"`{command}`",
        "",
        f"Split {args.split}: {len(people)} of {args.people} people ({len(asked)} with a question), "
        f"budget {budget}, source {args.source}, model {model}, device {args.device}, "
        f"pack size {args.size}, retrieval k={args.k}, replies greedy up to {REPLY_TOKENS} tokens. "
        f"{sum(len(p.probes) for p in asked)} held-out probes about {probe_facts} of {facts} facts"
        + (" (only facts whose answer words User 1 says in one line of the chat)" if args.source == "chat" else "")
        + f"; {sum(p.dropped_ambiguous for p in asked)} ambiguous questions dropped. "
        f"Controls: {len(controls)} of {len(CONTROLS)} general questions the base model gets right "
        f"({len(CONTROLS) - len(controls)} dropped). Minutes: wall clock and CPU (process time) of training "
        f"+ answering, all people; engram+retrieval counts the engram pack's training too; the base model's "
        f"replies are worked out once per question (the same for everyone).",
        "",
        "| method | recall | controls | retention cost | steps (mean) | wall min | CPU min |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        tally = tallies[method]
        label = method
        if method == "lora" and lora_r is not None:
            label = f"lora (r{lora_r})" if lora_r == WANTED_LORA_RANK else f"lora (r{lora_r}, not r{WANTED_LORA_RANK})"
        cost = f"{sum(tally.costs) / len(tally.costs):+.0%}" if tally.costs else ""
        steps = f"{sum(tally.steps) / len(tally.steps):.0f}" if tally.steps else ""
        lines.append(f"| {label} | {fraction(tally.hits, tally.probes)} | {tally.controls_right}/{tally.controls} | "
                     f"{cost} | {steps} | {tally.wall / 60:.1f} | {tally.cpu / 60:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_people_arguments(parser, people=20, split="held-out")
    parser.add_argument("--source", choices=("profile", "chat"), default="profile")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="quick")
    parser.add_argument("--steps", type=int, default=None, help="bound training by steps instead of minutes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    parser.add_argument("--k", type=int, default=3, help="library chunks put in the prompt by retrieval")
    parser.add_argument("--size", default="medium", help="pack size preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write every reply, per person and probe, here")
    parser.add_argument("--anchors", type=float, default=TrainOptions.anchors,
                        help="anchor examples (the base model's own replies) per new example, at most 16")
    parser.add_argument("--skip-template", action="store_true",
                        help="a lever not adopted: memories whose n-grams skip the chat template's tokens")
    parser.add_argument("--lr", type=float, default=TrainOptions.lr,
                        help="the learning rate of the dense parts (tables train at 5x), TrainOptions.lr")
    parser.add_argument("--lr-final", "--lr-decay", dest="lr_final", type=float, default=TrainOptions.lr_final,
                        metavar="FINAL", help="the learning rate falls linearly to FINAL x the first over a job's "
                        "step cap (TrainOptions.lr_final; 1: constant, as before stop 32)")
    parser.add_argument("--lr-horizon", type=int, default=None, metavar="STEPS",
                        help="a lever measured: the rate reaches --lr-final at step STEPS, not at the step cap")
    parser.add_argument("--synonyms", action="store_true",
                        help="answers also in other words for a home, a job, a favourite (bench/held_out_levers.synonym_answers)")
    parser.add_argument("--ask-frame", default=None, metavar="FRAME",
                        help="a lever measured: each fact pattern also trained with its question inside FRAME, "
                        "e.g. 'Can you tell me {q}?' ({q}: 'what I like')")
    parser.add_argument("--retrieval-you", action="store_true",
                        help="a lever measured: retrieval's lines in the second person ('You drive a bmw.')")
    parser.add_argument("--you-told", action="store_true",
                        help="a lever measured: each fact also answered 'You told me your sister is a pole dancer.'")
    parser.add_argument("--anchors-under-retrieval", action="store_true",
                        help="with --retrieval-others: the anchors also trained under 3 of the job's facts in that system message")
    parser.add_argument("--retrieval-others", type=int, default=0, metavar="N",
                        help="with --trained-with-retrieval: N of the source's other facts in that system message too")
    parser.add_argument("--trained-with-retrieval", nargs="?", const="all", default=None,
                        choices=("all", "first-question", "first-answer"),
                        help="a lever measured: a fact's questions (all, or those with its first question or "
                        "answer) also trained with its line in retrieval's system message")
    parser.add_argument("--stop-both-ways", action="store_true",
                        help="a lever measured: the stop test asks each question alone and under retrieval's "
                        "system message holding its fact")
    parser.add_argument("--system-message", default=None, metavar="TEXT",
                        help="a lever measured: TEXT as the system message of every chat without one of its own "
                        "(training, stop test, replies), in place of the chat template's default")
    parser.add_argument("--layers", default=None, metavar="L[,L]",
                        help="a lever measured: new packs' memories at these 0-based decoder blocks "
                        "(default: the size presets' middle block)")
    parser.add_argument("--consolidate", type=float, default=TrainOptions.consolidate, metavar="X",
                        help="once a job's stop test says learned at step S, train on to X x S "
                        "(TrainOptions.consolidate; 1, the default: stop at once; 2 measured at stop 38, not adopted)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.skip_template:
        held_out_levers.skip_template()
    if args.lr_horizon is not None:
        held_out_levers.lr_horizon(args.lr_horizon)
    if args.ask_frame:
        held_out_levers.ask_frames(args.ask_frame)
    if args.retrieval_you:
        held_out_levers.retrieval_you()
    if args.you_told:
        held_out_levers.you_told()
    if args.trained_with_retrieval:
        held_out_levers.trained_with_retrieval(args.trained_with_retrieval, args.retrieval_others)
    if args.anchors_under_retrieval:
        held_out_levers.anchors_under_retrieval()
    if args.stop_both_ways:
        held_out_levers.stop_both_ways()
    if args.system_message:
        held_out_levers.system_message(args.system_message)
    if args.synonyms:
        held_out_levers.synonym_answers()
    if args.layers:
        held_out_levers.memory_layers([int(x) for x in args.layers.split(",")])

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    if args.steps is not None:
        options = TrainOptions(max_steps=args.steps, evaluate=True, anchors=args.anchors,
                               lr=args.lr, lr_final=args.lr_final, consolidate=args.consolidate)
        budget = f"steps{args.steps}"
    else:
        options = TrainOptions(max_minutes=BUDGETS[args.budget], evaluate=True, anchors=args.anchors,
                               lr=args.lr, lr_final=args.lr_final, consolidate=args.consolidate)
        budget = args.budget

    people = people_of(args.data, args.people, args.split)
    for person in people:
        choose_probes(person, args.source)
    asked = [p for p in people if p.probes]
    log.info("%d people (%s), %d with a question, %d probes", len(people), args.split, len(asked),
             sum(len(p.probes) for p in asked))

    tallies = {method: Tally() for method in methods}
    shared = Shared()
    records, lora_r = [], None
    for number, person in enumerate(asked, 1):
        log.info("person %d/%d: row %d, %d probes", number, len(asked), person.row, len(person.probes))
        record = run_person(person, args, methods, shared, tallies, options)
        lora_r = record["training"].get("lora", {}).get("lora_r", lora_r)
        records.append(record)
        if args.json:  # after every person: a run cut short keeps what it measured
            write_json(args.json, args, [], shared.controls or [], records)

    model = records[0]["model"] if records else BUNDLED_NAME
    controls = shared.controls or []
    lines = table(args, methods, tallies, people, asked, controls, lora_r, budget, model)
    levers = ("-skip-template" if args.skip_template else "") + \
        (f"-lr-horizon{args.lr_horizon}" if args.lr_horizon is not None else "") + \
        ("-ask-frame" if args.ask_frame else "") + \
        ("-retrieval-you" if args.retrieval_you else "") + \
        ("-you-told" if args.you_told else "") + \
        (f"-trained-with-retrieval-{args.trained_with_retrieval}" if args.trained_with_retrieval else "") + \
        (f"-others{args.retrieval_others}" if args.retrieval_others else "") + \
        ("-anchors-under-retrieval" if args.anchors_under_retrieval else "") + \
        ("-stop-both-ways" if args.stop_both_ways else "") + \
        (f"-system-message-{zlib.crc32(args.system_message.encode()):08x}" if args.system_message else "") + \
        (f"-layers{args.layers.replace(',', '+')}" if args.layers else "") + \
        ("-synonyms" if args.synonyms else "") + \
        (f"-consolidate{args.consolidate:g}" if args.consolidate != TrainOptions.consolidate else "") + \
        (f"-lr{args.lr:g}" if args.lr != TrainOptions.lr else "") + \
        (f"-lr-final{args.lr_final:g}" if args.lr_final != TrainOptions.lr_final else "") + \
        (f"-anchors{args.anchors:g}" if args.anchors != TrainOptions.anchors else "")
    publish(f"recall-{args.split}-{budget}-{args.source}{levers}", lines)
    if args.json:
        write_json(args.json, args, lines, controls, records)


def write_json(path: Path, args, lines: list[str], controls: list[int], records: list[dict]) -> None:
    """The raw results: every person's probes, replies, control answers and training results."""
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": lines,
                                "controls": [CONTROLS[i][0] for i in controls], "people": records}, indent=1))


if __name__ == "__main__":
    main()
