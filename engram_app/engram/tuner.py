"""Engram as a PEFT tuner: ``get_peft_model(model, EngramConfig(...))`` and everything PEFT does with it.

PEFT's tuners replace target modules with adapter layers that see only their own input. Engram
needs the token ids of the whole call, and state that persists across decoding steps, at the
start of chosen blocks: so its target is the *backbone* (the module that owns the decoder
blocks), and each memory (:class:`~engram_app.engram.model.EngramModel`: addressing, table,
per-block gates) attaches to it with forward hooks instead of replacing a module.

- :class:`EngramTuner` (a ``BaseTuner``) holds the memories, one per adapter name, in an
  :class:`EngramLayer` (a ``BaseTunerLayer``) of its own. The memories are not inserted into the
  base model's module tree, so another PEFT method on the same model (a LoRA adapter) neither
  saves nor switches them, and they never save its weights.
- Only the active adapter's memory fires; ``disable_adapter()`` silences all of them, which
  gives exactly the base model's logits. Adapters never share a table.
- Saving goes through PEFT (``get_peft_model_state_dict``), with two additions: the memory's
  token-compression map travels in the weights file (so loading needs no tokenizer), and a mapped
  table's rows are written beside it by :meth:`EngramConfig.save_pretrained` (never densified).
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors import safe_open
from torch import nn

from .config import TABLE_DIR, EngramConfig
from .model import EngramAttachError, EngramModel, find_decoder_layers, model_fingerprint
from .storage import MappedTable, TableStorage

LAYER_ATTR = "engram_memory"  # the tuner's attribute holding the EngramLayer
MEMORIES = "memories"  # the EngramLayer's ModuleDict: adapter name -> EngramModel
COMPRESSION = "compression"  # state-dict entry of a memory's token map (a non-persistent buffer)
WEIGHTS_NAME = "adapter_model.safetensors"
SECOND_TIME_WARNING = "You are trying to modify a model with PEFT for a second time"


class EngramLayer(nn.Module, BaseTunerLayer):
    """The Engram memories of one model, by adapter name (PEFT's view of them as one tuner layer).

    It is not called: each memory acts through its own hooks on the backbone and the chosen
    blocks, and fires only while it is the active adapter and adapters are enabled.
    """

    adapter_layer_names = (MEMORIES,)

    def __init__(self, backbone: nn.Module):
        nn.Module.__init__(self)
        self.memories = nn.ModuleDict()
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: the base model owns it
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    def get_base_layer(self) -> nn.Module:
        return self._backbone

    def add_memory(self, adapter_name: str, memory: EngramModel) -> None:
        self.memories[adapter_name] = memory
        self._sync()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"Only one Engram memory can be active at a time, not {names}: each one reads the "
                             "model's token ids on its own.")
        super().set_adapter(names, inference_mode=inference_mode)
        self._sync()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._sync()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.memories:
            self.memories[adapter_name].detach()
        super().delete_adapter(adapter_name)
        self._sync()

    def _sync(self) -> None:
        """Switch each memory's hooks on or off: only the active memory fires, none while disabled."""
        for name, memory in self.memories.items():
            memory.enabled = not self.disable_adapters and name in self.active_adapters

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        if adapter_name in self.memories:
            self.memories[adapter_name].to(device or next(self._backbone.parameters()).device)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, but keep float32: the memory's branch computes in float32 (layer.py)."""
        super()._apply(fn, recurse)
        for tensor in [*self.parameters(), *self.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self


class EngramTuner(BaseTuner):
    """PEFT's tuner model for Engram (registered as ``peft_type`` "ENGRAM", see registration.py)."""

    prefix = "engram_"
    tuner_layer_cls = EngramLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True  # the memories live on the tuner, beside the model, not inside it

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: dict | None = None) -> None:
        # BaseTuner adopts a ``peft_config`` it finds on the model (another PeftModel's, e.g. LoRA's)
        # and leaves its own there for the next one: keep the two methods' configs apart.
        previous = model.__dict__.pop("peft_config", None)
        try:
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                             state_dict=state_dict)
        finally:
            model.__dict__.pop("peft_config", None)
            if previous is not None:
                model.peft_config = previous

    # --- injection ------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        if LAYER_ATTR not in self._modules:
            backbone, _, _ = find_decoder_layers(model)
            self.engram_memory = EngramLayer(backbone)

    def _prepare_adapter_config(self, peft_config: EngramConfig, model_config: dict) -> EngramConfig:
        """A private copy for this adapter (it will describe this memory), targeting the backbone."""
        config = copy.deepcopy(peft_config)
        backbone, _, _ = find_decoder_layers(self.model)
        name = next(name for name, module in self.model.named_modules() if module is backbone)
        if not name:
            raise EngramAttachError(f"Pass the whole causal LM (with its head), not its backbone "
                                    f"{type(backbone).__name__}: the memory hooks onto the backbone.")
        config.target_modules = re.escape(name)
        return config

    def _create_and_replace(self, peft_config: EngramConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs) -> None:
        check_base_model(self.model, peft_config)
        compression = None if peft_config.tokenizer is not None else self._saved_compression(peft_config)
        table = peft_config._table if peft_config._table is not None else saved_table(peft_config)
        memory = EngramModel(self.model, peft_config.tokenizer, peft_config, table, compression=compression)
        memory.adapter_name = adapter_name
        peft_config.base_model_fingerprint = memory.fingerprint()
        peft_config._table, peft_config._memory = None, memory
        self.peft_config[adapter_name] = peft_config  # the prepared copy is what PEFT saves for this adapter
        self.engram_memory.add_memory(adapter_name, memory)

    def _saved_compression(self, config: EngramConfig) -> tuple[torch.Tensor, str]:
        """The token map when no tokenizer was given: from the folder the config came from, else
        from another memory on this model (same model, same tokenizer)."""
        if config._source is not None and (config._source / WEIGHTS_NAME).is_file():
            return read_compression(config._source / WEIGHTS_NAME), config.base_model_fingerprint["tokenizer_sha256"]
        for memory in self.engram_memory.memories.values():
            return memory.compression.cpu(), memory.tokenizer_fingerprint
        raise EngramAttachError("A new Engram memory needs the base model's tokenizer: EngramConfig(tokenizer=...).")

    # --- one memory at a time -------------------------------------------------------------------

    def memory(self, adapter_name: str) -> EngramModel:
        return self.engram_memory.memories[adapter_name]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.engram_memory.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.engram_memory.enable_adapters(enabled)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self.engram_memory.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        self.engram_memory.delete_adapter(adapter_name)
        self.active_adapter = self.engram_memory.active_adapters

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError("An Engram memory cannot be merged into the base weights: it is a lookup by token ids, "
                         "not a change of weights. Use unload() to take it off.")

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        self.merge_adapter()

    def unload(self) -> nn.Module:
        """Take every memory off (their hooks are removed) and return the base model as it was."""
        for memory in self.engram_memory.memories.values():
            memory.detach()
        del self.engram_memory
        return self.model

    # --- saving and loading (PEFT's state-dict hooks) ---------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """This memory's entries only (never another method's layers), plus its token map."""
        out = {}
        for name, layer in _engram_layers(model, adapter_name):
            prefix = f"{name}.{MEMORIES}.{adapter_name}."
            out.update({key: value for key, value in state_dict.items() if key.startswith(prefix)})
            out[prefix + COMPRESSION] = layer.memories[adapter_name].compression
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".{MEMORIES}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{MEMORIES}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        for name, layer in _engram_layers(model, adapter_name):
            saved = state_dict.pop(f"{name}.{MEMORIES}.{COMPRESSION}", None)
            memory = layer.memories[adapter_name]
            if saved is not None:
                if saved.shape != memory.compression.shape:
                    raise EngramAttachError(f"The memory's token map covers {saved.numel()} ids; this model has "
                                            f"{memory.compression.numel()}.")
                memory.compression.copy_(saved)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _engram_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, EngramLayer]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, EngramLayer) and adapter_name in module.memories]


def read_compression(weights: Path) -> torch.Tensor:
    """The token map saved in an adapter's weights file, read alone (safetensors reads one tensor)."""
    with safe_open(str(weights), framework="pt") as f:
        keys = [key for key in f.keys() if key.endswith(f".{MEMORIES}.{COMPRESSION}")]
        if not keys:
            raise EngramAttachError(f"{weights} holds no token map: it is not an Engram memory's weights file.")
        return f.get_tensor(keys[0])


def saved_table(config: EngramConfig) -> TableStorage | None:
    """The mapped table stored beside the config it was read with (None: a new table)."""
    if config.storage != "mapped" or config._source is None or not (config._source / TABLE_DIR).is_dir():
        return None
    try:
        return MappedTable.open(config._source / TABLE_DIR)
    except (OSError, ValueError) as exc:
        raise EngramAttachError(f"The memory table in {config._source} cannot be read: {exc}") from None


def check_base_model(model: nn.Module, config: EngramConfig) -> None:
    """Refuse a saved memory (its config has a fingerprint) on a model other than the one it was trained with.

    The tokenizer is compared only when the config carries one (loading from a folder needs none:
    the token map is in the weights).
    """
    expected = config.base_model_fingerprint
    if not expected:
        return
    actual = model_fingerprint(model)
    if config.tokenizer is not None:
        from .compression import tokenizer_fingerprint

        actual["tokenizer_sha256"] = tokenizer_fingerprint(config.tokenizer)
    differences = [key for key in expected if key in actual and expected[key] != actual[key]]
    if differences:
        where = f"in {config._source}" if config._source is not None else "described by this configuration"
        details = ", ".join(f"{k}: saved {expected[k]!r}, this model {actual[k]!r}" for k in differences)
        raise EngramAttachError(
            f"The memory {where} was trained for another base model ({details}). Load it onto the model it was "
            "trained with, or train a new memory for this one."
        )


def attach(base_model: nn.Module, tokenizer, config: EngramConfig | None = None, table: TableStorage | None = None,
           adapter_name: str = "default") -> EngramModel:
    """``get_peft_model(base_model, config)`` for the app's API: the new memory, which knows its PeftModel.

    The base model is frozen; ``config`` is copied (the caller's object is left as it was);
    ``table`` replaces the one the configuration would create.
    """
    config = copy.deepcopy(config) if config is not None else EngramConfig()
    config.tokenizer, config._table = tokenizer, table
    base_model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SECOND_TIME_WARNING)  # a LoRA adapter beside it is intended
        peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    return bind(peft_model, adapter_name)


def bind(peft_model, adapter_name: str) -> EngramModel:
    """The memory ``adapter_name`` of ``peft_model``, holding a reference to it (for saving)."""
    memory = peft_model.base_model.memory(adapter_name)
    object.__setattr__(memory, "peft_model", peft_model)  # not a submodule: the PeftModel contains the memory
    return memory
