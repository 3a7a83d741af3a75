"""Kernels: shared dropout masks, the LoRA branch product, the LM head's fused cross-entropy.

Layers compute ``lora_add(base_layer(x), x, A, B, scaling, dropout)`` with one ``SharedDropout``
per adapter; the causal-LM loss runs through ``linear_cross_entropy``. How the work is arranged
lives here, so layers and the loss never change when the kernels do.
"""
from __future__ import annotations

from .branch import add_delta, lora_add, lora_delta
from .cross_entropy import linear_cross_entropy
from .dropout import SharedDropout

__all__ = ["SharedDropout", "add_delta", "linear_cross_entropy", "lora_add", "lora_delta"]
