"""LoRA around nn.Linear and transformers' Conv1D (GPT-2 family, weight stored as in x out).

The math (Hu et al. 2021, "LoRA", eq. 3), for x [..., in], A [r, in], B [out, r]:

    y = base(x) + scale * B(A(dropout(x)))          scale = lora_alpha / r (or / sqrt(r): rsLoRA)

``lora_linear_delta`` is that update as plain torch; ``lora_linear_weight`` is the same map as a
matrix, scale * (B @ A), which merging adds into the base weight. Kernels (``lorakit.kernels``)
may compute the update another way on the CPU; they are checked against these two functions.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..kernels import branch_add, dispatch, fusion, generation_add, guards
from .base import LoraLayer, add_delta
from .routing import BASE, current_rows

__all__ = ["LoraLinear", "lora_linear_delta", "lora_linear_weight"]


def lora_linear_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                      dropout: nn.Module | None = None) -> torch.Tensor:
    """``scale * B(A(dropout(x)))``: the LoRA update of a linear layer for input ``x`` (a new tensor).

    x is cast to the adapter's dtype first (float32 adapters over a half-precision base), as peft does.
    """
    x = x.to(A.dtype)
    if dropout is not None:
        x = dropout(x)
    return F.linear(F.linear(x, A), B) * scale


def lora_linear_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (B @ A)`` [out, in] in float32: the matrix with ``lora_linear_delta(x) == x @ W.T`` (no dropout)."""
    return (B.float() @ A.float()) * scale


class LoraLinear(LoraLayer):
    """``y = base(x) + scaling * B(A(dropout(x)))``; also wraps fused projections (BLOOM's query_key_value)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._fuse = fusion.FuseState()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + scale * B(A(dropout(x)))`` for each active adapter: the reference (``LoraLayer.forward``)
        or, where ``kernels.dispatch`` chooses one, a CPU kernel computing the same."""
        if args or kwargs or self.disable_adapters or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        dora = self._modules["lora_magnitude_vector"]  # (read directly: a module attribute costs a __getattr__ per call)
        if dora and not all(map(self.uses_plain_lora, self.active_adapters)):
            return super().forward(x)  # DoRA: the reference path only (layers/dora.py); no kernel knows the magnitude
        base, first = self.base_layer, self.active_adapters[0]  # (active adapters are ones this layer has)
        A = self.lora_A[first].weight
        route = dispatch.linear_route(x, base, A, current_rows() is not None)
        if route == dispatch.REFERENCE:
            return super().forward(x)
        if route == dispatch.SIBLINGS:
            out = fusion.fused_forward(self, x)  # None: this layer cannot join a group now
            if out is not None:
                return out
        elif route == dispatch.LEARN:
            fusion.observe(self, x)
        kernel = generation_add if route in (dispatch.GENERATION, dispatch.LEARN) else branch_add
        result = base(x)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            out = kernel(result, x, A if name == first else self.lora_A[name].weight, self.lora_B[name].weight,
                         self.scaling[name], self._dropout_of(name), self._inplace_ok)
            result = out if out is not None else add_delta(result, self._delta(name, x))  # operands unfit: reference
        return result

    def _create(self, name: str, r: int, init, device: torch.device, dtype: torch.dtype) -> None:
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
        elif init == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
            nn.init.zeros_(B.weight)
        # init False: both keep nn.Linear's random init, so the adapter changes the output at once
        self.lora_A[name], self.lora_B[name] = A, B

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return lora_linear_delta(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                 self._dropout_of(name))

    def _dropout_of(self, name: str):
        drop = self.lora_dropout[name]
        return None if drop.__class__ is nn.Identity else drop

    def _batched_delta(self, x: torch.Tensor, rows: tuple[str, ...]) -> torch.Tensor:
        """Each row through its own adapter in two batched products (bmm), not one loop per adapter.

        Without autograd (generation: the same rows every step) the per-row A, B and scale are gathered
        once per row pattern and kept while the weights are the same tensors with the same storage,
        version, dtype and device; with autograd they are gathered afresh each call, so gradients reach
        the adapters and no graph is shared between backward passes.
        """
        weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in rows if n != BASE]
        key = (rows, x.device, tuple((id(t), t.data_ptr(), guards.version(t), t.dtype, t.device)
                                     for a, b in weights for t in (a, b)))
        # no cache with autograd, nor where torch cannot say whether a weight changed in place
        grad = torch.is_grad_enabled() or any(k[2] is None for k in key[2])
        cache = None if grad else getattr(self, "_route_cache", None)
        if cache is None or cache[0] != key:
            some_a, some_b = weights[0]
            zero_a, zero_b = torch.zeros_like(some_a), torch.zeros_like(some_b)
            A = torch.stack([self.lora_A[n].weight if n != BASE else zero_a for n in rows])
            B = torch.stack([self.lora_B[n].weight if n != BASE else zero_b for n in rows])
            s = torch.tensor([self.scaling[n] if n != BASE else 0.0 for n in rows], dtype=A.dtype, device=A.device)
            cache = (key, A.transpose(1, 2), (B * s.view(-1, 1, 1)).transpose(1, 2))
            self._route_cache = None if grad else cache
        _, At, Bt = cache
        n = x.shape[0]
        xa = x.to(At.dtype).reshape(n, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xa, At), Bt)
        return delta.reshape(*x.shape[:-1], Bt.shape[-1])

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = lora_linear_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        return delta.t() if self.fan_in_fan_out else delta  # Conv1D stores its weight as [in, out]
