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
the most padding. Not used under gradient checkpointing (its recomputation runs outside this
context); switched off for a model whose block returns something other than one tensor or fails on
the gathered rows (the call then runs again without skipping).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["checkpointing", "feed_forward_blocks", "feed_forward_rows", "run_with_rows", "usable"]

#: the attribute names decoder layers give their feed-forward block across transformers' models
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")

#: bodies where a feed-forward block turned out not to return one tensor: skipping is off for them
_UNSUPPORTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _NotOneTensor(Exception):
    """A feed-forward block returned something the scatter cannot put back (a tuple, router logits)."""


#: body -> (its decoder stack, the feed-forward attribute name): found once, not by a walk every step
_STACKS: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.ModuleList, str] | None]" = weakref.WeakKeyDictionary()


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
    """The decoder stack (cached per body; looked for again if its layers lost their blocks)."""
    if body in _STACKS:
        found = _STACKS[body]
        if found is None or all(isinstance(getattr(layer, found[1], None), nn.Module) for layer in found[0]):
            return found
    found = _STACKS[body] = _find_stack(body)
    return found


def feed_forward_blocks(body: nn.Module) -> Optional[list[nn.Module]]:
    """Each decoder layer's feed-forward block, first layer first, or None when the body has no such stack.

    The stack is the longest ``nn.ModuleList`` of one layer class whose layers all have a block
    under one of ``FEED_FORWARD_NAMES``.
    """
    found = _stack(body)
    return None if found is None else [getattr(layer, found[1]) for layer in found[0]]


def usable(body: nn.Module) -> bool:
    """May ``feed_forward_rows`` be used on this body now?"""
    return body not in _UNSUPPORTED and not checkpointing(body)


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


def run_with_rows(body: nn.Module, keep: torch.Tensor, last_keep: torch.Tensor, fn):
    """``fn()`` inside ``feed_forward_rows``.

    A block that returns more than one tensor, or any error while the blocks were hooked (a block whose
    code assumes the full [batch, positions] shape), switches skipping off for ``body`` and ``fn()``
    runs again without it; an error that also happens without skipping is the caller's to see.
    """
    hooked = False
    try:
        with feed_forward_rows(body, keep, last_keep) as hooked:
            return fn()
    except Exception:
        if not hooked:
            raise
    result = fn()  # fails again (the caller's error, raised as is) unless skipping was the cause
    _UNSUPPORTED.add(body)
    return result
