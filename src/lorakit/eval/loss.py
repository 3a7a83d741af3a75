"""Held-out loss and perplexity over answer tokens (the same tokens the training loss sees).

The mean is token-weighted over the whole set: sum of per-token cross-entropy over all answer
tokens / number of answer tokens, so batches with more answer tokens count more (a mean of batch
means would not be the set's loss). Perplexity = exp(loss).

Causal LMs whose logits are ``head(body(x))`` are scored with ``lorakit.loss.lm_loss`` (the head only at
answer positions, never the full logits; checked once against the model's own loss); anything else
(other architectures, wrappers that only expose ``forward``) through its logits. The training loop's
periodic evaluation and ``lorakit eval`` call this same function.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

from lorakit.constants import IGNORE_INDEX
from lorakit.errors import ConfigError, DataError
from lorakit.eval.device import eval_mode, model_device

__all__ = ["heldout_loss"]


def _logits(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0] if isinstance(out, (tuple, list)) else out


def _logits_loss_sum(model: Any, batch: dict) -> Any:
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def heldout_loss(model: Any, dataset: Sequence[dict], collator: Any, *, batch_size: int = 8,
                 loss: Callable[[dict], Any] | None = None, device: Any = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of ``model`` on tokenized examples (under eval mode, no grad).

    ``loss``: a ``lorakit.loss.lm_loss.LossComputer`` to reuse (the training loop passes its own); by default
    one is made when the model allows the fast path. ``autocast``: a context factory for mixed precision.
    Batches are length-sorted (little padding); the result does not depend on ``batch_size``.
    """
    import torch

    from lorakit.loss.lm_loss import LossComputer, count_label_tokens, fast_path_parts
    from lorakit.data.batches import eval_order

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    examples = list(getattr(dataset, "examples", dataset))
    if not examples:
        raise DataError("heldout_loss got an empty dataset; pass held-out examples from tokenize_records.")
    if loss is None and fast_path_parts(model) is not None:
        loss = LossComputer(model)
    device = device if device is not None else model_device(model)
    total, tokens = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for idx in eval_order([len(e["input_ids"]) for e in examples], batch_size):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in collator([examples[i] for i in idx]).items()}
            n = count_label_tokens(batch["labels"])
            if n == 0:
                continue
            with (autocast() if autocast else contextlib.nullcontext()):
                total += float(loss(batch) if loss is not None else _logits_loss_sum(model, batch))
            tokens += n
    if tokens == 0:
        raise DataError("heldout_loss: the dataset has no answer tokens (all labels are -100).")
    mean = total / tokens
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": tokens}
