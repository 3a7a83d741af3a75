"""An adapter trained from a base-changing init (PiSSA, OLoRA), saved as a plain LoRA for the unmodified base.

PiSSA and OLoRA start from W = W_res + s B0 A0 and train on W_res, so their adapter fits only W_res.
After training, W_res + s B A = W + s (B A - B0 A0), which is a LoRA of rank 2r on the original W::

    A' = [A; A0]   (2r x in)        B' = [B, -B0]   (out x 2r)        B' A' = B A - B0 A0

with r and lora_alpha doubled (the scale stays alpha / r; rsLoRA: alpha times sqrt 2). This is peft's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``: the initial adapter is the one
saved right after ``get_peft_model`` (before training). The result loads on the original base in
lorakit, peft or anything else that reads LoRA files, next to other adapters.
"""
from __future__ import annotations

import math
import re
import warnings

import torch

from .config import LoraConfig
from .errors import LoraError

__all__ = ["to_plain_lora", "warn_random_init"]

_PAIR = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def _converted_config(config: LoraConfig) -> LoraConfig:
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=config.r * 2, lora_alpha=config.lora_alpha * alpha_factor, init_lora_weights=True, loftq_config={},
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def to_plain_lora(config: LoraConfig, weights: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                  where: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The (config, weights) of the trained adapter ``weights`` as a plain LoRA on the original base, given the
    ``initial`` adapter's weights (read from the folder ``where``). Keys other than LoRA pairs are kept."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise LoraError("path_initial_model_for_weight_conversion cannot convert an adapter with use_rslora and "
                        "rank_pattern/alpha_pattern (doubling alpha would change those layers' scale); peft refuses "
                        "it too. Save without conversion.")
    if config.init_lora_weights == "loftq":
        warnings.warn("LoftQ's base is W's quantization, not W minus the initial adapter: the converted adapter "
                      "only approximates the fine-tuned model on the original base.", stacklevel=3)
    pairs = {k: v for k, v in weights.items() if _PAIR.search(k)}
    missing = sorted(set(pairs) - set(initial))
    wrong = sorted(k for k in pairs if k in initial and tuple(initial[k].shape) != tuple(pairs[k].shape))
    if missing or wrong:
        raise LoraError(f"the initial adapter in {where} does not match this adapter ("
                        + (f"missing {missing[:4]}" if missing else f"other shapes for {wrong[:4]}")
                        + "); pass the folder saved right after get_peft_model, before training.")
    out = dict(weights)
    for key, value in pairs.items():
        first = _PAIR.search(key).group(1).endswith("A")
        start = initial[key].to(value.dtype)
        out[key] = torch.cat([value, start], dim=0) if first else torch.cat([value, -start], dim=1)
    return _converted_config(config), out


def warn_random_init(config: LoraConfig, where: str) -> None:
    """Loading an adapter re-runs its init on the base (peft's way): a randomised PiSSA ("pissa_niter_N") gives
    the training's base again only from the same torch seed."""
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        warnings.warn(f"the adapter in {where} was trained from init_lora_weights={init!r}, a randomised SVD that "
                      f"loading runs again on this base: the result matches training only from the same torch seed. "
                      f"Save it with path_initial_model_for_weight_conversion for a plain LoRA that loads anywhere.",
                      stacklevel=4)
