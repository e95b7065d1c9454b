"""Attaching an Engram memory to a Hugging Face causal LM without editing its code.

:func:`attach_engram` finds the decoder blocks (the ``nn.ModuleList`` with one entry per hidden
layer) and the backbone that owns them, and registers three forward hooks:

1. a pre-hook on the backbone computes, from the token ids alone, the rows every Engram layer
   will read for this call (the addresses are known before the first block runs), and starts
   fetching rows that live off the device (:meth:`EngramModel.prefetch`: on a GPU, a copy from
   pinned host memory on a side stream, overlapped with the blocks before the memory layer);
2. a pre-hook on each chosen block adds ``Engram(h, rows)`` to the hidden state entering it
   (waiting for its prefetched rows' copy if there is one, else reading them itself);
3. a hook after the backbone stores each sequence's decoding state (:class:`DecodeState`: the
   compressed ids and the convolution's inputs of every cached position) on the KV cache object
   it returned.

Keeping the state on the cache object means that a cached decoding step continues the right
sequences whatever the length (there is no fixed buffer), that two conversations with two caches
never mix, and that ``model.generate`` works unchanged. The state follows every operation on the
cache: beam search's reordering of its rows (the cache's batch methods are extended to reorder
the state too) and rollbacks (``crop``, as assisted decoding does: the next call sees that the
cache holds fewer positions than the state and drops the extra ones). The backbone is called
through ``__call__`` by every supported family, also when PEFT wraps the model, so LoRA composes.
"""

from __future__ import annotations

import contextlib
import hashlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .compression import compression_for, template_token_ids, tokenizer_fingerprint
from .config import EngramConfig
from .hashing import TableLayout, build_layout, hash_rows, shifted_ngrams, skipping_ngrams, visible_tail
from .layer import EngramBlock
from .storage import EmbeddingTable, MappedTable, PrefetchedRows, TableStorage

STATE_ATTR = "_engram_state"
FOLLOWS_ATTR = "_engram_follows"  # set on a cache whose batch methods also move the Engram state
FINGERPRINT_SAMPLES = 256  # weights sampled from each parameter tensor of the blocks
ADAPTER_MARKERS = ("lora_", "engram")  # parameter names of adapters inside the blocks, not of the base
# Set on a model whose block weights were replaced by an equivalent packed form (4-bit layers built from
# the same weights, for inference): the blocks hash of the weights it was built from.
BLOCKS_FINGERPRINT_ATTR = "engram_blocks_fingerprint"


class EngramAttachError(ValueError):
    """The model cannot carry an Engram memory (unknown layout, or a mismatched memory)."""


def placed_block(depth: float | None, blocks: int) -> int:
    """The block a single memory sits at when its config names no layers: ``depth`` of the way
    through the model's ``blocks`` (0.5: the middle one), or without a depth the 2nd block."""
    if depth is None:
        return min(1, blocks - 1)
    return min(int(depth * blocks), blocks - 1)


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

    Architecture sizes, a hash of the sign pattern of the first input-embedding rows, and a hash
    of weights sampled from every parameter of every decoder block (:func:`blocks_fingerprint`).
    The embeddings alone tell different pre-trained checkpoints apart, but not a fine-tune that
    kept them frozen, nor a merged LoRA: the blocks' hash does. Neither changes when the same
    weights are loaded in the app's other precision (bf16 on a GPU, fp32 on the CPU).

    Memories saved before ``blocks_sha256`` existed do not have it; the loader compares only the
    keys a saved fingerprint has, so they still load (checked on the embeddings only).
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
        "blocks_sha256": getattr(model, BLOCKS_FINGERPRINT_ATTR, None) or blocks_fingerprint(model),
    }


def blocks_fingerprint(model: nn.Module) -> str:
    """Hash of :data:`FINGERPRINT_SAMPLES` weights of each parameter of each decoder block.

    The samples sit at scattered, fixed positions (a multiplicative stride, computed without a
    random generator so that every torch version picks the same ones). Each is rounded to bf16
    first: a checkpoint loaded in fp32 and the same one loaded in bf16 give the same bytes (the
    load rounds to nearest even, exactly as this does), while a fine-tune moves weights by far
    more than bf16's spacing, so a changed tensor changes nearly all of its samples.
    Adapter parameters inside the blocks (a PEFT LoRA's ``lora_A``/``lora_B``) are skipped and
    PEFT's ``base_layer`` holds the base weight, so wrapping the model with LoRA does not change
    the hash; merging a LoRA into the weights does.
    """
    _, _, blocks = find_decoder_layers(model)
    digest = hashlib.sha256()
    for block in blocks:
        for name, param in block.named_parameters():
            if any(marker in name for marker in ADAPTER_MARKERS):
                continue
            flat = param.detach().reshape(-1)
            count = min(FINGERPRINT_SAMPLES, flat.numel())
            index = (torch.arange(count, dtype=torch.long) * 2_654_435_761) % flat.numel()
            sample = flat[index.to(flat.device)].to(torch.bfloat16).float().cpu() + 0.0  # + 0.0: no -0.0
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(model: nn.Module, tokenizer_sha256: str) -> dict:
    """The model's and its tokenizer's fingerprints: what a saved memory must match to load."""
    return {**model_fingerprint(model), "tokenizer_sha256": tokenizer_sha256}


@dataclass
class _Room:
    """Buffers a :class:`DecodeState` grows into: appending a decoding step writes one position
    instead of copying every earlier one (``cat``), which made each step cost O(length).

    ``frontier``: the end of the longest state written into them. Only a state ending exactly there
    appends in place; any other (a rolled-back one, a copy) gets buffers of its own, so no state
    ever sees another's positions change.
    """

    ids: torch.Tensor  # [B, capacity]
    conv: dict[int, torch.Tensor]  # layer -> [B, capacity, hidden]
    frontier: int

    @property
    def capacity(self) -> int:
        return self.ids.shape[1]


@dataclass
class DecodeState:
    """What the sequences of a KV cache carry between decoding steps (stored on the cache).

    Per cached position, like the keys and values beside it: the compressed token id (the
    boundary id at padding) and, per Engram layer, the convolution's input. A step reads only
    the last ``max_order - 1`` ids and the last ``(kernel - 1) * dilation`` inputs, but keeping
    every position is what lets the state follow the cache through any rollback (assisted
    decoding crops rejected draft tokens; an app may crop back to a shared prompt) with nothing
    to recompute. It costs ``4 * hidden_size + 8`` bytes per position and Engram layer (up to
    twice that while its buffers have room to grow): for one Engram layer, a few percent of the
    keys and values of the cache itself.
    """

    ids: torch.Tensor  # [B, L] compressed ids of the cached positions
    conv: dict[int, torch.Tensor]  # layer -> [B, L, hidden] convolution inputs RMSNorm(U) (float32)
    room: _Room | None = field(default=None, repr=False, compare=False)  # what ids and conv are views of

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DecodeState:
        return DecodeState(fn(self.ids), {layer: fn(x) for layer, x in self.conv.items()})

    def crop(self, length: int) -> DecodeState:
        """The state of the first ``length`` positions (the cache was rolled back to them)."""
        return self._map(lambda t: t[:, :length])

    def select(self, index) -> DecodeState:
        """Rows ``index`` of the batch, in that order (beam search's reordering, batch selection)."""
        index = torch.as_tensor(index)
        return self._map(lambda t: t[index.to(t.device)])

    def repeat_interleave(self, repeats: int) -> DecodeState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def extend(self, ids: torch.Tensor, conv: dict[int, torch.Tensor]) -> DecodeState:
        """This state followed by the positions of one more call (written into its buffers when they
        have room and it is the longest state in them; else into new buffers twice as long)."""
        start, end = self.length, self.length + ids.shape[1]
        room = self.room
        if room is None or room.frontier != start or end > room.capacity or set(room.conv) != set(conv):
            capacity = max(64, 2 * end)
            room = _Room(self.ids.new_empty(self.ids.shape[0], capacity),
                         {layer: x.new_empty(x.shape[0], capacity, x.shape[2]) for layer, x in conv.items()}, start)
            room.ids[:, :start] = self.ids
            for layer in conv:
                room.conv[layer][:, :start] = self.conv[layer]
        room.ids[:, start:end] = ids
        for layer, x in conv.items():
            room.conv[layer][:, start:end] = x
        room.frontier = end
        return DecodeState(room.ids[:, :end], {layer: x[:, :end] for layer, x in room.conv.items()}, room)


def _update_state(cache, fn: Callable[[DecodeState], DecodeState]) -> None:
    state = getattr(cache, STATE_ATTR, None)
    if state is not None:
        setattr(cache, STATE_ATTR, fn(state))


def _reorder_cache(cache, beam_idx: torch.Tensor) -> None:
    type(cache).reorder_cache(cache, beam_idx)
    _update_state(cache, lambda state: state.select(beam_idx))


def _batch_select_indices(cache, indices: torch.Tensor) -> None:
    type(cache).batch_select_indices(cache, indices)
    _update_state(cache, lambda state: state.select(indices))


def _batch_repeat_interleave(cache, repeats: int) -> None:
    type(cache).batch_repeat_interleave(cache, repeats)
    _update_state(cache, lambda state: state.repeat_interleave(repeats))


_FOLLOWERS = {"reorder_cache": _reorder_cache, "batch_select_indices": _batch_select_indices,
              "batch_repeat_interleave": _batch_repeat_interleave}


def follow_batch_operations(cache) -> None:
    """Make the methods that rearrange a cache's rows rearrange its Engram state too.

    Beam search calls ``cache.reorder_cache(beam_idx)`` after every step to make each row
    continue the beam it now holds; the Engram state must move with the keys and values, or a
    beam would hash another beam's tokens. ``transformers`` gives a cache no hook for this, so
    these instance methods call the class's own method and then apply the same operation to the
    state. They are bound methods of the cache, so ``copy.deepcopy`` of the cache binds them to
    the copy. (Rollbacks need no method: the next call sees the cache's shorter length.)
    """
    if getattr(cache, FOLLOWS_ATTR, False):
        return
    for name, follower in _FOLLOWERS.items():
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, types.MethodType(follower, cache))
    setattr(cache, FOLLOWS_ATTR, True)


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
    mask: torch.Tensor | None  # [B, T] bool; None: no padding
    state: DecodeState | None  # of the positions before this call (None: a new sequence)
    compressed: torch.Tensor  # [B, T] compressed ids of this call's positions
    memory: dict[int, PrefetchedRows] = field(default_factory=dict)  # rows fetched ahead of the blocks
    new_conv: dict[int, torch.Tensor] = field(default_factory=dict)
    traces: dict[int, LayerTrace] = field(default_factory=dict)


class EngramModel(nn.Module):
    """The memory attached to one base model: tables, per-layer blocks, addressing, hooks.

    The base model is referenced, not owned: ``state_dict()`` holds only the memory.
    """

    def __init__(self, base_model: nn.Module, tokenizer, config: EngramConfig | None = None,
                 table: TableStorage | None = None, compression: tuple[torch.Tensor, str] | None = None):
        """``compression``: instead of the ``tokenizer``, its map as :attr:`compression` holds it and
        its fingerprint (e.g. read from a saved memory, which needs no tokenizer to load)."""
        super().__init__()
        self.config = config = config or EngramConfig()
        object.__setattr__(self, "base_model", base_model)  # not a submodule: its weights are not ours
        backbone, _, blocks = find_decoder_layers(base_model)
        object.__setattr__(self, "backbone", backbone)
        layers = config.layers if config.layers is not None else [placed_block(config.depth, len(blocks))]
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise EngramAttachError(f"Engram layers {bad} do not exist: the model has blocks 0..{len(blocks) - 1}.")
        config.layers = list(layers)
        self.layer_ids = list(layers)

        # Compression: tokenizer ids -> canonical ids; ids the tokenizer lacks (padded vocab) get
        # their own canonical ids; one more id marks positions before the start of a sequence.
        vocab = base_model.get_input_embeddings().weight.shape[0]
        if compression is not None:
            compression, self.tokenizer_fingerprint = compression
            if len(compression) != vocab:
                raise EngramAttachError(f"The memory's token map covers {len(compression)} ids; the model has {vocab}.")
        else:
            self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
            compression = compression_for(tokenizer, self.tokenizer_fingerprint, strip=config.compression_strip)
            if len(compression) > vocab:
                raise EngramAttachError(f"The tokenizer has {len(compression)} tokens but the model only {vocab}.")
            extra = torch.arange(vocab - len(compression)) + int(compression.max()) + 1
            compression = torch.cat([compression, extra])
            if config.skip_template:
                compression = self._template_apart(compression, tokenizer, config)
        skipped = self._skipped_ids(compression, config) if config.skip_template else None
        self.boundary_id = int(compression.max()) + 1
        self.register_buffer("compression", compression, persistent=False)
        # The chat template's tokens, which n-grams skip (config.skip_template); None: nothing is skipped.
        self.register_buffer("skip_ids", skipped, persistent=False)
        self._skip_set: frozenset[int] = frozenset(skipped.tolist()) if skipped is not None else frozenset()
        self.layout: TableLayout = build_layout(config, self.layer_ids, self.boundary_id + 1)
        # The layout as Python integers, for the addressing of a single decoding step (_address_step).
        self._step_layout = (self.layout.multipliers.tolist(), self.layout.primes.tolist(),
                             self.layout.offsets.tolist())

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
        self.prefetching = True  # fetch off-device rows before the first block (False: each layer reads its own)
        self._prefetched: dict[int, PrefetchedRows] = {}  # started by prefetch() for the next call
        self._call: _Call | None = None
        self._trace_sink: list[dict[int, LayerTrace]] | None = None
        self._handles = [
            self.backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
            self.backbone.register_forward_hook(self._after_backbone, with_kwargs=True),
        ]
        for layer in self.layer_ids:
            self._handles.append(blocks[layer].register_forward_pre_hook(self._make_block_hook(layer), with_kwargs=True))
        self.to(next(base_model.parameters()).device)

    @staticmethod
    def _template_apart(compression: torch.Tensor, tokenizer, config: EngramConfig) -> torch.Tensor:
        """The token map with each of the chat template's tokens (``config.template_ids``, token ids;
        found from the tokenizer when None) given a canonical id of its own, after all the others: so
        skipping them skips the template's "user" and newline, not every " user" or whitespace run of
        a document that compression merged with them."""
        if config.template_ids is None:
            if tokenizer is None:
                raise EngramAttachError("A memory that skips the chat template needs the tokenizer, or its "
                                        "template_ids.")
            config.template_ids = template_token_ids(tokenizer)
        if any(i >= len(compression) for i in config.template_ids):
            raise EngramAttachError("The memory's template_ids are not all token ids of this model "
                                    f"(0..{len(compression) - 1}).")
        compression = compression.clone()
        first = int(compression.max()) + 1
        for k, token_id in enumerate(config.template_ids):
            compression[token_id] = first + k
        return compression

    @staticmethod
    def _skipped_ids(compression: torch.Tensor, config: EngramConfig) -> torch.Tensor:
        """The canonical ids of the template's tokens in ``compression``, which must hold each apart."""
        if config.template_ids is None or any(i >= len(compression) for i in config.template_ids):
            raise EngramAttachError("The memory skips the chat template but names no template_ids of this model.")
        skipped = compression[torch.tensor(config.template_ids, dtype=torch.long)]
        counts = torch.bincount(compression)
        if bool((counts[skipped] != 1).any()):
            raise EngramAttachError("The memory's token map does not hold the chat template's tokens apart: attach "
                                    "it with the tokenizer.")
        return skipped

    # --- hooks ----------------------------------------------------------------------------

    def _before_backbone(self, module, args, kwargs):
        self._call = None
        earlier, self._prefetched = self._prefetched, {}
        if not self.enabled:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise EngramAttachError("Engram memory needs token ids: call the model with input_ids, not inputs_embeds.")
        call = self._address(input_ids, kwargs.get("attention_mask"), kwargs.get("past_key_values"))
        # The rows depend only on the token ids: start fetching them now, before the first block runs.
        call.memory = self._start_prefetch(call.rows, earlier)
        self._call = call
        return None

    def _address(self, input_ids: torch.Tensor, mask: torch.Tensor | None, cache) -> _Call:
        """The rows every Engram layer reads in a call with these ids, mask and KV cache (from ids alone)."""
        batch, steps = input_ids.shape
        state = _cached_state(cache, batch, set(self.layer_ids) if self.config.use_conv else set())
        if batch == steps == 1 and mask is None:
            return self._address_step(input_ids, state)
        device = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask[:, -steps:].bool()
        compression = self.compression.to(device)
        compressed = torch.where(mask, compression[input_ids], torch.full_like(input_ids, self.boundary_id))
        keep = self.config.max_order - 1  # ids before this call that its n-grams reach
        history = torch.full((batch, keep), self.boundary_id, dtype=torch.long, device=device)
        if self.skip_ids is not None:
            if state is not None:
                history = visible_tail(state.ids.to(device), self.skip_ids, keep, self.boundary_id)
            grams = skipping_ngrams(compressed, history, self.config.max_order, self.skip_ids)
        else:
            if state is not None and keep:
                history = torch.cat([history, state.ids[:, -keep:].to(device)], dim=1)[:, -keep:]
            grams = shifted_ngrams(compressed, history, self.config.max_order)
        rows = hash_rows(self.layout, grams)
        return _Call(rows=rows, mask=mask, state=state, compressed=compressed)

    def _address_step(self, input_ids: torch.Tensor, state: DecodeState | None) -> _Call:
        """:meth:`_address` for one token of one sequence without padding (a chat's decoding step).

        The same rows as :func:`hash_rows` gives, computed on the few Python integers involved instead
        of some twenty tensor operations on one element each (~20 us instead of ~250 on a CPU). Exact:
        the layout bounds every product of an id and a multiplier to int64, so Python's integers and
        torch's int64 hold the same values, and both take the non-negative remainder.
        """
        token = int(self.compression[int(input_ids[0, 0])])
        keep = self.config.max_order - 1
        history = [self.boundary_id] * keep
        if state is not None and keep:
            history = (history + self._step_history(state.ids[0], keep))[-keep:]
        grams = [token, *reversed(history)]  # grams[j]: the token j positions back
        rows = []
        for multipliers, primes, offsets in zip(*self._step_layout):
            products = [g * m for g, m in zip(grams, multipliers)]
            layer_rows = []
            for order in self.config.orders:
                mix = products[0]
                for j in range(1, order):
                    mix ^= products[j]
                for _ in range(self.config.heads):
                    column = len(layer_rows)
                    layer_rows.append(mix % primes[column] + offsets[column])
            rows.append(layer_rows)
        device = input_ids.device
        return _Call(rows=torch.tensor([[rows]], dtype=torch.long, device=device), mask=None, state=state,
                     compressed=torch.tensor([[token]], dtype=torch.long, device=device))

    def _step_history(self, ids: torch.Tensor, keep: int) -> list[int]:
        """The last ``keep`` (or fewer) ids of one sequence's state [L] that its n-grams reach: the last
        ids, or with skip_template the last ones not skipped (read a few positions at a time)."""
        if not self._skip_set:
            return ids[-keep:].tolist()
        found: list[int] = []
        end = ids.shape[0]
        while end > 0 and len(found) < keep:
            window = ids[max(0, end - 16): end].tolist()
            found = [i for i in window if i not in self._skip_set][-(keep - len(found)):] + found
            end -= len(window)
        return found[-keep:]

    def _start_prefetch(self, rows: torch.Tensor, earlier: dict[int, PrefetchedRows]) -> dict[int, PrefetchedRows]:
        """Per layer, the fetch of its rows (of ``rows`` [B, T, L, R]): one of ``earlier`` if it asked for
        exactly these rows, else one started now; none where the table has nothing to prefetch."""
        fetched: dict[int, PrefetchedRows] = {}
        if not self.prefetching:
            return fetched
        for column, layer in enumerate(self.layer_ids):
            layer_rows = rows[:, :, column]
            ready = earlier.get(layer)
            if ready is None or not ready.matches(layer_rows):  # a stale prefetch (other ids) is dropped
                ready = self.table.prefetch(layer_rows)
            if ready is not None:
                fetched[layer] = ready
        return fetched

    def _make_block_hook(self, layer: int):
        column = self.layer_ids.index(layer)

        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = call.rows[:, :, column]  # [B, T, R]
            fetched = call.memory.get(layer)
            if fetched is not None:  # started before the first block: wait for its copy (GPU) or take it
                memory = fetched.wait().flatten(-2)  # [B, T, R * d_h]
            else:
                memory = self.table.lookup(rows).flatten(-2)
            block = self.blocks[str(layer)]
            conv_state = None  # the convolution inputs of the positions its kernel reaches before this call
            if call.state is not None and layer in call.state.conv:
                conv_state = call.state.conv[layer][:, max(0, call.state.length - block.context):]
            out = block(hidden, memory, call.mask, conv_state, with_ratio=self._trace_sink is not None)
            if out.conv_input is not None:
                call.new_conv[layer] = out.conv_input
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
            conv = {layer: x.detach() for layer, x in call.new_conv.items()}
            ids = call.compressed.detach()
            state = DecodeState(ids, conv) if call.state is None else call.state.extend(ids, conv)
            setattr(cache, STATE_ATTR, state)
            follow_batch_operations(cache)
        if self._trace_sink is not None:
            self._trace_sink.append(call.traces)
        return None

    # --- public API ------------------------------------------------------------------------

    def prefetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 past_key_values=None) -> None:
        """Start fetching the rows of the model call about to be made with these arguments.

        Every call does this itself before its first block runs; a caller that knows the next
        call's token ids sooner (a decoding loop, once it has picked the token) can start it
        earlier. The next call uses what was fetched only if it asks for exactly these rows: a
        prefetch for other ids (or another cache) is stale and dropped. Call it under the same
        lock as the model call it prepares.
        """
        if not self.enabled:
            return
        call = self._address(input_ids, attention_mask, past_key_values)
        self._prefetched = self._start_prefetch(call.rows, {})

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


def _cached_state(cache, batch: int, conv_layers: set[int]) -> DecodeState | None:
    """The Engram state of the positions ``cache`` holds now (None: nothing cached yet).

    The state is checked against the cache's length before every call rather than when the
    cache is cropped: a rollback by any means (``Cache.crop``, assisted decoding, a static
    cache's ``reset``) leaves the cache shorter than the state, and the extra positions are
    dropped here. A cache longer than its state was extended while the memory was off: refused.
    """
    length = _cache_length(cache) if cache is not None else 0
    if length == 0:
        return None
    state = getattr(cache, STATE_ATTR, None)
    if state is None or state.ids.shape[0] != batch or set(state.conv) != conv_layers:
        raise EngramAttachError(
            "This KV cache was not produced with the Engram memory attached (or belongs to another "
            "batch): start the sequence again with the memory attached."
        )
    if state.length < length:
        raise EngramAttachError(
            f"This KV cache holds {length} positions but the Engram memory saw only {state.length} of them "
            "(the sequence was continued with the memory switched off): start the sequence again with the "
            "memory attached."
        )
    return state.crop(length) if state.length > length else state


def attach_engram(base_model: nn.Module, tokenizer, config: EngramConfig | None = None,
                  table: TableStorage | None = None) -> EngramModel:
    """Freeze ``base_model`` and attach a fresh Engram memory to it (identity at initialisation).

    ``table``: where the rows live, sized for the configuration (default: what ``config.storage``
    says: all rows in memory, or a :class:`MappedTable` with nothing stored yet).
    """
    from .tuner import attach  # the PEFT tuner builds it (tuner.py imports this module)

    return attach(base_model, tokenizer, config, table)
