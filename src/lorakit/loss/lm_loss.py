"""The causal-LM loss, computed only where it counts and without the full logits.

HF's loss is ``sum(CE(logits[:, t], labels[:, t + 1])) / count`` over the positions whose shifted
label is not -100. The logits at every other position are computed and thrown away; with a 49k-word
vocabulary the LM head is a large share of a small model's compute, and the [tokens, vocab] logits
with their log-softmax and gradients are the largest tensors of a training step. So we run the
transformer body to hidden states, keep the positions that have a label, and hand those to
``ops.linear_cross_entropy`` (head + cross-entropy chunk by chunk, float32 as HF does). Same
number, less work, a fraction of the memory.

Architectures where the body -> head split is not the plain ``head(body(x))`` (logit soft-capping,
logit scaling, encoder-decoders) keep the model's own loss; `check_fast_loss` compares the two once
on a small batch and the callers (``LoraModel.forward``, the training loop) fall back when they differ.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..constants import IGNORE_INDEX
from ..kernels import fusion
from ..kernels import linear_cross_entropy
from ..kernels.onednn import frozen_linears
from .ffn_skip import checkpointing, run_with_rows

__all__ = ["IGNORE_INDEX", "FusedLossOutput", "LossComputer", "body_hidden", "check_fast_loss", "count_label_tokens",
           "fast_loss_sum", "fast_path_parts", "fused_output", "hf_loss_sum", "labelled_loss_sum", "unwrap_hf"]

# Config attributes that insert something between the head and the logits HF's loss sees.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping", "mup_width_scale")
# Config switches that add terms of their own to the model's loss (mixture-of-experts router losses).
_LOSS_TERMS = ("output_router_logits",)


@dataclass
class FusedLossOutput(ModelOutput):
    """What ``LoraModel.forward`` returns when it computed the training loss fused.

    ``out.loss`` / ``out["loss"]`` / ``out[0]`` as usual. The logits were not needed for the loss, so
    they are computed only when read (``out.logits``, ``out["logits"]``, ``out[1]``): the LM head over
    the body's final hidden states, which the output keeps, exactly as the model's own forward
    computes them; in grad mode they backpropagate like the model's own. A training loop that only
    calls ``out.loss.backward()`` never pays for them. The KV cache (``cache`` / ``past_key_values``),
    ``hidden_states`` and ``attentions`` are None: the fused path runs only without them.
    """

    loss: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None

    def _source(self):
        source = self.__dict__.get("_logits_source")
        if source is None and "logits" not in self.keys() and self.loss is not None:
            # a copy rebuilt from this output's items (accelerate's fp32 conversion under mixed precision
            # does so) keeps the same loss tensor: find the source through it
            entry = _SOURCES.get(id(self.loss))
            source = entry[1] if entry is not None and entry[0]() is self.loss else None
            if source is not None:
                self.__dict__["_logits_source"] = source
        return source

    def _logits(self) -> torch.Tensor:
        source = self._source()
        if source is None:
            raise AttributeError("this output has no logits")
        head, hidden = source
        logits = head(hidden)
        weight = getattr(_linear_of(head), "weight", None)
        if weight is not None and weight.dtype == torch.float32 and logits.dtype != torch.float32:
            logits = logits.float()  # the forward ran under mixed precision: float32 logits, as accelerate returns
        self.__dict__["_logits_source"] = None  # computed once; the hidden states are not kept twice
        self["logits"] = logits  # a key from now on: to_tuple() and out[1] include it
        return logits

    def __getattr__(self, name: str):
        if name == "logits":
            return self._logits()
        if name in ("cache", "past_key_values", "cache_params"):  # the KV cache's names across transformers
            return None                                           # versions: none in a training forward
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getitem__(self, key):
        # out[0] is the loss; the logits come second, as in the model's own output
        if isinstance(key, str):
            if key == "logits" and self._source() is not None:
                self._logits()
            return super().__getitem__(key)
        if key != 0 and self._source() is not None:
            self._logits()
        return ModelOutput.to_tuple(self)[key]

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or (key == "logits" and self._source() is not None)

    def to_tuple(self) -> tuple:
        if self._source() is not None:
            self._logits()
        return super().to_tuple()


#: id(loss) -> (weak reference to the loss, (head, hidden)) of the output that made it, while the loss
#: lives (keyed by identity: tensors compare by value)
_SOURCES: dict[int, tuple] = {}


def fused_output(loss: torch.Tensor, head: nn.Module, hidden: torch.Tensor) -> FusedLossOutput:
    """A FusedLossOutput whose logits, when read, are ``head(hidden)``."""
    out = FusedLossOutput(loss=loss)
    out.__dict__["_logits_source"] = (head, hidden)
    key = id(loss)
    _SOURCES[key] = (weakref.ref(loss), (head, hidden))
    weakref.finalize(loss, _SOURCES.pop, key, None)
    return out


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


def _linear_of(head: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear a head computes with (through a modules_to_save wrapper), else None."""
    active = getattr(head, "active_module", head)
    return active if type(active) is nn.Linear else None


def body_hidden(body: nn.Module, batch: dict[str, Any], drop_last: bool = True) -> torch.Tensor:
    """The body's final hidden states [batch, positions, hidden] for ``batch``'s inputs.

    ``drop_last``: the last position of a row predicts nothing (its label would lie beyond the row)
    and, under a causal mask, no earlier position reads it, so the body runs on ``input_ids[:, :-1]``
    (one token per row less work; 3% of a 36-token row). ``check_fast_loss`` catches models whose
    attention is not causal.
    """
    cut = (lambda t: t[..., :-1]) if drop_last else (lambda t: t)
    extra = {k: cut(batch[k]) for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
    # training: the frozen linears' products through oneDNN (ops.frozen_linear); not under activation
    # checkpointing, whose recomputation runs outside this call
    with frozen_linears(torch.is_grad_enabled() and not checkpointing(body)):
        out = body(input_ids=cut(batch["input_ids"]), use_cache=False, **extra)
    return out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state


def labelled_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                      half_scale: float = 1.0) -> torch.Tensor:
    """Sum of CE(head(hidden[b, t]), labels[b, t]) over positions whose label is not -100.

    ``hidden`` and ``labels`` are already aligned (hidden at t predicts labels[:, t]). ``half_scale``:
    see ``ops.linear_cross_entropy`` (1/N when the caller divides the sum by N).
    """
    mask = labels != IGNORE_INDEX
    picked = hidden[mask]                           # (n_tokens, hidden)
    targets = labels[mask]
    linear = _linear_of(head)
    if linear is not None:
        return linear_cross_entropy(picked, linear.weight, targets, bias=linear.bias, half_scale=half_scale)
    logits = head(picked).float()                   # a head lorakit cannot split: its own forward
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def fast_loss_sum(body: nn.Module, head: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the token cross-entropies over labelled positions (divide by the token count for the mean).

    The body runs on one position per row less (see ``body_hidden``), and its feed-forward blocks
    skip padding, and in the last layer every position without a label (``skip_rows``).
    """
    labels = batch["labels"][:, 1:]
    read = labels != IGNORE_INDEX
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() != 2:  # a custom (4D) mask: which positions are padding is unknown
        hidden = body_hidden(body, batch)
    else:
        # every real token, and any position the loss reads even if its mask is 0 (labels on padding)
        keep = torch.ones_like(read) if mask is None else (mask[:, :-1] != 0) | read
        hidden = run_with_rows(body, keep, read, lambda: body_hidden(body, batch))
    return labelled_loss_sum(hidden, head, labels)


def hf_loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own (mean) loss turned into a sum, for the fallback path."""
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
        # the check also teaches the LoRA layers which of them read one input (layers.fusion): the
        # first training step then already runs them as one node
        with torch.no_grad(), fusion.learning():
            n = max(count_label_tokens(batch["labels"]), 1)
            fast = fast_loss_sum(*parts, batch) / n
            ref = hf_loss_sum(model, batch) / n
        if torch.allclose(fast, ref, rtol=1e-3, atol=1e-4):
            return True
        warnings.warn(f"fast loss {fast.item():.6f} != model loss {ref.item():.6f} for "
                      f"{type(unwrap_hf(model)).__name__}; using the model's own loss instead", stacklevel=3)
        return False
    finally:
        torch.set_rng_state(cpu_state)
        model.train(was_training)


class LossComputer:
    """Summed token loss for a batch: the fast path when it is valid for this model, else the model's own.

    The first call checks the fast loss against the model's own (``check_fast_loss``) and falls back,
    with a warning, when they differ.
    """

    def __init__(self, model: nn.Module, fast: bool = True, check_first: bool = True) -> None:
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
        if self.parts is not None and not self._checked and count_label_tokens(batch["labels"]):
            self._self_check(batch)  # (a batch without labelled tokens cannot decide it)
        if self.parts is not None:
            return fast_loss_sum(*self.parts, batch)
        return hf_loss_sum(self.model, batch)
