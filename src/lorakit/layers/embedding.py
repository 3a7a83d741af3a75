"""LoRA around nn.Embedding: the update is a low-rank table, ``E + scaling * (B A)^T``."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import LoraLayer

__all__ = ["LoraEmbedding"]


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
        base = self.base_layer
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_a = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return (after_a @ B.t()) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).t() * self.scaling[name]
