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

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
