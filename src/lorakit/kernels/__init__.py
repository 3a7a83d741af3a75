"""CPU speed kernels behind one switch and one dispatcher; the math they replace lives in ``lorakit.layers``.

``lorakit.kernels.enabled`` (or ``set_enabled()``, or ``LORAKIT_KERNELS=0`` in the environment) turns
every kernel off: the reference path runs. ``kernels.dispatch.choose`` decides, per call and from what
the call sees, which kernel runs; on any device but the CPU it is always the reference.

    dispatch.py       the decision (a pure function of a frozen Facts) and its table
    branch.py         a LoRA linear's update added into the base output (generation / autograd kernels)
    dropout.py masks.py  LoRA dropout: one CPU mask per input, shared by the modules reading it
    fusion.py siblings.py  linears reading one input (q/k/v, gate/up) trained as one autograd node
    onednn.py         frozen float32 CPU products through oneDNN
    cross_entropy.py  LM head + cross-entropy without the full logits (the fused loss's head)
    guards.py         the private torch APIs used, each with its public fallback
"""
from __future__ import annotations

import sys
import types

from .branch import branch_add, generation_add, lora_add, lora_delta
from .cross_entropy import linear_cross_entropy
from .dropout import SharedDropout
from .switch import enabled_as, is_enabled, set_enabled

__all__ = ["SharedDropout", "branch_add", "enabled", "enabled_as", "generation_add", "is_enabled",
           "linear_cross_entropy", "lora_add", "lora_delta", "set_enabled"]


class _KernelsModule(types.ModuleType):
    """Makes ``lorakit.kernels.enabled`` a readable and assignable attribute backed by the one switch."""

    @property
    def enabled(self) -> bool:
        return is_enabled()

    @enabled.setter
    def enabled(self, on: bool) -> None:
        set_enabled(on)


sys.modules[__name__].__class__ = _KernelsModule
