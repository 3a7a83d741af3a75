"""peft's module-level functions under their names, for code ported from peft.

``get_peft_model`` and ``PeftModel`` live in ``lorakit.model``; these two read and write an adapter's
weights through the LoraModel methods that do the checking.
"""
from __future__ import annotations

import torch

from ..errors import LoraError
from ..model import LoraModel

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict"]


def get_peft_model_state_dict(model: LoraModel, state_dict: dict | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's function: the adapter's weights under PEFT key names (``model.lora_state_dict``).

    ``state_dict`` (peft's optional argument) is not supported: the weights are read from the model.
    """
    _require_lora_model(model, "get_peft_model_state_dict")
    if state_dict is not None:
        raise LoraError("get_peft_model_state_dict(model, state_dict=...) is not supported; lorakit reads the "
                        "adapter's weights from the model itself: call it without state_dict.")
    return model.lora_state_dict(adapter_name)


def set_peft_model_state_dict(model: LoraModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """peft's function: load PEFT-named weights into an existing adapter (every key and shape checked first)."""
    _require_lora_model(model, "set_peft_model_state_dict")
    model.load_lora_state_dict(peft_model_state_dict, adapter_name)


def _require_lora_model(model, what: str) -> None:
    if not isinstance(model, LoraModel):
        raise LoraError(f"{what} needs a model wrapped by lorakit.get_peft_model (a LoraModel); "
                        f"got {type(model).__name__}.")
