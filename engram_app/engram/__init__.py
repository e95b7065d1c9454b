"""Engram: a sparse, hashed n-gram memory attached to a frozen causal LM (DeepSeek, arXiv 2601.07372).

This package stands alone: it imports torch, transformers-compatible models, safetensors and
peft, and nothing else from the app.

Files, one concept each (after PEFT's tuner layout):

- ``config.py``       :class:`EngramConfig`, the shape and addressing of a memory
- ``compression.py``  tokenizer compression (token id -> canonical id)
- ``hashing.py``      suffix n-grams, multiplicative-XOR hashing, prime-modulus heads, row layout;
                      :func:`rows_for`, the rows one n-gram addresses (e.g. for an index of n-grams)
- ``storage.py``      where rows live: an ``nn.Embedding`` with sparse grads, or :class:`MappedTable`
                      (only written rows, in files mapped from disk: tables larger than RAM)
- ``layer.py``        :class:`EngramBlock`, the gate + convolution maths of one Engram layer
- ``model.py``        :class:`EngramModel`, one memory: finding blocks, hooks, decoding state, tracing
- ``tuner.py``        :class:`EngramTuner`, the PEFT tuner: memories by adapter name, save/load hooks
- ``registration.py`` the ``PeftType`` member and ``register_peft_method``
- ``io.py``           adapter folders: save, load (also the pre-PEFT format), base-model checks
- ``optim.py``        the optimiser split (row-wise lazy Adam for tables at 5x, AdamW for the rest)
- ``lora.py``         a PEFT LoRA adapter beside the memory
- ``trace.py``        per-token, per-layer reports of which slots fired (:func:`ngram_text`: how
                      a slot's n-gram is written)

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

What the app needs beyond that is exported here too (file names of an adapter folder, format
versions, fingerprints, the layout and rows of n-grams, the PEFT attach/bind calls), so nothing
outside this folder imports its modules.

Usage::

    memory = attach_engram(model, tokenizer, EngramConfig(layers=[1]))
    optimizer = EngramOptimizer(memory, lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss; loss.backward(); optimizer.step()
    save_engram(memory, "my-memory")
    memory = load_engram(fresh_model, tokenizer, "my-memory")
"""

from .card import CARD_NAME, write_model_card
from .compression import tokenizer_fingerprint
from .config import FORMAT_VERSION, STORAGES, EngramConfig
from .hashing import build_layout, rows_for, shifted_ngrams
from .io import CONFIG_NAME, LORA_DIR, load_engram, load_lora, read_adapter_config, save_engram, write_adapter
from .layer import EngramBlock
from .lora import DEFAULT_TARGETS, attach_lora
from .model import (
    BLOCKS_FINGERPRINT_ATTR,
    EngramAttachError,
    EngramModel,
    LayerTrace,
    attach_engram,
    base_fingerprint,
    blocks_fingerprint,
    find_decoder_layers,
)
from .optim import EngramOptimizer
from .registration import add_peft_type, register_engram
from .storage import MAPPED_FORMAT, MAPPED_VERSION, MappedTable
from .trace import TokenTrace, ngram_text, reports, trace_tokens
from .tuner import SECOND_TIME_WARNING, WEIGHTS_NAME, EngramLayer, EngramTuner, attach, bind

register_engram()

__all__ = [
    "add_peft_type",
    "attach",
    "attach_engram",
    "attach_lora",
    "base_fingerprint",
    "bind",
    "blocks_fingerprint",
    "BLOCKS_FINGERPRINT_ATTR",
    "build_layout",
    "CARD_NAME",
    "CONFIG_NAME",
    "DEFAULT_TARGETS",
    "EngramAttachError",
    "EngramBlock",
    "EngramConfig",
    "EngramLayer",
    "EngramModel",
    "EngramOptimizer",
    "EngramTuner",
    "find_decoder_layers",
    "FORMAT_VERSION",
    "LayerTrace",
    "load_engram",
    "load_lora",
    "LORA_DIR",
    "MAPPED_FORMAT",
    "MAPPED_VERSION",
    "MappedTable",
    "ngram_text",
    "read_adapter_config",
    "register_engram",
    "reports",
    "rows_for",
    "save_engram",
    "SECOND_TIME_WARNING",
    "shifted_ngrams",
    "STORAGES",
    "tokenizer_fingerprint",
    "TokenTrace",
    "trace_tokens",
    "WEIGHTS_NAME",
    "write_adapter",
    "write_model_card",
]
