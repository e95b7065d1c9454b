"""N-gram addressing: from token ids to table rows, with no learned router (ENGRAM.md section 2).

For position t and order n the n-gram is (x'_{t-n+1}, ..., x'_t): it ENDS AT the current token.
Positions before the start of a sequence (and left padding) use a dedicated boundary id.
Per Engram layer, odd multipliers are drawn from ``seed + 10007 * layer``;
``mix = (x'_t * m0) XOR (x'_{t-1} * m1) [XOR (x'_{t-2} * m2)]``, and head k of order n takes
``mix mod p_{n,k}`` with a distinct prime for every (layer, order, head). The row in the one
shared embedding matrix is that residue plus the (layer, order, head) table's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import EngramConfig


# Witnesses that make Miller-Rabin exact for every n < 3.3 * 10^24 (Sorenson and Webster, 2015):
# far above any table size (a table of 10^24 rows could never be held), and for larger n a
# composite still passes all thirteen rounds with a probability below 4^-13.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime, by deterministic Miller-Rabin: a few modular powers, whatever n.

    Trial division took sqrt(n) steps, so a config asking for 10^30 rows hung the process.
    """
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(n: int, taken: set[int]) -> int:
    """The smallest prime >= n not in ``taken``.

    Bounded: prime gaps below 10^18 are under 1,500, so the search tests a few thousand numbers
    at most (plus one step per prime already taken), each in microseconds.
    """
    n = max(int(n), 2)
    while n in taken or not is_prime(n):
        n += 1
    return n


@dataclass(frozen=True)
class TableLayout:
    """Which rows of the shared matrix belong to which (layer, order, head)."""

    layers: tuple[int, ...]
    orders: tuple[int, ...]
    heads: int
    primes: torch.Tensor  # [num_layers, num_orders * heads] table sizes
    offsets: torch.Tensor  # [num_layers, num_orders * heads] first row of each table
    multipliers: torch.Tensor  # [num_layers, max_order] odd int64 multipliers

    @property
    def total_rows(self) -> int:
        return int(self.offsets[-1, -1] + self.primes[-1, -1])

    def slot_names(self) -> list[tuple[int, int]]:
        """(order, head) for each slot column of a layer, in column order."""
        return [(n, k) for n in self.orders for k in range(self.heads)]

    def locate(self, row: int) -> tuple[int, int, int, int]:
        """(layer, order, head, residue) of a global row index."""
        flat = self.offsets.flatten()
        index = int(torch.searchsorted(flat, torch.tensor(row), right=True)) - 1
        layer_i, column = divmod(index, self.offsets.shape[1])
        order, head = self.slot_names()[column]
        return self.layers[layer_i], order, head, row - int(flat[index])


def build_layout(config: EngramConfig, layers: list[int], compressed_vocab: int) -> TableLayout:
    """Primes, offsets and multipliers for ``layers`` (deterministic in the config)."""
    max_order = config.max_order
    # Bound the multipliers so that id * multiplier cannot overflow int64 (ids < compressed_vocab + 1).
    half_bound = max(1, (np.iinfo(np.int64).max // (compressed_vocab + 1)) // 2)
    taken: set[int] = set()
    primes, multipliers = [], []
    for layer in layers:
        rng = np.random.default_rng(config.seed + 10007 * layer)
        multipliers.append(rng.integers(0, half_bound, size=max_order, dtype=np.int64) * 2 + 1)
        row = []
        for _order in config.orders:
            for _head in range(config.heads):
                p = next_prime(config.rows_per_head, taken)
                taken.add(p)
                row.append(p)
        primes.append(row)
    primes_t = torch.tensor(primes, dtype=torch.long)
    flat = primes_t.flatten()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), flat.cumsum(0)[:-1]]).view_as(primes_t)
    return TableLayout(
        layers=tuple(layers),
        orders=config.orders,
        heads=config.heads,
        primes=primes_t,
        offsets=offsets,
        multipliers=torch.tensor(np.stack(multipliers), dtype=torch.long),
    )


def shifted_ngrams(compressed: torch.Tensor, history: torch.Tensor, max_order: int) -> torch.Tensor:
    """Stack x'_t, x'_{t-1}, ..., x'_{t-max_order+1} for every position.

    compressed: [B, T] compressed ids of the new tokens.
    history: [B, max_order - 1] the compressed ids just before them (boundary ids at the start).
    Returns [B, T, max_order], where [..., j] is the token j positions back.
    """
    full = torch.cat([history, compressed], dim=1)  # [B, H + T]
    h, t = history.shape[1], compressed.shape[1]
    return torch.stack([full[:, h - j: h - j + t] for j in range(max_order)], dim=-1)


def ngram_positions(visible: torch.Tensor, start: int, max_order: int) -> torch.Tensor:
    """Where the n-grams of positions ``start..`` of ``visible`` [B, N] (bool) take their tokens.

    Returns [B, N - start, max_order] indices into the N positions: ``[..., 0]`` is the position
    itself and ``[..., j]`` (j >= 1) the j-th visible position before it, skipping positions that
    are not visible (-1: none is left). With every position visible this is plain shifting:
    position p - j.
    """
    batch, total = visible.shape
    index = torch.arange(total, device=visible.device).expand(batch, total)
    last = torch.cummax(torch.where(visible, index, torch.full_like(index, -1)), dim=1).values
    before = torch.cat([last.new_full((batch, 1), -1), last[:, :-1]], dim=1)  # last visible strictly before p
    columns = [index[:, start:]]
    current = index[:, start:]
    for _ in range(1, max_order):
        previous = before.gather(1, current.clamp(min=0))
        current = torch.where(current >= 0, previous, torch.full_like(previous, -1))
        columns.append(current)
    return torch.stack(columns, dim=-1)


def skipping_ngrams(compressed: torch.Tensor, history: torch.Tensor, max_order: int, skip: torch.Tensor) -> torch.Tensor:
    """:func:`shifted_ngrams` where the ids in ``skip`` are transparent (``EngramConfig.skip_template``).

    An n-gram reaches back over the skipped ids (the chat template's turn markers and role names,
    which the memory's token map holds apart from every other token) to the tokens before them, so
    the n-grams at the assistant's turn header, and so at the first token of a reply, end with the
    last words of the user's message. A position holding a skipped id keeps it as its own id: the
    header's positions key apart from the word before them and from each other. ``history``: the
    last ``max_order - 1`` ids before ``compressed`` that are not skipped (boundary ids at the start).
    """
    full = torch.cat([history, compressed], dim=1)
    positions = skipping_positions(full, history.shape[1], max_order, skip)
    return full.gather(1, positions.flatten(1)).view_as(positions)


def skipping_positions(full: torch.Tensor, start: int, max_order: int, skip: torch.Tensor) -> torch.Tensor:
    """Where :func:`skipping_ngrams` takes the ids of positions ``start..`` of ``full`` [B, N]
    (``start`` history ids, never skipped, then the call's ids): [B, N - start, max_order] indices
    into ``full``, so other per-position values (the original tokens, for display) can be gathered
    the same way."""
    visible = ~torch.isin(full, skip.to(full.device))
    visible[:, :start] = True
    return ngram_positions(visible, start, max_order).clamp(min=0)  # the history always holds enough


def visible_tail(ids: torch.Tensor, skip: torch.Tensor, keep: int, boundary: int) -> torch.Tensor:
    """The last ``keep`` ids of each row of ``ids`` [B, L] that are not in ``skip``, oldest first,
    boundary ids where a row has fewer: the history a call's n-grams reach back to. Reads the last
    positions only (a window doubled until every row has ``keep``), so a decoding step costs the
    same at any length."""
    batch, length = ids.shape
    out = torch.full((batch, keep), boundary, dtype=torch.long, device=ids.device)
    if keep == 0 or length == 0:
        return out
    skip = skip.to(ids.device)
    window = 16
    while True:
        tail = ids[:, -window:].flip(1)  # the most recent first
        visible = ~torch.isin(tail, skip)
        rank = visible.long().cumsum(1)  # visible ids among the most recent, inclusive
        if window >= length or bool((rank[:, -1] >= keep).all()):
            break
        window *= 2
    for j in range(1, keep + 1):
        hit = visible & (rank == j)
        value = tail.gather(1, hit.long().argmax(dim=1, keepdim=True)).squeeze(1)
        out[:, keep - j] = torch.where(hit.any(dim=1), value, out[:, keep - j])
    return out


def hash_rows(layout: TableLayout, grams: torch.Tensor) -> torch.Tensor:
    """Global rows [B, T, num_layers, num_orders * heads] for the n-grams in ``grams`` [B, T, max_order].

    (Any leading dimensions work: [..., max_order] -> [..., num_layers, num_orders * heads].)
    """
    out = []
    for li in range(len(layout.layers)):
        products = grams * layout.multipliers[li].to(grams.device)  # [B, T, max_order]
        columns = []
        for n in layout.orders:
            mix = products[..., 0]
            for j in range(1, n):
                mix = torch.bitwise_xor(mix, products[..., j])
            columns.append(mix.unsqueeze(-1).expand(*mix.shape, layout.heads))
        mixes = torch.cat(columns, dim=-1)  # [B, T, orders*heads]
        primes = layout.primes[li].to(grams.device)
        out.append(torch.remainder(mixes, primes) + layout.offsets[li].to(grams.device))
    return torch.stack(out, dim=-2)


def rows_for(layout: TableLayout, grams: torch.Tensor) -> torch.Tensor:
    """The rows that n-grams of one order address: [..., num_layers, heads] for ``grams`` [..., n].

    An n-gram is given as its ``n`` compressed ids, the most recent first (``[..., j]`` is the
    token j positions back, as :func:`shifted_ngrams` stacks them); its order is ``n``, which
    must be one of ``layout.orders``. Row ``[..., l, k]`` is what head k of that order reads in
    the l-th Engram layer when the n-gram ends at a token: the same rows :func:`hash_rows`
    gives a sequence (it is computed by it), for an n-gram met anywhere, e.g. in an index.
    """
    order = grams.shape[-1]
    if order not in layout.orders:
        raise ValueError(f"the memory hashes n-grams of orders {layout.orders}, not {order}")
    max_order = layout.multipliers.shape[1]
    # Columns past the order are never read by this order's heads: any id will do.
    padding = grams.new_zeros(*grams.shape[:-1], max_order - order)
    rows = hash_rows(layout, torch.cat([grams.long(), padding.long()], dim=-1))  # [..., layers, orders*heads]
    first = layout.orders.index(order) * layout.heads
    return rows[..., first: first + layout.heads]
