"""The maths of one Engram module: gate the retrieved memory by the hidden state, convolve, add.

With h_t the hidden state entering the chosen block and e_t the concatenated rows it addressed:

    k_t = W_K e_t,   v_t = W_V e_t
    s_t = <RMSNorm(h_t), RMSNorm(k_t)> / sqrt(d);   s_t = sign(s_t) sqrt(max(|s_t|, 1e-6))
    alpha_t = sigmoid(s_t);   u_t = alpha_t v_t
    Y = SiLU(CausalDepthwiseConv1d(RMSNorm(U))) + U      (kernel 4, dilation = max n-gram order)
    h_t <- h_t + Y_t

W_V and the convolution start at zero, so at initialisation Y = 0 and the adapted model computes
exactly what the base model computes. The branch runs in float32 whatever the base dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BlockOutput:
    y: torch.Tensor  # [B, T, hidden] what is added to the residual stream (in the input dtype)
    conv_input: torch.Tensor | None  # [B, T, hidden] RMSNorm(U) at these positions (0 at padding): later steps' context
    gate: torch.Tensor  # [B, T] alpha_t
    score: torch.Tensor  # [B, T] s_t after the signed square root (pre-sigmoid)
    ratio: torch.Tensor | None  # [B, T] |Y_t| / |h_t| (when asked for)


class EngramBlock(nn.Module):
    # The compiled kernels whose ``memory_step`` runs one-token steps (engram_app/inference/native.py), set by
    # :func:`use_native_step` once chat has the C kernels in this process; None: PyTorch only.
    native = None

    def __init__(self, hidden_size: int, memory_width: int, kernel_size: int = 4, dilation: int = 3,
                 use_conv: bool = True, eps: float = 1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.key = nn.Linear(memory_width, hidden_size, bias=False)
        self.value = nn.Linear(memory_width, hidden_size, bias=False)
        self.norm_h = nn.RMSNorm(hidden_size, eps=eps)
        self.norm_k = nn.RMSNorm(hidden_size, eps=eps)
        self.use_conv = use_conv
        self.context = (kernel_size - 1) * dilation  # how many earlier positions the conv sees
        if use_conv:
            self.norm_u = nn.RMSNorm(hidden_size, eps=eps)
            self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, dilation=dilation, groups=hidden_size, bias=False)
            nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.value.weight)
        self._weights = ("key", "value", "norm_h", "norm_k") + (("norm_u", "conv") if use_conv else ())
        self._native_plan = None  # (weights' addresses, kernels, the C step's fixed arguments): _native_step

    def _conv(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """Causal depthwise convolution of x [B, context + T, H] -> [B, T, H]."""
        if steps == 1:
            # One decoding step: the kernel's taps are single positions; an elementwise product and a
            # sum are several times cheaper than a convolution call on the CPU.
            taps = x[:, x.shape[1] - 1 - self.context:: self.conv.dilation[0]]  # [B, K, H], oldest first
            return (taps * self.conv.weight[:, 0].t()).sum(1, keepdim=True)
        return self.conv(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
                conv_state: torch.Tensor | None, with_ratio: bool = False) -> BlockOutput:
        """hidden [B, T, H]; memory [B, T, W] retrieved rows; mask [B, T] (False: padding; None: no padding).

        ``conv_state`` [B, <= context, H]: the convolution inputs (``conv_input`` of earlier calls) of
        the positions just before these, oldest first; missing ones (the start of the sequence) are
        zeros. ``with_ratio`` also computes |Y|/|h| per token (for traces; skipped otherwise).

        The layers are called through their functions (``F.linear``, ``F.rms_norm``: what the modules'
        own ``forward`` calls), which saves a module call each on every decoding step.
        """
        if (EngramBlock.native is not None and mask is None and hidden.shape[:2] == (1, 1)
                and hidden.dtype == torch.float32 and hidden.device.type == "cpu" and not torch.is_grad_enabled()):
            out = self._native_step(hidden, memory, conv_state, with_ratio)
            if out is not None:
                return out
        h = hidden.float()
        e = memory.float()
        keep = None if mask is None else mask.unsqueeze(-1).float()
        k = F.linear(e, self.key.weight)
        v = F.linear(e, self.value.weight)
        score = (self._norm(h, self.norm_h) * self._norm(k, self.norm_k)).sum(-1) / math.sqrt(self.hidden_size)
        score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        gate = torch.sigmoid(score)
        u = gate.unsqueeze(-1) * v
        if keep is not None:
            u = u * keep
        normed = None
        if self.use_conv:
            normed = self._norm(u, self.norm_u)
            if keep is not None:
                normed = normed * keep
            earlier = normed[:, :0] if conv_state is None else conv_state.to(normed.dtype)
            earlier = earlier[:, earlier.shape[1] - min(earlier.shape[1], self.context):]
            parts = [earlier, normed]
            if earlier.shape[1] < self.context:  # the start of a sequence: zeros before it
                parts.insert(0, normed.new_zeros(normed.shape[0], self.context - earlier.shape[1], normed.shape[2]))
            x = torch.cat(parts, dim=1)  # [B, context + T, H]
            y = F.silu(self._conv(x, u.shape[1])) + u
        else:
            y = u
        if keep is not None:
            y = y * keep
            gate, score = gate * mask, score * mask
        ratio = y.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12) if with_ratio else None
        return BlockOutput(y.to(hidden.dtype), normed, gate, score, ratio)

    def _native_step(self, hidden: torch.Tensor, memory: torch.Tensor, conv_state: torch.Tensor | None,
                     with_ratio: bool) -> BlockOutput | None:
        """:meth:`forward` for one token through the C step (one call instead of ~40 small operations:
        docs/BENCHMARKS.md); None where it does not take these tensors."""
        kernels = EngramBlock.native
        # The weights' addresses, read without nn.Module's attribute lookups (~2 us, not ~20): the
        # C call's fixed arguments are built again only when one of them has moved.
        modules = self._modules
        where = tuple(modules[name]._parameters["weight"].data_ptr() for name in self._weights)
        if self._native_plan is None or self._native_plan[0] != where or self._native_plan[1] is not kernels:
            self._native_plan = (where, kernels, kernels.memory_step_plan(self))
        plan = self._native_plan[2]
        if plan is None:
            return None
        state = None  # the C step reads the last `context` rows itself
        if conv_state is not None and conv_state.shape[1] and self.use_conv:
            state = conv_state[0]
        result = kernels.memory_step(plan, hidden.reshape(-1), memory.reshape(-1).float(), state)
        if result is None:
            return None
        y, normed, gate_score_ratio = result
        gate, score, ratio = gate_score_ratio.view(3, 1, 1).unbind()
        return BlockOutput(y.view(1, 1, -1), None if normed is None else normed.view(1, 1, -1), gate, score,
                           ratio if with_ratio else None)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def use_native_step(kernels) -> None:
    """Run every :class:`EngramBlock`'s one-token inference steps through ``kernels.memory_step``
    (``models.use_int4`` calls this when it has the C kernels, vectorised; None: PyTorch again)."""
    EngramBlock.native = kernels
