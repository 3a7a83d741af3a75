"""The precision of a model about to be loaded (train.precision, ``--precision``), resolved before its weights
are read: from the shapes in its config (no weights needed) on the device it will run on, so the base is
loaded straight in the chosen dtype and never as a float32 copy first. An explicit dtype (``model.dtype``,
``--dtype``) is taken as given.

Heavy imports (torch, transformers) happen inside the functions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from lorakit.errors import ConfigError

def config_shapes(name_or_path: str, trust_remote_code: bool = False) -> Optional[list[tuple[int, int]]]:
    """The linears' shapes from the model's config (``precision.shapes_of``), read without its weights; None
    when the config cannot be read here (the load reports that; auto then measures generic shapes)."""
    from transformers import AutoConfig

    from lorakit.models.embedded import resolve_model_path
    from lorakit.precision import shapes_of

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the model load itself says what is wrong with the folder or id
        return None
    return shapes_of(config)


def dtype_choice(dtype: Any, setting: str, why: str):
    """A PrecisionChoice for an explicitly given dtype (``why`` says who gave it)."""
    from lorakit.models.embedded import resolve_dtype
    from lorakit.precision import PrecisionChoice, precision_name

    torch_dtype = resolve_dtype(dtype)
    return PrecisionChoice(precision_name(torch_dtype), torch_dtype, setting, why)


def precision_for(name_or_path: str, setting: Any = "auto", device: Any = "cpu", *, dtype: Any = None,
                  trust_remote_code: bool = False, dtype_source: str = "model.dtype",
                  measure: Optional[Callable] = None, workload: str = "train"):
    """The PrecisionChoice for loading ``name_or_path`` on ``device``: ``dtype`` (not None / "auto") wins as an
    explicit override; else ``setting`` (auto | fp32 | bf16) through ``precision.choose_precision`` at the
    model's shapes for ``workload`` ("train" | "generate"). ``measure``: replaces the measurement (tests)."""
    from lorakit.precision import choose_precision, normalize_precision

    setting = normalize_precision(setting)
    if dtype is not None and str(dtype).lower() != "auto":
        why = f"{dtype_source} {str(dtype).removeprefix('torch.')} as given"
        chosen = dtype_choice(dtype, setting, why)
        if setting == "auto" or setting == chosen.name:
            return chosen
        return dtype_choice(dtype, setting, f"{why}, overriding precision {setting}")
    shapes = config_shapes(name_or_path, trust_remote_code) if setting == "auto" else None
    return choose_precision(setting, device, shapes, measure=measure, workload=workload)


def check_precision_option(value: Any, option: str = "--precision") -> str:
    """A command line's precision as auto | fp32 | bf16 (aliases float32 / bfloat16 taken); a ConfigError
    naming the option otherwise."""
    from lorakit.precision import normalize_precision

    try:
        return normalize_precision(value)
    except ConfigError as e:
        raise ConfigError(f"{option}: {e}") from None


def model_precision(model: Any) -> str:
    """The precision a loaded model computes in: its 4-bit compute dtype where it is quantized, else the dtype
    of its frozen floating-point weights ("fp32" | "bf16" | "fp16"); "fp32" when it has none."""
    import torch

    from lorakit.precision import precision_name

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) if quant is not None else None
    if isinstance(quant, dict):
        compute = quant.get("bnb_4bit_compute_dtype")
    if compute is not None:
        name = str(compute).removeprefix("torch.")  # a dtype, or its name in a config dict
        dtype = getattr(torch, name, None)
        return precision_name(dtype) if isinstance(dtype, torch.dtype) else name
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return precision_name(p.dtype)
    return precision_name(torch.get_default_dtype())
