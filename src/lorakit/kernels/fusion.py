"""Training LoRA linears that read one input together (``ops.siblings``), found by watching calls.

q/k/v read one hidden state, gate/up another; which layers do is a fact of the model's forward,
not of module names, so it is learned: consecutive calls of eligible layers with the *same tensor
object* (same in-place version) form a group, led by the first. From the next forward on, the
leader's call computes the whole group in one autograd node and leaves each sibling its output;
a sibling hands that output back only when it is called with that very tensor. Anything else
(another input, an output left unclaimed) computes the sibling alone and stops grouping for that
leader, so a wrong guess costs one wasted product, never a wrong value.

Only in training on the CPU (autograd on, float32/float64 throughout, no autocast), for one active
unmerged adapter over a plain ``nn.Linear`` with frozen weights and no hooks or replaced forward,
and never while saved-tensor hooks are active (activation checkpointing recomputes a forward and
expects the same autograd nodes; offloading hooks expect the usual ones): there the per-module path
(``ops.branch.lora_add``) runs as before.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from .dropout import SharedDropout
from .siblings import sibling_linear

__all__ = ["FuseState", "eligible", "enabled", "fused_forward", "learnable", "learning", "observe"]

#: set False to run every layer through the per-module path (comparisons, debugging)
enabled = True

# > 0 while a lorakit check forward runs without autograd (``learning``): only then do such calls teach
# groups, so generation and evaluation pay one flag test per layer call, nothing more
_learning = [0]


@contextlib.contextmanager
def learning():
    """No-grad forwards inside teach the groups (the training loss's first check runs in one)."""
    _learning[0] += 1
    try:
        yield
    finally:
        _learning[0] -= 1


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


class FuseState:
    """Per-layer grouping state; copies and pickles start empty (groups are learned again)."""

    __slots__ = ("siblings", "pending", "ok")

    def __init__(self):
        self.siblings: tuple = ()  # (leader, sibling, ...) once learned; a plain tuple, not submodules
        self.pending = None  # (weakref of the input, its version, output, leader) left by a leader
        self.ok = True  # False once a guess failed: this leader computes alone from then on

    def __deepcopy__(self, memo):
        return FuseState()

    def __reduce__(self):
        return (FuseState, ())


# the current run of eligible calls on one input: (weakref of x, version, [layers])
_run: list = [None, -1, []]


def _hooks_free() -> bool:
    if _top_hooks is None:
        return False
    try:
        return _top_hooks(False) is None
    except Exception:  # a torch whose private API changed: stay on the per-module path
        return False


class _Spec(NamedTuple):
    W: torch.Tensor
    b: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    factor: float
    drop: SharedDropout | None
    adapter: str


def _spec(layer, x: torch.Tensor) -> _Spec | None:
    """What ``layer`` computes on ``x`` when it may run fused, else None."""
    if layer.disable_adapters or len(layer.active_adapters) != 1 or layer.merged_adapters:
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None
    name = layer.active_adapters[0]
    if name not in layer.r:
        return None
    W, b = base.weight, base.bias
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    if (W.requires_grad or (b is not None and b.requires_grad) or not (A.requires_grad or B.requires_grad)
            or not (x.dtype == W.dtype == A.dtype == B.dtype) or x.dtype not in (torch.float32, torch.float64)
            or W.device.type != "cpu" or A.device.type != "cpu" or x.shape[-1] != W.shape[1]):
        return None
    drop = layer._dropout_of(name)
    if drop is not None and not isinstance(drop, SharedDropout):
        return None
    factor = layer.scaling[name] * (drop.scale if drop is not None and drop.active else 1.0)
    return _Spec(W, b, A, B, factor, drop, name)


def eligible(x: torch.Tensor) -> bool:
    """Whether this call may take the fused path at all (cheap checks first)."""
    return torch.is_grad_enabled() and _conditions(x)


def learnable(x: torch.Tensor) -> bool:
    """A call without autograd inside ``learning()`` (the training loss's first check) that may teach
    the groups, so that the first training step already runs fused: a run resumed from a checkpoint
    then repeats the very products of the run it continues."""
    return _learning[0] > 0 and not torch.is_grad_enabled() and _conditions(x)


def _conditions(x: torch.Tensor) -> bool:
    return (enabled and isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks
            and not torch.compiler.is_compiling() and _hooks_free())


def observe(layer, x: torch.Tensor) -> None:
    """Note a call computed by the per-module path (see ``learnable``)."""
    if layer.__dict__.get("_fuse") is not None and _spec(layer, x) is not None:
        _observe(layer, x)


def _observe(layer, x: torch.Tensor) -> None:
    ref, version, layers = _run
    if ref is not None and ref() is x and version == x._version:
        if layer in layers:
            return
        layers.append(layer)
        leader = layers[0]
        state = leader._fuse
        if state.ok and len(layers) > len(state.siblings):
            state.siblings = tuple(layers)
        return
    _run[:] = [weakref.ref(x), x._version, [layer]]


def _compute(x: torch.Tensor, specs: list[_Spec]) -> tuple:
    drop = specs[0].drop
    keep = drop.keep_for(x) if drop is not None and drop.active else None
    return sibling_linear(x, keep, [s.factor for s in specs], [s.W for s in specs], [s.b for s in specs],
                          [s.A for s in specs], [s.B for s in specs])


def fused_forward(layer, x: torch.Tensor):
    """The layer's output through the fused path, or None when the per-module path must run."""
    state = layer.__dict__.get("_fuse")
    if state is None:  # a layer unpickled from before fusion existed
        state = layer._fuse = FuseState()
    pending = state.pending
    if pending is not None:
        state.pending = None
        ref, version, out, leader = pending
        if ref() is x and version == x._version and _spec(layer, x) is not None:
            return out
        _give_up(leader)  # the leader guessed wrong: this layer reads another input
    spec = _spec(layer, x)
    if spec is None:
        return None
    group = state.siblings if state.ok else ()
    if len(group) > 1:
        if any(other._fuse.pending is not None for other in group[1:]):
            _give_up(layer)  # last time a sibling never came for its output: the guess was wrong
            specs = None
        else:
            specs = [spec]
            for other in group[1:]:
                s = _spec(other, x)
                if s is None or s.drop is not spec.drop or s.adapter != spec.adapter:
                    specs = None  # a sibling that cannot be fused now (a hook, another adapter): alone this time
                    break
                specs.append(s)
        if specs is not None:
            outs = _compute(x, specs)
            key = weakref.ref(x)
            for other, out in zip(group[1:], outs[1:]):
                other._fuse.pending = (key, x._version, out, layer)
            return outs[0]
    out = _compute(x, [spec])[0]
    _observe(layer, x)
    return out


def _give_up(leader) -> None:
    state = leader._fuse
    for other in state.siblings[1:]:
        other._fuse.pending = None
    state.siblings, state.ok = (), False
