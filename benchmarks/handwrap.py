"""A hand-written LoRA wrapper on lorakit.kernels, for kernel work before/independent of the core.

Same math and init as peft (A kaiming-uniform a=sqrt(5), B zero, scaling alpha/r), one
SharedDropout for the whole adapter.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.kernels import SharedDropout, lora_delta
from common import LLAMA_LINEAR


class HandLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: int, dropout: SharedDropout):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = dropout

    def forward(self, x):
        return self.base_layer(x) + lora_delta(x, self.lora_A, self.lora_B, self.scaling, self.dropout)


def hand_wrap(model: nn.Module, targets, r: int, alpha: int, p: float) -> nn.Module:
    names = LLAMA_LINEAR if targets == "all-linear" else tuple(targets)
    for prm in model.parameters():
        prm.requires_grad_(False)
    drop = SharedDropout(p)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name in names:
                setattr(mod, child_name, HandLoraLinear(child, r, alpha, drop))
    return model
