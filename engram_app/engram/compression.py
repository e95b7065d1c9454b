"""Tokenizer compression: a surjective map from token id to a canonical id (ENGRAM.md section 2.1).

Each token is decoded and its text normalised (NFKC, NFD, strip accents, lowercase, runs of
whitespace to one space); tokens with equal normalised text share a canonical id. A token that
is only whitespace becomes a single space. A token whose decoding is an incomplete UTF-8 sequence
keeps its raw token string as its key, so byte fragments never merge with real characters.

With ``strip`` (``EngramConfig.compression_strip``) the normalised text also loses its leading
and trailing whitespace, as DeepSeek's reference code does: " the" and "the" share an id, and a
token that is only whitespace still becomes a single space. It is off by default, so every saved
memory keeps its addressing; docs/BENCHMARKS.md has what it changes for SmolLM2.

Canonical ids are given in order of first appearance by token id, so the map depends only on
the tokenizer (and ``strip``): it is the same in every process. It is cached per tokenizer
fingerprint and ``strip``.
"""

from __future__ import annotations

import hashlib
import json
import threading

import torch
from tokenizers import Regex, normalizers

_NORMALIZER = normalizers.Sequence(
    [
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
    ]
)

_cache: dict[tuple[str, bool], torch.Tensor] = {}
_cache_lock = threading.Lock()


def normalise(text: str, strip: bool = False) -> str:
    """The normalised form under which tokens are merged.

    ``strip``: also drop leading and trailing whitespace (a whitespace-only token stays " ").
    When stripping would leave nothing (a lone combining accent after a space, say), the
    unstripped form is kept, so such a token does not merge with the empty-text tokens.
    """
    if text and not text.strip():
        return " "
    normalised = _NORMALIZER.normalize_str(text)
    return (normalised.strip() or normalised) if strip else normalised


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token string -> id), stable across processes."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def build_compression(tokenizer, strip: bool = False) -> torch.Tensor:
    """The map as a LongTensor: ``map[token_id] = canonical_id`` for every id below len(tokenizer).

    ``strip``: merge tokens that differ only by surrounding whitespace (see :func:`normalise`).
    """
    size = len(tokenizer)
    keys: dict[str, int] = {}
    mapping = torch.empty(size, dtype=torch.long)
    raw = tokenizer.convert_ids_to_tokens(list(range(size)))
    for token_id in range(size):
        text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if "\ufffd" in text or raw[token_id] is None:
            key = f"\0raw:{raw[token_id]}"  # a byte fragment: keep it apart from real text
        else:
            key = normalise(text, strip)
        mapping[token_id] = keys.setdefault(key, len(keys))
    return mapping


def compression_for(tokenizer, fingerprint: str | None = None, strip: bool = False) -> torch.Tensor:
    """:func:`build_compression`, computed once per tokenizer (by fingerprint) and ``strip`` in this process.

    Pass ``fingerprint`` when the caller has already computed :func:`tokenizer_fingerprint`.
    """
    key = (fingerprint or tokenizer_fingerprint(tokenizer), bool(strip))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = build_compression(tokenizer, strip=key[1])
        return _cache[key]


TEMPLATE_PROBE = ("Alpha", "Bravo", "Charlie", "Delta")  # message texts that locate the template around them


def template_token_ids(tokenizer) -> list[int]:
    """The tokenizer's special tokens and the tokens its chat template puts around messages.

    A short conversation (system, user, assistant, user, and the generation prompt) is rendered
    with the template and tokenised with offsets; every token outside the messages' own text is the
    template's (``<|im_start|>``, ``assistant``, the newline after it, ...). A tokenizer without a
    chat template gives its special tokens only.
    """
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    if not getattr(tokenizer, "chat_template", None):
        return sorted(ids)
    roles = ("system", "user", "assistant", "user")
    conversation = [{"role": role, "content": text} for role, text in zip(roles, TEMPLATE_PROBE)]
    for messages in (conversation, conversation[1:]):  # some templates refuse a system message
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            break
        except Exception:
            continue
    else:
        return sorted(ids)
    spans, start = [], 0
    for message in messages:
        at = rendered.find(message["content"], start)
        if at >= 0:
            spans.append((at, at + len(message["content"])))
            start = at + len(message["content"])
    try:
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        return sorted(ids)
    for token_id, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if not any(begin < b and a < end for a, b in spans):  # overlaps no message's text
            ids.add(int(token_id))
    return sorted(ids)
