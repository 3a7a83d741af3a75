"""Small helpers shared by the evaluators: where a model lives, and eval mode that is undone after."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["model_device", "eval_mode"]


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (or ``model.device``); CPU for a parameterless object."""
    import torch

    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` for the block, then the training flag it had before (dropout off while scoring)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
