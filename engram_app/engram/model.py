"""Attaching an Engram memory to a Hugging Face causal LM without editing its code.

:func:`attach_engram` finds the decoder blocks (the ``nn.ModuleList`` with one entry per hidden
layer) and the backbone that owns them, and registers three forward hooks:

1. a pre-hook on the backbone computes, from the token ids alone, the rows every Engram layer
   will read for this call (the addresses are known before the first block runs);
2. a pre-hook on each chosen block adds ``Engram(h, rows)`` to the hidden state entering it;
3. a hook after the backbone stores each sequence's decoding state (the last ``max_order - 1``
   compressed ids, and the convolution's last inputs) on the KV cache object it returned.

Keeping the state on the cache object means that a cached decoding step continues the right
sequences whatever the length (there is no fixed buffer), that two conversations with two caches
never mix, and that ``model.generate`` works unchanged. The backbone is called through
``__call__`` by every supported family, also when PEFT wraps the model, so LoRA composes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from engram_app.engram.compression import compression_for, tokenizer_fingerprint
from engram_app.engram.config import EngramConfig
from engram_app.engram.hashing import TableLayout, build_layout, hash_rows, shifted_ngrams
from engram_app.engram.layer import EngramBlock
from engram_app.engram.storage import EmbeddingTable, MappedTable, TableStorage

STATE_ATTR = "_engram_state"


class EngramAttachError(ValueError):
    """The model cannot carry an Engram memory (unknown layout, or a mismatched memory)."""


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(backbone, attribute name, blocks): the ModuleList with one block per hidden layer."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    for _name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and (count is None or len(child) == count):
                return module, attr, child
    raise EngramAttachError(
        f"Could not find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList with "
        f"{count} entries (config.num_hidden_layers)."
    )


def model_fingerprint(model: nn.Module) -> dict:
    """What a saved memory checks before it is loaded onto a model.

    Architecture sizes, plus a hash of the sign pattern of the first input-embedding rows: it
    tells different checkpoints apart, and does not change when the same weights are loaded in
    another dtype (bf16 on a GPU, fp32 on the CPU).
    """
    config = model.config
    embeddings = model.get_input_embeddings().weight
    signs = (embeddings[:512].detach().float().cpu() > 0).numpy().tobytes()
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": embeddings.shape[0],
        "embedding_signs_sha256": hashlib.sha256(signs).hexdigest()[:16],
    }


def base_fingerprint(model: nn.Module, tokenizer_sha256: str) -> dict:
    """The model's and its tokenizer's fingerprints: what a saved memory must match to load."""
    return {**model_fingerprint(model), "tokenizer_sha256": tokenizer_sha256}


@dataclass
class DecodeState:
    """What a sequence carries between decoding steps (stored on its KV cache)."""

    history: torch.Tensor  # [B, max_order - 1] compressed ids before the next token
    conv: dict[int, torch.Tensor]  # layer -> [B, context, hidden] last convolution inputs


@dataclass
class LayerTrace:
    rows: torch.Tensor  # [B, T, orders*heads] global rows read
    gate: torch.Tensor  # [B, T]
    score: torch.Tensor  # [B, T]
    ratio: torch.Tensor  # [B, T] |Y| / |h|


@dataclass
class _Call:
    """Per-call scratch space between the backbone pre-hook and the block hooks."""

    rows: torch.Tensor  # [B, T, L, R]
    mask: torch.Tensor  # [B, T] bool
    state: DecodeState | None
    new_history: torch.Tensor
    memory: dict[int, torch.Tensor] = field(default_factory=dict)  # rows gathered ahead of the blocks
    new_conv: dict[int, torch.Tensor] = field(default_factory=dict)
    traces: dict[int, LayerTrace] = field(default_factory=dict)


class EngramModel(nn.Module):
    """The memory attached to one base model: tables, per-layer blocks, addressing, hooks.

    The base model is referenced, not owned: ``state_dict()`` holds only the memory.
    """

    def __init__(self, base_model: nn.Module, tokenizer, config: EngramConfig | None = None,
                 table: TableStorage | None = None):
        super().__init__()
        self.config = config = config or EngramConfig()
        object.__setattr__(self, "base_model", base_model)  # not a submodule: its weights are not ours
        backbone, _, blocks = find_decoder_layers(base_model)
        object.__setattr__(self, "backbone", backbone)
        layers = config.layers if config.layers is not None else [min(1, len(blocks) - 1)]
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise EngramAttachError(f"Engram layers {bad} do not exist: the model has blocks 0..{len(blocks) - 1}.")
        config.layers = list(layers)
        self.layer_ids = list(layers)

        # Compression: tokenizer ids -> canonical ids; ids the tokenizer lacks (padded vocab) get
        # their own canonical ids; one more id marks positions before the start of a sequence.
        vocab = base_model.get_input_embeddings().weight.shape[0]
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        compression = compression_for(tokenizer, self.tokenizer_fingerprint)
        if len(compression) > vocab:
            raise EngramAttachError(f"The tokenizer has {len(compression)} tokens but the model only {vocab}.")
        extra = torch.arange(vocab - len(compression)) + int(compression.max()) + 1
        compression = torch.cat([compression, extra])
        self.boundary_id = int(compression.max()) + 1
        self.register_buffer("compression", compression, persistent=False)
        self.layout: TableLayout = build_layout(config, self.layer_ids, self.boundary_id + 1)

        hidden = base_model.config.hidden_size
        if table is not None and (table.num_rows, table.dim) != (self.layout.total_rows, config.head_dim):
            raise EngramAttachError(f"The table has {table.num_rows} x {table.dim} rows; this configuration addresses "
                                    f"{self.layout.total_rows} x {config.head_dim}.")
        if table is None and config.storage == "mapped":  # nothing stored yet: every row reads as initial
            table = MappedTable(self.layout.total_rows, config.head_dim, config.init_std, seed=config.seed)
        self.table = table or EmbeddingTable(self.layout.total_rows, config.head_dim, config.init_std)
        self.blocks = nn.ModuleDict({
            str(layer): EngramBlock(hidden, config.memory_width, config.kernel_size, config.dilation, config.use_conv)
            for layer in self.layer_ids
        })
        self.enabled = True
        self._call: _Call | None = None
        self._trace_sink: list[dict[int, LayerTrace]] | None = None
        self._handles = [
            self.backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
            self.backbone.register_forward_hook(self._after_backbone, with_kwargs=True),
        ]
        for layer in self.layer_ids:
            self._handles.append(blocks[layer].register_forward_pre_hook(self._make_block_hook(layer), with_kwargs=True))
        self.to(next(base_model.parameters()).device)

    # --- hooks ----------------------------------------------------------------------------

    def _before_backbone(self, module, args, kwargs):
        self._call = None
        if not self.enabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise EngramAttachError("Engram memory needs token ids: call the model with input_ids, not inputs_embeds.")
        batch, steps = input_ids.shape
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask[:, -steps:].bool()
        cache = kwargs.get("past_key_values")
        state = None
        if cache is not None and _cache_length(cache) > 0:
            state = getattr(cache, STATE_ATTR, None)
            if state is None or state.history.shape[0] != batch:
                raise EngramAttachError(
                    "This KV cache was not produced with the Engram memory attached (or belongs to another "
                    "batch): start the sequence again with the memory attached."
                )
        compression = self.compression.to(device)
        compressed = torch.where(mask, compression[input_ids], torch.full_like(input_ids, self.boundary_id))
        history = state.history.to(device) if state is not None else torch.full(
            (batch, self.config.max_order - 1), self.boundary_id, dtype=torch.long, device=device
        )
        grams = shifted_ngrams(compressed, history, self.config.max_order)
        rows = hash_rows(self.layout, grams)
        keep = history.shape[1]  # max_order - 1 ids carry over to the next call
        new_history = torch.cat([history, compressed], dim=1)[:, -keep:] if keep else history
        self._call = _Call(rows=rows, mask=mask, state=state, new_history=new_history)
        if isinstance(self.table, MappedTable):
            # Rows read from files: gather them now, before the first block runs. The addresses
            # depend only on the token ids, and on a GPU the copy from pinned host memory is
            # queued without blocking the CPU.
            for column, layer in enumerate(self.layer_ids):
                self._call.memory[layer] = self.table.lookup(rows[:, :, column]).flatten(-2)
        return None

    def _make_block_hook(self, layer: int):
        column = self.layer_ids.index(layer)

        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = call.rows[:, :, column]  # [B, T, R]
            memory = call.memory.get(layer)
            if memory is None:
                memory = self.table.lookup(rows).flatten(-2)  # [B, T, R * d_h]
            conv_state = call.state.conv.get(layer) if call.state is not None else None
            out = self.blocks[str(layer)](hidden, memory, call.mask, conv_state, with_ratio=self._trace_sink is not None)
            if out.conv_state is not None:
                call.new_conv[layer] = out.conv_state
            if self._trace_sink is not None:
                call.traces[layer] = LayerTrace(rows.detach(), out.gate.detach(), out.score.detach(), out.ratio.detach())
            hidden = hidden + out.y
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _after_backbone(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if call is None:
            return None
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            conv = {layer: state.detach() for layer, state in call.new_conv.items()}
            setattr(cache, STATE_ATTR, DecodeState(call.new_history.detach(), conv))
        if self._trace_sink is not None:
            self._trace_sink.append(call.traces)
        return None

    # --- public API ------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove the hooks: the base model is as it was before attaching."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without memory inside this block (for comparisons)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[dict[int, LayerTrace]]]:
        """Collect one ``{layer: LayerTrace}`` per forward call made inside this block."""
        sink: list[dict[int, LayerTrace]] = []
        previous, self._trace_sink = self._trace_sink, sink
        try:
            yield sink
        finally:
            self._trace_sink = previous

    def fingerprint(self) -> dict:
        return base_fingerprint(self.base_model, self.tokenizer_fingerprint)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return self.table.sparse_parameters()

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.blocks.parameters())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _cache_length(cache) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache:
        return int(cache[0][0].shape[-2])
    return 0


def attach_engram(base_model: nn.Module, tokenizer, config: EngramConfig | None = None,
                  table: TableStorage | None = None) -> EngramModel:
    """Freeze ``base_model`` and attach a fresh Engram memory to it (identity at initialisation).

    ``table``: where the rows live, sized for the configuration (default: what ``config.storage``
    says: all rows in memory, or a :class:`MappedTable` with nothing stored yet).
    """
    base_model.requires_grad_(False)
    return EngramModel(base_model, tokenizer, config, table)
