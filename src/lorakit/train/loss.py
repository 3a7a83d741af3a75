"""The causal-LM loss, computed only where it counts.

HF's loss is ``mean(CE(logits[:, t], labels[:, t + 1]))`` over the positions whose shifted label is not
-100. The logits at every other position are computed and then thrown away; with a 49k-word vocabulary
the LM head is a large share of a small model's compute. So we run the transformer body to hidden
states, gather the positions that have a label, and apply the LM head (and the cross-entropy, in fp32
as HF does) to those only. Same number, less work.

Architectures where the body -> head split is not the plain ``head(body(x))`` (logit soft-capping,
logit scaling, encoder-decoders) use the model's own loss; `LossComputer` also checks the two agree on
the first batch and falls back (with a warning) when they do not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Config attributes that insert something between the head and the logits HF's loss sees.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping", "mup_width_scale")


def unwrap_hf(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a LoraModel (or the model itself)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, PreTrainedModel) else model


def fast_path_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(body, head) when ``head(body(x).last_hidden_state)`` gives the model's logits, else None."""
    hf = unwrap_hf(model)
    config = getattr(hf, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
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


def fast_loss_sum(body: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the token cross-entropies over labelled positions (divide by the token count for the mean)."""
    out = body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = hidden[:, :-1][mask]                   # (n_tokens, hidden)
    logits = head(picked).float()                   # (n_tokens, vocab)
    return F.cross_entropy(logits, labels[mask], reduction="sum")


def hf_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own (mean) loss turned into a sum, for the fallback path."""
    out = model(**batch, use_cache=False)
    n = count_label_tokens(batch["labels"])
    return out.loss.float() * n


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
        """Compare fast and HF loss once, dropout off, without touching any RNG state."""
        self._checked = True
        was_training = self.model.training
        cpu_state = torch.get_rng_state()
        try:
            self.model.eval()
            # two rows decide whether the split is valid; the whole batch would cost a step's forward twice
            small = {k: (v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
            if count_label_tokens(small["labels"]) > 0:
                batch = small
            with torch.no_grad():
                n = max(count_label_tokens(batch["labels"]), 1)
                fast = fast_loss_sum(*self.parts, batch) / n
                ref = hf_loss_sum(self.model, batch) / n
            if not torch.allclose(fast, ref, rtol=1e-3, atol=1e-4):
                warnings.warn(f"fast loss {fast.item():.6f} != model loss {ref.item():.6f} for "
                              f"{type(unwrap_hf(self.model)).__name__}; using the model's own loss instead",
                              stacklevel=3)
                self.parts = None
        finally:
            torch.set_rng_state(cpu_state)
            self.model.train(was_training)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.parts is not None and not self._checked:
            self._self_check(batch)
        if self.parts is not None:
            return fast_loss_sum(*self.parts, batch)
        return hf_loss_sum(self.model, batch)
