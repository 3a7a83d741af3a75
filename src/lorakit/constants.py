"""Values every layer of the package agrees on."""
from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

#: the label value that cross-entropy (lorakit's and transformers') skips: prompt, padding, masked turns
IGNORE_INDEX = -100
