"""One model's fused-loss state: checked once against the model's own loss, one verdict for every caller.

``LoraModel.forward`` (training with labels) and ``LossComputer`` (the training loop, held-out loss) both
ask ``loss_state(model)``, so one check decides for both. The state lives on the model object itself
(copies and pickles of the model start with a fresh one, checked again).

``summed_loss_request``: a ``LossComputer`` whose model sits inside a data-parallel wrapper (DDP, whose
gradient all-reduce needs the wrapper's forward) calls the wrapper under a request; the wrapped
LoraModel's forward answers it with the summed fused loss (``loss.fused_forward``). One path for one
process and many.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["LossState", "SumRequest", "loss_state", "pending_request", "summed_loss_request"]

_ATTR = "_lorakit_loss_state"


class LossState:
    """``verdict``: None until checked, then True (the fused loss equals the model's own) or False for good."""

    __slots__ = ("verdict",)

    def __init__(self) -> None:
        self.verdict: bool | None = None

    def reset(self) -> None:
        """Check again on the next batch (the model's head changed: a new modules_to_save copy)."""
        self.verdict = None

    def __deepcopy__(self, memo):
        return LossState()

    def __reduce__(self):
        return (LossState, ())


def loss_state(model: Any) -> LossState:
    """The fused-loss state of ``model`` (a LoraModel or a transformers model), made on first use."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = model.__dict__[_ATTR] = LossState()  # a plain attribute: not a parameter, buffer or submodule
    return state


class SumRequest:
    """Asks the LoraModel that owns ``state`` for the summed fused loss of its next training forward."""

    __slots__ = ("state", "parts", "loss")

    def __init__(self, state: LossState, parts: tuple) -> None:
        self.state, self.parts, self.loss = state, parts, None


# the request of the forward in progress: per context (thread / task), as the forward it belongs to
_request: contextvars.ContextVar[SumRequest | None] = contextvars.ContextVar("lorakit_sum_request", default=None)


@contextlib.contextmanager
def summed_loss_request(state: LossState, parts: tuple) -> Iterator[SumRequest]:
    request = SumRequest(state, parts)
    token = _request.set(request)
    try:
        yield request
    finally:
        _request.reset(token)


def pending_request(model: Any) -> SumRequest | None:
    """The request addressed to ``model`` (its own state), if one is open and unanswered."""
    request = _request.get()
    if request is None or request.loss is not None or request.state is not model.__dict__.get(_ATTR):
        return None
    return request
