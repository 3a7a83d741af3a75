"""Task-arithmetic merges of same-shaped tensors: TIES, DARE and magnitude pruning (peft's definitions).

Each function takes the tensors of several adapters (all one shape) and a weight per adapter, and
returns one tensor of that shape:

* ``task_arithmetic``: sum_i w_i T_i.
* ``magnitude_prune``: each T_i keeps its ``density`` share of entries largest in magnitude (the rest
  are zeroed), then the weighted sum.
* ``ties`` (Yadav et al. 2023): magnitude pruning as above; per entry, the sign whose pruned values
  sum larger (``"total"``) or occur more often (``"frequency"``) is elected; the weighted entries
  that agree with it are averaged (divided by how many agree, at least 1).
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): each entry is kept with probability ``density``
  (a Bernoulli draw per entry, ``torch.bernoulli`` on the default generator, in the tensors' order)
  and the kept ones divided by ``density``; then the weighted sum, or TIES' sign election and average.

The random draws happen in the same order and on the same generator as peft's, so with the same
``torch.manual_seed`` both give the same merged adapter. A density of 1 prunes nothing (and draws
nothing).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MERGES", "SIGN_METHODS", "merge_tensors"]

SIGN_METHODS = ("total", "frequency")


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _elect_and_average(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    kept = (_weighted(stacked, weights) * agree).sum(dim=0)
    return kept / torch.clamp(agree.sum(dim=0), min=1.0)


def merge_tensors(kind: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float | None = None,
                  sign_method: str = "total") -> torch.Tensor:
    """Merge ``tensors`` (one per adapter, same shape) with ``weights`` [n] by ``kind`` (see the module doc)."""
    if kind == "linear":
        return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)
    prune = _keep_random if kind.startswith("dare") else _keep_largest
    stacked = torch.stack([prune(t, density) for t in tensors])
    if kind.endswith("ties"):
        return _elect_and_average(stacked, weights, sign_method)
    return _weighted(stacked, weights).sum(dim=0)


#: the merge kinds ``merge_tensors`` knows ("linear" is plain task arithmetic)
MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
