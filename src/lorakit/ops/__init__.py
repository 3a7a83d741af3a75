"""Kernels for the LoRA branch.

Reference implementation; the fast path (shared dropout masks, fused autograd) is built here
behind the same two names, so layers never change when the kernels do.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SharedDropout", "lora_delta"]


class SharedDropout(nn.Module):
    """Dropout whose mask is reused when the same input tensor comes again in a row.

    q/k/v (and gate/up) read the same hidden state; drawing one mask for them instead of one
    each keeps dropout's meaning per module (each element kept with probability 1-p, scaled by
    1/(1-p)) at a fraction of the cost.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self._last_in: torch.Tensor | None = None
        self._last_out: torch.Tensor | None = None
        self._last_version = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self._last_in is x and self._last_in._version == self._last_version:
            return self._last_out
        out = nn.functional.dropout(x, self.p, training=True)
        self._last_in, self._last_version, self._last_out = x, x._version, out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               dropout: nn.Module | None) -> torch.Tensor:
    """scaling * B(A(dropout(x))) with x [..., in], A [r, in], B [out, r]."""
    if dropout is not None:
        x = dropout(x)
    return (x.to(A.dtype) @ A.t() @ B.t()) * scaling
