"""LoRA layer wrappers, one file per wrapped kind."""
from .base import LoraLayer
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .saved import ModulesToSave

__all__ = ["LoraLayer", "LoraLinear", "LoraEmbedding", "ModulesToSave", "wrapper_for"]

_WRAPPERS = {"linear": LoraLinear, "conv1d": LoraLinear, "embedding": LoraEmbedding}


def wrapper_for(kind: str) -> type[LoraLayer]:
    return _WRAPPERS[kind]
