"""The training loop's loss: the fast causal-LM loss (``lorakit.lm_loss``) when it is valid for the model.

`LossComputer` checks the fast loss against the model's own on the first batch and falls back (with a
warning) when they differ.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.lm_loss import (IGNORE_INDEX, check_fast_loss, count_label_tokens, fast_loss_sum, fast_path_parts,
                             hf_loss_sum, unwrap_hf)

__all__ = ["IGNORE_INDEX", "LossComputer", "count_label_tokens", "fast_loss_sum", "fast_path_parts",
           "hf_loss_sum", "unwrap_hf"]


class LossComputer:
    """Summed token loss for a batch; the fast path when it is valid for this model."""

    def __init__(self, model: torch.nn.Module, fast: bool = True, check_first: bool = True) -> None:
        self.model = model
        self.parts = fast_path_parts(model) if fast else None
        self._checked = not check_first

    @property
    def is_fast(self) -> bool:
        return self.parts is not None

    def _self_check(self, batch: dict[str, torch.Tensor]) -> None:
        self._checked = True
        if not check_fast_loss(self.model, self.parts, batch):
            self.parts = None

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.parts is not None and not self._checked:
            self._self_check(batch)
        if self.parts is not None:
            return fast_loss_sum(*self.parts, batch)
        return hf_loss_sum(self.model, batch)
