"""The training loop's loss: ``lorakit.lm_loss`` (the fast causal-LM loss where it is valid), re-exported."""

from __future__ import annotations

from lorakit.lm_loss import (IGNORE_INDEX, LossComputer, check_fast_loss, count_label_tokens, fast_loss_sum,
                             fast_path_parts, hf_loss_sum, unwrap_hf)

__all__ = ["IGNORE_INDEX", "LossComputer", "check_fast_loss", "count_label_tokens", "fast_loss_sum",
           "fast_path_parts", "hf_loss_sum", "unwrap_hf"]
