"""What every LoRA layer shares: the adapters it holds, which are active, merge and unmerge.

A LoRA layer wraps a module and keeps it as ``base_layer``; it never changes the class of what
it wraps. Per-kind code (linear, embedding) only says how to build A/B, how to compute the
update for an input, and what ``B A`` looks like in the base weight's layout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LoraError
from ..hf.quant import dequantized, is_quantized_weight
from .dora import dora_linear_delta, dora_merged_weight, dora_unmerged_weight, weight_norm
from .routing import BASE, current_rows, rows_for_batch

__all__ = ["LoraLayer", "add_delta"]


def add_delta(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``result + delta`` as a new tensor, in the result's dtype.

    A delta in a wider dtype (float32 adapters over a bf16/fp16 base) is added in that dtype and the sum
    rounded once to the result's dtype, as peft does; rounding the delta first would round twice.
    """
    if delta.dtype == result.dtype:
        return result + delta
    return (result.to(delta.dtype) + delta).to(result.dtype)


class LoraLayer(nn.Module):
    """Base class of lorakit's LoRA wrappers (see ``layers.linear`` and ``layers.embedding``)."""

    #: names of the per-adapter parameter containers (PEFT naming)
    adapter_containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        #: DoRA adapters' trained magnitudes, one per output feature (peft's name; see layers/dora.py)
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norms: dict[str, torch.Tensor] = {}  # ||W + s B A|| of each merged DoRA adapter, to unmerge
        self._inplace_ok = type(base_layer) in (nn.Linear, nn.Embedding) or type(base_layer).__name__ == "Conv1D"

    # -- per-kind hooks ---------------------------------------------------------------------
    def _create(self, name: str, r: int, init, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A, in the base weight's layout and float32."""
        raise NotImplementedError

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the base weight's layout seen as [out, in] (rows: output features), and back again.
        Linear layers store [out, in]; GPT-2's Conv1D (``fan_in_fan_out``) [in, out]; embeddings override."""
        return t.t() if getattr(self, "fan_in_fan_out", False) else t

    def uses_plain_lora(self, name: str) -> bool:
        """Whether adapter ``name`` is plain LoRA (``base(x) + s B A x``): the only kind a kernel may compute.
        A DoRA adapter always takes the reference path."""
        return name not in self.lora_magnitude_vector

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:  # transformers code sometimes reads layer.weight
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: nn.Module | None, init) -> None:
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.lora_dropout[name] = dropout if dropout is not None else nn.Identity()
        # adapters live in float32 when the base is half precision or quantized (stable training)
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self._create(name, r, init, w.device, dtype)

    def init_dora(self, name: str) -> None:
        """Make adapter ``name`` a DoRA adapter: its magnitude starts at ``||W + s B A||`` per output feature.
        Called last, after every init that changes A, B or the base weight (peft's order)."""
        dtype = self.adapter_parameters(name)[0].dtype
        w = self._rows(dequantized(self.base_layer.weight).detach()).to(dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(weight_norm(w, self._rows(self.delta_weight(name)).to(dtype)))
        # parameters listed after A and B, in peft's order (optimizer groups and their saved state follow it)
        self._modules["lora_magnitude_vector"] = self._modules.pop("lora_magnitude_vector")

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        out = []
        for container in self.adapter_containers:
            item = getattr(self, container)[name]
            out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        if name in self.lora_magnitude_vector:
            out.append(self.lora_magnitude_vector[name])
        return out

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for container in self.adapter_containers:
            del getattr(self, container)[name]
        del self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    # -- merge ------------------------------------------------------------------------------
    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Add the adapters' updates into the base weight. Merging a merged adapter is a no-op."""
        names = list(self.active_adapters if names is None else names)
        w = self.base_layer.weight
        if is_quantized_weight(w):
            raise LoraError(
                "cannot merge into a quantized (4/8-bit) base layer: load the base model in bf16/fp32, "
                "load the adapter on it, then merge."
            )
        if safe:
            self.check_merge(names)
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            if self.uses_plain_lora(name):
                w.data += self.delta_weight(name)  # a float32 delta into a half-precision weight: one rounding, as peft
            else:
                merged, self._dora_norms[name] = self._dora_merged(name)
                w.data.copy_(merged)
            self.merged_adapters.append(name)

    def check_merge(self, names: Sequence[str]) -> None:
        """Refuse (changing nothing) when merging ``names`` would put NaN/inf into the base weight."""
        w = self.base_layer.weight
        for name in names:
            if name in self.r and name not in self.merged_adapters:
                merged = (w.data.float() + self.delta_weight(name) if self.uses_plain_lora(name)
                          else self._dora_merged(name)[0])
                if not torch.isfinite(merged).all():
                    raise LoraError(
                        f"merging adapter {name!r} would put NaN/inf into the weights of a "
                        f"{type(self.base_layer).__name__} layer; nothing was merged. The adapter is broken "
                        f"(check its training).")

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Subtract merged updates again; unmerge of an unmerged layer is a no-op."""
        names = list(reversed(self.merged_adapters if names is None else names))
        w = self.base_layer.weight
        for name in names:
            if name not in self.merged_adapters:
                continue
            if self.uses_plain_lora(name):
                w.data -= self.delta_weight(name)
            else:
                w.data.copy_(self._rows(self._dora_unmerged(name, w.data, self._dora_norms.pop(name))))
            self.merged_adapters.remove(name)

    # -- DoRA merging (the math: layers/dora.py) --------------------------------------------
    def _dora_unmerged(self, name: str, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """``weight`` (base layout) with merged DoRA adapter ``name`` taken out, as [out, in] float32."""
        return dora_unmerged_weight(self._rows(weight), self._rows(self.delta_weight(name)),
                                    self.lora_magnitude_vector[name], norm)

    def _weight_without_merges(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out, as [out, in] (computed; the layer is untouched)."""
        w = self.base_layer.weight.detach().float()
        for name in reversed(self.merged_adapters):
            if self.uses_plain_lora(name):
                w = w - self.delta_weight(name)
            else:
                w = self._rows(self._dora_unmerged(name, w, self._dora_norms[name]))
        return self._rows(w)

    def _dora_merged(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight with DoRA adapter ``name`` merged, in the base layout, ||V||); the norm is taken of the
        weight without earlier merges (what forward sees), the merge goes into the current weight (as peft)."""
        merged, norm = dora_merged_weight(self._rows(self.base_layer.weight.detach()), self._weight_without_merges(),
                                          self._rows(self.delta_weight(name)), self.lora_magnitude_vector[name])
        return self._rows(merged), norm

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        rows = current_rows()
        result = self.base_layer(x, *args, **kwargs)
        if rows is not None:
            return self._routed(x, result, rows)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            result = self._add(name, x, result)
        return result

    def _add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the adapter's update for ``x`` (the reference: ``base(x) + delta``)."""
        if not self.uses_plain_lora(name):
            return self._dora_add(name, x, result)
        return add_delta(result, self._delta(name, x))

    def _dora_add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """A linear layer's output with DoRA adapter ``name`` (layers/dora.py), in the adapter's dtype as plain LoRA;
        the embedding overrides ``_add``."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        W = dequantized(self.base_layer.weight)  # a 4-bit base: its values, each call (QDoRA, as peft)
        delta = dora_linear_delta(x.to(A.dtype), result, self._rows(W).to(A.dtype),
                                  self.base_layer.bias, A, B, self.scaling[name], self.lora_magnitude_vector[name],
                                  None if isinstance(self.lora_dropout[name], nn.Identity) else self.lora_dropout[name])
        return add_delta(result, delta)

    def _routed(self, x: torch.Tensor, result: torch.Tensor, rows: tuple[str, ...]) -> torch.Tensor:
        if self.merged_adapters:
            raise LoraError("adapter_names (one adapter per row) needs unmerged adapters; call unmerge_adapter() first.")
        dora = sorted({n for n in rows if n in self.lora_magnitude_vector})
        if dora:
            raise LoraError(f"adapter_names (one adapter per row) does not work with DoRA adapters ({dora}), as in "
                            f"peft: run each DoRA adapter on its own batch (set_adapter) instead.")
        n = x.shape[0]
        rows = rows_for_batch(rows, n)
        if self._can_batch(rows):
            return add_delta(result, self._batched_delta(x, rows))
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).append(i)
        # float32 adapters over a half-precision base: sum in float32, round once at the end (as peft)
        work = None
        for name, idx in groups.items():
            if name == BASE or name not in self.r:
                continue  # the base model's rows, or an adapter that does not target this layer
            if len(idx) == n:
                delta = self._delta(name, x)
                work = (result.to(delta.dtype) if work is None else work) + delta
                continue
            index = torch.tensor(idx, device=x.device)
            delta = self._delta(name, x.index_select(0, index))
            work = (result.to(delta.dtype) if work is None else work).index_add(0, index, delta)
        return result if work is None else work.to(result.dtype)

    def _can_batch(self, rows: tuple[str, ...]) -> bool:
        """One batched product for all rows: needs the same rank everywhere and no active dropout."""
        if not hasattr(self, "_batched_delta"):
            return False
        names = {n for n in rows if n != BASE}
        if not names or any(n not in self.r for n in names) or len({self.r[n] for n in names}) != 1:
            return False
        return not any(getattr(self.lora_dropout[n], "active", False) for n in names)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.r)
