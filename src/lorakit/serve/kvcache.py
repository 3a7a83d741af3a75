"""The decoding batch's key/value cache: rows of different lengths in one transformers cache.

Every row's keys and values sit right-aligned in one ``[rows, heads, T, head_dim]`` tensor per layer;
the columns in front of a shorter row are padding, switched off by the attention mask (``mask``:
``[rows, T]``, 1 = a real token). A row's next position is its own token count, passed as
``position_ids``, so each row sees exactly the positions and keys it would see alone. Rows join (their
prompt's cache, computed alone, is padded to the batch's width or the batch to theirs) and leave (their
row is dropped, and columns that are padding for every remaining row are cut) between decoding steps;
only then is the cache rebuilt. In a step the model appends one column in place, as in ``generate``.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name a model's forward takes its cache under: ``cache`` (transformers 5) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def logits_kwarg(model: torch.nn.Module) -> str | None:
    """The argument that limits the head to the last positions, when the model has one."""
    params = _forward_params(type(model))
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def new_cache():
    """An empty cache with one plain (full-length) layer per attention layer, made as they are filled."""
    from transformers import DynamicCache

    return DynamicCache()


def layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers DynamicCache, whichever release made it."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _filled(tensors: list[tuple[torch.Tensor, torch.Tensor]]):
    cache = new_cache()
    for i, (k, v) in enumerate(tensors):
        cache.update(k, v, i)
    return cache


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` ([rows, heads, T, dim]) with ``width`` zero columns in front."""
    if width == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], width, t.shape[3])
    return torch.cat([pad, t], dim=2)


class BatchCache:
    """The cache and attention mask of the rows being decoded together (see the module docstring)."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None   # [rows, T] long, 1 where a row has a real token
        self.lengths: list[int] = []            # each row's real token count = its next position

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add_row(self, row_cache, length: int) -> None:
        """Append one row whose cache (a prompt computed alone: ``length`` columns, no padding) is given."""
        row = layer_tensors(row_cache)
        if self.rows == 0:
            self.cache, self.mask, self.lengths = _filled(row), None, [length]
            self.mask = torch.ones(1, length, dtype=torch.long, device=row[0][0].device)
            return
        width = self.mask.shape[1]
        total = max(width, length)
        merged = [(torch.cat([_pad_left(k, total - width), _pad_left(rk, total - length)]),
                   torch.cat([_pad_left(v, total - width), _pad_left(rv, total - length)]))
                  for (k, v), (rk, rv) in zip(layer_tensors(self.cache), row)]
        mask = torch.cat([self.mask.new_zeros(self.rows, total - width), self.mask], dim=1)
        row_mask = self.mask.new_zeros(1, total)
        row_mask[:, total - length:] = 1
        self.cache, self.mask = _filled(merged), torch.cat([mask, row_mask])
        self.lengths.append(length)

    def keep_rows(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (indices, in order) and the columns no remaining row uses."""
        if len(keep) == self.rows:
            return
        if not keep:
            self.cache, self.mask, self.lengths = None, None, []
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.lengths = [self.lengths[i] for i in keep]
        start = self.mask.shape[1] - max(self.lengths)  # rows are right-aligned: the longest decides
        self.mask = self.mask.index_select(0, index)[:, start:]
        self.cache = _filled([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                              for k, v in layer_tensors(self.cache)])

    def step_inputs(self) -> dict:
        """Attention mask (with the new column) and position ids for one decoding step of every row."""
        ones = self.mask.new_ones(self.rows, 1)
        positions = torch.tensor(self.lengths, device=self.mask.device).unsqueeze(1)
        return {"attention_mask": torch.cat([self.mask, ones], dim=1), "position_ids": positions}

    def advance(self, step_mask: torch.Tensor) -> None:
        """Record the step the model just ran (it appended one column to the cache in place)."""
        self.mask = step_mask
        self.lengths = [n + 1 for n in self.lengths]
