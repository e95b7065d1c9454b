"""Configuration of an Engram memory: where it sits, how it addresses, how big it is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

FORMAT_VERSION = 1
STORAGES = ("memory", "mapped")


@dataclass
class EngramConfig:
    """Everything that determines an Engram memory's shape and addressing.

    Two memories with equal configs attached to the same base model address the same rows for
    the same tokens, so a saved memory is reproduced exactly from this config and its weights.
    """

    layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based decoder blocks that receive memory at their start. None: the 2nd block (index 1), "
                          "as the paper found best for a single module."},
    )
    orders: tuple[int, ...] = field(
        default=(2, 3), metadata={"help": "n-gram orders; each n-gram ends at (and includes) the current token."}
    )
    heads: int = field(default=8, metadata={"help": "hash heads per order (K); heads differ only by their prime modulus."})
    rows_per_head: int = field(
        default=32_749,
        metadata={"help": "rows of each (order, head) table; the actual size is the next unused prime at or above."},
    )
    head_dim: int = field(default=32, metadata={"help": "width d_h of each retrieved row; the memory width is orders*heads*d_h."})
    kernel_size: int = field(default=4, metadata={"help": "kernel of the causal depthwise convolution."})
    use_conv: bool = field(default=True, metadata={"help": "apply the short convolution (the paper found it helps a little)."})
    init_std: float = field(default=0.02, metadata={"help": "std of the N(0, std) table initialisation (0: zeros)."})
    seed: int = field(default=0, metadata={"help": "seed of the hash multipliers (layer l uses seed + 10007*l)."})
    table_lr_scale: float = field(default=5.0, metadata={"help": "table learning rate as a multiple of the base rate."})
    storage: str = field(
        default="memory",
        metadata={"help": "where the table's rows live: 'memory' (all rows in RAM or on the GPU) or 'mapped' (only "
                          "written rows, in files mapped from disk: for tables larger than RAM)."},
    )
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.orders = tuple(sorted(set(int(n) for n in self.orders)))
        if not self.orders or self.orders[0] < 1:
            raise ValueError("orders must be positive n-gram lengths, e.g. (2, 3)")
        if self.heads < 1 or self.rows_per_head < 2 or self.head_dim < 1:
            raise ValueError("heads, rows_per_head and head_dim must be positive")
        if self.layers is not None:
            self.layers = sorted(set(int(x) for x in self.layers))
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, not {self.storage!r}")

    @property
    def max_order(self) -> int:
        return max(self.orders)

    @property
    def dilation(self) -> int:
        """The convolution's dilation: the largest n-gram order (3 by default)."""
        return self.max_order

    @property
    def memory_width(self) -> int:
        return len(self.orders) * self.heads * self.head_dim

    def to_dict(self) -> dict:
        data = asdict(self)
        data["orders"] = list(self.orders)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EngramConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Engram config fields: {sorted(unknown)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"this memory was saved by a newer version (format {data['format_version']}, this code reads "
                f"{FORMAT_VERSION}): update Engram Studio"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
