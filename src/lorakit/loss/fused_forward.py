"""LoraModel.forward's loss paths for causal LMs: body, then head and cross-entropy at labelled positions.

``forward(model, kwargs)`` is what LoraModel.forward asks first; None means "run the model's own forward".
It answers a ``LossComputer``'s request (``state.summed_loss_request``: the summed fused loss, or the model's
own loss), or, training with labels, computes the fused training loss when ``fused_loss_applies`` (the
dispatcher allows it, the one verdict of ``loss_state(model)`` is not False, keyword inputs the fused path
understands, a causal LM), after checking it once against the model's own loss.
"""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from ..kernels import dispatch
from .lm_loss import body_hidden, check_fast_loss, fast_loss_sum, fast_path_parts, labelled_loss_sum, loss_choice
from .output import FusedLossOutput, fused_output, linear_of
from .state import loss_state, pending_request

__all__ = ["FUSED_KEYS", "forward", "fused_loss_applies", "fused_loss_forward"]

FUSED_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids", "use_cache",
                        "num_items_in_batch", "return_dict"})
_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def forward(model, kwargs: dict):
    """The output of ``model``'s forward (a LoraModel, keyword inputs only) when a loss path takes it, else None."""
    request = pending_request(model)
    if request is not None:
        if request.parts is None:
            return None  # the caller asked for the model's own loss
        batch = {k: kwargs[k] for k in _BATCH_KEYS if kwargs.get(k) is not None}
        request.loss = fast_loss_sum(*request.parts, batch)
        return FusedLossOutput(loss=request.loss)
    if fused_loss_applies(model, kwargs):
        return fused_loss_forward(model, kwargs)
    return None


def fused_loss_applies(model, kwargs: dict) -> bool:
    """Whether ``model``'s forward with ``kwargs`` computes the causal-LM loss fused (see LoraModel.forward)."""
    if not (model.fused_loss and model.training and torch.is_grad_enabled()):
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
    if loss_state(model).verdict is False:
        return False
    if loss_choice(model, ids.device, checkpointed=False).loss != dispatch.FUSED:
        return False
    task = getattr(model.peft_config.get(model.active_adapter), "task_type", None)
    if task is not None:
        return str(getattr(task, "value", task)) == "CAUSAL_LM"
    return type(model.model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def fused_loss_forward(model, kwargs: dict):
    """The training loss of ``model`` (a LoraModel) on ``kwargs`` through the body and the fused head."""
    state = loss_state(model)
    parts = fast_path_parts(model)
    if parts is None:
        state.verdict = False
        return model.model(**kwargs)
    batch = {k: kwargs[k] for k in _BATCH_KEYS if kwargs.get(k) is not None}
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if state.verdict is None:
        if not bool(labelled):
            return model.model(**kwargs)  # no labelled token to check against: decide on a later batch
        state.verdict = check_fast_loss(model, parts, batch)
        if not state.verdict:
            return model.model(**kwargs)
    body, head = parts
    # every position through the body (not one less, as the training loop's loss does): the output's
    # logits, computed only if read, then have the shape and values of the model's own
    hidden = body_hidden(body, batch, drop_last=False)
    denom = kwargs.get("num_items_in_batch")
    if denom is None:
        denom = labelled
    # half-precision heads on the chunked form round their gradient after the 1/N, as HF does (the one-pass
    # form keeps it float32 until backward has scaled it; float32 heads need no scale, and no host sync for it)
    weight = getattr(linear_of(head), "weight", None)
    half = weight is not None and weight.dtype in (torch.float16, torch.bfloat16)
    scale = 1.0 / max(float(denom), 1.0) if half else 1.0
    total = labelled_loss_sum(hidden[:, :-1], head, batch["labels"][:, 1:], half_scale=scale)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return fused_output(total / denom, head, hidden)
