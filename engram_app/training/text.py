"""Training text by kind: what the memory reads for each source.

- Documents: their chunks as plain language-modelling text.
- Chats: rendered with the base model's chat template; the loss covers every turn (the user's
  own words are what tell us about the user), not the template's default system prompt.
- Profiles: each fact in several phrasings: the statement itself, the statement said to the
  assistant, and question/answer turns in the chat template ("What is my dog called?" ->
  "Your dog is called Pixel."), because a model learns a fact far better from paraphrases than
  from one sentence (Ovadia et al. 2023). The same question patterns give recall probes.

Phrasing is rule-based (first person -> second person, a handful of sentence patterns): it is
predictable, fast, needs no model, and a fact no pattern matches still gets the generic
phrasings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE = -100

GENERIC_QUESTIONS = (
    "What do you know about me?",
    "Tell me something about myself.",
    "What do you remember about me?",
)

_SECOND_PERSON = {
    "i": "you", "i'm": "you're", "im": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll",
    "my": "your", "mine": "yours", "me": "you", "myself": "yourself", "am": "are",
    "we": "you", "our": "your", "ours": "yours", "us": "you", "ourselves": "yourselves",
}
_WORD = re.compile(r"[A-Za-z']+|[^A-Za-z']+")


@dataclass
class Example:
    """One training sequence: token ids, labels (IGNORE where no loss), the source and chunk it came from.

    ``chunk_id`` is the library chunk (``chunks.id``) whose text the sequence renders: a
    document's chunk, the chunk holding a chat's turns, the chunk holding a profile fact (for
    every phrasing of that fact). The slot index records it, so the inspector shows the very
    passage that wrote a memory row. None for sequences from no chunk (evaluation texts).
    """

    ids: list[int]
    labels: list[int]
    source_id: int
    kind: str  # document | chat | profile | retention
    chunk_id: int | None = None

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class Probe:
    """A question whose reply should contain ``answer`` once the memory holds the fact."""

    prompt: str
    answer: str
    source_id: int | None = None

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


# --- phrasing ---------------------------------------------------------------------------------

def second_person(statement: str, capitalize: bool = True) -> str:
    """'I have a turtle named Timothy.' -> 'You have a turtle named Timothy.'"""
    out = []
    previous = ""
    for piece in _WORD.findall(statement.strip()):
        lower = piece.lower()
        if lower in ("was",) and previous == "i":
            word = "were"
        else:
            word = _SECOND_PERSON.get(lower, piece)
            if word != piece and piece[:1].isupper():
                word = word[:1].upper() + word[1:]
        if piece.strip():
            previous = lower
        out.append(word)
    text = "".join(out)
    return text[:1].upper() + text[1:] if capitalize else text


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _short_answer(text: str) -> str:
    """The key words of an answer: up to the first comma, 'and', 'because', 'who' or 'which'."""
    head = re.split(r",|;| and | but | because | who | which | that | since | so ", text, maxsplit=1)[0]
    head = re.sub(r"^(?:a|an|the|to)\s+", "", head.strip(" .!?\"'"), flags=re.I)
    return head.strip()


# Each pattern: a regex on the fact (first person, no trailing punctuation), a question
# template and a second-person answer template; ``ans`` is the span a reply must contain.
_PATTERNS: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"^my (?P<thing>[\w' -]{1,40}?) (?P<verb>is|are|was) (?:called|named) (?P<ans>.+)$", re.I),
     "What {verb} my {thing} called?", "Your {thing} {verb} called {ans}."),
    (re.compile(r"^my name is (?P<ans>.+)$", re.I), "What is my name?", "Your name is {ans}."),
    (re.compile(r"^my (?P<thing>[\w' -]{1,40}?) (?P<verb>is|are|was) (?P<ans>.+)$", re.I),
     "What {verb} my {thing}?", "Your {thing} {verb} {ans}."),
    (re.compile(r"^i have an? (?P<thing>[\w' -]{1,40}?) (?:called|named) (?P<ans>.+)$", re.I),
     "What is my {thing} called?", "Your {thing} is called {ans}."),
    (re.compile(r"^i (?:live|reside) in (?P<ans>.+)$", re.I), "Where do I live?", "You live in {ans}."),
    (re.compile(r"^i work (?:as an?|as) (?P<ans>.+)$", re.I), "What do I do for a living?", "You work as {article} {ans}."),
    (re.compile(r"^i work (?:at|for) (?P<ans>.+)$", re.I), "Where do I work?", "You work at {ans}."),
    (re.compile(r"^i was born in (?P<ans>.+)$", re.I), "Where was I born?", "You were born in {ans}."),
    (re.compile(r"^i grew up in (?P<ans>.+)$", re.I), "Where did I grow up?", "You grew up in {ans}."),
    (re.compile(r"^i (?P<verb>like|love|enjoy|hate|play|drive|speak|own|study|collect) (?P<ans>.+)$", re.I),
     "What do I {verb}?", "You {verb} {ans}."),
    (re.compile(r"^i(?:'m| am) (?:from) (?P<ans>.+)$", re.I), "Where am I from?", "You are from {ans}."),
    (re.compile(r"^i have (?P<ans>.+)$", re.I), "What do I have?", "You have {ans}."),
]


def fact_questions(fact: str) -> list[tuple[str, str, str]]:
    """(question, answer sentence, short answer) for a first-person fact; [] when no pattern fits."""
    core = fact.strip().rstrip(".!").strip()
    for pattern, question, answer in _PATTERNS:
        match = pattern.match(core)
        if not match:
            continue
        fields = {k: v.strip() for k, v in match.groupdict().items() if v}
        fields["thing"] = second_person(fields.get("thing", ""), capitalize=False)
        fields["article"] = "an" if fields["ans"][:1].lower() in "aeiou" else "a"
        fields["ans"] = second_person(fields["ans"], capitalize=False)
        short = _short_answer(fields["ans"])
        if not short:
            continue
        q = question.format(**fields)
        q = q[:1].upper() + q[1:]
        return [(q, answer.format(**fields), short)]
    return []


def fact_phrasings(fact: str) -> list[list[dict]]:
    """The conversations (lists of chat messages) a fact is trained as; the first is plain text."""
    fact = _sentence(fact)
    told = _sentence(second_person(fact))
    conversations = [
        [{"role": "text", "content": fact}],
        [{"role": "user", "content": fact}, {"role": "assistant", "content": f"Noted: {told[:1].lower()}{told[1:]}"}],
    ]
    for question in GENERIC_QUESTIONS[:2]:
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": told}])
    for question, answer, _short in fact_questions(fact):
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": told}])
    return conversations


def fact_probes(fact: str, source_id: int | None = None) -> list[Probe]:
    return [Probe(q, short, source_id) for q, _answer, short in fact_questions(fact)]


# --- tokenisation -----------------------------------------------------------------------------

def text_example(tokenizer, text: str, source_id: int, kind: str, max_length: int,
                 chunk_id: int | None = None) -> Example:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < max_length:
        ids = ids + [eos]
    return Example(ids, list(ids), source_id, kind, chunk_id)


def chat_example(tokenizer, messages: list[dict], source_id: int, kind: str, max_length: int,
                 loss_roles: tuple[str, ...] = ("user", "assistant"), chunk_id: int | None = None) -> Example:
    """``messages`` rendered with the chat template; loss on the turns whose role is in ``loss_roles``.

    Each turn's span is found by rendering the conversation up to it (chat templates render a
    prefix of a conversation as a prefix of the whole), so the template's own preamble (a
    default system prompt) is left out of the loss.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    bounds = []
    for i, message in enumerate(messages):
        if i == 0:
            empty = tokenizer.apply_chat_template([{**message, "content": ""}], tokenize=False)
            start = len(_common_prefix(empty, full))
        else:
            start = bounds[-1][1]
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        bounds.append((start, end, message["role"]))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for start, end, role in bounds:
        if role not in loss_roles:
            continue
        for j, (a, b) in enumerate(offsets):
            if a >= start and b <= end and b > a:
                labels[j] = ids[j]
    return Example(ids[:max_length], labels[:max_length], source_id, kind, chunk_id)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def conversation_example(tokenizer, conversation: list[dict], source_id: int, kind: str, max_length: int,
                         chunk_id: int | None = None) -> Example:
    """A phrasing from :func:`fact_phrasings`: plain text, or chat turns with loss on the reply."""
    if conversation[0]["role"] == "text":
        return text_example(tokenizer, conversation[0]["content"], source_id, kind, max_length, chunk_id)
    return chat_example(tokenizer, conversation, source_id, kind, max_length, loss_roles=("assistant",),
                        chunk_id=chunk_id)


def turns_as_messages(turns: list[tuple[str | None, str]]) -> list[dict]:
    """Chat turns with any speaker names -> user/assistant messages for the chat template.

    'user'/'assistant' (and 'human'/'ai', 'me'/'bot') keep their role; other speakers alternate
    in order of appearance: the first one is the user (the person whose history this is).
    """
    aliases = {"user": "user", "human": "user", "me": "user", "you": "user",
               "system": "system", "assistant": "assistant", "ai": "assistant", "bot": "assistant", "chatgpt": "assistant", "gpt": "assistant"}
    order: dict[str, str] = {}
    out = []
    for speaker, text in turns:
        key = (speaker or "").strip().lower()
        role = aliases.get(key)
        if role is None:
            if key not in order:
                order[key] = "user" if len(order) % 2 == 0 else "assistant"
            role = order[key]
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    return out
