"""What every adapter layer holds and does right now (``LoraModel.get_layer_status`` / ``get_model_status``).

The same fields as peft's ``TunerLayerStatus`` / ``TunerModelStatus``, for debugging a model whose
adapters do not behave: which layers are disabled, merged, frozen, or on another device. A value that
differs between layers where it should agree is reported as ``"irregular"`` at the model level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from .hf.quant import quantized_kind
from .layers import LoraLayer, ModulesToSave

__all__ = ["LayerStatus", "ModelStatus", "layer_status", "model_status"]

Irregular = Literal["irregular"]


@dataclass
class LayerStatus:
    name: str                                   # module path in the wrapped model
    module_type: str                            # "lora.Linear", "lora.Embedding", "lora.ModulesToSave"
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class ModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_none(flags: list[bool]) -> Union[bool, Irregular]:
    return True if all(flags) else False if not any(flags) else "irregular"


def _backend(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    return quantized_kind(weight) if weight is not None else None


def _per_adapter(module: nn.Module, names: list[str]) -> dict[str, list[nn.Parameter]]:
    if isinstance(module, LoraLayer):
        return {n: module.adapter_parameters(n) for n in names}
    return {n: list(module.modules_to_save[n].parameters()) for n in names}


def layer_status(model: nn.Module) -> list[LayerStatus]:
    """One ``LayerStatus`` per LoRA layer and modules_to_save wrapper of ``model`` (the wrapped model)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            kind, names = "lora." + type(module).__name__.removeprefix("Lora"), list(module.r)  # peft: lora.Linear
            active, merged = list(module.active_adapters), list(module.merged_adapters)
            backend = _backend(module.base_layer)
        elif isinstance(module, ModulesToSave):
            kind, names = "lora.ModulesToSave", list(module.modules_to_save)
            active = [module.active_adapter] if module.active_adapter in module.modules_to_save else []
            merged, backend = [], None
        else:
            continue
        params = _per_adapter(module, names)
        out.append(LayerStatus(
            name=name, module_type=kind, enabled=not module.disable_adapters, active_adapters=active,
            merged_adapters=merged,
            requires_grad={n: _all_or_none([p.requires_grad for p in ps]) for n, ps in params.items()},
            available_adapters=sorted(names),
            devices={n: sorted({p.device.type for p in ps}) for n, ps in params.items()},
            quantization_backend=backend))
    return out


def model_status(lora_model) -> ModelStatus:
    """The layers' status folded into one (``"irregular"`` where layers disagree)."""
    layers = layer_status(lora_model.model)
    lora_only = [s for s in layers if s.module_type != "lora.ModulesToSave"] or layers

    def agreed(values: list, empty=None):
        """The value every layer has, ``"irregular"`` when they differ (``empty`` without layers)."""
        if not values:
            return empty
        return values[0] if all(v == values[0] for v in values) else "irregular"

    requires_grad: dict[str, list] = {}
    devices: dict[str, set] = {}
    for s in layers:
        for n, flag in s.requires_grad.items():
            requires_grad.setdefault(n, []).append(flag)
        for n, devs in s.devices.items():
            devices.setdefault(n, set()).update(devs)
    trainable, total = lora_model.get_nb_trainable_parameters()
    return ModelStatus(
        base_model_type=type(lora_model.model).__name__, adapter_model_type=type(lora_model).__name__,
        peft_types={n: "LORA" for n in lora_model.peft_config}, trainable_params=trainable, total_params=total,
        num_adapter_layers=len(layers),
        enabled=agreed([s.enabled for s in lora_only], True),
        active_adapters=agreed([s.active_adapters for s in lora_only], []),
        merged_adapters=agreed([s.merged_adapters for s in lora_only], []),
        requires_grad={n: agreed(flags) for n, flags in requires_grad.items()},
        available_adapters=sorted(lora_model.peft_config),
        devices={n: sorted(d) for n, d in devices.items()},
        quantization_backend=agreed([s.quantization_backend for s in lora_only]),
    )
