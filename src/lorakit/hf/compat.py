"""peft's names on a LoraModel that add nothing to its lifecycle: aliases, status reports, switches.

Kept apart from ``lorakit.model`` so that model.py holds the adapter lifecycle only. The mixin reads
``peft_config``, ``active_adapter``, ``model`` and ``_set_adapters_disabled`` of the LoraModel it is mixed into.
"""
from __future__ import annotations

from torch import nn

__all__ = ["PeftCompatMixin"]


class PeftCompatMixin:
    """``base_model``, ``get_base_model``, ``peft_type``, ``active_peft_config``, ``disable/enable_adapter_layers``,
    ``get_layer_status``, ``get_model_status``, ``print_trainable_parameters`` as peft's PeftModel has them."""

    @property
    def base_model(self) -> "LoraModel":
        """peft's ``PeftModel.base_model``; ``model.base_model.model`` is the transformers model."""
        return self

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until ``enable_adapter_layers()`` (peft's method; merged ones are unmerged)."""
        self._set_adapters_disabled(True)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``."""
        self._set_adapters_disabled(False)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the LoRA layers in it), as peft's ``get_base_model``."""
        return self.model

    @property
    def peft_type(self) -> str:
        return "LORA"

    def get_layer_status(self) -> list:
        """Per adapter layer: enabled, active / merged / available adapters, requires_grad, devices (peft's fields)."""
        from ..status import layer_status

        return layer_status(self.model)

    def get_model_status(self):
        """The layers' status folded into one, ``"irregular"`` where they disagree (peft's ``get_model_status``)."""
        from ..status import model_status

        return model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
