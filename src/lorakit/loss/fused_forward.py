"""LoraModel.forward's training loss for causal LMs: body, then head and cross-entropy at labelled positions.

``fused_loss_applies`` says when (training, grad on, labels, keyword inputs the fused path understands,
a causal LM); ``fused_loss_forward`` computes it, after checking it once against the model's own loss
(``model._fused_ok``: None until checked, then True or False for good).
"""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from .lm_loss import (_linear_of, body_hidden, check_fast_loss, fast_path_parts, fused_output,
                      labelled_loss_sum)

__all__ = ["FUSED_KEYS", "fused_loss_applies", "fused_loss_forward"]

FUSED_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids", "use_cache",
                         "num_items_in_batch", "return_dict"})

def fused_loss_applies(model, kwargs: dict) -> bool:
    """Whether ``model``'s forward with ``kwargs`` computes the causal-LM loss fused (see LoraModel.forward)."""
    if not (model.fused_loss and model.training and torch.is_grad_enabled() and model._fused_ok is not False):
        return False
    labels, ids = kwargs.get("labels"), kwargs.get("input_ids")
    if labels is None or ids is None or not set(kwargs) <= FUSED_KEYS:
        return False
    if kwargs.get("use_cache") or kwargs.get("return_dict", True) is False:
        return False
    if not (isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape == ids.shape):
        return False
    if ids.shape[1] < 2:  # nothing to predict; the model's own loss says so (NaN, as HF and peft)
        return False
    task = getattr(model.peft_config.get(model.active_adapter), "task_type", None)
    if task is not None:
        return str(getattr(task, "value", task)) == "CAUSAL_LM"
    return type(model.model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def fused_loss_forward(model, kwargs: dict):
    """The training loss of ``model`` (a LoraModel) on ``kwargs`` through the body and the fused head."""
    parts = fast_path_parts(model)
    if parts is None:
        model._fused_ok = False
        return model.model(**kwargs)
    batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")
             if kwargs.get(k) is not None}
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if model._fused_ok is None:
        if not bool(labelled):
            return model.model(**kwargs)  # no labelled token to check against: decide on a later batch
        model._fused_ok = check_fast_loss(model, parts, batch)
        if not model._fused_ok:
            return model.model(**kwargs)
    body, head = parts
    # every position through the body (not one less, as the training loop's loss does): the output's
    # logits, computed only if read, then have the shape and values of the model's own
    hidden = body_hidden(body, batch, drop_last=False)
    denom = kwargs.get("num_items_in_batch")
    if denom is None:
        denom = labelled
    # half-precision heads round their gradient after the 1/N, as HF does (float32 ones need no scale, and
    # no host sync for it)
    weight = getattr(_linear_of(head), "weight", None)
    half = weight is not None and weight.dtype in (torch.float16, torch.bfloat16)
    scale = 1.0 / max(float(denom), 1.0) if half else 1.0
    total = labelled_loss_sum(hidden[:, :-1], head, batch["labels"][:, 1:], half_scale=scale)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return fused_output(total / denom, head, hidden)
