"""Training: recipe config, the loop on accelerate, resumable checkpoints, metrics and plots.

Nothing heavy is imported here; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "lorakit.train.config",
    "config_from_dict": "lorakit.train.config",
    "load_recipe": "lorakit.train.recipe",
    "train": "lorakit.train.run",
    "TrainResult": "lorakit.train.loop",
    "train_loop": "lorakit.train.loop",
    "LossComputer": "lorakit.loss.lm_loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
