"""All or nothing for changes to a model's module tree: if the block fails, the model is put back as it was.

Injection is planned and checked before it starts, so a bad input is refused before anything changes.
This is the net under that: an error nobody foresaw halfway through (memory running out while adapters are
allocated, a bug) must not leave the caller's model half-wrapped and frozen. What is put back: every
module's children, parameters and buffers (so wrappers are replaced by the modules they wrapped and added
adapter weights disappear), the plain attributes of every module (the adapter bookkeeping a LoRA layer
keeps in dicts), the ``requires_grad`` flag of every parameter, and a LoraModel's own adapter records.
Weight values changed in place are not copied (that would double the memory): inits that rewrite base
weights (PiSSA, OLoRA, LoftQ) check everything they need before they write.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["undo_on_error"]

_OWNER_FIELDS = ("peft_config", "_plans", "active_adapter")


def _copy(value: Any) -> Any:
    """One level deep: the containers a module mutates in place (dicts of adapters, its children) are copied."""
    return copy.copy(value) if isinstance(value, (dict, list, set)) else value


@contextlib.contextmanager
def undo_on_error(model: nn.Module, owner: Any = None) -> Iterator[None]:
    """Run the block; on any exception (or interrupt) restore ``model`` (and ``owner``'s adapter records) and
    re-raise."""
    modules = [(m, {k: _copy(v) for k, v in vars(m).items()}) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    kept = {f: _copy(getattr(owner, f)) for f in _OWNER_FIELDS if hasattr(owner, f)} if owner is not None else {}
    try:
        yield
    except BaseException:
        for module, state in modules:
            vars(module).clear()
            vars(module).update(state)
        for p, flag in flags:
            p.requires_grad_(flag)
        for field, value in kept.items():
            setattr(owner, field, value)
        raise
