"""Where the memory's rows live. The layer only calls :meth:`TableStorage.lookup`.

Keeping storage behind this small interface lets the rows move (to a memory-mapped file, to
pinned host memory with prefetch) without touching the layer or the addressing.
"""

from __future__ import annotations

import torch
from torch import nn


class TableStorage(nn.Module):
    """A [num_rows, dim] matrix of memory rows, read by row index."""

    num_rows: int
    dim: int

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors of ``rows`` (any shape of int64 indices) -> ``rows.shape + (dim,)``."""
        raise NotImplementedError

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are row-sparse (to be given to a sparse optimizer)."""
        raise NotImplementedError


class EmbeddingTable(TableStorage):
    """All rows in one ``nn.Embedding`` with sparse gradients: a step only touches the rows it read."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.embedding = nn.Embedding(num_rows, dim, sparse=True)
        with torch.no_grad():
            if init_std > 0:
                self.embedding.weight.normal_(0.0, init_std)
            else:
                self.embedding.weight.zero_()

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embedding(rows)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.weight]
