"""Held-out loss / perplexity with the same (answer-only) loss the training uses."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from lorakit.train.batches import eval_order
from lorakit.train.loss import LossComputer, count_label_tokens


def move(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: list[dict], collate: Callable[[list[dict]], dict],
                 batch_size: int = 16, loss: LossComputer | None = None, device: torch.device | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict:
    """{"loss": mean token loss over answer tokens, "perplexity": exp(loss), "tokens": count}."""
    loss = loss or LossComputer(model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        lengths = [len(e["input_ids"]) for e in examples]
        for idx in eval_order(lengths, batch_size):
            batch = move(collate([examples[i] for i in idx]), device)
            n = count_label_tokens(batch["labels"])
            if n == 0:
                continue
            with (autocast() if autocast else contextlib.nullcontext()):
                total += float(loss(batch))
            tokens += n
    finally:
        model.train(was_training)
    mean = total / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)) if tokens else float("nan"), "tokens": tokens}
