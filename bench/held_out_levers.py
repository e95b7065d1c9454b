"""Training levers measured on the ten-fact profile and not adopted (docs/BENCHMARKS.md, stop 23).

Kept so that the table's rows can be run again (``bench/held_out_profile.py --frames --cool 0.25
--consolidate 1.75``). Each lever patches the app's own code for this process only:

- ``more_frames``: extra answer sentences per fact pattern ("You named your dog Pixel.", "You like
  teal best." for a favourite, "Your home is in Porto.");
- ``recall_stop(cool, consolidate)``: the job's stop test (``JobRunner._recall_check``) with the
  learning rate multiplied by ``cool`` at the first check that recalls every fact, and training
  going on after "recalled twice in a row" until ``consolidate`` x the steps it took;
- ``skip_template``: new packs' memories key their n-grams past the chat template's tokens
  (``EngramConfig.skip_template``: a reply's first token keyed on the question's last words;
  ``bench/recall.py --skip-template``, stop 29);
- ``lr_horizon(steps)``: the decaying rate reaches its final fraction at step ``steps`` instead of
  at the job's step cap (``bench/recall.py --lr-horizon 40``, stop 32);
- ``ask_frames(frame)``: each fact pattern trained with one more question, the pattern's question
  asked inside a yes/no frame ("Can you tell me what I like?"), so that the memory learns to
  answer a question that does not start with "What"/"Where" (``bench/recall.py --ask-frame``,
  stop 33);
- ``retrieval_you(header)``: the retrieval mode's lines put into the system message in the second
  person, as the memory answers ("I drive a bmw." -> "- You drive a bmw."), under ``header``
  (``bench/recall.py --retrieval-you``, stop 34);
- ``you_told(frame)``: each fact pattern trained with one more answer, its first answer inside
  ``frame`` ("You told me your sister is a pole dancer."), so that a reply whose first token is
  "You" (the frozen model's echo of "Do you remember my sister?") has a trained way on to the fact
  (``bench/recall.py --you-told``, stop 35);
- ``trained_with_retrieval(which)``: question-and-answer phrasings of a fact (all, or those of its
  first question or first answer) trained a second time with the fact's own line in the retrieval
  mode's system message, as memory + retrieval asks it, so that the memory learns to answer in
  the second person while the user's first-person lines are in the prompt
  (``bench/recall.py --trained-with-retrieval``, stop 35); with ``others`` (``--retrieval-others
  N``, stop 39) that system message also holds N of the source's other facts, as the app's k
  nearest lines would;
- ``stop_both_ways()``: the job's stop test asks each fact's trained question twice, memory alone
  and under retrieval's system message holding the fact's line, and stops when both are recalled
  with the margin (``bench/recall.py --stop-both-ways``, with ``--trained-with-retrieval``, stop 35);
- ``system_message(message)``: every conversation without a system message of its own rendered
  with ``message`` as its system message instead of the chat template's default one (SmolLM2's
  "You are a helpful AI assistant named SmolLM, trained by Hugging Face"): the training text, the
  stop test, the anchors and every reply asked, so that the frozen model reads each question as
  one about what the user told it (``bench/recall.py --system-message``, stop 36);
- ``anchors_under_retrieval(lines)``: the anchors also trained under retrieval's system message
  holding ``lines`` of the job's facts, with the base model's reply as before
  (``bench/recall.py --anchors-under-retrieval``, with ``--retrieval-others``, stop 39);
- ``synonym_answers()``: answer sentences in the other words people use for a home, a job, an
  employer, a hometown, and a favourite as "You like teal best." (``bench/held_out_profile.py
  --synonyms``, stop 39);
- ``memory_layers(layers)``: new packs' memories sit at the start of the decoder blocks
  ``layers`` instead of the second block (``EngramConfig.layers``): a deeper block's hidden state,
  which the memory's gate reads, already holds the question (``bench/recall.py --layers``, stop 38;
  adopted as the size presets' ``EngramConfig.depth``).

The decaying learning rate measured here at stop 31 is now the engine's (``TrainOptions.lr_final``);
training on once the facts are learned is an engine option now (``TrainOptions.consolidate``, default
1: measured at 2 at stop 38, not adopted; ``recall_stop``'s ``consolidate`` was its first form, on
stop 23's stop test without a margin).
"""

from __future__ import annotations

import json
import math

from engram_app.inference import prompting
from engram_app.training import dataset, runner, sizes, text, trainer
from engram_app.training.evaluate import recalled
from engram_app.training.trainer import Trainer


def more_frames() -> None:
    """Add the answer sentences of variant A (and C) to the fact patterns."""
    patterns = text._PATTERNS
    named = patterns[0]  # "my X is called Y"
    patterns[0] = text._pattern(named.regex.pattern, named.questions,
                                named.answers + ("You named your {thing} {ans}.",), named.held_out)
    favourite = text._pattern(r"^my (?P<thing>favou?rite [\w' -]{1,30}?) (?P<verb>is|are|was) (?P<ans>.+)$",
                              ("What {verb} my {thing}?", "Tell me my {thing}."),
                              ("Your {thing} {verb} {ans}.", "You like {ans} best."),
                              ("Do you remember my {thing}?", "Remind me, what {verb} my {thing}?"))
    patterns.insert(2, favourite)  # before the general "my X is Y"
    live = next(i for i, p in enumerate(patterns) if "live|reside" in p.regex.pattern)
    home = patterns[live]
    patterns[live] = text._pattern(home.regex.pattern, home.questions, home.answers + ("Your home is in {ans}.",),
                                   home.held_out)


def recall_stop(cool: float = 1.0, consolidate: float = 1.0) -> None:
    """Replace the job's stop test by one that cools the learning rate and/or trains on past "recalled"."""
    trainers: list[Trainer] = []
    original_init = Trainer.__init__

    def remember_trainer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trainers.append(self)

    Trainer.__init__ = remember_trainer

    def scale_learning_rate(trainer: Trainer, factor: float) -> None:
        # the rates the schedule (TrainOptions.lr_final) scales at every step, tables and dense parts
        trainer.optimizer.set_lrs = [[lr * factor for lr in lrs] for lrs in trainer.optimizer.set_lrs]

    def recall_check(self, adapted, tokenizer, probes, options=None):
        # the caller trains with TrainOptions(consolidate=1.0): this test does the training on itself
        state = {"streak": 0, "cooled": False, "until": None}

        def check(step: int) -> bool:
            hits = sum(recalled(adapted, tokenizer, probes))
            state["streak"] = state["streak"] + 1 if hits == len(probes) else 0
            self.say(f"step {step}: recalls {hits} of {len(probes)} facts")
            if state["streak"] == 1 and cool != 1.0 and not state["cooled"]:
                state["cooled"] = True
                scale_learning_rate(trainers[-1], cool)
            if state["streak"] < 2:
                return False
            if consolidate <= 1.0:
                return True
            if state["until"] is None:
                state["until"] = math.ceil(consolidate * step / 10) * 10
            return step >= state["until"]

        return check

    runner.JobRunner._recall_check = recall_check


def skip_template() -> None:
    """New packs' memories skip the chat template's tokens in their n-grams (EngramConfig.skip_template)."""
    preset_config = sizes.SizePreset.engram_config

    def skipping(self):
        config = preset_config(self)
        config.skip_template = True
        return config

    sizes.SizePreset.engram_config = skipping


def lr_horizon(steps: int) -> None:
    """The decaying learning rate (TrainOptions.lr_final) reaching its final fraction at step ``steps``
    (then staying there) instead of at the job's step cap, when the cap is further: most profile
    jobs stop on recall at 30-60 steps of a 100-300 step cap, at 0.6-0.85x the starting rate."""
    schedule = trainer.lr_factor

    def sooner(step: int, total: int, final: float) -> float:
        return schedule(step, min(total, steps), final)

    trainer.lr_factor = sooner


# What each fact pattern (text._PATTERNS, in order) asks, as an embedded question: "what I {verb}".
_EMBEDDED = (
    "what my {thing} {verb} called", "my name", "what my {thing} {verb}", "what my {thing} is called",
    "where I live", "what I do for a living", "where I work", "when I was born", "where I was born",
    "where I grew up", "what I {verb}", "where I'm from", "how many {thing} I have", "what I have",
)


def ask_frames(frame: str = "Can you tell me {q}?") -> None:
    """Each fact pattern trained with one more question: its embedded question inside ``frame``
    (none where that is one of the pattern's held-out questions)."""
    patterns = text._PATTERNS
    assert len(patterns) == len(_EMBEDDED), "a fact pattern without an embedded question"
    for i, (pattern, embedded) in enumerate(zip(patterns, _EMBEDDED)):
        asked = frame.format(q=embedded)
        if asked.lower() in {q.lower() for q in pattern.held_out}:
            continue  # never train a held-out question ("Do you know my name?")
        patterns[i] = text.FactPattern(pattern.regex, pattern.questions + (asked,), pattern.answers,
                                       pattern.held_out)


def retrieval_you(header: str = "What you know about the user:") -> None:
    """The retrieved lines in the second person under ``header`` (inference/prompting.retrieval_message):
    with the user's own first-person lines in the prompt the reply takes their first person
    ("Do you remember what I drive?" -> "I'm a car driver."), where the memory says "You drive a bmw."."""

    app_message = prompting.retrieval_message

    def message(retrieved):
        system = app_message([{**hit, "text": text.second_person(hit["text"])} for hit in retrieved])
        return system and prompting.Message(system.role, system.content.replace(prompting.RETRIEVAL_HEADER, header, 1))

    prompting.retrieval_message = message


def you_told(frame: str = "You told me {answer}") -> None:
    """Each fact pattern trained with one more answer: its first answer inside ``frame``, which starts
    with "You" ("You told me your sister is a pole dancer."). The held-out echo ("Do you remember my
    sister?" -> "You remember your sister?") starts "You" where every trained answer but a few
    starts "Your": nothing was trained for the token after it."""
    patterns = text._PATTERNS
    for i, pattern in enumerate(patterns):
        first = pattern.answers[0]
        told = frame.format(answer=first[:1].lower() + first[1:])
        patterns[i] = text.FactPattern(pattern.regex, pattern.questions, pattern.answers + (told,), pattern.held_out)


JOB_FACTS: list[str] = []  # the facts of the sources the job being built reads (trained_with_retrieval, others > 0)


def trained_with_retrieval(which: str = "all", others: int = 0) -> None:
    """Question-and-answer phrasings of a fact also trained under the system message that memory +
    retrieval would put first, holding the fact's own line (prompting.retrieval_message). With the
    user's first-person lines in the prompt the frozen model answers in their first person ("I'm a
    car driver."), where the memory was trained without them to answer "You drive a bmw.".

    ``which``: "all" the fact's question-and-answer phrasings, "first-question" those asking its
    pattern's first question, "first-answer" those answering with its pattern's first answer.
    ``others``: that many of the same source's other facts in the system message too, as the app's
    retrieval puts its k nearest lines there (the fact's line moving through the positions from one
    phrasing to the next, the others taken in the source's order after it), so that the memory
    learns to answer from the line the question asks about, not from the first line."""
    phrasings = text.fact_phrasings
    source_facts: list[str] = []
    examples_of = dataset.source_examples

    def remembering_facts(db, tokenizer, source_id, max_length):
        source_facts[:] = [r["text"] for r in db.query(
            "select text from records where source_id = ? and kind = 'fact' order by position", [source_id])]
        JOB_FACTS.extend(source_facts)
        return examples_of(db, tokenizer, source_id, max_length)

    if others:
        dataset.source_examples = remembering_facts

    def chosen(pairs: list[tuple[str, str]], conversation: list[dict]) -> bool:
        if conversation[0]["role"] != "user":
            return False
        if which == "first-question":
            return bool(pairs) and conversation[0]["content"] == pairs[0][0]
        if which == "first-answer":
            return bool(pairs) and conversation[1]["content"] == pairs[0][1]
        return True

    def with_retrieval(fact: str) -> list[list[dict]]:
        conversations = phrasings(fact)
        pairs = text.fact_training_pairs(text._sentence(fact))  # as fact_phrasings makes them
        asked = [c for c in conversations if chosen(pairs, c)]
        at = source_facts.index(fact) if fact in source_facts else -1
        extra = [f for f in source_facts[at + 1:] + source_facts[:max(at, 0)] if f != fact][:others]
        trained = []
        for i, conversation in enumerate(asked):
            lines = list(extra)
            lines.insert(i % (len(extra) + 1), fact)
            system = prompting.retrieval_message([{"text": line} for line in lines])
            trained.append([{"role": "system", "content": system.content}, *conversation])
        return conversations + trained

    text.fact_phrasings = with_retrieval
    dataset.fact_phrasings = with_retrieval  # imported by name there


def stop_both_ways() -> None:
    """The job's stop test (runner.answer_margins as JobRunner._recall_check calls it) takes for each
    probe the smaller margin of its question asked alone and asked under retrieval's system message
    holding the probe's fact (None where either reply misses the answer)."""
    from engram_app.training import evaluate

    facts: dict[tuple[str, str], str] = {}
    probes_of = text.fact_probes

    def remembering(fact: str, source_id: int | None = None):
        probes = probes_of(fact, source_id)
        facts.update({(p.prompt, p.answer): fact for p in probes})
        return probes

    dataset.fact_probes = remembering
    alone = runner.answer_margins

    def both_ways(adapted, tokenizer, probes, max_new_tokens: int = 24, batch_size: int = 16):
        plain = alone(adapted, tokenizer, probes, max_new_tokens, batch_size)
        prompts = []
        for probe in probes:
            messages = prompting.with_retrieved([prompting.Message("user", probe.prompt)],
                                                [{"text": facts.get((probe.prompt, probe.answer), "")}])
            rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                     tokenize=False, add_generation_prompt=True)
            prompts.append(tokenizer.encode(rendered, add_special_tokens=False))
        scored = evaluate.generate_batch_scored(adapted.model, tokenizer, prompts, max_new_tokens, batch_size)
        asked = [evaluate.answer_gap(tokenizer, row, leads, p.answer) for p, (row, leads) in zip(probes, scored)]
        return [None if a is None or b is None else min(a, b) for a, b in zip(plain, asked)]

    runner.answer_margins = both_ways


def system_message(message: str) -> None:
    """Every chat rendered without a system message of its own (training text, probes, anchors,
    retention, replies; not the retrieval or profile-in-the-prompt modes, which bring theirs) gets
    ``message`` as its system message, in place of the chat template's default one."""
    from transformers import PreTrainedTokenizerBase

    render = PreTrainedTokenizerBase.apply_chat_template

    def with_system(self, conversation, *args, **kwargs):
        if conversation and isinstance(conversation[0], dict) and \
                not any(turn.get("role") == "system" for turn in conversation):
            conversation = [{"role": "system", "content": message}, *conversation]
        return render(self, conversation, *args, **kwargs)

    PreTrainedTokenizerBase.apply_chat_template = with_system


def memory_layers(layers: list[int]) -> None:
    """New packs' memories at the start of decoder blocks ``layers`` (0-based) instead of block 1."""
    made = sizes.SizePreset.engram_config

    def placed(self):
        config = made(self)
        config.layers = sorted(set(layers))
        return config

    sizes.SizePreset.engram_config = placed


# Words people use for what a fact pattern names, besides the pattern's own (how one asks about a
# home, a job, a favourite): each an answer sentence ending in the words right before the answer.
_SYNONYM_ANSWERS = {
    r"(?:live|reside)": ("Your home is in {ans}.", "You are based in {ans}."),
    r"(?:as an?|as)": ("Your occupation is {article} {ans}.", "Your profession is {article} {ans}."),
    r"(?:at|for)": ("Your employer is {ans}.",),
    r"grew up in": ("Your hometown is {ans}.",),
}


def synonym_answers() -> None:
    """Each of several fact patterns trained with answer sentences in the other words people use
    for what it names ("Your home is in Porto.", "Your occupation is a glassblower."), and a
    favourite ("My favourite colour is teal.") also as "You like teal best.": the frozen model's
    reply echoes the question's word ("Your home is in ..."), and a frame no training text ends in
    has no trained memory row."""
    patterns = text._PATTERNS
    for i, pattern in enumerate(patterns):
        for words, extra in _SYNONYM_ANSWERS.items():
            if words in pattern.regex.pattern:
                patterns[i] = text.FactPattern(pattern.regex, pattern.questions, pattern.answers + extra,
                                               pattern.held_out)
    general = next(i for i, p in enumerate(patterns) if p.regex.pattern.startswith(r"^my (?P<thing>") and
                   "called|named" not in p.regex.pattern)
    favourite = text._pattern(r"^my (?P<thing>favou?rite [\w' -]{1,30}?) (?P<verb>is|are|was) (?P<ans>.+)$",
                              patterns[general].questions,
                              patterns[general].answers + ("You like {ans} best.", "You like {ans} the most."),
                              patterns[general].held_out)
    patterns.insert(general, favourite)


def anchors_under_retrieval(lines: int = 3) -> None:
    """Each anchor (the base model's own reply to a general request) trained a second time under
    memory + retrieval's system message holding ``lines`` of the job's facts (rotating from one anchor
    to the next), with the same reply: retrieval brings the user's nearest lines for every
    question, and a memory trained to answer from them must still leave a general question to the
    frozen model. Needs ``trained_with_retrieval(..., others > 0)``, which records the job's facts."""
    from engram_app.training.text import IGNORE, Example

    made = runner.anchor_examples

    def with_retrieval(adapted, tokenizer, cache, count, max_length=256):
        examples = made(adapted, tokenizer, cache, count, max_length)
        facts, more = list(JOB_FACTS), []
        JOB_FACTS.clear()  # the next job starts afresh
        if not examples or not facts:
            return examples
        data = json.loads(cache.read_text())[:count]
        for i, item in enumerate(data):
            chosen = [facts[(i + j) % len(facts)] for j in range(min(lines, len(facts)))]
            system = prompting.retrieval_message([{"text": line} for line in chosen])
            rendered = tokenizer.apply_chat_template(
                [{"role": "system", "content": system.content}, {"role": "user", "content": item["prompt"]}],
                tokenize=False, add_generation_prompt=True)
            head, tail = tokenizer.encode(rendered, add_special_tokens=False), item["reply_ids"]
            if tail:
                more.append(Example((head + tail)[:max_length], ([IGNORE] * len(head) + tail)[:max_length], -1,
                                    "anchor"))
        return examples + more

    runner.anchor_examples = with_retrieval
