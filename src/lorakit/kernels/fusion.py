"""Training LoRA linears that read one input together (``kernels.siblings``), found by watching calls.

q/k/v read one hidden state, gate/up another; which layers do is a fact of the model's forward,
not of module names, so it is learned: consecutive calls of eligible layers with the *same tensor
object* (same in-place version) form a group, led by the first. From the next forward on, the
leader's call computes the whole group in one autograd node and leaves each sibling its output;
a sibling hands that output back only when it is called with that very tensor. Anything else
(another input, an output left unclaimed) computes the sibling alone and stops grouping for that
leader, so a wrong guess costs one wasted product, never a wrong value.

``kernels.dispatch`` sends a call here (route "siblings", or "learn" for the fused loss's no-grad
check) only in training on the CPU with float32/float64 tensors or bfloat16 ones (adapters bfloat16 or
float32: train.precision bf16), no autocast, no hooks, no saved-tensor hooks (activation checkpointing
recomputes a forward and expects the same autograd nodes; offloading hooks expect the usual ones) and
not under torch.compile. What the layer must be
is checked here (``_spec``): one active unmerged adapter over a plain ``nn.Linear`` with frozen
weights; otherwise ``fused_forward`` returns None and the layer takes the per-module branch kernel.
"""
from __future__ import annotations

import contextvars
import weakref
from typing import NamedTuple

import torch
from torch import nn

from . import guards
from .dispatch import adapter_fits, learning
from .dropout import SharedDropout
from .siblings import sibling_linear

__all__ = ["FuseState", "fused_forward", "learning", "observe"]


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


# the current run of eligible calls on one input: (weakref of x, version, [layers]). It belongs to the forward
# pass in progress, whose layers run one after another in one thread: per context, like torch's grad mode
_run: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("lorakit_sibling_run", default=None)


# the input's (and frozen weight's) dtypes the sibling kernel computes in; the adapters: ``adapter_fits``
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


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
    if type(base) is not nn.Linear or guards.module_hooks(base):
        return None
    name = layer.active_adapters[0]
    if name not in layer.r:
        return None
    W, b = base.weight, base.bias
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    dtype = x.dtype
    if (W.requires_grad or (b is not None and b.requires_grad) or not (A.requires_grad or B.requires_grad)
            or dtype not in _DTYPES or W.dtype is not dtype or (b is not None and b.dtype is not dtype)
            or not (adapter_fits(dtype, A) and adapter_fits(dtype, B))
            or W.device.type != "cpu" or A.device.type != "cpu" or x.shape[-1] != W.shape[1]):
        return None
    drop = layer._dropout_of(name)
    if drop is not None and not isinstance(drop, SharedDropout):
        return None
    factor = layer.scaling[name] * (drop.scale if drop is not None and drop.active else 1.0)
    return _Spec(W, b, A, B, factor, drop, name)


def observe(layer, x: torch.Tensor) -> None:
    """Note a call without autograd inside ``learning()`` (the training loss's first check), so that the
    first training step already runs fused: a run resumed from a checkpoint then repeats the very products
    of the run it continues."""
    if layer.__dict__.get("_fuse") is not None and _spec(layer, x) is not None:
        _observe(layer, x)


def _observe(layer, x: torch.Tensor) -> None:
    run = _run.get()
    if run is not None and guards.same_tensor(x, run[0], run[1]):
        layers = run[2]
        if layer in layers:
            return
        layers.append(layer)
        leader = layers[0]
        state = leader._fuse
        if state.ok and len(layers) > len(state.siblings):
            state.siblings = tuple(layers)
        return
    _run.set((weakref.ref(x), guards.version(x), [layer]))


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
        if guards.same_tensor(x, ref, version) and _spec(layer, x) is not None:
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
                other._fuse.pending = (key, guards.version(x), out, layer)
            return outs[0]
    out = _compute(x, [spec])[0]
    _observe(layer, x)
    return out


def _give_up(leader) -> None:
    state = leader._fuse
    for other in state.siblings[1:]:
        other._fuse.pending = None
    state.siblings, state.ok = (), False
