"""LoRA around nn.Embedding: the update is a low-rank table.

For token ids x, A [r, num_embeddings], B [embedding_dim, r] (PEFT's layout):

    y = E[x] + scale * (A.T[x] @ B.T)          the merged table: E + scale * (B @ A).T

``lora_embedding_delta`` is that update as plain torch; ``lora_embedding_weight`` the table merging adds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import LoraLayer
from .dora import dora_embedding_forward

__all__ = ["LoraEmbedding", "lora_embedding_delta", "lora_embedding_weight"]


def embed_scale_of(base: nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding (Gemma 3's ``embed_scale``) multiplies its looked-up rows by, or None.

    Such a layer returns ``E[x] * embed_scale``; merging adds the update into E, so the unmerged update must
    be scaled the same way for merged and unmerged outputs to agree (peft applies it too). A non-scalar
    ``embed_scale`` is not applied (as peft), with a warning.
    """
    s = getattr(base, "embed_scale", None)
    if s is None:
        return None
    if isinstance(s, (int, float)):
        return torch.tensor(float(s), device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        return s
    import warnings

    warnings.warn(f"{type(base).__name__}.embed_scale has shape {tuple(getattr(s, 'shape', ()))}, not a scalar; "
                  f"the LoRA update is not scaled by it (as peft).", stacklevel=3)
    return None


def lora_embedding_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                         base: nn.Embedding) -> torch.Tensor:
    """``scale * A.T[x] @ B.T``: the LoRA update for token ids ``x``, looked up as ``base`` looks up its table
    (and multiplied by ``base``'s ``embed_scale`` where it scales its rows, see ``embed_scale_of``)."""
    after_a = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
    out = (after_a @ B.t()) * scale
    factor = embed_scale_of(base)
    return out if factor is None else out * factor.to(out.dtype)


def lora_embedding_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (B @ A).T`` [num_embeddings, embedding_dim] in float32: the rows ``lora_embedding_delta`` looks up."""
    return (B.float() @ A.float()).t() * scale


class LoraEmbedding(LoraLayer):
    """A is r x num_embeddings (zeros), B is embedding_dim x r (normal): PEFT's layout and init."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, r: int, init, device: torch.device, dtype: torch.dtype) -> None:
        A = torch.randn(r, self.in_features, device=device, dtype=dtype)
        B = torch.randn(self.out_features, r, device=device, dtype=dtype)
        if init is not False:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return lora_embedding_delta(x, self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name],
                                    self.base_layer)

    def _add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.uses_plain_lora(name):
            return super()._add(name, x, result)
        out = dora_embedding_forward(x, result, self.base_layer, self.lora_embedding_A[name],
                                     self.lora_embedding_B[name], self.scaling[name], self.lora_magnitude_vector[name])
        return out.to(result.dtype)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.t()  # [num_embeddings, embedding_dim]: the output features are the embedding dimensions

    def delta_weight(self, name: str) -> torch.Tensor:
        return lora_embedding_weight(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name])
