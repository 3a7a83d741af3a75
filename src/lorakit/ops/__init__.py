"""Kernels for the LoRA branch: shared dropout masks and the branch product.

Layers compute ``base_layer(x) + lora_delta(x, A, B, scaling, dropout)`` with one
``SharedDropout`` per adapter; how the work is arranged lives here, so layers never change
when the kernels do.
"""
from __future__ import annotations

from .branch import lora_delta
from .dropout import SharedDropout

__all__ = ["SharedDropout", "lora_delta"]
