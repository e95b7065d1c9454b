"""LoRA beside (or instead of) the memory, with Hugging Face PEFT.

PEFT wraps the base model (``get_peft_model``); the Engram memory is another PEFT adapter on the
same base model (its own ``PeftModel``, see tuner.py), whose hooks sit on the backbone and its
blocks, which LoRA leaves in place: both adapters act in the same forward pass, and each saves
and switches only its own weights. Attach the memory before or after LoRA, to the unwrapped base
model.
"""

from __future__ import annotations

from torch import nn

# Attention and MLP projections by family; PEFT matches module names by suffix.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "qkv_proj"]


def attach_lora(base_model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                target_modules: list[str] | None = None):
    """Return ``base_model`` wrapped by a trainable PEFT LoRA adapter (the base stays frozen)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in base_model.named_modules()}
    targets = [t for t in (target_modules or DEFAULT_TARGETS) if t in names]
    if not targets:
        raise ValueError(f"no LoRA target modules found among {target_modules or DEFAULT_TARGETS}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(base_model, config)
