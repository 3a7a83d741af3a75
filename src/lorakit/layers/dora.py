"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), computed as peft computes it.

The adapted weight is split into a direction and a trained magnitude ``m`` (one number per output feature):

    W' = m * V / ||V||,      V = W + s B A

where ``||V||`` is the L2 norm of each output feature's weights (a row of V as [out, in]; for an
embedding, each embedding dimension's column over the vocabulary). ``||V||`` counts as a constant in
backward (the paper's section 4.3; peft detaches it), so only m, A and B get gradients, and m starts at
``||W + s B A||`` (``||W||`` when B = 0), so a fresh adapter leaves the model unchanged.

A linear layer (nn.Linear, or GPT-2's Conv1D) with bias b computes ``W' x + b`` on top of its base output:

    y = base(x) + (m/||V|| - 1) * (W x_d) + (m/||V||) * s * B A x_d

with x_d = dropout(x) while lora_dropout is active (then ``W x_d`` is one more product with the base
weight) and x_d = x otherwise (then ``W x`` is the base output less its bias). An embedding (no dropout):

    y = (m/||V||) * (E[x] + s * A.T[x] B.T)

Merging writes W' into the base weight, ``W <- (m/||V||) * (W + s B A)``, and keeps ``||V||`` to unmerge
(``W = W' / (m/||V||) - s B A``). Per-row adapters (``adapter_names``) are refused with DoRA, as peft does.

The layers call these functions with their weights seen as [out, in] (``LoraLayer._rows``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["dora_embedding_forward", "dora_linear_delta", "dora_merged_weight", "dora_unmerged_weight",
           "weight_norm"]


def weight_norm(weight_rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
    """``||W + delta||`` per output feature (each row of the [out, in] matrices), without gradient."""
    with torch.no_grad():
        v = weight_rows + delta_rows
        return torch.linalg.norm(v, dim=1).to(v.dtype)


def dora_linear_delta(x: torch.Tensor, result: torch.Tensor, weight_rows: torch.Tensor, bias: torch.Tensor | None,
                      A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
                      dropout: nn.Module | None) -> torch.Tensor:
    """What a DoRA adapter adds to a linear layer's output ``result`` for input ``x`` (see the module doc).

    ``x`` is in the adapter's dtype, ``weight_rows`` the base weight as [out, in] in that dtype, ``result`` the
    output so far (the base output, plus earlier active adapters: peft's definition of W x uses it as is).
    ``dropout`` is the adapter's dropout module, None when there is none.
    """
    lora_weight = B @ A
    norm = weight_norm(weight_rows, scale * lora_weight.detach())
    factor = (magnitude / norm).view(1, -1)
    if dropout is not None and dropout.training:
        x = dropout(x)
        base = F.linear(x, weight_rows)
    else:
        base = result if bias is None else result - bias
    lora = F.linear(F.linear(x, A), B)
    return (factor - 1) * base + factor * lora * scale


def dora_embedding_forward(x: torch.Tensor, result: torch.Tensor, base: nn.Embedding, A: torch.Tensor,
                           B: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """An embedding's output with a DoRA adapter: ``(m/||V||) * (result + s * A.T[x] B.T)`` (a new tensor).

    A is [r, num_embeddings], B [embedding_dim, r] (PEFT's layout); ``result`` the output so far.
    """
    lora_weight = B @ A  # [dim, vocab]: the rows are the output features
    norm = weight_norm(base.weight.t(), scale * lora_weight.detach())
    factor = magnitude / norm
    after_a = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
    update = factor * (after_a @ B.t()) * scale
    embed_scale = getattr(base, "embed_scale", None)  # a scaled embedding (Gemma 3): after the norm, as peft
    if isinstance(embed_scale, (int, float)) or (isinstance(embed_scale, torch.Tensor) and embed_scale.numel() == 1):
        update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
    return factor * result + update


def dora_merged_weight(weight_rows: torch.Tensor, base_rows: torch.Tensor, delta_rows: torch.Tensor,
                       magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged weight as [out, in] in float32, ||V||) for merging.

    ``base_rows`` is the weight without any merged adapter (the W of ``||W + s B A||``, as forward sees it);
    ``weight_rows`` the weight to merge into (it may hold adapters merged earlier, as in peft).
    """
    norm = weight_norm(base_rows.float(), delta_rows.float())
    factor = (magnitude.detach().float() / norm).view(-1, 1)
    return factor * (weight_rows.float() + delta_rows.float()), norm


def dora_unmerged_weight(merged_rows: torch.Tensor, delta_rows: torch.Tensor, magnitude: torch.Tensor,
                         norm: torch.Tensor) -> torch.Tensor:
    """The weight before ``dora_merged_weight`` (as [out, in], float32), from the ``||V||`` it returned."""
    factor = (magnitude.detach().float() / norm).view(-1, 1)
    return merged_rows.float() / factor - delta_rows.float()
