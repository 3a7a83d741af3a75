"""modules_to_save: a trainable copy of a whole module per adapter (e.g. a new classification head)."""
from __future__ import annotations

import copy

from torch import nn

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
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module, name)
