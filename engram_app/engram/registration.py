"""Making Engram a PEFT method: its ``PeftType`` member and its registration with ``peft``.

PEFT 0.21 registers a method (``peft.utils.register_peft_method``) only under a name that is a
member of its ``PeftType`` enum, and the enum lists PEFT's own methods. It is a plain ``str``
enum, so :func:`add_peft_type` adds a member the way ``enum`` creates its own; everything else
goes through PEFT's public API. Importing :mod:`engram_app.engram` calls :func:`register_engram`,
after which ``PeftConfig.from_pretrained``, ``get_peft_model`` and ``PeftModel.from_pretrained``
know Engram adapters.
"""

from __future__ import annotations

from peft.utils import PeftType

ENGRAM = "ENGRAM"


def add_peft_type(name: str) -> PeftType:
    """The ``PeftType`` member ``name`` (upper case), added to the enum if PEFT lacks it.

    Idempotent. The member behaves like PEFT's own: ``PeftType.NAME``, ``PeftType("NAME")``,
    ``PeftType["NAME"]``, ``list(PeftType)`` and ``member == "NAME"`` all work, and it serialises
    to JSON as ``"NAME"``.
    """
    name = name.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members; this is what enum does
    return member


def register_engram() -> None:
    """Register Engram with PEFT (``peft_type`` "ENGRAM", state-dict prefix ``engram_``). Idempotent."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import EngramConfig
    from .tuner import EngramTuner

    peft_type = add_peft_type(ENGRAM)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=ENGRAM.lower(), config_cls=EngramConfig, model_cls=EngramTuner, prefix=EngramTuner.prefix)
