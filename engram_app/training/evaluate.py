"""What a version learned and what it cost.

- Memorisation: mean loss on (a sample of) the text trained on, before and after the job.
- Retention: mean loss on text the base model finds natural (its own greedy replies to a fixed
  set of prompts, memory off, generated once per pack), for the base model, and with the memory
  before and after the job. The rise over the base model is the forgetting cost.
- Recall: for each probe (a question and the answer a reply should contain), the greedy reply
  with memory on and off, whether it contains the answer (:func:`contains_answer`: case-insensitive,
  a number as a word or in digits), and the mean
  log-probability of the answer's tokens right after the prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engram_app.atomic import write_text
from engram_app.training.adapters import Adapted
from engram_app.training.text import IGNORE, Example, Probe

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")


def contains_answer(reply: str, answer: str) -> bool:
    """Whether ``reply`` gives ``answer`` (case-insensitive); a number counts as a word or in digits
    ("three" or "3": "You have 3 dogs." answers "How many dogs do I have?" -> "three")."""
    reply, answer = reply.lower(), answer.lower()
    if answer in reply:
        return True
    for word, digits in zip(NUMBER_WORDS, map(str, range(len(NUMBER_WORDS)))):
        for a, b in ((word, digits), (digits, word)):
            if re.search(rf"\b{a}\b", answer):
                spelled = re.sub(rf"\b{a}\b", b, answer)
                if re.search(rf"(?<![\w]){re.escape(spelled)}(?![\w])", reply):
                    return True
    return False


RETENTION_PROMPTS = (
    "Write two sentences about the ocean.",
    "Explain what a computer does, briefly.",
    "Give me a tip for cooking rice.",
    "Describe a busy city street.",
    "What is the capital of France?",
    "Tell me a short fact about the moon.",
    "How do plants grow?",
    "Suggest a name for a small bakery.",
)
REPLY_TOKENS = 40
# General requests whose replies by the base model itself (memory off) are trained alongside a
# pack's facts, so the memory learns to leave the model's general answers as they were (the
# "anchors"). None of them is a retention prompt above: those measure what the anchors protect.
ANCHOR_PROMPTS = (
    "What is two plus three?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "Write one sentence about autumn.",
    "What is the opposite of hot?",
    "Give me a synonym for happy.",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "Translate 'thank you' into French.",
    "Tell me a fun fact about elephants.",
    "What is water made of?",
    "How do I boil an egg?",
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "What language is spoken in Brazil?",
    "Describe a rainy day in one sentence.",
)
ANCHOR_TOKENS = 32


def pad_batch(examples: Sequence[Example], pad_id: int, device) -> dict:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@torch.no_grad()
def mean_loss(model, tokenizer, examples: Sequence[Example], batch_size: int = 8) -> float | None:
    """Token-weighted mean loss over ``examples`` (None when there are none)."""
    if not examples:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_batch(examples[i: i + batch_size], pad_id(tokenizer), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE,
                                                   reduction="sum")
        total += float(losses)
        count += int((targets != IGNORE).sum())
    return total / max(count, 1)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):  # as the chat runtime builds its prompts
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"user: {prompt}\nassistant:")


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int = REPLY_TOKENS) -> tuple[str, list[int]]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id(tokenizer))
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new


@torch.no_grad()
def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Mean log-probability of the answer's tokens right after the prompt (teacher-forced)."""
    device = next(model.parameters()).device
    head = prompt_ids(tokenizer, prompt)
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail], device=device)
    logits = model(input_ids=ids).logits[0, len(head) - 1: -1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tail, device=device)[:, None])
    return float(logprobs.mean())


def probe_result(adapted: Adapted, tokenizer, probe: Probe, memory_on: bool) -> dict:
    model = adapted.model
    if memory_on:
        reply, _ = greedy_reply(model, tokenizer, probe.prompt)
        logprob = answer_logprob(model, tokenizer, probe.prompt, probe.answer)
    else:
        with adapted.off():
            reply, _ = greedy_reply(model, tokenizer, probe.prompt)
            logprob = answer_logprob(model, tokenizer, probe.prompt, probe.answer)
    return {"reply": reply, "contains_answer": contains_answer(reply, probe.answer), "logprob": round(logprob, 4)}


# The stop test's margin: each token of the answer must beat the runner-up by this much (in the
# scores greedy decoding chose by, i.e. nats of log-probability). A fact the greedy reply reaches by
# a hair ("Your dog is called" -> " Pixel" just ahead of " a") came out differently in the chat that
# followed, which answers one question at a time where the check answers a batch. One nat (the
# answer's token at least e times as likely as any other) is a rule of thumb that ended those
# misses in the bundled-model tests, not a guarantee.
RECALL_MARGIN = 1.0


@torch.no_grad()
def recalled(adapted: Adapted, tokenizer, probes: Sequence[Probe], max_new_tokens: int = 24,
             batch_size: int = 16) -> list[bool]:
    """For each probe, whether the greedy reply with memory on contains its answer.

    The training job's stop test (with :func:`answer_margins`), run every few steps: the probes are
    answered in batches (left-padded; a padded position hashes like the start of a sequence) with a
    shorter reply than :func:`probe_result`'s, so a check of 24 facts costs about as much as a few
    training steps. It errs on the side of training on: an answer past ``max_new_tokens`` is not counted.
    """
    replies = generate_batch(adapted.model, tokenizer, [probe.prompt for probe in probes], max_new_tokens, batch_size)
    return [contains_answer(tokenizer.decode(row, skip_special_tokens=True), probe.answer)
            for probe, row in zip(probes, replies)]


@torch.no_grad()
def answer_margins(adapted: Adapted, tokenizer, probes: Sequence[Probe], max_new_tokens: int = 24,
                   batch_size: int = 16) -> list[float | None]:
    """For each probe, how clearly the greedy reply (as :func:`recalled` makes it) gives the answer: the
    smallest lead of the chosen token over the runner-up among the tokens that spell the answer;
    None when the reply does not contain the answer."""
    scored = generate_batch_scored(adapted.model, tokenizer, [prompt_ids(tokenizer, p.prompt) for p in probes],
                                   max_new_tokens, batch_size)
    return [answer_gap(tokenizer, row, leads, probe.answer) for probe, (row, leads) in zip(probes, scored)]


def answer_gap(tokenizer, row: list[int], leads: Sequence[float], answer: str) -> float | None:
    """The smallest of ``leads`` (one per token of ``row``) over the tokens that spell ``answer`` in the
    reply ``row``; None when the reply does not contain it (:func:`contains_answer`).

    The answer's span ends where the match starts to hold for good: a number matched at the end of
    a prefix ("You have 3") can be undone by the next token ("You have 30"), so the span is the last
    occurrence that survives to the end of the reply, and it starts at the last token it still needs.
    """
    def says(ids) -> bool:
        return contains_answer(tokenizer.decode(ids, skip_special_tokens=True), answer)

    if not says(row):
        return None
    end = len(row)
    while end > 1 and says(row[:end - 1]):
        end -= 1
    start = next(j for j in range(end - 1, -1, -1) if says(row[j:end]))
    return min(leads[start:end])


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """The greedy reply (token ids, up to the end-of-sequence token) to each prompt, ``batch_size`` at a
    time, left-padded (a padded position hashes like the start of a sequence)."""
    return generate_batch_ids(model, tokenizer, [prompt_ids(tokenizer, prompt) for prompt in prompts], max_new_tokens,
                              batch_size)


@torch.no_grad()
def generate_batch_ids(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                       batch_size: int = 16) -> list[list[int]]:
    """:func:`generate_batch` for prompts already made into token ids (e.g. with a system message)."""
    return [row for row, _leads in _generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size, scored=False)]


@torch.no_grad()
def generate_batch_scored(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                          batch_size: int = 16) -> list[tuple[list[int], list[float]]]:
    """:func:`generate_batch_ids`, each reply with, per token, the lead of the chosen token's score over
    the best other token's (the scores greedy decoding chose by, after the model's logits processors)."""
    return _generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size, scored=True)


def _generate_batch(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                    scored: bool) -> list[tuple[list[int], list[float]]]:
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    stop = {tokenizer.eos_token_id, pad}
    replies: list[tuple[list[int], list[float]]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = list(prompts[start: start + batch_size])
        width = max(len(p) for p in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, prompt in enumerate(encoded):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, return_dict_in_generate=True, output_scores=scored)
        rows = out.sequences[:, width:]
        leads = [[] for _ in range(len(encoded))]
        if scored:
            scores = torch.stack(out.scores, dim=1).float()  # (batch, steps, vocab): what greedy chose by
            chosen = scores.gather(2, rows[:, :, None].to(scores.device)).squeeze(2)
            others = scores.scatter(2, rows[:, :, None].to(scores.device), float("-inf")).amax(dim=2)
            leads = (chosen - others).tolist()
        for row, lead in zip(rows.tolist(), leads):
            end = next((j for j, token in enumerate(row) if token in stop), len(row))
            keep = end + 1 if end < len(row) and row[end] == tokenizer.eos_token_id else end
            replies.append((row[:keep], lead[:keep]))
    return replies


def held_out_recall(adapted: Adapted, tokenizer, probes: Sequence[Probe]) -> dict:
    """Recall of questions asked in words the training text never used (``Probe.held_out``), memory on
    and off, and per question whether it is remembered yet: what a version's evaluation shows."""
    on = recalled(adapted, tokenizer, probes)
    with adapted.off():
        off = recalled(adapted, tokenizer, probes)
    return {"probes": len(probes), "memory_on": {"recall": round(sum(on) / len(probes), 4)},
            "memory_off": {"recall": round(sum(off) / len(probes), 4)},
            "facts": [{"prompt": p.prompt, "answer": p.answer, "remembered": hit} for p, hit in zip(probes, on)]}


def evaluate_runtime(runtime, probes: Sequence[Probe], progress: Callable[[int, int], None] | None = None) -> dict:
    """:func:`run_probes` on a pack runtime of a shared base model (inference/pools.py); chats with that
    model wait while it runs."""
    with runtime.session():
        return run_probes(runtime.adapted, runtime.tokenizer, probes, progress)


def run_probes(adapted: Adapted, tokenizer, probes: Sequence[Probe],
               progress: Callable[[int, int], None] | None = None) -> dict:
    """The ``eval`` report: every probe with memory on and off, and a summary of each."""
    was_training = adapted.model.training
    adapted.model.eval()
    results = []
    for i, probe in enumerate(probes):
        results.append({"prompt": probe.prompt, "answer": probe.answer,
                        "memory_on": probe_result(adapted, tokenizer, probe, True),
                        "memory_off": probe_result(adapted, tokenizer, probe, False)})
        if progress:
            progress(i + 1, len(probes))
    adapted.model.train(was_training)
    summary = {}
    for side in ("memory_on", "memory_off"):
        if results:
            summary[side] = {
                "recall": round(sum(r[side]["contains_answer"] for r in results) / len(results), 4),
                "mean_logprob": round(sum(r[side]["logprob"] for r in results) / len(results), 4),
            }
        else:
            summary[side] = {"recall": None, "mean_logprob": None}
    return {"probes": results, "summary": summary}


def read_probes(path: Path) -> list[Probe]:
    """Probes from a JSON-lines file of ``{"prompt": ..., "answer": ...}``; errors name the line."""
    from engram_app.errors import EngramError

    probes = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EngramError(f"Cannot read probes from {path}: {exc.strerror or exc}.") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EngramError(f"{path}, line {number}: not JSON ({exc.msg}).") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not isinstance(data.get("answer"), str) \
                or not data["prompt"].strip() or not data["answer"].strip():
            raise EngramError(f'{path}, line {number}: expected {{"prompt": "...", "answer": "..."}} with non-empty strings.')
        probes.append(Probe(data["prompt"], data["answer"]))
    if not probes:
        raise EngramError(f"{path} holds no probes.")
    return probes


def retention_examples(adapted: Adapted, tokenizer, cache: Path, max_length: int = 256) -> list[Example]:
    """The base model's own replies to fixed prompts (memory off), generated once per pack."""
    if cache.is_file():
        data = json.loads(cache.read_text())
    else:
        data = []
        with adapted.off():
            for prompt in RETENTION_PROMPTS:
                reply, ids = greedy_reply(adapted.model, tokenizer, prompt, max_new_tokens=48)
                data.append({"prompt": prompt, "reply": reply, "reply_ids": ids})
        write_text(cache, json.dumps(data, indent=1))
    return reply_examples(tokenizer, data, "retention", max_length)


def anchor_examples(adapted: Adapted, tokenizer, cache: Path, count: int, max_length: int = 256) -> list[Example]:
    """``count`` of the base model's own replies to :data:`ANCHOR_PROMPTS`, with the loss on the reply:
    trained with the facts, they hold the memory's gate shut on general questions (a memory that
    learned only "You ..." replies starts every reply with "You"). Generated once per pack (memory
    off, in batches) and kept in ``cache``, so a resumed job trains on the very same ones."""
    if count <= 0:
        return []
    if cache.is_file():
        data = json.loads(cache.read_text())
    else:
        with adapted.off():
            replies = generate_batch(adapted.model, tokenizer, ANCHOR_PROMPTS, ANCHOR_TOKENS)
        data = [{"prompt": prompt, "reply_ids": ids} for prompt, ids in zip(ANCHOR_PROMPTS, replies)]
        write_text(cache, json.dumps(data, indent=1))
    return reply_examples(tokenizer, data[:count], "anchor", max_length)


def reply_examples(tokenizer, replies: list[dict], kind: str, max_length: int) -> list[Example]:
    """A prompt and the base model's reply ids (``{"prompt", "reply_ids"}``) as examples with the loss on
    the reply; an empty reply gives none."""
    out = []
    for item in replies:
        head, tail = prompt_ids(tokenizer, item["prompt"]), item["reply_ids"]
        if tail:
            out.append(Example((head + tail)[:max_length], ([IGNORE] * len(head) + tail)[:max_length], -1, kind))
    return out


def relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not math.isfinite(before) or before == 0:
        return None
    return round((after - before) / before, 4)
