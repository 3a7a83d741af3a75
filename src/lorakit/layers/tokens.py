"""Trainable tokens (``trainable_token_indices``): train chosen rows of an embedding, e.g. added tokens.

The adapter holds the new values of those rows, ``trainable_tokens_delta`` [n, dim] (started from the
rows as they are, so a fresh adapter changes nothing), and the module runs with its table ``W`` replaced
by ``W`` with those rows overwritten (``index_copy``): the gradient reaches those rows only, and a
vocabulary that was resized (new rows randomly initialised) gives the same result whatever the new rows
held. Merging writes the rows into ``W``; unmerging writes the originals back. This is peft's
``TrainableTokensLayer``, with its PEFT key ``<embedding>.token_adapter.trainable_tokens_delta``.

A head tied to the embedding (``lm_head.weight is embed_tokens.weight``) is wrapped too, following the
embedding's rows (``tied_to``): it holds and saves nothing of its own, so the pair stays tied.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LoraError
from .base import LoraLayer
from .routing import BASE, current_rows, rows_for_batch

__all__ = ["TrainableTokens"]


class TrainableTokens(LoraLayer):
    """Rows ``token_indices[name]`` of ``base_layer.weight`` (an embedding, or a head tied to one) trained."""

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokens | None" = None):
        super().__init__(base_layer)
        self.token_adapter = nn.Module()  # PEFT's key: <path>.token_adapter.trainable_tokens_delta
        self.token_adapter.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, tuple[int, ...]] = {}
        self._originals: dict[str, torch.Tensor] = {}  # the rows before training (not saved: they are the base's)
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule, not in state dicts

    @property
    def source(self) -> "TrainableTokens":
        """The wrapper that holds the rows: this one, or the embedding's for a tied head."""
        return self._tied[0] if self._tied else self

    def add_tokens(self, name: str, indices: Sequence[int]) -> None:
        self.r[name], self.lora_alpha[name], self.scaling[name] = len(indices), 1, 1.0
        self.lora_dropout[name] = nn.Identity()
        self.token_indices[name] = tuple(indices)
        if self._tied:
            return
        rows = self.base_layer.weight.detach()[list(indices)]
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(rows.clone())
        self._originals[name] = rows.clone()

    def delta(self, name: str) -> torch.Tensor:
        return self.source.token_adapter.trainable_tokens_delta[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [] if self._tied else [self.token_adapter.trainable_tokens_delta[name]]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        if not self._tied:
            del self.token_adapter.trainable_tokens_delta[name]
            self._originals.pop(name, None)
        for d in (self.r, self.lora_alpha, self.scaling, self.token_indices):
            d.pop(name, None)
        del self.lora_dropout[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _index(self, name: str, device) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], device=device, dtype=torch.long)

    def table(self, names: Sequence[str]) -> torch.Tensor:
        """The base table with the rows of adapters ``names`` written in (a new tensor; gradients reach the rows)."""
        W = self.base_layer.weight
        for name in names:
            W = W.index_copy(0, self._index(name, W.device), self.delta(name).to(W.dtype))
        return W

    # -- merge: rows written into the table -------------------------------------------------
    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.r and n not in self.merged_adapters]
        if safe:
            self.check_merge(names)
        w = self.base_layer.weight
        for name in names:
            w.data.index_copy_(0, self._index(name, w.device), self.delta(name).detach().to(w.dtype))
            self.merged_adapters.append(name)

    def check_merge(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self.r and not torch.isfinite(self.delta(name)).all():
                raise LoraError(f"merging adapter {name!r} would put NaN/inf into the embedding rows "
                                f"{list(self.token_indices[name])[:8]}; nothing was merged (check its training).")

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        w = self.base_layer.weight
        for name in list(reversed(self.merged_adapters if names is None else names)):
            if name in self.merged_adapters:
                w.data.index_copy_(0, self._index(name, w.device), self.source._originals[name].to(w.dtype))
                self.merged_adapters.remove(name)

    # -- forward ------------------------------------------------------------------------------
    def _run(self, names: Sequence[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        # the module's own forward (scaled embeddings, a head's bias) over the changed table
        return torch.func.functional_call(self.base_layer, {"weight": self.table(names)}, (x, *args), kwargs,
                                          tie_weights=False, strict=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        rows = current_rows()
        if rows is not None and not self.merged_adapters:
            return self._routed_rows(rows, x, *args, **kwargs)
        return self._run([n for n in self.active_adapters if n not in self.merged_adapters], x, *args, **kwargs)

    def _routed_rows(self, rows: tuple[str, ...], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per row (``adapter_names``): each row through its adapter's table."""
        n = x.shape[0]
        rows = rows_for_batch(rows, n)
        out = None
        for name in dict.fromkeys(rows):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            part = self._run([name] if name != BASE and name in self.r else [], x.index_select(0, idx),
                             *args, **kwargs)
            out = part.new_empty((n, *part.shape[1:])) if out is None else out
            out = out.index_copy(0, idx, part)
        return out

    def extra_repr(self) -> str:
        tied = f"tied to {type(self.source.base_layer).__name__}, " if self._tied else ""
        return tied + ", ".join(f"{n}: {len(i)} tokens" for n, i in self.token_indices.items())
