"""Several adapters combined into a new one (``LoraModel.add_weighted_adapter``, peft's method).

For each LoRA layer, with adapter i's A_i [r_i, in], B_i [out, r_i], scaling s_i and weight w_i:

* ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] and B = [B_1, B_2, ...] stacked along the rank, so
  B A = sum_i w_i s_i B_i A_i exactly; the rank is the sum of the ranks.
* ``svd``: the same sum, cut to ``svd_rank`` (default: the largest rank) by a singular value
  decomposition, B = U S, A = V^T (exact when the sum's rank fits), optionally clamped at the
  ``svd_clamp`` quantile of their entries.
* ``linear``: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i and B = sum_i sqrt|w_i s_i| B_i, all ranks
  equal. B A then has cross terms B_i A_j: peft's definition, a cheap approximation only.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: as ``linear``, but the A's (then the
  B's) are merged by that method of ``lorakit.merging`` (pruned to ``density``; TIES elects a sign by
  ``majority_sign_method``) instead of summed.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the adapters' full
  updates s_i B_i A_i (in the base weight's layout) merged by that method, then cut by the SVD as ``svd``.

The new adapter has lora_alpha = r (scaling 1). Layers that none of the adapters wraps get a zero
adapter. Embedding layers follow the same rules with PEFT's layout (A [r, vocab], B [dim, r]).
DARE's random pruning draws from torch's default generator in peft's order: the same seed gives
peft's adapter.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import LoraError
from .merging import MERGES, SIGN_METHODS, merge_tensors

__all__ = ["COMBINATIONS", "add_weighted", "combined_pair", "lora_pair"]

#: what lorakit computes: cat, and each merge of the A's and B's (``linear`` ...) or of the updates (``..._svd``)
COMBINATIONS = ("svd", "cat", *MERGES, *(f"{m}_svd" for m in MERGES[1:]))
#: the combinations that prune (they need ``density``) and those that elect a sign (``majority_sign_method``)
_PRUNING = tuple(c for c in COMBINATIONS if c.split("_svd")[0] in MERGES[1:])


def lora_pair(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) parameters of adapter ``name`` in ``layer`` (its ``adapter_containers``:
    lora_A / lora_B modules for linear layers, lora_embedding_A / _B parameters for embeddings)."""
    a, b = (getattr(layer, container)[name] for container in layer.adapter_containers[:2])
    return tuple(t.weight if isinstance(t, nn.Module) else t for t in (a, b))


def _update_is_transposed(layer) -> bool:
    """Is the layer's ``delta_weight`` (the base weight's layout) B A transposed? Conv1D (in x out) and
    embeddings (vocab x dim) store their weights so."""
    return bool(getattr(layer, "fan_in_fan_out", False)) or "lora_embedding_A" in layer.adapter_containers


def _svd_pair(delta: torch.Tensor, rank: int, clamp: Optional[float], full_matrices: bool, driver: Optional[str]):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    u, vh = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


def combined_pair(layer, sources: Sequence[str], weights: Sequence[float], kind: str, rank: int, *,
                  svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                  svd_driver: Optional[str] = None, density: Optional[float] = None,
                  majority_sign_method: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """The combined (A [rank, in], B [out, rank]) in float32 for one layer (see module docstring)."""
    pairs = [tuple(t.detach().float() for t in lora_pair(layer, s)) for s in sources]
    scaled = [w * layer.scaling[s] for s, w in zip(sources, weights)]
    n_in, n_out = pairs[0][0].shape[1], pairs[0][1].shape[0]
    A = pairs[0][0].new_zeros((rank, n_in))
    B = pairs[0][1].new_zeros((n_out, rank))
    if kind == "cat":
        a = torch.cat([A_i * c for (A_i, _), c in zip(pairs, scaled)], dim=0)
        b = torch.cat([B_i for _, B_i in pairs], dim=1)
    elif kind in MERGES:
        ranks = {A_i.shape[0] for A_i, _ in pairs}
        if len(ranks) != 1:
            raise LoraError(f"combination_type={kind!r} needs adapters of one rank; this layer has ranks "
                            f"{sorted(ranks)}. Use 'cat' or 'svd'.")
        # sqrt|w s| on both sides, the sign on A's side only (peft's split of the weight)
        roots = [math.sqrt(abs(c)) for c in scaled]
        w_a = torch.tensor([r if c >= 0 else -r for r, c in zip(roots, scaled)])
        a = merge_tensors(kind, [A_i for A_i, _ in pairs], w_a, density, majority_sign_method)
        b = merge_tensors(kind, [B_i for _, B_i in pairs], torch.tensor(roots), density, majority_sign_method)
    else:  # svd, or a merge of the full updates then svd
        deltas = [layer.delta_weight(s).float() for s in sources]
        merge = "linear" if kind == "svd" else kind.removesuffix("_svd")
        merged = merge_tensors(merge, deltas, torch.tensor([float(w) for w in weights]), density, majority_sign_method)
        if _update_is_transposed(layer):
            merged = merged.T
        a, b = _svd_pair(merged, rank, svd_clamp, svd_full_matrices, svd_driver)
    A[:a.shape[0]], B[:, :b.shape[1]] = a, b
    return A, B


def _check_request(model, adapters: list[str], given: Sequence, combination_type: str, svd_rank, svd_clamp,
                   density, majority_sign_method) -> list[float]:
    """Refuse a bad add_weighted_adapter call (nothing changed yet); returns the weights as floats."""
    if not adapters:
        raise LoraError("add_weighted_adapter needs at least one adapter to combine.")
    for name in adapters:
        model._require(name)
    try:
        weights = [float(w) for w in given]
    except (TypeError, ValueError):
        weights = []
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise LoraError(f"weights must be one finite number per adapter: {len(adapters)} adapter(s) {adapters}, "
                        f"weights {given!r}.")
    if combination_type not in COMBINATIONS:
        raise LoraError(f"unknown combination_type {combination_type!r}; choose one of {list(COMBINATIONS)}.")
    if combination_type in _PRUNING and len(adapters) > 1:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise LoraError(f"combination_type={combination_type!r} needs density, the share of entries each adapter "
                            f"keeps, in (0, 1] (e.g. density=0.5); got {density!r}.")
        if majority_sign_method not in SIGN_METHODS:
            raise LoraError(f"majority_sign_method must be one of {list(SIGN_METHODS)}; got {majority_sign_method!r}.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise LoraError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
    if svd_clamp is not None and not 0.0 < float(svd_clamp) <= 1.0:
        raise LoraError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}.")
    return weights


def _new_rank(model, adapters: list[str], kind: str, svd_rank: int | None) -> int:
    configs = [model.peft_config[a] for a in adapters]
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind in MERGES and len(set(ranks)) != 1:
        raise LoraError(f"combination_type={kind!r} needs adapters of one rank, got ranks {ranks} for {adapters}; "
                        f"use 'cat' or 'svd'.")
    if kind == "cat":
        return sum(ranks)
    return ranks[0] if kind in MERGES else svd_rank or max(ranks)


def _refuse_uncombinable(model, adapters: list[str]) -> None:
    shared = [path for path, w in model._saved_wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise LoraError(f"adapters {adapters} each keep their own copy of {shared[0]!r} (modules_to_save), "
                        f"which cannot be combined; combine adapters that share no saved module.")
    params = [a for a in adapters if getattr(model.peft_config[a], "target_parameters", None)]
    if params:
        raise LoraError(f"adapter {params[0]!r} targets raw parameters (target_parameters), whose updates "
                        f"add_weighted_adapter cannot combine (peft neither); combine adapters on modules only.")


def add_weighted(model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                 combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                 svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                 majority_sign_method: str = "total") -> None:
    """``LoraModel.add_weighted_adapter``: check everything, add the adapter, fill it per layer."""
    model._check_live()
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)):
        raise LoraError(f"adapters must be a list of adapter names, got {adapters!r}; e.g. "
                        f"add_weighted_adapter([{adapters!r}], [1.0], 'new') for one adapter.")
    if isinstance(weights, (str, int, float)) or not isinstance(weights, (list, tuple)):
        raise LoraError(f"weights must be a list with one number per adapter, got {weights!r}.")
    adapters = list(adapters)
    weights = _check_request(model, adapters, weights, combination_type, svd_rank, svd_clamp, density,
                             majority_sign_method)
    if adapter_name in model.peft_config:
        warnings.warn(f"adapter {adapter_name!r} exists already; add_weighted_adapter left it unchanged "
                      f"(delete_adapter() it first to rebuild it).", stacklevel=3)
        return
    kind = "linear" if len(adapters) == 1 else combination_type  # one adapter: peft scales it (linear)
    rank = _new_rank(model, adapters, kind, svd_rank)
    _refuse_uncombinable(model, adapters)
    pairs = [(path, layer) for path, layer in model.lora_layers() if layer.adapter_containers]  # not token rows
    paths = sorted(path for path, layer in pairs if any(a in layer.r for a in adapters))
    # the modules the sources wrap, by path (a union of their target patterns could reach others);
    # plain initialisation (no PiSSA-style change of the base) and scaling exactly 1
    config = model.peft_config[adapters[0]].replace(
        r=rank, lora_alpha=rank, use_rslora=False, target_modules=tuple(paths), exclude_modules=None,
        layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={}, init_lora_weights=True,
        loftq_config={})
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for _, layer in pairs:
            if adapter_name not in layer.r:
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
            A, B = lora_pair(layer, adapter_name)
            if not present:
                A.zero_(), B.zero_()
                continue
            new_a, new_b = combined_pair(layer, [a for a, _ in present], [w for _, w in present], kind, rank,
                                         svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                         svd_driver=svd_driver, density=density,
                                         majority_sign_method=majority_sign_method)
            A.copy_(new_a), B.copy_(new_b)
