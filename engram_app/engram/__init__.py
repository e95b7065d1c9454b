"""Engram: a sparse, hashed n-gram memory attached to a frozen causal LM (DeepSeek, arXiv 2601.07372).

This package stands alone: it imports torch, transformers-compatible models, safetensors and
peft, and nothing else from the app.

Files, one concept each (after PEFT's tuner layout):

- ``config.py``       :class:`EngramConfig`, the shape and addressing of a memory
- ``compression.py``  tokenizer compression (token id -> canonical id)
- ``hashing.py``      suffix n-grams, multiplicative-XOR hashing, prime-modulus heads, row layout
- ``storage.py``      where rows live: an ``nn.Embedding`` with sparse grads, or :class:`MappedTable`
                      (only written rows, in files mapped from disk: tables larger than RAM)
- ``layer.py``        :class:`EngramBlock`, the gate + convolution maths of one Engram layer
- ``model.py``        :class:`EngramModel`, one memory: finding blocks, hooks, decoding state, tracing
- ``tuner.py``        :class:`EngramTuner`, the PEFT tuner: memories by adapter name, save/load hooks
- ``registration.py`` the ``PeftType`` member and ``register_peft_method``
- ``io.py``           adapter folders: save, load (also the pre-PEFT format), base-model checks
- ``optim.py``        the optimiser split (row-wise lazy Adam for tables at 5x, AdamW for the rest)
- ``lora.py``         a PEFT LoRA adapter beside the memory
- ``trace.py``        per-token, per-layer reports of which slots fired

Engram is a PEFT method. Importing this package registers it with ``peft`` (``peft_type``
"ENGRAM", see ``registration.py``), so the standard calls work::

    import engram_app.engram
    from peft import PeftModel, get_peft_model
    model = get_peft_model(base, EngramConfig(tokenizer=tokenizer))     # EngramConfig is a PeftConfig
    model.save_pretrained("my-memory")                                  # a PEFT adapter folder
    model = PeftModel.from_pretrained(fresh_base, "my-memory")          # no tokenizer needed

PEFT's tuners replace target modules with adapter layers that see only their own input. Engram
needs the *token ids* of the whole call, and state that persists across decoding steps, at the
start of chosen blocks: so the tuner (``tuner.py``) targets the backbone and each memory attaches
with forward hooks (no model code edited, any family whose backbone owns an ``nn.ModuleList`` of
blocks). Several memories can live on one model (``add_adapter``/``set_adapter``: only the
active one fires), and a real ``peft`` LoRA adapter composes with them on the same model. The
app's own API below is implemented on that tuner. "Engram only", "LoRA only" and "Engram + LoRA"
are all trained by the same loop.

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
from engram_app.engram.registration import add_peft_type, register_engram
from engram_app.engram.trace import TokenTrace, trace_tokens
from engram_app.engram.tuner import EngramLayer, EngramTuner

register_engram()

__all__ = [
    "EngramAttachError",
    "EngramConfig",
    "EngramLayer",
    "EngramModel",
    "EngramOptimizer",
    "EngramTuner",
    "TokenTrace",
    "add_peft_type",
    "attach_engram",
    "attach_lora",
    "find_decoder_layers",
    "load_engram",
    "load_lora",
    "read_adapter_config",
    "register_engram",
    "save_engram",
    "trace_tokens",
]
