"""An output head tied to the input embedding, with a LoRA pair tied to the embedding's (``ensure_weight_tying``).

When ``lm_head.weight`` is ``embed_tokens.weight`` (one tensor) and the head's A and B are views of the
embedding's B^T and A^T, both layers' updates are the same matrix added to the same tensor. Merging must
add it once: the head merges a tied adapter through the embedding (which writes the shared table) and only
records it as merged (peft adds it twice, which doubles the update in the merged weights). Adapters of the
head that are not tied merge as in any linear layer.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .linear import LoraLinear

__all__ = ["TiedLoraLinear"]


class TiedLoraLinear(LoraLinear):
    """A LoraLinear over a head whose weight is ``embedding``'s; ``tie(name)`` marks an adapter as tied."""

    def __init__(self, base_layer: nn.Module, embedding: nn.Module):
        super().__init__(base_layer)
        self._embedding = [embedding]  # a list: not a submodule (the embedding is saved where it is)
        self.tied_adapters: set[str] = set()

    def tie(self, name: str) -> None:
        self.tied_adapters.add(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.tied_adapters.discard(name)

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = list(self.active_adapters if names is None else names)
        tied = [n for n in names if n in self.tied_adapters and n in self.r and n not in self.merged_adapters]
        super().merge([n for n in names if n not in self.tied_adapters], safe=safe)
        emb = self._embedding[0]
        emb.merge([n for n in tied if n in emb.r], safe=safe)  # the shared table takes the update once
        self.merged_adapters.extend(tied)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        names = list(reversed(self.merged_adapters if names is None else names))
        tied = [n for n in names if n in self.tied_adapters and n in self.merged_adapters]
        super().unmerge([n for n in names if n not in self.tied_adapters])
        emb = self._embedding[0]
        emb.unmerge([n for n in tied if n in emb.merged_adapters])
        for n in tied:
            self.merged_adapters.remove(n)
