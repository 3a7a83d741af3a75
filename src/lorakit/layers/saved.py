"""modules_to_save: a trainable copy of a whole module per adapter (e.g. a new classification head)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .routing import current_rows, rows_for_batch

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Keeps the original module and one trainable copy per adapter; forwards through the active one."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        rows = current_rows()
        if rows is None or self.disable_adapters or not args or not isinstance(args[0], torch.Tensor):
            return self.active_module(*args, **kwargs)
        return self._routed(rows, *args, **kwargs)

    def _module_for(self, name: str) -> nn.Module:
        """Each row's module: its adapter's copy, or the original for "__base__" and adapters without one."""
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def _routed(self, rows: tuple[str, ...], x: torch.Tensor, *args, **kwargs):
        """One adapter per row (``adapter_names``): rows go through their own copy, as in peft."""
        n = x.shape[0]
        rows = rows_for_batch(rows, n)
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        for i, name in enumerate(rows):
            module = self._module_for(name)
            groups.setdefault(id(module), (module, []))[1].append(i)
        if len(groups) == 1:
            return next(iter(groups.values()))[0](x, *args, **kwargs)
        out = None
        for module, idx in groups.values():
            index = torch.tensor(idx, device=x.device)
            part = module(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((n,) + tuple(part.shape[1:]))
            out = out.index_copy(0, index, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module, name)
