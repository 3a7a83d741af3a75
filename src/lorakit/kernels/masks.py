"""Dropout keep-masks: cheap to draw, exact in probability, reproducible from torch's RNG.

torch's CPU dropout draws one 32-bit float per element; numpy's SFC64 generator makes one random
*byte* per element, far less work and data. One byte decides almost every element; the 1-in-256
that land exactly on the threshold byte draw a second, 53-bit uniform, so P(drop) == p to ~2**-61,
not p rounded to 1/256.

The numpy seed is one int64 drawn from torch's default CPU generator, so
``torch.manual_seed`` reproduces the masks and ``torch.utils.checkpoint`` (which restores
torch's RNG state before recomputing) regenerates the same mask on recomputation.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["draw_keep_mask", "pack_keep", "torch_seed", "unpack_keep"]


def torch_seed(device: torch.device | str = "cpu") -> int:
    """One 63-bit integer from torch's generator of ``device`` (advances it by one draw)."""
    return int(torch.empty((), dtype=torch.int64, device=device).random_())


def draw_keep_mask(numel: int, p: float, seed: int) -> np.ndarray:
    """Flat bool array of ``numel`` elements, each True (kept) with probability ``1 - p``.

    Element i is dropped iff byte_i < t, or byte_i == t and u_i < frac, where
    p * 256 == t + frac: P(drop) = t/256 + frac/256 = p.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1], got {p}; pass lora_dropout in [0, 1)")
    if p == 0.0:
        return np.ones(numel, dtype=bool)
    if p == 1.0:
        return np.zeros(numel, dtype=bool)
    gen = np.random.Generator(np.random.SFC64(seed))
    words = (numel + 7) // 8
    raw = gen.bit_generator.random_raw(words).view(np.uint8)[:numel]
    q = p * 256.0
    t = int(q)
    frac = q - t
    if frac == 0.0:
        return raw >= t
    keep = raw > t
    tie = np.flatnonzero(raw == t)
    if tie.size:
        keep[tie] = gen.random(tie.size) >= frac
    return keep


def pack_keep(keep: torch.Tensor) -> np.ndarray:
    """A CPU bool keep mask as bits (1 bit per element), what backward keeps of it."""
    return np.packbits(keep.reshape(-1).numpy())


def unpack_keep(packed: np.ndarray, shape) -> torch.Tensor:
    """The bool mask of ``shape`` that ``pack_keep`` packed."""
    count = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed, count=count).view(bool).reshape(tuple(shape)))
