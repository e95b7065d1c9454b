"""The engine's maths against an independent reference written from shared/docs/ENGRAM.md.

The reference below re-derives, with plain Python integers and float64 loops, what the spec
states: the suffix n-grams (section 2.2), the multiplicative-XOR hash with multipliers drawn from
``seed + 10007 * layer`` and distinct prime moduli (2.3, 2.4), the gate with RMSNorm on both the
hidden state and the key and the demo's signed square root (4), and the short convolution with
kernel 4 and dilation = max n-gram order (5). It reads from the engine only what the spec leaves
to it: the tokenizer compression map (tested on its own in test_engram.py), the learned weights,
and the RMSNorm epsilon.

The engine runs attached to a tiny model, once, on a batch with a left-padded row. What it does
is observed from outside: the rows and gates through ``memory.tracing()``, the hidden state h
entering each Engram block as the output of the block before it, and h + Y as the input of the
block's first layer norm (Engram runs at the block's start, before that norm).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch

from engram_app.engram import EngramConfig, attach_engram
from engram_app.engram.model import find_decoder_layers
from tiny import tiny_family, tiny_tokenizer

# Two layers, neither 0 (layer 0 would draw the same multipliers from seed + 10007 * layer and
# from seed + layer), three heads per order, a non-default seed.
CONFIG = dict(layers=[1, 2], orders=(2, 3), heads=3, rows_per_head=1009, head_dim=4, seed=7, kernel_size=4)
LENGTHS = [16, 11]  # row 1 is left-padded by 5
INT64_MAX = 2**63 - 1
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


# --- the reference, from the spec --------------------------------------------------------------

def reference_primes(layers, orders, heads, requested) -> dict[tuple[int, int, int], tuple[int, int]]:
    """{(layer, order, head): (prime, first row)}: distinct primes at or above the requested size,
    the next unused one for each table in (layer, order, head) order, tables laid end to end."""
    out, taken, offset = {}, set(), 0
    for layer in layers:
        for order in orders:
            for head in range(heads):
                p = requested - 1
                while True:
                    p = sympy.nextprime(p)
                    if p not in taken:
                        break
                taken.add(p)
                out[layer, order, head] = (p, offset)
                offset += p
    return out


def reference_multipliers(seed: int, layer: int, max_order: int, ids: int) -> list[int]:
    """One random odd multiplier per n-gram position, from an RNG seeded with seed + 10007 * layer,
    bounded so that id * multiplier fits in int64 (the demo's recipe; ``ids`` distinct ids)."""
    half_bound = max(1, (INT64_MAX // ids) // 2)
    rng = np.random.default_rng(seed + 10007 * layer)
    return [int(r) * 2 + 1 for r in rng.integers(0, half_bound, size=max_order, dtype=np.int64)]


def reference_rows(compressed: list[int], boundary: int, layer: int) -> list[list[int]]:
    """Per position, the global row of every (order, head): mix mod p_{n,k} + the table's offset,
    where mix = (x'_t m0) XOR (x'_{t-1} m1) [XOR (x'_{t-2} m2)] over the n-gram ENDING at t."""
    orders, heads = CONFIG["orders"], CONFIG["heads"]
    # The engine's compressed ids run 0..boundary; it bounds the multipliers with one id to spare.
    multipliers = reference_multipliers(CONFIG["seed"], layer, max(orders), boundary + 2)
    tables = reference_primes(CONFIG["layers"], orders, heads, CONFIG["rows_per_head"])
    out = []
    for t in range(len(compressed)):
        row = []
        for n in orders:
            gram = [compressed[t - j] if t - j >= 0 else boundary for j in range(n)]  # x'_t, x'_{t-1}, ...
            mix = 0
            for j, token in enumerate(gram):
                mix ^= token * multipliers[j]
            for k in range(heads):
                prime, offset = tables[layer, n, k]
                row.append(offset + mix % prime)
        out.append(row)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * weight


def reference_gate_and_y(h: torch.Tensor, rows: list[list[int]], table: torch.Tensor,
                         block) -> tuple[list[float], torch.Tensor]:
    """alpha_t for every position and Y = SiLU(CausalDepthwiseConv1d(RMSNorm(U))) + U, in float64.

    h [T, d] the hidden states entering the block; rows per position; table [rows, d_h].
    """
    d = h.shape[1]
    weight = {name: p.detach().double() for name, p in block.named_parameters()}
    w_k, w_v = weight["key.weight"], weight["value.weight"]
    eps = block.norm_h.eps
    gates, u = [], []
    for t in range(h.shape[0]):
        e = torch.cat([table[r] for r in rows[t]])  # e_t: every (order, head) row, concatenated
        k, v = w_k @ e, w_v @ e
        s = float(rms_norm(h[t], weight["norm_h.weight"], eps) @ rms_norm(k, weight["norm_k.weight"], eps))
        s = s / math.sqrt(d)
        s = math.copysign(math.sqrt(max(abs(s), 1e-6)), s)  # the demo's signed square root
        alpha = 1 / (1 + math.exp(-s))
        gates.append(alpha)
        u.append(alpha * v)
    u = torch.stack(u)
    x = torch.stack([rms_norm(u[t], weight["norm_u.weight"], block.norm_u.eps) for t in range(len(u))])
    kernel, dilation = CONFIG["kernel_size"], max(CONFIG["orders"])
    taps = weight["conv.weight"][:, 0]  # [d, kernel]; tap kernel-1 is the current position
    y = torch.zeros_like(u)
    for t in range(len(u)):
        conv = torch.zeros(d, dtype=torch.float64)
        for tap in range(kernel):
            source = t - (kernel - 1 - tap) * dilation  # causal: only this and earlier positions
            if source >= 0:
                conv += taps[:, tap] * x[source]
        y[t] = torch.nn.functional.silu(conv) + u[t]
    return gates, y


# --- the engine, observed ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def run():
    tokenizer = tiny_tokenizer()
    model = tiny_family("llama")  # 3 blocks
    memory = attach_engram(model, tokenizer, EngramConfig(**CONFIG))
    torch.manual_seed(5)
    with torch.no_grad():  # every weight away from its initial value, so each one matters
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
            block.conv.weight.normal_(0, 0.5)
            for norm in (block.norm_h, block.norm_k, block.norm_u):
                norm.weight.uniform_(0.5, 1.5)
    _, _, blocks = find_decoder_layers(model)
    # Repeated tokens, so equal n-grams recur and must hash alike.
    sequences = [torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(LENGTHS)]
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    entering, normed_input = {}, {}

    def output(out) -> torch.Tensor:
        return (out[0] if isinstance(out, tuple) else out).detach()

    handles = []
    for layer in CONFIG["layers"]:
        handles.append(blocks[layer - 1].register_forward_hook(
            lambda m, a, out, layer=layer: entering.__setitem__(layer, output(out))))
        handles.append(blocks[layer].input_layernorm.register_forward_pre_hook(
            lambda m, a, layer=layer: normed_input.__setitem__(layer, a[0].detach())))
    try:
        with torch.no_grad(), memory.tracing() as calls:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return dict(memory=memory, sequences=sequences, width=width, traces=calls[-1], entering=entering,
                added={layer: normed_input[layer] - entering[layer] for layer in CONFIG["layers"]})


def real_positions(run, i: int) -> slice:
    return slice(run["width"] - LENGTHS[i], run["width"])


def compressed_ids(run, i: int) -> list[int]:
    return [int(run["memory"].compression[token]) for token in run["sequences"][i]]


# --- the comparisons ---------------------------------------------------------------------------

@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("layer", CONFIG["layers"])
def test_hash_rows_equal_the_spec_recomputed_with_python_integers(run, layer, row):
    memory = run["memory"]
    expected = reference_rows(compressed_ids(run, row), memory.boundary_id, layer)
    engine = run["traces"][layer].rows[row, real_positions(run, row)].tolist()
    assert engine == expected
    assert len({r for position in expected for r in position}) > 2 * len(expected)  # many distinct rows


def test_table_sizes_are_the_next_unused_primes_at_or_above_the_requested_size(run):
    layout = run["memory"].layout
    tables = reference_primes(CONFIG["layers"], CONFIG["orders"], CONFIG["heads"], CONFIG["rows_per_head"])
    columns = [(n, k) for n in CONFIG["orders"] for k in range(CONFIG["heads"])]
    for li, layer in enumerate(CONFIG["layers"]):
        for c, (n, k) in enumerate(columns):
            assert (int(layout.primes[li, c]), int(layout.offsets[li, c])) == tables[layer, n, k]


@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("layer", CONFIG["layers"])
def test_gate_equals_the_spec_recomputed_in_float64(run, layer, row):
    memory, positions = run["memory"], real_positions(run, row)
    rows = reference_rows(compressed_ids(run, row), memory.boundary_id, layer)
    h = run["entering"][layer][row, positions].double()
    gates, _ = reference_gate_and_y(h, rows, memory.table.weight.detach().double(), memory.blocks[str(layer)])
    engine = run["traces"][layer].gate[row, positions].double()
    assert torch.allclose(engine, torch.tensor(gates, dtype=torch.float64), **TOLERANCE)
    assert max(gates) - min(gates) > 0.05  # the gates differ from token to token


@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("layer", CONFIG["layers"])
def test_convolution_output_added_to_the_block_equals_the_spec_recomputed_in_float64(run, layer, row):
    memory, positions = run["memory"], real_positions(run, row)
    rows = reference_rows(compressed_ids(run, row), memory.boundary_id, layer)
    h = run["entering"][layer][row, positions].double()
    _, y = reference_gate_and_y(h, rows, memory.table.weight.detach().double(), memory.blocks[str(layer)])
    engine = run["added"][layer][row].double()
    assert torch.allclose(engine[positions], y, **TOLERANCE)
    assert torch.equal(engine[: positions.start], torch.zeros_like(engine[: positions.start]))  # padding gets nothing
    assert y.abs().max() > 0.1  # the memory adds something sizeable
