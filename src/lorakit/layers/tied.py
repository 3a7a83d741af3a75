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


def untie_for_merge(model: nn.Module, layers: Sequence, names: Sequence[str]) -> list[str]:
    """Give each layer about to merge an adapter into a weight another module shares (a tied embedding/head
    without ``ensure_weight_tying``) its own copy of that weight first, and return the untied paths.

    Unmerged, such an adapter changes only its own layer's output; merged into the shared tensor it would
    change the other module's too (peft merges it so, and its merged model computes something else). Pairs
    whose LoRA is itself tied (``TiedLoraLinear``) stay tied: the shared table takes their update once. The
    model's config then says ``tie_word_embeddings=False`` so that saving and reloading keep both copies.
    """
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(path)
    keep_tied = {id(l.base_layer.weight) for l in layers
                 if isinstance(l, TiedLoraLinear) and all(n in l.tied_adapters for n in names if n in l.r)}
    untied = []
    for layer in layers:
        base = layer.base_layer
        w = getattr(base, "weight", None)
        merging = [n for n in names if n in layer.r and n not in layer.merged_adapters]
        if (w is None or not merging or id(w) in keep_tied or len(owners.get(id(w), ())) < 2
                or not isinstance(w, nn.Parameter)):
            continue
        paths = [p for p in owners[id(w)] if model.get_submodule(p) is base]
        owners[id(w)] = [p for p in owners[id(w)] if p not in paths]  # the others keep the shared tensor
        base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        untied.append(paths[0].removesuffix(".base_layer") if paths else type(base).__name__)
    if untied:
        for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        import warnings

        warnings.warn(f"{untied} shared their weight with another module (tied embeddings); each now has its own "
                      f"copy, so merging changes only what the adapter changes. The merged model is untied "
                      f"(config.tie_word_embeddings=False). Use ensure_weight_tying=True to train a tied pair.",
                      stacklevel=3)
    return untied
