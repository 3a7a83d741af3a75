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


def rows_for_batch(rows: tuple[str, ...], n: int) -> tuple[str, ...]:
    """One adapter name per row of a batch of ``n`` rows: ``rows`` itself, or each entry repeated for the beams
    or samples generate makes of one prompt (n a multiple of ``len(rows)``); anything else is a LoraError."""
    if len(rows) == n:
        return rows
    if not rows or n % len(rows):
        from ..errors import LoraError

        raise LoraError(f"adapter_names has {len(rows)} entries but the batch has {n} rows.")
    return tuple(r for r in rows for _ in range(n // len(rows)))
