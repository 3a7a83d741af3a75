"""What LoraModel.forward returns when it computed a causal LM's training loss fused: the loss now,
the logits only when read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

__all__ = ["FusedLossOutput", "fused_output", "linear_of"]


def linear_of(head: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear a head computes with (through a modules_to_save wrapper), else None."""
    active = getattr(head, "active_module", head)
    return active if type(active) is nn.Linear else None


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
            holder = getattr(self.loss, _SOURCE_ATTR, None)
            source = holder.parts if holder is not None else None
            if source is not None:
                self.__dict__["_logits_source"] = source
        return source

    def _logits(self) -> torch.Tensor:
        source = self._source()
        if source is None:
            raise AttributeError("this output has no logits")
        head, hidden = source
        logits = head(hidden)
        weight = getattr(linear_of(head), "weight", None)
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


# the loss tensor carries (head, hidden) under this attribute for as long as it lives, so that a copy of the
# output rebuilt around the same loss finds its logits (no process-wide table of losses)
_SOURCE_ATTR = "_lorakit_logits_source"


class _Source:
    """(head, hidden) kept on a loss tensor; a pickled or copied tensor carries none (torch keeps a tensor's
    Python attributes when it pickles it: the head and the hidden states would go with it)."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple | None = None) -> None:
        self.parts = parts

    def __reduce__(self):
        return (_Source, ())

    def __deepcopy__(self, memo):
        return _Source()


def fused_output(loss: torch.Tensor, head: nn.Module, hidden: torch.Tensor) -> FusedLossOutput:
    """A FusedLossOutput whose logits, when read, are ``head(hidden)``."""
    out = FusedLossOutput(loss=loss)
    out.__dict__["_logits_source"] = (head, hidden)
    setattr(loss, _SOURCE_ATTR, _Source((head, hidden)))
    return out
