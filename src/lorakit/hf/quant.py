"""QLoRA: LoRA adapters over a 4-bit (NF4) base model, through bitsandbytes.

The base weights are stored in 4 bits and dequantised block by block in each forward; the
adapters stay in float32 and are the only trained weights. That cuts the base model's memory
about 4x against bf16 (8x against fp32) at some cost in speed. Merging into 4-bit weights is
refused: load the base in bf16/fp32, load the adapter on it, then merge.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LoraError

__all__ = ["bnb_4bit_config", "guard_cpu_4bit_training", "prepare_for_kbit_training", "prepare_model_for_kbit_training",
           "is_quantized_model"]


def _require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError(
            "4-bit loading needs bitsandbytes: pip install 'lorakit[qlora]' (or pip install bitsandbytes)."
        ) from None


def bnb_4bit_config(compute_dtype: str | torch.dtype = "float32", quant_type: str = "nf4",
                    double_quant: bool = True) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA (NF4 weights, double quantisation of the scales).

    compute_dtype: the dtype of the dequantised matmuls. A recipe's QLoRA run passes its precision's
    (train.precision: bfloat16 where bf16 is the faster arithmetic, e.g. GPUs and CPUs with AMX or
    AVX-512 BF16; float32 elsewhere, where bf16 is about 3x slower).
    """
    _require_bnb()
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise LoraError(f"quant_type={quant_type!r} is unknown; use 'nf4' (QLoRA's choice) or 'fp4'.")
    if isinstance(compute_dtype, str):
        try:
            compute_dtype = getattr(torch, compute_dtype)
        except AttributeError:
            raise LoraError(f"compute_dtype={compute_dtype!r} is not a torch dtype (use float32 or bfloat16).") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)


#: bitsandbytes' quantized parameter classes, by name (bitsandbytes is optional: never imported to ask)
_QUANTIZED = {"Params4bit": "bnb 4bit", "Int8Params": "bnb 8bit"}


def quantized_kind(weight) -> str | None:
    """``"bnb 4bit"`` / ``"bnb 8bit"`` for a bitsandbytes-quantized parameter, else None. The one place
    that recognises quantized weights."""
    kind = _QUANTIZED.get(type(weight).__name__)
    if kind is None and hasattr(weight, "quant_state"):
        kind = "bnb 4bit"
    return kind


def is_quantized_weight(weight) -> bool:
    return quantized_kind(weight) is not None


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The full-precision values of a weight: a bitsandbytes 4-bit one dequantized (a new tensor, in its compute
    dtype), any other as it is. 8-bit weights are not read this way (nothing in lorakit needs them)."""
    kind = quantized_kind(weight)
    if kind is None:
        return weight
    if kind != "bnb 4bit" or _is_packed(weight):
        what = f"{kind} weight" + (" packed for CPU inference" if kind == "bnb 4bit" else "")
        raise LoraError(f"cannot read the values of a {what}; use a 4-bit (NF4/FP4) base loaded with "
                        f"lorakit.bnb_4bit_config and wrapped before it is evaluated.")
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def stored_elements(p: torch.Tensor) -> int:
    """How many weights a parameter holds: 4-bit ones pack two values per stored byte."""
    return p.numel() * (2 if quantized_kind(p) == "bnb 4bit" else 1)


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_quantized_weight(p) for p in model.parameters())


def guard_cpu_4bit_training(model: nn.Module) -> int:
    """Keep bitsandbytes from repacking ``model``'s 4-bit weights for its CPU inference kernel.

    bitsandbytes (>= 0.47) repacks a Linear4bit's weight the first time the layer runs in eval mode
    without grad on a CPU with AVX512-BF16, and keeps it packed. That kernel has no backward: later
    training forwards pass no gradient through the base layer (silently wrong LoRA gradients in every
    layer below; an evaluation between training steps is enough), and unpacking does not restore the
    quantisation state exactly. So lorakit switches that path off for the models it wraps: evaluation
    then runs the same dequantising matmul as training. A layer already packed (evaluated before
    wrapping) is unpacked, with a warning. Returns the number of 4-bit layers seen. Idempotent.
    """
    n, repacked = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if quantized_kind(weight) != "bnb 4bit":
            continue
        n += 1
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if _is_packed(weight):
            _unpack(module, weight)
            repacked += 1
    if repacked:
        import warnings

        warnings.warn(f"{repacked} 4-bit layers had been repacked by bitsandbytes for CPU inference (the model ran "
                      "in eval mode before lorakit wrapped it); they were unpacked for training, which changes "
                      "their quantisation state slightly. Wrap the model before evaluating it to avoid this.",
                      stacklevel=3)
    return n


def _is_packed(weight) -> bool:
    """Is this 4-bit weight in bitsandbytes' CPU inference layout?"""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _bnb_unpack_function():
    """bitsandbytes' own inverse of its CPU repacking, or None: a private function, looked up rather
    than assumed (other versions may lack it or name it differently)."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return None
    return _convert_weight_packed_for_cpu_inverse


def _unpack(module: nn.Module, weight) -> None:
    """Put ``module``'s 4-bit weight back into the plain quantized layout, in place.

    Through bitsandbytes' private inverse when this version has it; otherwise through the public
    ``module.state_dict()``, whose save path unpacks the weight first (bitsandbytes saves the plain
    layout). A weight still packed after that is refused: training through it gives wrong gradients.
    """
    unpack = _bnb_unpack_function()
    if unpack is not None:
        weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
    else:
        import logging

        logging.getLogger(__name__).info("bitsandbytes has no _convert_weight_packed_for_cpu_inverse; "
                                         "unpacking 4-bit CPU weights through state_dict() instead")
        module.state_dict()
    if _is_packed(getattr(module, "weight", weight)):
        raise LoraError(f"a 4-bit {type(module).__name__} was repacked by bitsandbytes for CPU inference (the model "
                        "ran in eval mode before lorakit wrapped it) and this bitsandbytes version cannot unpack it; "
                        "load the model again and wrap it with get_peft_model before evaluating it.")


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Get a 4/8-bit model ready for LoRA training (call before get_peft_model).

    Freezes every weight, keeps the remaining half-precision weights (norms, embeddings) in
    float32 for stable training, and with ``gradient_checkpointing`` trades compute for memory:
    activations are recomputed in backward, the main memory cost left once weights are 4-bit.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and not is_quantized_weight(p):
            p.data = p.data.float()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        # the inputs of checkpointed blocks must require grad, or no gradient reaches the adapters
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """peft's name and signature for ``prepare_for_kbit_training``.

    ``gradient_checkpointing_kwargs`` other than ``use_reentrant=False`` (lorakit's choice: the
    non-reentrant form works with frozen inputs) are refused rather than silently dropped.
    """
    extra = dict(gradient_checkpointing_kwargs or {})
    if extra and extra != {"use_reentrant": False}:
        raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r} is not supported; "
                         "lorakit always checkpoints with use_reentrant=False (pass None).")
    return prepare_for_kbit_training(model, gradient_checkpointing=use_gradient_checkpointing)
