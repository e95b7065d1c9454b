"""Engram: a sparse, hashed n-gram memory attached to a frozen causal LM (DeepSeek, arXiv 2601.07372).

This package stands alone: it imports torch, transformers-compatible models, safetensors and
(optionally) peft, and nothing else from the app.

Files, one concept each (after PEFT's tuner layout):

- ``config.py``       :class:`EngramConfig`, the shape and addressing of a memory
- ``compression.py``  tokenizer compression (token id -> canonical id)
- ``hashing.py``      suffix n-grams, multiplicative-XOR hashing, prime-modulus heads, row layout
- ``storage.py``      where rows live: an ``nn.Embedding`` with sparse grads, or :class:`MappedTable`
                      (only written rows, in files mapped from disk: tables larger than RAM)
- ``layer.py``        :class:`EngramBlock`, the gate + convolution maths of one Engram layer
- ``model.py``        :func:`attach_engram`: finding blocks, hooks, decoding state, tracing
- ``io.py``           adapter folders: save, load, base-model fingerprint checks
- ``optim.py``        the optimiser split (row-wise lazy Adam for tables at 5x, AdamW for the rest)
- ``lora.py``         a PEFT LoRA adapter beside the memory
- ``trace.py``        per-token, per-layer reports of which slots fired

How it relates to PEFT. PEFT's tuners (``BaseTuner``) work by replacing target modules with
adapter layers that see only their own input. Engram needs the *token ids* of the whole call,
and state that persists across decoding steps, at the start of chosen blocks: neither fits the
module-replacement machinery without forking PEFT's model classes. So the memory attaches with
forward hooks (no model code edited, any family whose backbone owns an ``nn.ModuleList`` of
blocks), and follows PEFT where it can: the adapter folder convention
(``adapter_config.json`` with a ``peft_type`` + ``adapter_model.safetensors``), a frozen base,
and composition with a real ``peft`` LoRA adapter in the same model (saved in ``lora/`` inside
the memory folder, loaded with ``PeftModel.from_pretrained``). "Engram only", "LoRA only" and
"Engram + LoRA" are all trained by the same loop.

Usage::

    memory = attach_engram(model, tokenizer, EngramConfig(layers=[1]))
    optimizer = EngramOptimizer(memory, lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss; loss.backward(); optimizer.step()
    save_engram(memory, "my-memory")
    memory = load_engram(fresh_model, tokenizer, "my-memory")
"""

from engram_app.engram.config import EngramConfig
from engram_app.engram.io import load_engram, load_lora, read_adapter_config, save_engram
from engram_app.engram.lora import attach_lora
from engram_app.engram.model import EngramAttachError, EngramModel, attach_engram, find_decoder_layers
from engram_app.engram.optim import EngramOptimizer
from engram_app.engram.trace import TokenTrace, trace_tokens

__all__ = [
    "EngramAttachError",
    "EngramConfig",
    "EngramModel",
    "EngramOptimizer",
    "TokenTrace",
    "attach_engram",
    "attach_lora",
    "find_decoder_layers",
    "load_engram",
    "load_lora",
    "read_adapter_config",
    "save_engram",
    "trace_tokens",
]
