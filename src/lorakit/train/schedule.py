"""Learning-rate schedules: linear warm-up, then linear / cosine decay (or constant).

The factor for optimizer step ``s`` (0-based) with ``w`` warm-up steps out of ``T``:

    warm-up   (s < w):  (s + 1) / (w + 1)            never 0, so no step is wasted
    linear    (s >= w): (T - s) / (T - w)            reaches 1 / (T - w) on the last step
    cosine    (s >= w): 0.5 * (1 + cos(pi * (s - w) / (T - w)))
    constant  (s >= w): 1
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total: int, warmup_steps: int, warmup_ratio: float) -> int:
    w = warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * total))
    return min(w, max(total - 1, 0))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    if kind == "linear":
        return max(total - step, 0) / span
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown scheduler {kind!r}; use linear, cosine or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str):
    lr_factor(0, total, warmup, kind)  # validate the kind now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind))
