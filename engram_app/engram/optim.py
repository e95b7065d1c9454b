"""The paper's optimiser split (ENGRAM.md section 8).

- Tables: Adam at ``table_lr_scale`` x the base learning rate, no weight decay, and row-sparse:
  ``torch.optim.SparseAdam`` updates only the rows a batch addressed (its moment estimates are
  still dense tensors; row-wise optimiser state is the ultra-large-memory work).
- Everything else that trains (projections, norms, convolution, LoRA weights): AdamW at the base
  learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engram_app.engram.model import EngramModel


class EngramOptimizer:
    """Two optimisers stepped together; quacks like one for a training loop."""

    def __init__(self, memory: EngramModel | None, lr: float, weight_decay: float = 0.0,
                 extra_parameters: Iterable[nn.Parameter] = ()):
        dense = [p for p in extra_parameters if p.requires_grad]
        self.optimizers: list[torch.optim.Optimizer] = []
        if memory is not None:
            sparse = memory.sparse_parameters()
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr * memory.config.table_lr_scale))
            dense = memory.dense_parameters() + dense
        if dense:
            self.optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay))
        if not self.optimizers:
            raise ValueError("nothing to train: no memory and no trainable parameters")

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]
