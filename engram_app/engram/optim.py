"""The paper's optimiser split (ENGRAM.md section 8), with row-wise state for the tables.

- Tables: Adam at ``table_lr_scale`` x the base learning rate, no weight decay, row-sparse.
  :class:`RowwiseAdam` keeps moment estimates only for rows a batch has addressed, allocated on
  first touch (with a per-row step count for bias correction, as "lazy" Adam does), so optimiser
  memory grows with the rows touched, not with the table. ``torch.optim.SparseAdam`` would keep
  two dense tensors the size of the table. It works on any table storage (in memory, or mapped
  from disk) through the storage's row-gradient methods.
- Everything else that trains (projections, norms, convolution, LoRA weights): AdamW at the base
  learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .model import EngramModel
from .storage import ParameterRows, TableStorage


class _ParameterRows(ParameterRows):
    """A plain [rows, dim] parameter seen as a table (for :class:`RowwiseAdam` on any weight)."""

    def __init__(self, weight: nn.Parameter):
        self.weight, self.dim = weight, weight.shape[1]


class RowwiseAdam:
    """Adam for a table with row-sparse gradients; state only for touched rows.

    ``target``: a :class:`TableStorage` (in memory or mapped) or a plain [rows, dim] parameter.
    """

    def __init__(self, target: TableStorage | nn.Parameter, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.table = target if isinstance(target, TableStorage) else _ParameterRows(target)
        self.table.start_recording()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight = getattr(self.table, "weight", None)  # None: rows outside autograd (a mapped table)
        dim, device = self.table.dim, self.weight.device if self.weight is not None else torch.device("cpu")
        self.rows = torch.empty(0, dtype=torch.long, device=device)  # sorted ids of rows with state
        self.exp_avg = torch.empty(0, dim, device=device)
        self.exp_avg_sq = torch.empty(0, dim, device=device)
        self.steps = torch.empty(0, dtype=torch.long, device=device)

    @property
    def param_groups(self) -> list[dict]:
        return [{"params": [self.weight] if self.weight is not None else [], "lr": self.lr}]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.exp_avg, self.exp_avg_sq, self.steps))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.table.clear_row_gradients()

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        """State positions of ``ids`` (sorted, unique), creating zero state for new rows."""
        pos = torch.searchsorted(self.rows, ids)
        known = pos < len(self.rows)
        known[known.clone()] = self.rows[pos[known]] == ids[known]
        new = ids[~known]
        if len(new):
            dim = self.exp_avg.shape[1]
            rows = torch.cat([self.rows, new])
            order = rows.argsort()
            zeros = torch.zeros(len(new), dim, device=rows.device)
            self.rows = rows[order]
            self.exp_avg = torch.cat([self.exp_avg, zeros])[order]
            self.exp_avg_sq = torch.cat([self.exp_avg_sq, zeros])[order]
            self.steps = torch.cat([self.steps, torch.zeros(len(new), dtype=torch.long, device=rows.device)])[order]
            pos = torch.searchsorted(self.rows, ids)
        return pos

    @torch.no_grad()
    def step(self) -> None:
        gradients = self.table.row_gradients()
        if gradients is None or not len(gradients[0]):
            return
        ids, values = gradients
        ids, values = ids.to(self.rows.device), values.to(self.rows.device)
        slots = self._slots(ids)
        beta1, beta2 = self.betas
        m = self.exp_avg[slots].mul_(beta1).add_(values, alpha=1 - beta1)
        v = self.exp_avg_sq[slots].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        t = self.steps[slots] + 1
        self.exp_avg[slots], self.exp_avg_sq[slots], self.steps[slots] = m, v, t
        m_hat = m / (1 - beta1 ** t.unsqueeze(1).float())
        v_hat = v / (1 - beta2 ** t.unsqueeze(1).float())
        self.table.apply_row_update(ids, -self.lr * m_hat / (v_hat.sqrt() + self.eps))

    def state_dict(self) -> dict:
        return {"rows": self.rows, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        device = self.rows.device
        self.rows, self.exp_avg = state["rows"].to(device), state["exp_avg"].to(device)
        self.exp_avg_sq, self.steps = state["exp_avg_sq"].to(device), state["steps"].to(device)

    @property
    def rows_touched(self) -> int:
        return len(self.rows)


class EngramOptimizer:
    """The table optimiser and AdamW stepped together; quacks like one optimiser for a loop."""

    def __init__(self, memory: EngramModel | None, lr: float, weight_decay: float = 0.0,
                 extra_parameters: Iterable[nn.Parameter] = (), extra_lr: float | None = None):
        extra = [p for p in extra_parameters if p.requires_grad]
        self.optimizers: list = []
        groups = []
        if memory is not None:
            self.optimizers.append(RowwiseAdam(memory.table, lr=lr * memory.config.table_lr_scale))
            groups.append({"params": memory.dense_parameters(), "lr": lr})
        if extra:  # e.g. LoRA weights, at their own learning rate when given
            groups.append({"params": extra, "lr": extra_lr if extra_lr is not None else lr})
        groups = [g for g in groups if g["params"]]
        if groups:
            self.optimizers.append(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay))
        if not self.optimizers:
            raise ValueError("nothing to train: no memory and no trainable parameters")
        self.set_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]

    def scale_lr(self, factor: float) -> None:
        """Every learning rate at ``factor`` x the one it was made with (a schedule's step)."""
        for opt, lrs in zip(self.optimizers, self.set_lrs):
            if isinstance(opt, RowwiseAdam):
                opt.lr = lrs[0] * factor
            else:
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr * factor

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimiser state for {len(states)} optimisers, this one has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)

    @property
    def rows_touched(self) -> int:
        """Table rows with optimiser state: the rows training has written so far."""
        return sum(opt.rows_touched for opt in self.optimizers if isinstance(opt, RowwiseAdam))
