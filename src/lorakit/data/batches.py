"""The data order: a seeded shuffle per epoch, optionally bucketed by length.

Bucketing sorts each window of ``batch_size * BUCKET_BATCHES`` shuffled examples by length before
cutting it into batches, so a batch holds examples of similar length (little padding); the batches are
then shuffled again, so the order of lengths seen by the optimizer stays random. The order depends only
on (seed, epoch), and is also stored in every checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch

BUCKET_BATCHES = 32


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                sort_by_length: bool = True) -> list[list[int]]:
    """Batches (lists of example indices) for one epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if not sort_by_length:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    batches = []
    window = batch_size * BUCKET_BATCHES
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle]


def eval_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic, length-sorted batches for evaluation."""
    idx = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
