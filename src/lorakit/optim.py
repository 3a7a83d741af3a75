"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns faster than A.

With plain LoRA, A and B share one learning rate; LoRA+ gives B ``loraplus_lr_ratio`` times A's (the
paper suggests 2-16, and a smaller base lr than plain LoRA's). peft's ``create_loraplus_optimizer`` builds
four parameter groups, and so does this one, with the same members and settings:

    A            every other trainable matrix (lora_A, saved heads' weights)     lr          loraplus_weight_decay
    embedding    an embedding LoRA's A and B                                     lr_embedding  loraplus_weight_decay
    B            lora_B, DoRA magnitudes and other 1-D parameters                lr * ratio  loraplus_weight_decay
    B, no decay  those of them that are biases or inside a LayerNorm            lr * ratio  0

Groups are found by what a parameter is (lorakit's layer classes), not by name matching.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .errors import LoraError
from .layers import LoraEmbedding, LoraLayer

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]

_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of the A and B tables of LoRA embedding layers (their own group, as peft)."""
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraEmbedding):
            for container in ("lora_embedding_A", "lora_embedding_B"):
                out.update(id(p) for p in getattr(module, container).parameters())
    return out


def _lora_b_params(model: nn.Module) -> set[int]:
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_B"):  # not trainable tokens' rows (group A)
            out.update(id(p) for p in module.lora_B.parameters())
    return out


def _no_decay_params(model: nn.Module) -> set[int]:
    """Parameters inside a LayerNorm (transformers' ALL_LAYERNORM_LAYERS), which the Trainer never decays."""
    return {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


def loraplus_param_groups(model: nn.Module, *, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0) -> list[dict]:
    """The four LoRA+ parameter groups (A, embedding, B, B without decay) of ``model``'s trainable parameters."""
    for key, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio), ("loraplus_lr_embedding",
                                                                                loraplus_lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LoraError(f"{key} must be a positive number; got {value!r}.")
    embedding, lora_b, no_decay = _embedding_params(model), _lora_b_params(model), _no_decay_params(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in _trainable(model):
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif id(p) in lora_b or p.ndim == 1:
            decays = id(p) not in no_decay and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    wd = loraplus_weight_decay
    return [
        {"params": groups["A"], "weight_decay": wd, "lr": lr},
        {"params": groups["embedding"], "weight_decay": wd, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": wd, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> torch.optim.Optimizer:
    """peft's ``create_loraplus_optimizer``: ``optimizer_cls`` over the LoRA+ groups.

    ``loraplus_lr_embedding`` (default 1e-6) and ``loraplus_weight_decay`` (default 0) are taken from
    ``kwargs``; the rest (betas, eps, ...) go to the optimizer. With a bitsandbytes 8-bit optimizer the
    embeddings keep 32-bit state, as peft arranges.
    """
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                   loraplus_lr_embedding=embedding_lr, loraplus_weight_decay=weight_decay)
    if not any(g["params"] for g in groups):
        raise LoraError("the model has no trainable parameters; wrap it with get_peft_model first.")
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
