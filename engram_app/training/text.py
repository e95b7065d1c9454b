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
    held_out: bool = False  # asked in words the training text never uses (evaluation only, never the stop test)

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


# Each pattern: a regex on the fact (first person, no trailing punctuation); the questions it is
# trained with; the answer sentences it is trained with (second person), each ending in words that
# name the fact ("...your dog is called" -> "Pixel"), because the memory keys on the last two or
# three tokens before the answer: "Your dog's name is" would end in "name is", shared by every
# pet; and held-out questions, never trained, asked by evaluation and the benchmarks to measure
# recall in words the training text did not use. The first question and answer are the fact's
# probe and its plain answer. ``ans`` is the span a reply must contain.
@dataclass(frozen=True)
class FactPattern:
    regex: re.Pattern
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    held_out: tuple[str, ...]


def _pattern(regex: str, questions: tuple[str, ...], answers: tuple[str, ...], held_out: tuple[str, ...]) -> FactPattern:
    return FactPattern(re.compile(regex, re.I), questions, answers, held_out)


_PATTERNS: list[FactPattern] = [
    _pattern(r"^my (?P<thing>[\w' -]{1,40}?) (?P<verb>is|are|was) (?:called|named) (?P<ans>.+)$",
             ("What {verb} my {thing} called?", "What is the name of my {thing}?"),
             ("Your {thing} {verb} called {ans}.", "The name of your {thing} is {ans}.", "Your {thing}'s name is {ans}."),
             ("Do you remember what my {thing} is called?", "What name does my {thing} have?")),
    _pattern(r"^my name is (?P<ans>.+)$", ("What is my name?", "What am I called?"),
             ("Your name is {ans}.", "You are called {ans}."),
             ("Do you know my name?", "What should you call me?")),
    _pattern(r"^my (?P<thing>[\w' -]{1,40}?) (?P<verb>is|are|was) (?P<ans>.+)$",
             ("What {verb} my {thing}?", "Tell me my {thing}."),
             ("Your {thing} {verb} {ans}.",),
             ("Do you remember my {thing}?", "Remind me, what {verb} my {thing}?")),
    _pattern(r"^i have an? (?P<thing>[\w' -]{1,40}?) (?:called|named) (?P<ans>.+)$",
             ("What is my {thing} called?", "What is the name of my {thing}?"),
             ("Your {thing} is called {ans}.", "You have {article_thing} {thing} called {ans}.",
              "You named your {thing} {ans}.", "Your {thing}'s name is {ans}."),
             ("What did I name my {thing}?", "Do you remember my {thing}'s name?")),
    _pattern(r"^i (?:live|reside) in (?P<ans>.+)$", ("Where do I live?", "Which city do I live in?"),
             ("You live in {ans}.",),
             ("Where is my home?", "Where am I living these days?")),
    _pattern(r"^i work (?:as an?|as) (?P<ans>.+)$", ("What do I do for a living?", "What is my job?"),
             ("You work as {article} {ans}.", "Your job is {article} {ans}."),
             ("What's my profession?", "What kind of work do I do?")),
    _pattern(r"^i work (?:at|for) (?P<ans>.+)$", ("Where do I work?", "Who do I work for?"),
             ("You work at {ans}.", "Your workplace is {ans}."),
             ("Which company employs me?", "Where is my job?")),
    # A time ("I was born in the early 80 s.", "in 1990", "in May") is not a birthplace.
    _pattern(r"^i was born in (?P<ans>(?=.*(?:\d|\b(?:the (?:early|late|mid)|january|february|march|april|may|june|"
             r"july|august|september|october|november|december|spring|summer|autumn|fall|winter)\b)).+)$",
             ("When was I born?", "What is my time of birth?"),
             ("You were born in {ans}.", "Your birth was in {ans}."),
             ("Do you remember when I was born?", "Around what time was I born?")),
    _pattern(r"^i was born in (?P<ans>.+)$", ("Where was I born?", "What is my birthplace?"),
             ("You were born in {ans}.", "Your birthplace is {ans}."),
             ("In which place was I born?", "Where is my place of birth?")),
    _pattern(r"^i grew up in (?P<ans>.+)$", ("Where did I grow up?", "Where was I raised?"),
             ("You grew up in {ans}.", "You were raised in {ans}."),
             ("Where did I spend my childhood?", "Which place did I grow up in?")),
    _pattern(r"^i (?P<verb>like|love|enjoy|hate|play|drive|speak|own|study|collect) (?P<ans>.+)$",
             ("What do I {verb}?", "Tell me what I {verb}."),
             ("You {verb} {ans}.",),
             ("Do you remember what I {verb}?", "What is it that I {verb}?")),
    _pattern(r"^i(?:'m| am) (?:from) (?P<ans>.+)$", ("Where am I from?", "Where do I come from?"),
             ("You are from {ans}.", "You come from {ans}."),
             ("Which place am I from?", "Do you remember where I'm from?")),
    # A count ("I have three children."): asked "how many", answered with the thing last, the
    # words the memory keys on ("...children you have is" -> "three").
    _pattern(r"^i have (?P<ans>\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve) "
             r"(?P<thing>[a-z']+(?: [a-z']+)?)$",
             ("How many {thing} do I have?", "Tell me how many {thing} I have."),
             ("You have {ans} {thing}.", "The number of {thing} you have is {ans}."),
             ("Do you remember how many {thing} I have?", "What's the number of {thing} I have?")),
    _pattern(r"^i have (?P<ans>.+)$", ("What do I have?", "Tell me what I have."),
             ("You have {ans}.",),
             ("Do you remember what I have?", "What is it that I have?")),
]


def _match(fact: str) -> tuple[FactPattern, dict, str] | None:
    """The first pattern a first-person fact matches, its fields and the short answer; None: no pattern."""
    core = fact.strip().rstrip(".!").strip()
    for pattern in _PATTERNS:
        match = pattern.regex.match(core)
        if not match:
            continue
        fields = {k: v.strip() for k, v in match.groupdict().items() if v}
        fields["thing"] = second_person(fields.get("thing", ""), capitalize=False)
        fields["article"] = "an" if fields["ans"][:1].lower() in "aeiou" else "a"
        fields["article_thing"] = "an" if fields["thing"][:1].lower() in "aeiou" else "a"
        fields["ans"] = second_person(fields["ans"], capitalize=False)
        short = _short_answer(fields["ans"])
        if short:
            return pattern, fields, short
    return None


def _fill(template: str, fields: dict) -> str:
    text = template.format(**fields)
    return text[:1].upper() + text[1:]


def fact_questions(fact: str) -> list[tuple[str, str, str]]:
    """(question, answer sentence, short answer) for a first-person fact; [] when no pattern fits."""
    found = _match(fact)
    if found is None:
        return []
    pattern, fields, short = found
    return [(_fill(pattern.questions[0], fields), _fill(pattern.answers[0], fields), short)]


def fact_training_pairs(fact: str) -> list[tuple[str, str]]:
    """Every (question, answer sentence) a fact is trained with: each trained question with each answer."""
    found = _match(fact)
    if found is None:
        return []
    pattern, fields, _short = found
    return [(_fill(q, fields), _fill(a, fields)) for q in pattern.questions for a in pattern.answers]


def fact_phrasings(fact: str) -> list[list[dict]]:
    """The conversations (lists of chat messages) a fact is trained as; the first is plain text."""
    fact = _sentence(fact)
    told = _sentence(second_person(fact))
    conversations = [[{"role": "text", "content": fact}]]
    for question in GENERIC_QUESTIONS[:2]:
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": told}])
    pairs = fact_training_pairs(fact)
    for question, answer in pairs:
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    if pairs:
        conversations.append([{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": told}])
    return conversations


def fact_probes(fact: str, source_id: int | None = None) -> list[Probe]:
    """The fact's trained question (the training job's stop test asks it)."""
    return [Probe(q, short, source_id) for q, _answer, short in fact_questions(fact)]


def held_out_probes(fact: str, source_id: int | None = None) -> list[Probe]:
    """Questions about the fact in words its training text never uses (evaluation, benchmarks)."""
    found = _match(fact)
    if found is None:
        return []
    pattern, fields, short = found
    return [Probe(_fill(q, fields), short, source_id, held_out=True) for q in pattern.held_out]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NOT_ABOUT_THE_USER = re.compile(r"\b(?:you|your|yours|we|us|our)\b|\?", re.I)
_VAGUE = {"that", "this", "it", "those", "these", "them", "one", "too", "so", "much", "all", "things", "stuff", "lot",
          "a", "the", "to", "very", "really", "of", "fun", "good", "great", "about", "play", "do", "go"}
# An answer that starts with one of these points at something said before ("I love them to death.",
# "I love that show!", "I have no idea."): it says nothing about the user on its own.
_POINTING = {"it", "them", "him", "her", "they", "there", "that", "this", "those", "these", "his", "their",
             "another", "no", "such"}
# What people "have" in a conversation with an assistant, not about themselves ("I have a question.").
_CONVERSATIONAL = {"question", "questions", "problem", "problems", "idea", "clue", "issue", "issues", "doubt",
                   "suggestion", "request", "feeling", "thought", "error", "follow-up", "favor", "favour"}
# Where one sentence of a chat holds two clauses: "..., but my favourite is X", "...; ...", "... and I
# love them", and a question after a comma ("I'm George, what's your name?"), whose clause is then
# dropped as any question is, keeping the statement before it.
_CLAUSE_BREAK = re.compile(
    r",?\s+but\s+|;\s*|,?\s+and\s+(?=(?:i|i'm|i've|my)\b)"
    r"|,\s*(?=(?:what|what's|how|where|who|when|why|which|do|does|did|are|is|have|can|could|would|will)\b)",
    re.I)
# "I have a pet cow and drive a big truck.": the verb after "and" shares the clause's "I".
_SHARED_SUBJECT = re.compile(
    r",?\s+and\s+(?=(?:like|love|enjoy|hate|play|drive|speak|own|study|collect|live|work|have|grew)\b)", re.I)
_NOT_PLAIN = re.compile(r"\b(?:to|not|never|can|could|would|should|might|will|want|wanted|wish|used|who|"
                        r"that|which|think|hope|if|when)\b|n't\b", re.I)
_TOO = re.compile(r"\s*,?\s+(?:too|as well)(?=[.!]*$)", re.I)
_LEAD_IN = re.compile(r"^(?:(?:yes|yeah|yep|oh|well|wow|haha|lol|hi|hello|hey|sure|no|nope|ok|okay|honestly|"
                      r"actually|so|and|but|also|thanks|cool|great|nice|there)\b[,!.]?\s+)+(?=(?:i|i'm|my)\b)", re.I)
_ADVERB = re.compile(r"^(i(?:'m| am)?)\s+(?:also|really|just|still|actually|truly|absolutely|definitely|"
                     r"especially|mostly|usually|currently|only)\s+", re.I)


def _clauses(sentence: str) -> list[str]:
    """A chat sentence's clauses, each a sentence of its own, lead-ins ("Yeah, ") and "also" taken out."""
    out = []
    for clause in _CLAUSE_BREAK.split(sentence.strip()):
        clause = _ADVERB.sub(r"\1 ", _LEAD_IN.sub("", _TOO.sub("", clause.strip())))
        parts = _SHARED_SUBJECT.split(clause, maxsplit=1) if re.match(r"i\s", clause, re.I) else [clause]
        # "I have a cow and drive a truck." is two facts; "I want to move to Spain and work as a
        # teacher.", "I used to live in Paris and ...", "I have two sons who play hockey and love
        # pizza." are not: the first part must be a plain fact itself.
        if len(parts) == 2 and (_NOT_PLAIN.search(parts[0]) or _match(parts[0]) is None):
            parts = [clause]
        out.extend([parts[0]] + ["I " + part for part in parts[1:]])
    if len(out) == 1 and out[0] == sentence.strip():
        return out
    out = [c[:1].upper() + c[1:] for c in map(str.strip, out) if c]
    return [c if re.search(r"[.!?][\"')\]]*$", c) else c + "." for c in out]


_MAX_SENTENCE = 400  # characters
_GREETING = re.compile(r"^\W*(?:hi|hello|hey|hiya|good (?:morning|afternoon|evening)|nice to meet you)\b", re.I)
_INTRODUCTION = re.compile(r"^I(?:'m| am) (?P<name>[^\W\d_]+)[.!]?$")
# Capitalised words after "I'm" that are not names (titles, nationalities, faiths, greetings' echoes).
_NOT_NAMES = {
    "dr", "mr", "mrs", "ms", "miss", "sir", "madam", "prof", "professor", "here", "back", "new", "fine", "good",
    "great", "okay", "ok", "sorry", "glad", "happy", "well", "so", "not", "also", "just", "american", "canadian",
    "mexican", "british", "english", "scottish", "welsh", "irish", "french", "german", "dutch", "spanish",
    "italian", "portuguese", "greek", "russian", "polish", "swedish", "norwegian", "danish", "finnish", "swiss",
    "austrian", "chinese", "japanese", "korean", "vietnamese", "thai", "filipino", "indian", "pakistani",
    "african", "nigerian", "kenyan", "egyptian", "brazilian", "argentinian", "colombian", "peruvian", "chilean",
    "cuban", "australian", "asian", "european", "latino", "latina", "hispanic", "christian", "catholic",
    "protestant", "jewish", "muslim", "hindu", "buddhist", "atheist", "vegan", "vegetarian"}


def chat_statements(turns: list[tuple[str | None, str]]) -> list[str]:
    """The user's own first-person facts in a chat ("I live in Porto. What about you?" -> "I live in
    Porto."): clauses of the user's turns (as :func:`turns_as_messages` assigns roles) that a fact
    pattern matches, with a short answer, and that speak of no one else (no "you", "we", no question).
    A sentence is cut at its clauses first ("I'm from Ohio, how about you?" -> "I'm from Ohio.";
    "I have a cow and drive a truck." -> "I have a cow.", "I drive a truck."). They are trained as
    profile facts are, so a person who never wrote a profile is remembered from their chats. In a
    turn that opens with a greeting, "I'm Sam." is the user's name ("My name is Sam.")."""
    out: list[str] = []
    seen: set[str] = set()
    for message in turns_as_messages(turns):
        if message["role"] != "user":
            continue
        content = message["content"].replace("\u2019", "'").replace("\u2018", "'")  # a phone's apostrophes
        introducing = bool(_GREETING.match(content))  # until the turn's first clause after the greeting
        for sentence in _sentences(content):
            for clause in _clauses(sentence):
                introduction = _INTRODUCTION.match(clause) if introducing else None
                if introduction and introduction["name"][0].isupper() and introduction["name"].lower() not in _NOT_NAMES:
                    clause = f"My name is {introduction['name']}."
                if _GREETING.match(clause) is None:
                    introducing = False
                if _NOT_ABOUT_THE_USER.search(clause) or len(clause.split()) > 14:
                    continue
                found = _match(clause)
                if found is None or len(found[2].split()) > 5 or clause in seen:
                    continue
                # "I like that one." says nothing; "I have one sister." does (the answer with its thing).
                said = f"{found[1]['ans']} {found[1].get('thing', '')}".split()
                if said[0].lower() not in _POINTING and any(w.lower().strip(".,!'") not in _VAGUE for w in said) \
                        and re.search(r"[^\W_]", found[2]) \
                        and not (clause.lower().startswith("i have") and _CONVERSATIONAL & set(found[2].lower().split())):
                    seen.add(clause)
                    out.append(clause)
    return out


def _sentences(content: str) -> list[str]:
    """A turn's sentences: cut after . ! ? and at a line that starts a statement ("I ...", "My ...");
    other line breaks are spaces (wrapped text); runs of whitespace are one space, so the clause
    rules cost linear time on any turn; a sentence that long holds no short fact."""
    groups: list[list[str]] = []  # lines of one stretch of text (joined once: += per line was quadratic)
    for line in filter(None, (" ".join(line.split()) for line in content.splitlines())):
        if groups and not re.match(r"(?:i|i'm|my)\b", line, re.I) and not re.search(r"[.!?][\"')\]]*$", groups[-1][-1]):
            groups[-1].append(line)
        else:
            groups.append([line])
    return [s for group in groups for s in _SENTENCE_END.split(" ".join(group)) if len(s) <= _MAX_SENTENCE]


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
        text = text if isinstance(text, str) else str(text or "")
        if out and out[-1]["role"] == role:
            out[-1]["content"].append(text)  # joined once below: += on each turn was quadratic
        else:
            out.append({"role": role, "content": [text]})
    return [{"role": m["role"], "content": "\n".join(m["content"])} for m in out]
