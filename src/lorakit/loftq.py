"""LoftQ for a base already loaded in 4 bits (peft's ``replace_lora_weights_loftq``).

``init_lora_weights="loftq"`` quantizes a full-precision base itself (``layers.init``). For a model that
was loaded in 4 bits (QLoRA), this replaces each LoRA pair over a 4-bit layer instead: with W the
layer's original weight, read from the model's safetensors files, and Q its 4-bit version in the model,

    B A = the rank-r SVD of W - dequant(Q)      (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, no scale, as peft)

so that Q + B A is closer to W than Q alone: the adapter starts by undoing the quantization error. It runs
on the CPU (bitsandbytes >= 0.45 dequantizes there). ``callback(model, module_name) -> bool`` may reject a
layer's replacement (it is rolled back), e.g. when the logits do not get closer to the original's.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from .errors import LoraError
from .hf.quant import dequantized, quantized_kind
from .layers.init import svd_factors

__all__ = ["replace_lora_weights_loftq"]


class _Weights:
    """Tensors of a model folder's safetensors file(s), read one at a time."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self._open = safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.where = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with self._open(single, framework="pt") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise LoraError(f"replace_lora_weights_loftq reads the original weights from safetensors files, and "
                            f"{folder} has neither model.safetensors nor model.safetensors.index.json; pass "
                            f"model_path= the folder the model was loaded from.")

    def get(self, name: str) -> torch.Tensor:
        key = name if name in self.where else next((k for k in self.where if k.endswith("." + name)
                                                     or name.endswith("." + k)), None)
        if key is None:
            raise LoraError(f"the model files have no tensor {name!r}; pass model_path= the folder the model was "
                            f"loaded from.")
        with self._open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)


def replace_lora_weights_loftq(model, model_path: str | os.PathLike | None = None, adapter_name: str = "default",
                               callback: Callable[[object, str], bool] | None = None) -> None:
    """Give adapter ``adapter_name``'s LoRA pairs over 4-bit layers LoftQ's values (see the module docstring)."""
    folder = os.fspath(model_path) if model_path is not None else \
        getattr(getattr(model.model, "config", None), "_name_or_path", None)
    if not folder or not os.path.isdir(folder):
        raise LoraError(f"replace_lora_weights_loftq needs the model's local folder (model_path=...); got {folder!r}.")
    layers = [(n, l) for n, l in model.lora_layers()
              if quantized_kind(getattr(l.base_layer, "weight", None)) == "bnb 4bit" and adapter_name in l.r]
    if not layers:
        raise LoraError(f"no LoRA layer of adapter {adapter_name!r} sits on a 4-bit base layer; load the model with "
                        f"lorakit.bnb_4bit_config (or use init_lora_weights='loftq' on a full-precision base).")
    weights = _Weights(folder)
    for name, layer in layers:
        W = weights.get(name + ".weight").float()
        residual = W - dequantized(layer.base_layer.weight).float()
        L, R = svd_factors(residual, layer.r[adapter_name])
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = A.data, B.data
        A.data, B.data = R.to(A.dtype).contiguous(), L.to(B.dtype).contiguous()
        if callback is not None and not callback(model, name):
            A.data, B.data = before
