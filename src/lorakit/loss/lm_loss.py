"""The causal-LM loss, computed only where it counts and without the full logits.

HF's loss is ``sum(CE(logits[:, t], labels[:, t + 1])) / count`` over the positions whose shifted
label is not -100. The logits at every other position are computed and thrown away; with a 49k-word
vocabulary the LM head is a large share of a small model's compute, and the [tokens, vocab] logits
with their log-softmax and gradients are the largest tensors of a training step. So we run the
transformer body to hidden states, keep the positions that have a label, and hand those to
``kernels.linear_cross_entropy`` (head + cross-entropy without the full logits, the softmax in float32 as HF
does, also for a bfloat16 model).
Same number, less work, a fraction of the memory.

This fused loss is a kernel: ``kernels.dispatch`` decides where it runs (the CPU, kernels on), and
everywhere else the model's own loss does. Architectures where the body -> head split is not the plain
``head(body(x))`` (logit soft-capping, logit scaling, encoder-decoders) keep the model's own loss;
``check_fast_loss`` compares the two once on a small batch, and its verdict (``state.loss_state``) holds
for every caller of that model (``LoraModel.forward``, ``LossComputer``).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..constants import IGNORE_INDEX
from ..kernels import dispatch, linear_cross_entropy
from ..kernels.onednn import frozen_linears
from .ffn_skip import checkpointing, run_with_rows
from .output import linear_of
from .state import loss_state, summed_loss_request

__all__ = ["IGNORE_INDEX", "LossComputer", "body_hidden", "check_fast_loss", "check_tolerance", "count_label_tokens",
           "fast_loss_sum", "fast_path_parts", "hf_loss_sum", "labelled_loss_sum", "loss_choice", "unwrap_hf"]

# Config attributes that insert something between the head and the logits HF's loss sees.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping", "mup_width_scale")
# Config switches that add terms of their own to the model's loss (mixture-of-experts router losses).
_LOSS_TERMS = ("output_router_logits",)
# (rtol, atol) the first-batch check asks of the fused and the model's own mean loss, by the least precise
# dtype the model computes in. Float32: the two differ in their last digits. A half-precision body rounds
# every activation (bfloat16: to 8 bits, 2**-8 of itself), and the fused path runs the same products in
# another order (rows gathered, one position less, the head in vocabulary blocks), so some activations
# round the other way and the loss may move by a few such roundings: 2e-2 is ~5 of them. A split that is
# wrong (a logit transform, a body that is not causal) moves it by far more.
_CHECK_TOLERANCE = {torch.bfloat16: (2e-2, 1e-3), torch.float16: (5e-3, 1e-3)}
_EXACT_TOLERANCE = (1e-3, 1e-4)


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers model inside a LoraModel (or the model itself)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, PreTrainedModel) else model


def fast_path_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body, head) when ``head(body(x).last_hidden_state)`` gives the model's logits, else None."""
    hf = unwrap_hf(model)
    config = getattr(hf, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            return None
    for attr in _LOSS_TERMS:
        if getattr(config, attr, False):
            return None
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    body = getattr(hf, "base_model", None)
    if head is None or body is None or body is hf:
        return None
    return body, head


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to the loss (labels shifted by one, -100 ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_choice(body: nn.Module, device: torch.device, checkpointed: bool | None = None) -> dispatch.Choice:
    """The dispatcher's choice for a training-loss call on ``device`` through ``body`` (its parameters' dtype)."""
    param = next(body.parameters(), None)
    ckpt = checkpointing(body) if checkpointed is None else checkpointed
    return dispatch.decide(dispatch.loss_facts(device, None if param is None else param.dtype, checkpointing=ckpt))


def body_hidden(body: nn.Module, batch: dict[str, Any], drop_last: bool = True,
                choice: dispatch.Choice | None = None) -> torch.Tensor:
    """The body's final hidden states [batch, positions, hidden] for ``batch``'s inputs.

    ``drop_last``: the last position of a row predicts nothing (its label would lie beyond the row)
    and, under a causal mask, no earlier position reads it, so the body runs on ``input_ids[:, :-1]``
    (one token per row less work; 3% of a 36-token row). ``check_fast_loss`` catches models whose
    attention is not causal.
    """
    cut = (lambda t: t[..., :-1]) if drop_last else (lambda t: t)
    extra = {k: cut(batch[k]) for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    # training on the CPU: the frozen linears' products through oneDNN (kernels.onednn) where the dispatcher
    # says so; not under activation checkpointing, whose recomputation runs outside this call
    choice = choice or loss_choice(body, batch["input_ids"].device)
    with frozen_linears(choice.frozen == dispatch.ONEDNN):
        out = body(input_ids=cut(batch["input_ids"]), use_cache=False, **extra)
    return out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state


def labelled_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                      half_scale: float = 1.0) -> torch.Tensor:
    """Sum of CE(head(hidden[b, t]), labels[b, t]) over positions whose label is not -100.

    ``hidden`` and ``labels`` are already aligned (hidden at t predicts labels[:, t]). ``half_scale``:
    see ``kernels.linear_cross_entropy`` (1/N when the caller divides the sum by N).
    """
    mask = labels != IGNORE_INDEX
    picked = hidden[mask]                           # (n_tokens, hidden)
    targets = labels[mask]
    linear = linear_of(head)
    if linear is not None:
        return linear_cross_entropy(picked, linear.weight, targets, bias=linear.bias, half_scale=half_scale)
    logits = head(picked).float()                   # a head lorakit cannot split: its own forward
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def fast_loss_sum(body: nn.Module, head: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the token cross-entropies over labelled positions (divide by the token count for the mean).

    The body runs on one position per row less (see ``body_hidden``), and where the dispatcher says so its
    feed-forward blocks skip padding, and in the last layer every position without a label (``ffn_skip``).
    """
    labels = batch["labels"][:, 1:]
    read = labels != IGNORE_INDEX
    mask = batch.get("attention_mask")
    choice = loss_choice(body, batch["input_ids"].device)
    if not choice.ffn_skip or (mask is not None and mask.dim() != 2):  # a 4D mask: padding is unknown
        hidden = body_hidden(body, batch, choice=choice)
    else:
        # every real token, and any position the loss reads even if its mask is 0 (labels on padding)
        keep = torch.ones_like(read) if mask is None else (mask[:, :-1] != 0) | read
        hidden = run_with_rows(body, keep, read, lambda: body_hidden(body, batch, choice=choice))
    return labelled_loss_sum(hidden, head, labels)


def hf_loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own (mean) loss turned into a sum (a LoraModel inside runs its model's own forward too)."""
    with summed_loss_request(loss_state(_unwrap_parallel(model)), None):  # no parts: "your own loss, please"
        out = model(**batch, use_cache=False)
    n = count_label_tokens(batch["labels"])
    return out.loss.float() * n


def check_fast_loss(model: nn.Module, parts: tuple[nn.Module, nn.Module], batch: dict[str, Any]) -> bool:
    """Does the fast loss equal the model's own on (one labelled row of) ``batch``? Dropout off, RNG untouched.

    Warns and returns False when they differ, so the caller uses the model's own loss from then on.
    """
    was_training = model.training
    cpu_state = torch.get_rng_state()
    try:
        model.eval()
        # one row with labels decides whether the split is valid; the whole batch would cost a step's
        # forward twice
        rows = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).nonzero().flatten()
        if rows.numel():
            # the row with the most padding: the fast path skips work there (skip_rows), so check that too
            mask = batch.get("attention_mask")
            fill = mask[rows].sum(dim=1) if mask is not None and mask.dim() == 2 else torch.zeros_like(rows)
            pick = rows[fill.argmin()].reshape(1)
            batch = {k: (v[pick] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
        # the check also teaches the LoRA layers which of them read one input (kernels.fusion): the
        # first training step then already runs them as one node
        with torch.no_grad(), dispatch.learning():
            n = max(count_label_tokens(batch["labels"]), 1)
            fast = fast_loss_sum(*parts, batch) / n
            ref = hf_loss_sum(model, batch) / n
        rtol, atol = check_tolerance(model)
        if torch.allclose(fast, ref, rtol=rtol, atol=atol):
            return True
        warnings.warn(f"fast loss {fast.item():.6f} != model loss {ref.item():.6f} (rtol {rtol:g}, atol {atol:g}) "
                      f"for {type(unwrap_hf(model)).__name__}; using the model's own loss instead", stacklevel=3)
        return False
    finally:
        torch.set_rng_state(cpu_state)
        model.train(was_training)


def check_tolerance(model: nn.Module) -> tuple[float, float]:
    """(rtol, atol) of ``check_fast_loss`` for ``model``: by the least precise floating dtype among its
    parameters (a bfloat16 base with float32 adapters computes in bfloat16; see ``_CHECK_TOLERANCE``)."""
    dtypes = {p.dtype for p in model.parameters()}
    for dtype, tolerance in _CHECK_TOLERANCE.items():
        if dtype in dtypes:
            return tolerance
    return _EXACT_TOLERANCE


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside torch's data-parallel wrappers (what accelerate.prepare makes for several processes)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


class LossComputer:
    """Summed token loss of a batch (divide by the token count for the mean), for training and evaluation.

    ``model`` is called as it is: a LoraModel, a transformers model, or either inside a data-parallel
    wrapper (DDP from ``accelerate.prepare``). The fused loss runs where the dispatcher allows it and it is
    valid for the model: checked once against the model's own loss on the first batch with labelled tokens,
    the one verdict ``LoraModel.forward`` also reads (``loss_state``). Else (or ``fast=False``) the model's
    own loss. Through a wrapper the loss is computed inside the wrapper's forward, which DDP's gradient
    all-reduce needs: the wrapped LoraModel answers a request for the summed fused loss. One process or
    many, the same computation.
    """

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        self.model = model
        self.inner = _unwrap_parallel(model)
        self.parts = fast_path_parts(self.inner) if fast else None
        self.state = loss_state(self.inner)

    @property
    def is_fast(self) -> bool:
        """Does the fused loss run for this model (once checked, on its parameters' device)?"""
        if self.parts is None or self.state.verdict is False:
            return False
        param = next(self.inner.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return loss_choice(self.parts[0], device, checkpointed=False).loss == dispatch.FUSED

    def _fused(self, batch: dict[str, Any]) -> bool:
        if self.parts is None or self.state.verdict is False:
            return False
        if loss_choice(self.parts[0], batch["input_ids"].device, checkpointed=False).loss != dispatch.FUSED:
            return False
        if self.state.verdict is None and count_label_tokens(batch["labels"]):  # (no labelled token: undecided)
            self.state.verdict = check_fast_loss(self.inner, self.parts, batch)
        return self.state.verdict is not False

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if not self._fused(batch):
            return hf_loss_sum(self.model, batch)
        if self.model is self.inner:
            return fast_loss_sum(*self.parts, batch)
        with summed_loss_request(self.state, self.parts) as request:
            out = self.model(**batch)
        if request.loss is None:  # nothing inside answered (not a LoraModel): its own loss, as a sum
            return out.loss.float() * count_label_tokens(batch["labels"])
        return request.loss
