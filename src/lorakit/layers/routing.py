"""Per-row adapter routing: one batch, each row through its own adapter.

``LoraModel.forward/generate(adapter_names=[...])`` sets the row names here for the duration
of the call; LoRA layers read them. "__base__" means the base model without any adapter.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

BASE = "__base__"

_rows: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("lorakit_adapter_rows", default=None)


def current_rows() -> tuple[str, ...] | None:
    return _rows.get()


@contextlib.contextmanager
def adapter_rows(names: Sequence[str] | None) -> Iterator[None]:
    token = _rows.set(tuple(names) if names is not None else None)
    try:
        yield
    finally:
        _rows.reset(token)
