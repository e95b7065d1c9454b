"""A lean decoding step for Llama-family models: one token of one sequence in a few operations per block.

Why: on a CPU the Hugging Face forward of a small model spends as long on its own small operations
as on the weights. For one token a SmolLM2-135M step runs ~5,500 tensor operations (rotary
embeddings rebuilt per layer, the KV cache grown with ``cat``, norms in five operations, the
attention through a kernel tuned for long queries) and the 4-bit matmuls take only about half of
the step (docs/BENCHMARKS.md, "Chat in 4 bits"). :class:`LeanDecoder` computes the same
step with about fifteen operations per block:

- the keys and values in preallocated buffers (:class:`StepCache`), written in place;
- each norm in one ``F.rms_norm``;
- the rotary embedding of the queries and keys of all heads as one product with a
  head_dim x head_dim matrix
  (``x cos + rotate_half(x) sin == x @ (diag(cos) + P diag(sin))``, computed once per step from
  the model's own rotary module, so every rope variant it supports is supported here);
- the attention of a single query as two small batched products and a softmax;
- with the 4-bit layers of the C kernel (quant.py), q/k/v and gate/up as one kernel call each:
  their codes are concatenated once, and the layers keep row slices of the concatenation (no
  second copy of any weight).

It computes what the model computes (the same weights, fp32 throughout; logits agree with the
Hugging Face step to fp32 rounding, checked by tests on every family it accepts). Everything
around the blocks still happens as a model call would do it: the backbone's forward hooks and each
block's forward pre-hooks run exactly as ``nn.Module.__call__`` runs them, so an attached Engram
memory (engram/model.py: addressing before the backbone, its branch before its blocks, its
decoding state stored on the cache after) and its traces work unchanged; the embedding, every
projection that is not a fused 4-bit one (a PEFT LoRA wrapper, a plain ``nn.Linear``) and the
output layer are called as modules, so adapters switched on or off between steps apply.

Only the chat runtime uses it (runtime.py), for decoding steps after a prompt read by the model's
own forward, and only where :func:`lean_decoder` accepts the model: a Llama, Mistral (no sliding
window) or Qwen2 (no sliding layers) model in fp32 on the CPU, in eval mode, called directly (not
through a ``PeftModel`` wrapper), with no hooks it would bypass (on the model, the final norm or
any module inside a block but the block itself). ``ENGRAM_LEAN=0`` turns it off.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from engram_app.engram.model import STATE_ATTR, find_decoder_layers
from engram_app.inference.quant import Int4Linear

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")  # decoder blocks computing exactly what LeanDecoder.step does
INITIAL_ROOM = 512  # positions a StepCache holds beyond the prompt before it first doubles


class StepCache:
    """The keys and values of one sequence, ``[layers, kv_heads, capacity, head_dim]``, filled to :attr:`length`.

    What a Hugging Face ``DynamicCache`` holds, in buffers a decoding step writes into instead of
    growing them with ``cat``. It has the cache method the Engram hooks read (``get_seq_length``),
    and carries the memory's decoding state as an attribute like any cache.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, decoder: LeanDecoder):
        self.keys = keys
        self.values = values
        self.length = length
        self.decoder = decoder  # the step that continues it

    @classmethod
    def adopt(cls, cache, capacity: int, decoder: LeanDecoder) -> StepCache:
        """The positions of a Hugging Face cache of one sequence, in buffers for ``capacity`` positions."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        batch, kv_heads, length, head_dim = layers[0][0].shape
        if batch != 1:
            raise ValueError(f"a StepCache holds one sequence, not {batch}")
        # Room for the reply planned, but not allocated up front past INITIAL_ROOM positions: a request
        # for a million new tokens must not reserve their keys and values (make_room doubles).
        capacity = max(length + 1, min(capacity, length + INITIAL_ROOM))
        keys = layers[0][0].new_empty(len(layers), kv_heads, capacity, head_dim)
        values = layers[0][1].new_empty(len(layers), kv_heads, capacity, head_dim)
        for i, (k, v) in enumerate(layers):
            keys[i, :, :length] = k[0]
            values[i, :, :length] = v[0]
        adopted = cls(keys, values, length, decoder)
        state = getattr(cache, STATE_ATTR, None)
        if state is not None:
            setattr(adopted, STATE_ATTR, state)
        return adopted

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def make_room(self) -> None:
        """Double the buffers when the next position would not fit (a reply longer than planned)."""
        if self.length < self.keys.shape[2]:
            return
        grow = self.keys.shape[2]
        self.keys = torch.cat([self.keys, torch.zeros_like(self.keys[:, :, :grow])], dim=2)
        self.values = torch.cat([self.values, torch.zeros_like(self.values[:, :, :grow])], dim=2)


class _Projections:
    """Linear layers of one block reading the same input (q/k/v, gate/up, or one layer), outputs concatenated.

    Where all are C-kernel Q4_1 layers (quant.py) without hooks, one kernel call computes them: their
    codes are concatenated by rows once, and each layer keeps a row slice of the concatenation as its
    own buffers (no weight is held twice). Whenever the modules found on ``parent`` are no longer
    those layers (PEFT wrapped one in a LoRA layer, say), they are called as modules instead.
    """

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        self.parent = parent
        self.names = names
        # The base layers: a PEFT LoRA layer wrapping one (a pack loaded before the first reply) is
        # looked through, so the fused call serves whenever the wrapper is taken off again.
        self.members = tuple(_base_layer(parent._modules[name]) for name in names)
        self.codes = self.scales = self.bias = self.kernels = None
        self.out_features = 0
        if all(isinstance(m, Int4Linear) and m.kernels is not None and m.input_copies == 1 for m in self.members) \
                and len({m.in_features for m in self.members}) == 1 and len({m.bias is None for m in self.members}) == 1:
            self._concatenate()

    def _concatenate(self) -> None:
        members = self.members
        self.codes = torch.cat([m.qweight for m in members])
        self.scales = torch.cat([m.scales_and_mins for m in members])
        self.bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
        start = 0
        for m in members:
            end = start + m.out_features
            m.qweight, m.scales_and_mins = self.codes[start:end], self.scales[start:end]
            if self.bias is not None:
                m.bias = self.bias[start:end]
            start = end
        self.out_features = start
        self.kernels = members[0].kernels

    def _intact(self) -> bool:
        modules = self.parent._modules
        return all(modules[name] is m and not (m._forward_hooks or m._forward_pre_hooks)
                   for name, m in zip(self.names, self.members))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [1, 1, in] -> the layers' outputs side by side, [1, 1, sum of out]."""
        if self.codes is not None and self._intact():
            y = self.kernels.q4_1_matmul(x.view(1, -1), self.codes, self.scales, self.out_features)
            return (y if self.bias is None else y + self.bias).view(1, 1, -1)
        outputs = [self.parent._modules[name](x) for name in self.names]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


@dataclass
class _Block:
    """What a decoding step reads of one decoder block."""

    block: nn.Module
    qkv: _Projections
    output: _Projections
    gate_up: _Projections
    down: _Projections


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT adapter layer wraps (the module itself when it wraps none)."""
    while hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
        module = module.get_base_layer()
    return module


def _rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """``P`` with ``x @ P == rotate_half(x) == cat(-x[half:], x[:half])``."""
    half = head_dim // 2
    p = torch.zeros(head_dim, head_dim)
    index = torch.arange(half)
    p[index + half, index] = -1.0
    p[index, index + half] = 1.0
    return p


def _pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run ``module``'s forward pre-hooks as ``nn.Module.__call__`` does; returns the (changed) arguments."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def _post_hooks(module: nn.Module, args: tuple, kwargs: dict, output):
    """Run ``module``'s forward hooks as ``nn.Module.__call__`` does; returns the (changed) output."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


class LeanDecoder:
    """The decoding step of one model (see the module's docstring).

    It keeps the model's backbone and blocks (which do not refer back to the model), never the model
    itself: decoders are kept per model in a weak dictionary, and the model is passed to each step.
    """

    def __init__(self, model: nn.Module):
        config = model.config
        self.backbone, _, blocks = find_decoder_layers(model)
        attention = blocks[0].self_attn
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.rotate_half = _rotate_half_matrix(self.head_dim)
        self.blocks = [_Block(b, _Projections(b.self_attn, ("q_proj", "k_proj", "v_proj")),
                              _Projections(b.self_attn, ("o_proj",)),
                              _Projections(b.mlp, ("gate_proj", "up_proj")), _Projections(b.mlp, ("down_proj",)))
                       for b in blocks]

    def step(self, model: nn.Module, input_ids: torch.Tensor, cache: StepCache) -> CausalLMOutputWithPast:
        """``model(input_ids=input_ids, past_key_values=cache, use_cache=True)`` for one token: logits of
        shape ``[1, 1, vocab]``; the token's keys and values are added to ``cache``."""
        backbone = self.backbone
        kwargs = {"input_ids": input_ids, "attention_mask": None, "past_key_values": cache, "use_cache": True}
        args, kwargs = _pre_hooks(backbone, (), kwargs)
        cache.make_room()
        position = cache.length
        hidden = backbone.embed_tokens(kwargs["input_ids"])  # [1, 1, hidden]
        cos, sin = backbone.rotary_emb(hidden, torch.tensor([[position]], device=hidden.device))
        rotation = torch.diag_embed(cos[0, 0]) + self.rotate_half * sin[0, 0]  # x @ rotation: x's rotary embedding
        for index, block in enumerate(self.blocks):
            if block.block._forward_pre_hooks:  # an Engram memory's branch, added before the block
                (hidden, *_), _ = _pre_hooks(block.block, (hidden,), {})
            hidden = self._block(block, cache.keys[index], cache.values[index], hidden, rotation, position)
        cache.length = position + 1
        hidden = F.rms_norm(hidden, (self.hidden,), backbone.norm.weight, backbone.norm.variance_epsilon)
        output = _post_hooks(backbone, args, kwargs, BaseModelOutputWithPast(last_hidden_state=hidden,
                                                                              past_key_values=cache))
        logits = model.lm_head(output.last_hidden_state)
        return CausalLMOutputWithPast(logits=logits, past_key_values=output.past_key_values)

    def _block(self, block: _Block, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor,
               rotation: torch.Tensor, position: int) -> torch.Tensor:
        """One decoder block for the token at ``position``; ``keys``/``values``: this block's cache buffers."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        norm = block.block._modules["input_layernorm"]  # read on each step: a module may be replaced
        qkv = block.qkv(F.rms_norm(hidden, (self.hidden,), norm.weight, norm.variance_epsilon)).view(-1)
        qk = qkv[:(heads + kv_heads) * head_dim].view(heads + kv_heads, head_dim) @ rotation
        keys[:, position] = qk[heads:]
        values[:, position] = qkv[(heads + kv_heads) * head_dim:].view(kv_heads, head_dim)
        query = qk[:heads].view(kv_heads, heads // kv_heads, head_dim)  # query heads grouped by their kv head
        scores = torch.bmm(query, keys[:, :position + 1].transpose(1, 2)).mul_(self.scaling)
        mixed = torch.bmm(torch.softmax(scores, dim=-1), values[:, :position + 1])
        hidden = hidden + block.output(mixed.view(1, 1, heads * head_dim))
        norm = block.block._modules["post_attention_layernorm"]
        gate, up = block.gate_up(F.rms_norm(hidden, (self.hidden,), norm.weight, norm.variance_epsilon)).chunk(2, dim=-1)
        return hidden + block.down(F.silu(gate) * up)


def unsupported(model: nn.Module) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} is not one of {', '.join(FAMILIES)}"
    if not isinstance(model, PreTrainedModel) or isinstance(model, PeftModel) or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a causal LM called directly"
    if getattr(config, "sliding_window", None) is not None and (
            family == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())):
        return "it attends over a sliding window"
    if getattr(config, "hidden_act", None) != "silu":
        return f"its activation is {config.hidden_act}"
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return "it is not an fp32 model on the CPU"
    if model.training:
        return "it is in training mode (dropout)"
    backbone, _, blocks = find_decoder_layers(model)
    # Called as modules by the step (their hooks run): the embedding, the rotary module, the output
    # layer, the blocks' own pre-hooks. Computed as functions (hooks would be skipped): the rest.
    for name, module in (("the model", model), ("the final norm", backbone.norm)):
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a hook on {name} would be bypassed"
    for block in blocks:
        for name, module in block.named_modules():
            if name and (module._forward_hooks or module._forward_pre_hooks):
                return f"a hook on {name} would be bypassed"
        if block._forward_hooks:
            return "a hook after a block would be bypassed"
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module hook would be bypassed"
    return None


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LeanDecoder
_LOCK = threading.Lock()


def lean_enabled() -> bool:
    return os.environ.get("ENGRAM_LEAN", "1").strip().lower() not in ("0", "off", "false", "no")


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """The lean step for ``model`` (built once per model object), or None where it does not apply now."""
    if not lean_enabled():
        return None
    problem = unsupported(model)
    if problem is not None:
        log.debug("Decoding with the model's own forward: %s.", problem)
        return None
    with _LOCK:
        decoder = _DECODERS.get(model)
        if decoder is None:
            decoder = _DECODERS[model] = LeanDecoder(model)
        return decoder
