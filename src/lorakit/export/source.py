"""An adapter folder read as LoRA pairs: each wrapped module's ``A``, ``B`` and the scale lorakit applies.

The scale is lorakit's own (``LoraConfig.scaling_for`` with the module's rank_pattern / alpha_pattern
entries), so an export computes the delta ``scaling * B @ A`` that ``lorakit generate`` computes. Tensors that
are not LoRA pairs (``modules_to_save`` copies, trained biases) are listed separately: a runtime that only
adds low-rank deltas cannot hold them.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterLoadError
from lorakit.plan import PEFT_PREFIX
from lorakit.targets import pattern_value

_PAIR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclasses.dataclass(frozen=True)
class LoraPair:
    """One wrapped module. Linear: ``A`` (r, in), ``B`` (out, r); embedding: ``A`` (r, vocab), ``B`` (dim, r).
    The update is ``scaling * B @ A`` (transposed for an embedding's (vocab, dim) table)."""

    module: str
    embedding: bool
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scaling: float


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    path: str
    config: LoraConfig
    pairs: tuple[LoraPair, ...]
    #: tensors of the file that are not LoRA pairs: modules_to_save copies and trained biases
    extra: tuple[str, ...]


def read_source(adapter_dir: str | os.PathLike) -> AdapterSource:
    """Read and check an adapter folder; AdapterLoadError when a pair is incomplete or has the wrong rank."""
    from lorakit.peft_format import read_adapter

    config, weights = read_adapter(adapter_dir)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    extra = []
    for key, tensor in weights.items():
        m = _PAIR_KEY.match(key)
        if m is None:
            extra.append(key.removeprefix(PEFT_PREFIX))
            continue
        module = m["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[m["part"].removeprefix("lora_").removeprefix("embedding_")] = tensor
    pairs = tuple(_pair(adapter_dir, config, module, parts, weights) for module, parts in halves.items())
    if not pairs:
        raise AdapterLoadError(f"{adapter_dir}: the adapter holds no LoRA pair (lora_A / lora_B); it is not a LoRA "
                               f"adapter. Save it again with save_pretrained")
    return AdapterSource(os.fspath(adapter_dir), config, pairs, tuple(sorted(extra)))


def _pair(adapter_dir, config: LoraConfig, module: str, parts: dict, weights: dict) -> LoraPair:
    if set(parts) != {"A", "B"}:
        missing = "lora_B" if "A" in parts else "lora_A"
        raise AdapterLoadError(f"{adapter_dir}: {module} has no {missing} tensor; the adapter file is incomplete. "
                               f"Save the adapter again")
    embedding = any(".lora_embedding_" in k and k.removeprefix(PEFT_PREFIX).startswith(module + ".")
                    for k in weights)
    A, B = parts["A"].float(), parts["B"].float()
    r = pattern_value(config.rank_pattern, module, config.r)
    alpha = float(pattern_value(config.alpha_pattern, module, config.lora_alpha))
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise AdapterLoadError(f"{adapter_dir}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                               f"not rank {r} as adapter_config.json says; the config and the weights come from "
                               f"different adapters. Save the adapter again")
    return LoraPair(module, embedding, A, B, r, alpha, float(config.scaling_for(r, alpha)))
