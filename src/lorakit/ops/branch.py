"""lora_delta: the LoRA branch scaling * B(A(dropout(x))), arranged to touch big tensors least.

With x [N, in], A [r, in], B [out, r], mask m and keep rate 1-p:

    delta = ((x * m) @ A.T * (scaling / (1-p))) @ B.T

Both scale factors multiply the small [N, r] product instead of an [N, in] or [N, out]
tensor, and ``x * m`` is computed once per input tensor and shared by every module reading
it (SharedDropout), so backward saves one dropped activation per input instead of one float
copy plus one mask per module.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .dropout import SharedDropout

__all__ = ["lora_delta"]


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               dropout: nn.Module | None) -> torch.Tensor:
    """scaling * B(A(dropout(x))) with x [..., in], A [r, in], B [out, r]."""
    factor = float(scaling)
    if isinstance(dropout, SharedDropout):
        x, keep_scale = dropout.drop(x)
        factor *= keep_scale
    elif dropout is not None:
        x = dropout(x)
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    # F.linear takes [..., in] as it is (no transposed views, one flattened GEMM): the cheapest call
    # per layer, which is what decides generation speed with an unmerged adapter
    h = F.linear(x, A)
    if factor != 1.0:
        # linear's backward needs its input and weight, not its output: scaling h in place is safe
        h = h.mul_(factor)
    return F.linear(h, B)
