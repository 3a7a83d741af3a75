"""Several adapters combined into a new one (``LoraModel.add_weighted_adapter``, peft's method).

For each LoRA layer, with adapter i's A_i [r_i, in], B_i [out, r_i], scaling s_i and weight w_i:

* ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] and B = [B_1, B_2, ...] stacked along the rank, so
  B A = sum_i w_i s_i B_i A_i exactly; the rank is the sum of the ranks.
* ``svd``: the same sum, cut to ``svd_rank`` (default: the largest rank) by a singular value
  decomposition, B = U S, A = V^T (exact when the sum's rank fits), optionally clamped at the
  ``svd_clamp`` quantile of their entries.
* ``linear``: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i and B = sum_i sqrt|w_i s_i| B_i, all ranks
  equal. B A then has cross terms B_i A_j: peft's definition, a cheap approximation only.

The new adapter has lora_alpha = r (scaling 1). Layers that none of the adapters wraps get a zero
adapter. Embedding layers follow the same rules with PEFT's layout (A [r, vocab], B [dim, r]).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import LoraError

__all__ = ["COMBINATIONS", "combined_pair", "lora_pair"]

#: what lorakit computes
COMBINATIONS = ("svd", "cat", "linear")
#: peft's task-arithmetic variants lorakit does not implement
PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
             "magnitude_prune_svd")


def lora_pair(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) parameters of adapter ``name`` in ``layer`` (its ``adapter_containers``:
    lora_A / lora_B modules for linear layers, lora_embedding_A / _B parameters for embeddings)."""
    a, b = (getattr(layer, container)[name] for container in layer.adapter_containers)
    return tuple(t.weight if isinstance(t, nn.Module) else t for t in (a, b))


def combined_pair(layer, sources: Sequence[str], weights: Sequence[float], kind: str, rank: int, *,
                  svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                  svd_driver: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A [rank, in], B [out, rank]) in float32 for one layer (see module docstring)."""
    pairs = [tuple(t.detach().float() for t in lora_pair(layer, s)) for s in sources]
    scaled = [w * layer.scaling[s] for s, w in zip(sources, weights)]
    n_in, n_out = pairs[0][0].shape[1], pairs[0][1].shape[0]
    A = pairs[0][0].new_zeros((rank, n_in))
    B = pairs[0][1].new_zeros((n_out, rank))
    if kind == "cat":
        a = torch.cat([A_i * c for (A_i, _), c in zip(pairs, scaled)], dim=0)
        b = torch.cat([B_i for _, B_i in pairs], dim=1)
        A[:a.shape[0]], B[:, :b.shape[1]] = a, b
    elif kind == "linear":
        ranks = {A_i.shape[0] for A_i, _ in pairs}
        if len(ranks) != 1:
            raise LoraError(f"combination_type='linear' needs adapters of one rank; this layer has ranks "
                            f"{sorted(ranks)}. Use 'cat' or 'svd'.")
        for (A_i, B_i), c in zip(pairs, scaled):
            root = math.sqrt(abs(c))
            A[:A_i.shape[0]] += math.copysign(root, c) * A_i
            B[:, :B_i.shape[1]] += root * B_i
    else:  # svd
        delta = sum(c * (B_i @ A_i) for (A_i, B_i), c in zip(pairs, scaled))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
        k = min(rank, S.shape[0])
        u, vh = U[:, :k] * S[:k], Vh[:k, :]
        if svd_clamp is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        A[:k], B[:, :k] = vh, u
    return A, B
