"""LoRA on a raw parameter (``target_parameters``), e.g. the fused 3-D expert weights of an MoE block.

Many mixture-of-experts blocks in transformers hold their experts as one parameter, ``gate_up_proj``
[experts, out, in] (or [experts, in, out] where the block says ``is_transposed``), and call
``F.linear(x, W[e])`` per expert: there is no nn.Linear to wrap. ``LoraParam`` keeps the module as
``base_layer`` and runs it with the parameter replaced by ``W + delta`` (``torch.func.functional_call``:
the module's own forward, nothing patched), where for each expert e (peft's ``ParamWrapper`` layout):

    A [r * E, in]  viewed as [E, r, in]        B [out, r * E]  viewed as [out, r, E]
    delta[e] = scale * B[:, :, e] @ A[e]       (a 2-D parameter: E = 1, delta = scale * B @ A)

Several parameters of one module nest, one wrapper per parameter, in the order the module registers
them (the innermost first), so the PEFT keys are peft's: ``experts.base_layer.lora_A.weight`` for the
first of two, ``experts.lora_A.weight`` for the last. Dropout and per-row ``adapter_names`` do not apply
(the update is a weight, not a function of x), as in peft.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LoraError
from .base import LoraLayer
from .routing import current_rows

__all__ = ["LoraParam", "param_shape", "lora_param_delta"]


def param_shape(param: torch.Tensor, transposed: bool) -> tuple[int, int, int, bool]:
    """(experts, in_features, out_features, stored as [E, out, in]) of a targeted 2-D or 3-D parameter."""
    if param.dim() == 2:
        return 1, int(param.shape[1]), int(param.shape[0]), True
    if param.dim() != 3:
        raise LoraError(f"target_parameters needs a 2-D or 3-D parameter; got one of shape {tuple(param.shape)}.")
    experts, a, b = (int(d) for d in param.shape)
    return (experts, a, b, False) if transposed else (experts, b, a, True)


def lora_param_delta(A: torch.Tensor, B: torch.Tensor, scale: float, experts: int, out_in: bool, ndim: int
                     ) -> torch.Tensor:
    """The update of a targeted parameter in its own layout (see the module docstring), in A's dtype."""
    if ndim == 2:
        return (B @ A) * scale
    a = A.reshape(experts, -1, A.shape[-1])        # [E, r, in]
    b = B.reshape(B.shape[0], -1, experts)         # [out, r, E]
    spec = "o r e, e r i -> e o i" if out_in else "o r e, e r i -> e i o"
    return torch.einsum(spec, b, a) * scale


class LoraParam(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (which may itself be a LoraParam)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner = self.owner
        self.num_experts, self.in_features, self.out_features, self._out_in = param_shape(
            self.get_param(), bool(getattr(owner, "is_transposed", False)))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The module that really holds the parameters (under any nested LoraParam)."""
        m = self.base_layer
        while isinstance(m, LoraParam):
            m = m.base_layer
        return m

    def get_param(self) -> nn.Parameter:
        return getattr(self.owner, self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.get_param()

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout, init, use_dora: bool = False
                    ) -> None:
        if dropout is not None or use_dora:
            raise LoraError("target_parameters takes no lora_dropout and no DoRA (as peft).")
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.lora_dropout[name] = nn.Identity()
        p = self.get_param()
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        E = self.num_experts
        # nn.Linear as peft builds them (so one seed gives peft's A and B), then its init
        A = nn.Linear(self.in_features, r * E, bias=False, device=p.device, dtype=dtype)
        B = nn.Linear(r * E, self.out_features, bias=False, device=p.device, dtype=dtype)
        if init is True:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A.weight, std=1 / r)
        if init is not False:
            nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B

    def delta_weight(self, name: str) -> torch.Tensor:
        return lora_param_delta(self.lora_A[name].weight.float(), self.lora_B[name].weight.float(), self.scaling[name],
                                self.num_experts, self._out_in, self.get_param().dim())

    def _effective(self) -> torch.Tensor:
        """The parameter with the active, unmerged adapters added (in its dtype), or the parameter itself."""
        W = self.get_param()
        names = [] if self.disable_adapters else [n for n in self.active_adapters if n not in self.merged_adapters]
        for name in names:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            W = W + lora_param_delta(A, B, self.scaling[name], self.num_experts, self._out_in, W.dim()).to(W.dtype)
        return W

    # -- merge: into the parameter, not a .weight -------------------------------------------------
    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = list(self.active_adapters if names is None else names)
        if safe:
            self.check_merge(names)
        p = self.get_param()
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                p.data += self.delta_weight(name).to(p.dtype)
                self.merged_adapters.append(name)

    def check_merge(self, names: Sequence[str]) -> None:
        p = self.get_param()
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                if not torch.isfinite(p.data.float() + self.delta_weight(name)).all():
                    raise LoraError(f"merging adapter {name!r} would put NaN/inf into {self.parameter_name}; nothing "
                                    f"was merged. The adapter is broken (check its training).")

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        names = list(reversed(self.merged_adapters if names is None else names))
        p = self.get_param()
        for name in names:
            if name in self.merged_adapters:
                p.data -= self.delta_weight(name).to(p.dtype)
                self.merged_adapters.remove(name)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if current_rows() is not None:
            raise LoraError("adapter_names (one adapter per row) does not work with target_parameters (as in peft); "
                            "run each adapter on its own batch (set_adapter) instead.")
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        chain, m = [], self
        while isinstance(m, LoraParam):  # every nested wrapper's parameter, replaced at once
            chain.append(m)
            m = m.base_layer
        swapped = {w.parameter_name: w._effective() for w in chain}
        return torch.func.functional_call(m, swapped, args, kwargs, tie_weights=False, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
