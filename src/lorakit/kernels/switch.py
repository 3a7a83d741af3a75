"""The one switch of every kernel: ``lorakit.kernels.enabled``, ``set_enabled()``, ``LORAKIT_KERNELS=0``.

Off, lorakit computes everything on the reference path (``lorakit.layers``: plain torch, peft's
formula; the model's own loss). The environment variable sets the value at import time; the module
attribute and ``set_enabled`` change it at run time. It is process-wide on purpose: one answer to
"are kernels on?" for every model, thread and call, as the variable is.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["ENV", "enabled_as", "is_enabled", "set_enabled"]

ENV = "LORAKIT_KERNELS"
_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


def _from_env() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        logging.getLogger("lorakit.kernels").warning(
            "%s=%r is neither on (1/true/on/yes) nor off (0/false/off/no); kernels stay on", ENV, value)
    return True


class _State:
    __slots__ = ("on",)

    def __init__(self, on: bool):
        self.on = on


#: read on every dispatch (one attribute load)
STATE = _State(_from_env())


def is_enabled() -> bool:
    return STATE.on


def set_enabled(on: bool) -> bool:
    """Turn every kernel on or off; returns the previous setting."""
    if not isinstance(on, bool):
        raise TypeError(f"lorakit.kernels.enabled must be True or False, got {on!r}")
    before, STATE.on = STATE.on, on
    return before


@contextlib.contextmanager
def enabled_as(on: bool) -> Iterator[None]:
    """Kernels on (or off) inside the ``with`` block, as before after it."""
    before = set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)
