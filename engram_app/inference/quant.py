"""Weight-only 4-bit linear layers for chat on the CPU, taken from a GGUF file's own 4-bit blocks.

Why: decoding a small model on a CPU is bound by reading its weights once per token. The bundled
SmolLM2-135M ships as a Q4_1 GGUF file; running its linear layers from those 4-bit blocks reads
~6 bits per weight instead of fp32's 32, without changing a weight.

The maths. A Q4_1 block holds 32 consecutive weights of one row as 4-bit codes ``q`` (0..15), a
scale ``d`` and a minimum ``m`` (both fp16)::

    w = d * q + m

Decoding (one row at a time) computes ``x @ W.T`` from those blocks with the C kernel of
``gguf_matmul.c`` (built on this machine by :mod:`engram_app.inference.native`): the codes in
GGUF's nibble order, ``d`` and ``m`` in fp32, the codes widened to fp32 in registers and the sums
kept in fp32, so the output is the dequantised layer's to fp32 rounding. Prompts (several rows)
go through the fp32 weight instead (:attr:`Int4Linear.dense`, mapped from the converted model's
file): MKL's GEMM beats any 4-bit kernel once there are several rows.

Where no C compiler is found, decoding uses PyTorch's CPU int4 weight-only matmul
(``aten._weight_int4pack_mm_for_cpu``), which computes, for the group ``g = k // group_size`` of
input ``k``::

    W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]

so ``scale = d`` and ``zero = m + 8 d`` is the same weight. In fp32 that is exact (d and m are fp16
values) but slow; the kernel is only vectorised for bf16 inputs, so that fallback computes in bf16:
activations and the scales are rounded to bf16 at each linear layer (the weights' codes are
untouched, the residual stream, norms, attention and the Engram memory stay fp32).
``bench/decode_int4.py`` measures what each changes: teacher-forced top-1 agreement with the fp32
model and identical greedy replies (docs/BENCHMARKS.md).

The output layer of the bundled model is tied to the embeddings, which the file stores as Q8_0
(32 int8 codes ``c`` and one fp16 scale ``d`` per block: ``w = d * c``). The C kernel reads those
codes as they are. For PyTorch's int4 kernel each code splits exactly into two 4-bit halves,
``c = 16 * hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15, so the output layer is one int4
matmul over the input written twice (``[x, x]``): the first copy's weights are ``16 d * hi``, the
second's ``d * lo`` (this split is how the blocks are read from the file either way). Logits
computed in bf16 are rounded to bf16's spacing (1/8 at |logit| 16), enough to swap two near-equal
top tokens; so with that kernel the ``rescore`` best logits are computed again exactly in fp32
from the (fp32) embedding rows, which keeps the top token and its neighbours the fp32 model's.

Blocks are only used when they reproduce the loaded fp32 weights bit for bit (the converted model
was dequantised from the same file): anything else keeps its fp32 layer, with a log line.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram_app.inference.native import Kernels

log = logging.getLogger(__name__)

GROUP_SIZE = 32  # weights per GGUF block (Q4_0, Q4_1, Q8_0)
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of two 4-bit codes each
Q8_0_BLOCK_BYTES = 34  # fp16 d, 32 int8 codes
INNER_K_TILES = 2  # how the CPU kernel interleaves the codes; any of 2, 4, 8 gives the same result

# GGUF tensor name (llama architecture) -> the Hugging Face module it becomes.
LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# --- 4-bit blocks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Q4Blocks:
    """Group-wise asymmetric 4-bit weights of a linear layer ``[out, in]``.

    ``W[n, k] = scale[n, k // group_size] * codes[n, k] + minimum[n, k // group_size]``.
    """

    codes: torch.Tensor  # uint8 [out, in], values 0..15
    scale: torch.Tensor  # float32 [out, in // group_size]
    minimum: torch.Tensor  # float32 [out, in // group_size]
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight these blocks stand for, computed as GGUF's reference does (``d * q + m``)."""
        out, inp = self.shape
        q = self.codes.float().view(out, inp // self.group_size, self.group_size)
        return (self.scale[..., None] * q + self.minimum[..., None]).view(out, inp)

    def rows(self, order: torch.Tensor | np.ndarray) -> Q4Blocks:
        """The same blocks with their rows (output features) reordered."""
        order = torch.as_tensor(order, dtype=torch.long)
        return Q4Blocks(self.codes[order], self.scale[order], self.minimum[order], self.group_size)


def unpack_q4_1(raw: np.ndarray) -> Q4Blocks:
    """Q4_1 bytes ``[rows, blocks * 20]`` (as GGUFReader gives them) -> :class:`Q4Blocks`.

    Each block: fp16 ``d``, fp16 ``m``, then 16 bytes whose low nibbles are weights 0..15 and
    high nibbles weights 16..31 of the block.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, Q4_1_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return Q4Blocks(torch.from_numpy(codes.copy()), torch.from_numpy(d), torch.from_numpy(m))


def unpack_q8_0_as_q4(raw: np.ndarray) -> Q4Blocks:
    """Q8_0 bytes ``[rows, blocks * 34]`` -> 4-bit blocks over the input written twice (module docstring).

    For ``x2 = [x, x]``: ``x2 @ W2.T == x @ W.T`` where ``W = d * c`` is the Q8_0 weight.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, Q8_0_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    c = blocks[..., 2:].copy().view(np.int8).astype(np.int16)
    hi, lo = c >> 4, c & 0x0F  # arithmetic shift: c == 16 * hi + lo, hi in -8..7, lo in 0..15
    codes = np.concatenate([(hi + 8).reshape(rows, -1), lo.reshape(rows, -1)], axis=1).astype(np.uint8)
    # 16 d * (hi + 8) - 128 d == 16 d * hi ; d * lo + 0 == d * lo
    scale = np.concatenate([16 * d, d], axis=1)
    minimum = np.concatenate([-128 * d, np.zeros_like(d)], axis=1)
    return Q4Blocks(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(minimum))


def quantize_q4_1(weight: torch.Tensor) -> Q4Blocks:
    """Quantise an fp32 weight ``[out, in]`` to Q4_1 exactly as llama.cpp's converter does (gguf-py).

    Used for models that do not come as a GGUF file (the tests' tiny models).
    """
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType.Q4_1)
    return unpack_q4_1(raw)


# --- the layer ------------------------------------------------------------------------------


def unsupported(blocks: Q4Blocks, input_copies: int = 1) -> str | None:
    """Why the CPU kernel cannot hold these blocks (its shape rules), or None when it can."""
    out_features, packed_in = blocks.shape
    if out_features % 16:
        return f"{out_features} outputs: the int4 kernel needs a multiple of 16"
    if packed_in % (blocks.group_size * input_copies):
        return f"{packed_in // input_copies} inputs: not a multiple of the group size {blocks.group_size}"
    return None


class _Shared:
    """A tensor that copies of a module share: ``copy.deepcopy`` returns the same holder."""

    def __init__(self, tensor: torch.Tensor | None):
        self.tensor = tensor

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class Int4Linear(nn.Linear):
    """A frozen linear layer whose weight is held as packed 4-bit codes with per-group scale and zero.

    It takes and returns fp32 (the model's dtype). One row at a time (decoding) goes through a
    4-bit kernel, either
    - ``kernels`` (``gguf_matmul.c``, built on this machine by :mod:`native`): the codes in GGUF's
      own nibble order, widened to fp32 and accumulated in fp32: the dequantised layer's output to
      fp32 rounding; or, where that kernel is not had (no C compiler, ``ENGRAM_NATIVE=0``),
    - PyTorch's ``_weight_int4pack_mm_for_cpu`` in ``compute_dtype`` (bf16: vectorised, but it
      rounds the input, output and scales to bf16; fp32: exact, several times slower).
    More rows at once (a prompt, a teacher-forced text) go through :attr:`dense`, the fp32 weight,
    when the layer was given one: MKL's fp32 GEMM beats both 4-bit kernels from two rows up, and a
    prompt reads its weights once for all its rows (the runtime maps it from the model's file).
    ``input_copies`` is 2 for a Q8_0 weight split into two 4-bit halves (:func:`unpack_q8_0_as_q4`).

    It has no ``weight`` parameter (nothing to train). It is an ``nn.Linear`` only so that PEFT's
    LoRA wraps it like any linear layer (a LoRA pack chats on the 4-bit model; its ``forward`` is
    this one's plus the low-rank update).
    """

    def __init__(self, blocks: Q4Blocks, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, input_copies: int = 1, kernels: Kernels | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate an fp32 weight
        self.register_parameter("weight", None)
        problem = unsupported(blocks, input_copies)
        if problem:
            raise ValueError(problem)
        out_features, packed_in = blocks.shape
        self.in_features = packed_in // input_copies
        self.out_features = out_features
        self.group_size = blocks.group_size
        self.input_copies = input_copies
        self.kernels = kernels
        self.dense = None
        if kernels is not None and input_copies == 2:  # Q8_0: its int8 codes put back together from the halves
            self.compute_dtype = torch.float32
            first, second = blocks.codes[:, :self.in_features], blocks.codes[:, self.in_features:]
            codes = (16 * (first.to(torch.int16) - 8) + second).to(torch.int8)
            self.register_buffer("qweight", codes.contiguous())
            self.register_buffer("scales_and_mins", blocks.scale[:, None, self.in_features // GROUP_SIZE:].contiguous())
        elif kernels is not None:
            self.compute_dtype = torch.float32
            grouped = blocks.codes.view(out_features, packed_in // GROUP_SIZE, GROUP_SIZE)
            codes = grouped[..., :16] | (grouped[..., 16:] << 4)  # GGUF's order: weights j and j + 16 in byte j
            self.register_buffer("qweight", codes.reshape(out_features, packed_in // 2).contiguous())
            self.register_buffer("scales_and_mins", torch.stack([blocks.scale, blocks.minimum], 1).contiguous())
        else:
            self.compute_dtype = compute_dtype
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.codes.to(torch.int32).contiguous(),
                                                                       INNER_K_TILES)
            zero = blocks.minimum + 8 * blocks.scale  # (q - 8) * d + (m + 8 d) == d * q + m
            scales_and_zeros = torch.stack([blocks.scale, zero], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
            self.register_buffer("qweight", packed)  # the name PEFT looks for on a quantised layer
            self.register_buffer("scales_and_zeros", scales_and_zeros.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int,
                    group_size: int, input_copies: int = 1, bias: torch.Tensor | None = None,
                    kernels: Kernels | None = None) -> Int4Linear:
        """A layer from what an earlier one held (:func:`save_layers`): no packing to do again.

        ``scales``: ``scales_and_mins`` with ``kernels``, else ``scales_and_zeros``.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_parameter("weight", None)
        layer.in_features, layer.out_features = in_features, out_features
        layer.group_size, layer.input_copies = group_size, input_copies
        layer.kernels = kernels
        layer.dense = None
        groups = in_features * input_copies // group_size
        if kernels is None:
            shapes = (out_features, in_features * input_copies // 2), (groups, out_features, 2)
        elif input_copies == 2:
            shapes = (out_features, in_features), (out_features, 1, in_features // group_size)
        else:
            shapes = (out_features, in_features // 2), (out_features, 2, groups)
        if (tuple(qweight.shape), tuple(scales.shape)) != shapes:
            raise ValueError(f"packed shapes {tuple(qweight.shape)}, {tuple(scales.shape)} do not fit "
                             f"{out_features}x{in_features}")
        if kernels is not None:  # the C kernel reads raw memory: only the exact layout it was written for
            codes_dtype = torch.int8 if input_copies == 2 else torch.uint8
            if qweight.dtype != codes_dtype or scales.dtype != torch.float32 or not (
                    qweight.is_contiguous() and scales.is_contiguous()) or group_size != GROUP_SIZE:
                raise ValueError(f"packed layer is {qweight.dtype}/{scales.dtype}, group {group_size}: "
                                 f"not the C kernel's layout")
        layer.compute_dtype = torch.float32 if kernels is not None else scales.dtype
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("scales_and_mins" if kernels is not None else "scales_and_zeros", scales)
        layer.register_buffer("bias", bias)
        return layer

    @property
    def dense(self) -> torch.Tensor | None:
        """The fp32 weight for prompts: not a buffer (never saved), and shared by copies of the layer."""
        return self._dense.tensor

    @dense.setter
    def dense(self, weight: torch.Tensor | None) -> None:
        self._dense = _Shared(weight)

    @property
    def backend(self) -> str:
        """Which 4-bit kernel decodes: ``native`` (exact fp32) or ``torch-bf16`` / ``torch-fp32``."""
        return "native" if self.kernels is not None else f"torch-{str(self.compute_dtype).removeprefix('torch.')}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > 1 and self.dense is not None:
            return F.linear(x, self.dense.to(x.dtype), self.bias)
        if self.kernels is not None:
            matmul = self.kernels.q8_0_matmul if self.input_copies == 2 else self.kernels.q4_1_matmul
            step = self.kernels.max_rows
            flat = flat.float()
            if flat.shape[0] <= step:  # decoding: one row
                y = matmul(flat, self.qweight, self.scales_and_mins, self.out_features)
            else:
                y = torch.cat([matmul(flat[i:i + step], self.qweight, self.scales_and_mins, self.out_features)
                               for i in range(0, flat.shape[0], step)])
            y = y.to(x.dtype)
        else:
            if self.input_copies > 1:
                flat = flat.repeat(1, self.input_copies)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(self.compute_dtype), self.qweight, self.group_size,
                                                           self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.backend}, copies={self.input_copies}, dense={self.dense is not None}")


class RescoredLogits(nn.Module):
    """An output layer computed in 4 bits whose ``top`` best logits per position are computed again in fp32.

    ``exact_weight`` is the fp32 output weight (for a tied model, the embeddings the model keeps
    anyway): re-scoring reads ``top`` rows of it, not the whole matrix.
    """

    def __init__(self, approximate: nn.Module, exact_weight: torch.Tensor, top: int = 16):
        super().__init__()
        self.approximate = approximate
        self.exact_weight = exact_weight  # shared with the embeddings: not a buffer, so never saved or copied
        self.top = top
        self.in_features = exact_weight.shape[1]
        self.out_features = exact_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approximate(x)
        flat = logits.view(-1, self.out_features)
        best = flat.topk(self.top, dim=-1).indices  # [positions, top]
        exact = torch.einsum("ptk,pk->pt", self.exact_weight[best], x.reshape(-1, self.in_features).float())
        flat.scatter_(1, best, exact.to(flat.dtype))
        return logits


def decode_logits(model: nn.Module, ids: list[int], lean: bool = True) -> torch.Tensor:
    """The logits of ``ids`` read as decoding reads them: one token per forward, with the cache.

    A whole text in one forward goes through the layers' fp32 prompt path (:attr:`Int4Linear.dense`);
    this measures the 4-bit kernels (bench/decode_int4.py, tests). After the first token, the steps
    go through the chat runtime's lean step where it applies (lean.py; ``lean=False``: the model's
    own forward throughout).
    """
    from engram_app.inference.lean import StepCache, lean_decoder

    decoder = lean_decoder(model) if lean else None
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids[:1]]), use_cache=True)
        cache = out.past_key_values if decoder is None else StepCache.adopt(out.past_key_values, len(ids), decoder)
        rows = [out.logits[0, -1]]
        for token in ids[1:]:
            input_ids = torch.tensor([[token]])
            out = decoder.step(model, input_ids, cache) if decoder is not None else model(
                input_ids=input_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


# --- which layers, from a GGUF file ---------------------------------------------------------


@dataclass
class LayerBlocks:
    """The 4-bit blocks of one linear layer of a model, by module name."""

    blocks: Q4Blocks
    input_copies: int = 1  # 2: a Q8_0 weight split into two 4-bit halves


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: which layers run in 4 bits, what stayed fp32 and why."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> reason
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    cached: bool = False  # the blocks came from the cache file, not from the GGUF file
    kernel: str = ""  # Int4Linear.backend of the layers
    dense_mapped: int = 0  # layers whose fp32 weight (for prompts) is mapped from the model's file

    def summary(self) -> str:
        return (f"{len(self.quantized)} linear layers in 4 bits ({self.bytes_before / 2**20:.0f} MB of fp32 weights "
                f"-> {self.bytes_after / 2**20:.0f} MB, {self.kernel} kernel; prompts through fp32 weights, "
                f"{self.dense_mapped} mapped from the file), {len(self.kept)} kept in fp32, "
                f"{self.seconds:.1f} s{' (cached layers)' if self.cached else ''}")


def _head_order(rows: int, heads: int) -> np.ndarray:
    """The row order transformers applies to llama.cpp's q/k weights (its ``_reverse_permute_weights``)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(1, 2).reshape(-1)


def _candidate_orders(gguf_name: str, rows: int, config) -> list[np.ndarray | None]:
    """Row orders to try for a tensor: as stored, and (q, k) llama.cpp's rotary permutation undone."""
    orders: list[np.ndarray | None] = [None]
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if gguf_name == "attn_q" and heads and rows % (2 * heads) == 0:
        orders.append(_head_order(rows, heads))
    if gguf_name == "attn_k" and kv_heads and rows % (2 * kv_heads) == 0:
        orders.append(_head_order(rows, kv_heads))
    return orders


def _matching(blocks: Q4Blocks, weight: torch.Tensor, orders: list[np.ndarray | None]) -> Q4Blocks | None:
    """The blocks in the row order that reproduces ``weight`` bit for bit, or None."""
    if blocks.shape != tuple(weight.shape):
        return None
    for order in orders:
        candidate = blocks if order is None else blocks.rows(order)
        if torch.equal(candidate.dequantize(), weight.detach().float()):
            return candidate
    return None


def _decoder_prefix(model: nn.Module) -> str:
    """The module name of the decoder (``model`` for Llama) inside a causal LM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return next(name for name, module in model.named_modules() if module is base)


def gguf_blocks(model: nn.Module, gguf_path: Path) -> tuple[dict[str, LayerBlocks], dict[str, str]]:
    """The 4-bit blocks of ``model``'s linear layers read from the GGUF file it was converted from.

    Returns (blocks by module name, layers left out with the reason). Only llama-architecture files
    (SmolLM2, Llama) are mapped; each layer's blocks must give its loaded fp32 weight exactly
    (the output layer: to fp32 rounding, as its Q8_0 codes are split into two 4-bit halves).
    Reading the file's metadata (its vocabulary) takes most of the time: ~5-20 s for the bundled model.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(gguf_path)
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else "?"
    if arch != "llama" or getattr(model.config, "model_type", None) != "llama":
        return {}, {"*": f"architecture {arch!r} is not mapped (llama only)"}
    tensors = {t.name: t for t in reader.tensors}
    found: dict[str, LayerBlocks] = {}
    kept: dict[str, str] = {}
    prefix = _decoder_prefix(model)
    for index in range(model.config.num_hidden_layers):
        for gguf_name, hf_name in LLAMA_LINEARS.items():
            name = f"{prefix}.layers.{index}.{hf_name}"
            tensor = tensors.get(f"blk.{index}.{gguf_name}.weight")
            weight = model.get_submodule(name).weight
            if tensor is None or tensor.tensor_type != GGMLQuantizationType.Q4_1:
                kept[name] = "not Q4_1 in the file" if tensor is not None else "not in the file"
                continue
            blocks = _matching(unpack_q4_1(tensor.data), weight, _candidate_orders(gguf_name, weight.shape[0],
                                                                                   model.config))
            if blocks is None:
                kept[name] = "the file's blocks do not give the loaded weight"
                continue
            found[name] = LayerBlocks(blocks)
    _output_blocks(model, tensors, found, kept)
    return found, kept


def _output_blocks(model: nn.Module, tensors: dict, found: dict[str, LayerBlocks], kept: dict[str, str]) -> None:
    from gguf import GGMLQuantizationType

    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None or tensor.tensor_type not in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        kept[name] = "output weight not Q8_0 or Q4_1 in the file"
        return
    copies = 2 if tensor.tensor_type == GGMLQuantizationType.Q8_0 else 1
    blocks = unpack_q8_0_as_q4(tensor.data) if copies == 2 else unpack_q4_1(tensor.data)
    reference = blocks.dequantize()
    if copies == 2:
        half = reference.shape[1] // 2
        reference = reference[:, :half] + reference[:, half:]
    weight = head.weight.detach().float()
    if reference.shape != weight.shape or (reference - weight).abs().max() > 1e-6 * weight.abs().max():
        kept[name] = "the file's blocks do not give the loaded output weight"
        return
    found[name] = LayerBlocks(blocks, copies)


# --- putting them in the model --------------------------------------------------------------


def _install(model: nn.Module, name: str, new: Int4Linear, rescore: int, report: QuantReport,
             dense: dict[str, torch.Tensor] | None = None) -> None:
    """Put ``new`` in place of the linear layer ``name``, with its fp32 weight for prompts.

    That weight is ``dense[name]`` (mapped from the model's file: :func:`mapped_weights`) when it is
    the loaded one, else the loaded layer's own. The output layer of the bf16 kernel is wrapped
    for re-scoring (the exact kernel needs none).
    """
    old = model.get_submodule(name)
    weight = old.weight.detach()
    mapped = (dense or {}).get(name)
    if mapped is not None and mapped.shape == weight.shape and mapped.dtype == weight.dtype:
        new.dense = mapped
        report.dense_mapped += 1
    else:
        new.dense = weight
    layer: nn.Module = new
    if old is model.get_output_embeddings() and rescore and new.kernels is None:
        layer = RescoredLogits(new, weight, rescore)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    report.quantized.append(name)
    report.kernel = new.backend
    report.bytes_before += weight.numel() * weight.element_size()
    report.bytes_after += sum(b.numel() * b.element_size() for b in new.buffers())


def mapped_weights(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The fp32 weights of linear layers ``names`` in a safetensors file, memory-mapped, not copied.

    Prompts read them (:attr:`Int4Linear.dense`): the pages are the operating system's file cache,
    which it can drop and read again, not memory the app holds. Names not in the file are left out.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            return {name: handle.get_tensor(f"{name}.weight") for name in names if f"{name}.weight" in keys}
    except (OSError, SafetensorError) as exc:
        log.warning("Could not map %s (%s): prompts use the loaded fp32 weights.", path, exc)
        return {}


def _keep_fingerprint(model: nn.Module) -> None:
    """Record the fp32 weights' fingerprint, so that memories saved for them still load (engram/model.py)."""
    from engram_app.engram import BLOCKS_FINGERPRINT_ATTR, blocks_fingerprint

    if getattr(model, BLOCKS_FINGERPRINT_ATTR, None) is None:
        setattr(model, BLOCKS_FINGERPRINT_ATTR, blocks_fingerprint(model))


def quantize_model(model: nn.Module, found: dict[str, LayerBlocks], compute_dtype: torch.dtype = torch.bfloat16,
                   rescore: int = 16, kernels: Kernels | None = None,
                   dense: dict[str, torch.Tensor] | None = None) -> QuantReport:
    """Replace the named linear layers of ``model`` by :class:`Int4Linear` layers, in place.

    ``kernels``: decode with the exact C kernel (:mod:`native`); None: PyTorch's in ``compute_dtype``.
    The output layer of the bf16 kernel gets ``rescore`` exact fp32 logits per position
    (:class:`RescoredLogits`; 0: none). ``dense``: fp32 weights mapped from the model's file, for
    prompts (:func:`_install`). The model keeps the fingerprint of the fp32 weights it was built
    from, so that memories saved for that model still load onto it (engram/model.py
    ``BLOCKS_FINGERPRINT_ATTR``).
    """
    report = QuantReport()
    if found:
        _keep_fingerprint(model)
    for name, layer in found.items():
        problem = unsupported(layer.blocks, layer.input_copies)
        if problem:
            report.kept[name] = problem
            continue
        old = model.get_submodule(name)
        _install(model, name, Int4Linear(layer.blocks, old.bias, compute_dtype, layer.input_copies, kernels),
                 rescore, report, dense)
    return report


# --- the cache: packed layers saved next to the converted model -----------------------------

CACHE_FORMAT = "3"


def _cache_key(source: str, kernel: str) -> dict[str, str]:
    """What a cache file must have been written from: the GGUF (``source``), this torch (its packing), the kernel."""
    return {"format": CACHE_FORMAT, "source": source, "torch": torch.__version__, "inner_k_tiles": str(INNER_K_TILES),
            "kernel": kernel}


def save_layers(path: Path, model: nn.Module, source: str) -> None:
    """Write ``model``'s :class:`Int4Linear` layers, packed as their kernel reads them, to a safetensors file.

    Packing for the kernel takes ~5 s for the bundled model; loading the packed bytes well under one.
    Written under a temporary name and renamed into place.
    """
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    kernel = ""
    for name, module in model.named_modules():
        if isinstance(module, RescoredLogits):  # saved under the output layer's own name
            module = module.approximate
        elif not isinstance(module, Int4Linear) or name.endswith(".approximate"):
            continue
        if isinstance(module, Int4Linear):
            kernel = module.backend
            scales = module.scales_and_mins if module.kernels is not None else module.scales_and_zeros
            # The lean decoding step (lean.py) leaves q/k/v and gate/up as row slices of one buffer:
            # safetensors refuses tensors that share memory, so those are written as copies.
            own = {"qweight": module.qweight, "scales": scales, "bias": module.bias}
            for part, tensor in own.items():
                if tensor is not None:
                    shared = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
                    tensors[f"{name}.{part}"] = tensor.clone() if shared else tensor
            layers[name] = {"in": module.in_features, "out": module.out_features, "group": module.group_size,
                            "copies": module.input_copies}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes may write it at once
    try:
        save_file(tensors, str(tmp), metadata={**_cache_key(source, kernel), "layers": json.dumps(layers)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_layers(path: Path, source: str, kernels: Kernels | None = None,
                compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, Int4Linear] | None:
    """Layers saved by :func:`save_layers` from ``source`` with this torch for the same kernel; None when
    missing, stale, for another kernel or unreadable."""
    import json

    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    kernel = "native" if kernels is not None else f"torch-{str(compute_dtype).removeprefix('torch.')}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if any(metadata.get(k) != v for k, v in _cache_key(source, kernel).items()):
                return None
            names = set(handle.keys())
            layers = {}
            for name, shape in json.loads(metadata["layers"]).items():
                bias = handle.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
                layers[name] = Int4Linear.from_packed(handle.get_tensor(f"{name}.qweight"),
                                                      handle.get_tensor(f"{name}.scales"), shape["in"],
                                                      shape["out"], shape["group"], shape["copies"], bias, kernels)
            return layers
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        log.warning("Ignoring the 4-bit cache %s (%s): reading the GGUF file again.", path, exc)
        return None


def _fits(model: nn.Module, layers: dict[str, Int4Linear]) -> bool:
    """Whether cached layers replace linear layers of ``model`` of the same sizes."""
    modules = dict(model.named_modules())
    return all(isinstance(modules.get(name), nn.Linear) and not isinstance(modules[name], Int4Linear)
               and modules[name].weight.shape == (layer.out_features, layer.in_features)
               for name, layer in layers.items())


def quantize_from_gguf(model: nn.Module, gguf_path: Path, cache: Path | None = None, source: str = "",
                       compute_dtype: torch.dtype = torch.bfloat16, rescore: int = 16, kernels: Kernels | None = None,
                       weights_file: Path | None = None) -> QuantReport:
    """Run ``model``'s linear layers from the 4-bit blocks of the GGUF file it was converted from.

    ``cache``: a file to keep the packed layers in (read instead of the GGUF file when it was written
    from the same ``source`` with this torch for the same kernel; written otherwise), so only the
    first start pays for reading and packing (~10-40 s for the bundled model on a busy 2-core
    machine). ``weights_file``: the model's own safetensors file, mapped for prompts (:func:`_install`).
    """
    started = time.perf_counter()
    cached = load_layers(cache, source, kernels, compute_dtype) if cache is not None else None
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    dense = mapped_weights(weights_file, linear) if weights_file is not None and weights_file.is_file() else None
    if cached is not None and _fits(model, cached):
        report = QuantReport(cached=True)
        _keep_fingerprint(model)
        for name, layer in cached.items():
            _install(model, name, layer, rescore, report, dense)
    else:
        found, kept = gguf_blocks(model, gguf_path)
        report = quantize_model(model, found, compute_dtype, rescore, kernels, dense)
        report.kept.update(kept)
        if cache is not None and report.quantized:
            try:
                save_layers(cache, model, source)
            except OSError as exc:
                log.warning("Could not keep the 4-bit layers in %s: %s", cache, exc)
    report.seconds = time.perf_counter() - started
    log.info("4-bit weights from %s: %s.", gguf_path.name, report.summary())
    for name, reason in report.kept.items():
        log.info("Kept %s in fp32: %s.", name, reason)
    return report
