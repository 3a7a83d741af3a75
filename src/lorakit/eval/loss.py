"""Held-out loss and perplexity over answer tokens (the same tokens the training loss sees).

The mean is token-weighted over the whole set: sum of per-token cross-entropy over all answer
tokens / number of answer tokens, so batches with more answer tokens count more (a mean of batch
means would not be the set's loss). Perplexity = exp(loss).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import ConfigError, DataError
from lorakit.eval.device import eval_mode, model_device

__all__ = ["heldout_loss"]


def _logits(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0] if isinstance(out, (tuple, list)) else out


def heldout_loss(model: Any, dataset: Sequence[dict], collator: Any, *, batch_size: int = 8) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of ``model`` on a TokenizedDataset (under eval mode, no grad)."""
    import torch
    import torch.nn.functional as F

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}.")
    examples = list(getattr(dataset, "examples", dataset))
    if not examples:
        raise DataError("heldout_loss got an empty dataset; pass held-out examples from tokenize_records.")
    device = model_device(model)
    total, tokens = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start:start + batch_size])
            labels = batch["labels"][:, 1:].to(device)
            logits = _logits(model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)))[:, :-1]
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise DataError("heldout_loss: the dataset has no answer tokens (all labels are -100).")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}
