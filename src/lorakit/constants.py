"""Values every layer of the package agrees on."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "DEFAULT_CACHE", "IGNORE_INDEX", "cache_root"]

#: the label value that cross-entropy (lorakit's and transformers') skips: prompt, padding, masked turns
IGNORE_INDEX = -100

#: lorakit's cache (the converted embedded model, the measured precision choice): $LORAKIT_CACHE or this
CACHE_ENV = "LORAKIT_CACHE"
DEFAULT_CACHE = "~/.cache/lorakit"


def cache_root() -> Path:
    """The lorakit cache root: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
