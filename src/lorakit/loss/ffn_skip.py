"""Feed-forward blocks run only on the positions whose result is read, on the training-loss path.

A decoder layer's feed-forward block (``mlp``: ~75% of a Llama layer's matmul FLOPs) works on each
position alone. Two kinds of positions never need it:

* padding (``attention_mask`` 0): a real position never attends to it, and its own output is not
  scored (``fast_loss_sum`` keeps a padded position that does carry a label), so whatever the block
  gives there changes nothing (a length-sorted batch of RAFT tweets is still 8% padding; an unsorted
  one 30-50%);
* in the last layer, every position whose final hidden state does not reach the loss (the loss reads
  only positions that have a label: ~3 of ~36 per row for a short classification answer).

While ``lm_loss.fast_loss_sum`` runs the body, ``feed_forward_rows`` gathers each layer's needed rows
into one ``[1, rows, hidden]`` sequence before its feed-forward block and scatters the result back
into zeros after it. The loss and every gradient are the same numbers (the rows that are computed
see the same inputs); the hidden states at the skipped positions are not the model's (they are
never read: the lazily computed logits of ``LoraModel.forward`` do not use this path).
``lm_loss.check_fast_loss`` compares the result with the model's own loss once, on the row with
the most padding. A kernel of the fused loss (``kernels.dispatch``: ``Choice.ffn_skip``): not used
under activation checkpointing (its recomputation runs outside this context); switched off for a body
whose block returns something other than one tensor or fails on the gathered rows (the call then runs
again without skipping, and a warning says why).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..kernels.guards import note_fallback

__all__ = ["SkipState", "checkpointing", "feed_forward_blocks", "feed_forward_rows", "run_with_rows", "usable"]

#: the attribute names decoder layers give their feed-forward block across transformers' models
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")


class _NotOneTensor(Exception):
    """A feed-forward block returned something the scatter cannot put back (a tuple, router logits)."""


class SkipState:
    """Per body: its decoder stack, found once (not by a walk every step), and whether skipping failed on it."""

    __slots__ = ("found", "stack", "unsupported")

    def __init__(self) -> None:
        self.found = False
        self.stack: Optional[tuple[nn.ModuleList, str]] = None
        self.unsupported = False

    def __deepcopy__(self, memo):
        return SkipState()

    def __reduce__(self):
        return (SkipState, ())


def _state(body: nn.Module) -> SkipState:
    state = body.__dict__.get("_lorakit_ffn_skip")
    if state is None:  # kept on the body itself: it lives and goes with the model
        state = body.__dict__["_lorakit_ffn_skip"] = SkipState()
    return state


def _find_stack(body: nn.Module) -> Optional[tuple[nn.ModuleList, str]]:
    best: Optional[tuple[nn.ModuleList, str]] = None
    for mod in body.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        for name in FEED_FORWARD_NAMES:
            if all(isinstance(getattr(layer, name, None), nn.Module) for layer in mod):
                if best is None or len(mod) > len(best[0]):
                    best = (mod, name)
                break
    return best


def _stack(body: nn.Module) -> Optional[tuple[nn.ModuleList, str]]:
    """The decoder stack (kept per body; looked for again if its layers lost their blocks)."""
    state = _state(body)
    if state.found:
        found = state.stack
        if found is None or all(isinstance(getattr(layer, found[1], None), nn.Module) for layer in found[0]):
            return found
    state.stack, state.found = _find_stack(body), True
    return state.stack


def feed_forward_blocks(body: nn.Module) -> Optional[list[nn.Module]]:
    """Each decoder layer's feed-forward block, first layer first, or None when the body has no such stack.

    The stack is the longest ``nn.ModuleList`` of one layer class whose layers all have a block
    under one of ``FEED_FORWARD_NAMES``.
    """
    found = _stack(body)
    return None if found is None else [getattr(layer, found[1]) for layer in found[0]]


def usable(body: nn.Module) -> bool:
    """May ``feed_forward_rows`` be used on this body now?"""
    return not _state(body).unsupported and not checkpointing(body)


def checkpointing(body: nn.Module) -> bool:
    """Is activation checkpointing on? transformers marks the body and its decoder layers
    (``gradient_checkpointing = True``): checking those spares a walk over every module each step."""
    found = _stack(body)
    layers = found[0] if found is not None else body.modules()
    return getattr(body, "gradient_checkpointing", False) is True or any(
        getattr(m, "gradient_checkpointing", False) is True for m in layers)


@contextlib.contextmanager
def feed_forward_rows(body: nn.Module, keep: torch.Tensor, last_keep: torch.Tensor) -> Iterator[bool]:
    """Within the block, the body's feed-forward blocks run only where ``keep`` (the last layer's: ``last_keep``).

    keep, last_keep: bool [batch, positions] of the body's input. Yields whether the blocks were
    hooked (False: the body has no recognised stack, or nothing would be skipped).
    """
    blocks = feed_forward_blocks(body) if usable(body) else None
    shape = tuple(keep.shape)
    if not blocks or keep.dim() != 2 or tuple(last_keep.shape) != shape:
        yield False
        return
    flat_keep, flat_last = keep.reshape(-1), last_keep.reshape(-1)
    all_kept = bool(flat_keep.all())
    if all_kept and bool(flat_last.all()):
        yield False
        return
    rows = flat_keep.nonzero().flatten()
    last_rows = rows if torch.equal(flat_last, flat_keep) else flat_last.nonzero().flatten()
    if rows.numel() == 0 or last_rows.numel() == 0:  # nothing to compute at all: leave the model alone
        yield False
        return
    handles = []

    def hooks(index: torch.Tensor):
        n = shape[0] * shape[1]

        def gather(module, args, kwargs):
            def pick(t):  # every per-position tensor: the hidden states, a [batch, positions] mask
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == shape:
                    return t.reshape(n, *t.shape[2:]).index_select(0, index).unsqueeze(0)
                return t
            return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}

        def scatter(module, args, kwargs, out):
            if not isinstance(out, torch.Tensor) or out.dim() < 3 or tuple(out.shape[:2]) != (1, index.numel()):
                raise _NotOneTensor(type(module).__name__)
            full = out.new_zeros((n, *out.shape[2:]))
            return full.index_copy(0, index, out[0]).view(*shape, *out.shape[2:])

        return gather, scatter

    try:
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            if all_kept and not last:
                continue
            gather, scatter = hooks(last_rows if last else rows)
            handles.append(block.register_forward_pre_hook(gather, with_kwargs=True))
            handles.append(block.register_forward_hook(scatter, with_kwargs=True))
        yield True
    finally:
        for h in handles:
            h.remove()


# what a block that cannot take the gathered rows raises: our scatter's refusal, or torch's own shape errors
_SKIP_FAILURES = (_NotOneTensor, RuntimeError, ValueError, IndexError)


def run_with_rows(body: nn.Module, keep: torch.Tensor, last_keep: torch.Tensor, fn):
    """``fn()`` inside ``feed_forward_rows``.

    A block that returns more than one tensor, or a shape error while the blocks were hooked (a block whose
    code assumes the full [batch, positions] shape), switches skipping off for ``body`` with a warning, and
    ``fn()`` runs again without it; an error that also happens without skipping is the caller's to see,
    and any other exception is raised as it is.
    """
    hooked = False
    try:
        with feed_forward_rows(body, keep, last_keep) as hooked:
            return fn()
    except _SKIP_FAILURES as exc:
        if not hooked:
            raise
        failure = exc
    result = fn()  # fails again (the caller's error, raised as is) unless skipping was the cause
    _state(body).unsupported = True
    note_fallback("ffn-skip", f"{type(body).__name__}'s feed-forward blocks cannot run on gathered rows "
                              f"({type(failure).__name__}: {failure}); every position runs through them")
    return result
