"""Which kernel runs: one pure decision from the facts of a call.

``choose(facts) -> Choice`` is the whole policy, a pure function of a frozen ``Facts`` (device type,
dtype, grad mode, autocast, hooks, checkpointing, per-row routing, torch.compile, the switch, ...).
The call sites only gather facts and do what the choice says:

    Choice.linear   a LoRA linear's update         reference | generation | branch | siblings | learn
    Choice.dropout  LoRA dropout's mask            torch (F.dropout on the tensor's device) | shared-mask
    Choice.frozen   the loss body's frozen F.linear  torch | onednn
    Choice.loss     a causal LM's training loss    model (its own forward) | fused (lorakit.loss)
    Choice.ffn_skip feed-forward blocks only on rows the fused loss reads
    Choice.head     the fused head's form          chunked | one-pass | one-pass-onednn (where the
                                                   fused loss runs; on its own not gated by the switch)

Kernels are CPU speed only: on any other device (cuda, meta, ...) every choice is the reference
(torch's own ops on the device: no host RNG, no host copies, no function mode), and so it is with the
switch off (``lorakit.kernels.enabled = False`` or ``LORAKIT_KERNELS=0``). ``python -m
lorakit.kernels`` prints the decision table that tests/kernels/test_dispatch.py checks.

What the choice leaves to a kernel is its operands' layout: a kernel that finds them unfit (a
non-contiguous output, a layer that is not a plain ``nn.Linear``) computes nothing and the caller
runs the reference instead.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from . import guards, onednn
from .switch import STATE

__all__ = ["Choice", "Facts", "TABLE", "choose", "decide", "dropout_route", "head_route", "learning",
           "linear_route", "loss_facts", "table", "adapter_fits", "call_dtype"]

# routes of a LoRA linear
REFERENCE = "reference"  # base(x) + scale * B(A(dropout(x))) in plain torch (lorakit.layers)
GENERATION = "generation"  # no autograd: one F.linear and one accumulating addmm_ into the base output
BRANCH = "branch"  # autograd: the update added by one node with skinny-GEMM layouts (kernels.branch)
SIBLINGS = "siblings"  # autograd: linears reading one input as one node (kernels.fusion, kernels.siblings)
LEARN = "learn"  # the fused loss's check (no autograd): generation, noting which linears read one input
# dropout, frozen products, loss, head
TORCH, SHARED_MASK, ONEDNN = "torch", "shared-mask", "onednn"
MODEL, FUSED = "model", "fused"
CHUNKED, ONE_PASS, ONE_PASS_ONEDNN = "chunked", "one-pass", "one-pass-onednn"

_EXACT = ("float32", "float64")
# dtypes the CPU kernels compute in: the exact ones and bfloat16 (train.precision bf16: a bf16 base and bf16
# activations; the adapters may stay float32 and are read in bf16 by the kernels, their gradients float32)
_KERNEL = _EXACT + ("bfloat16",)
# dtypes of the frozen products and the fused head through oneDNN / in one pass over the head
_ONEDNN = ("float32", "bfloat16")


@dataclass(frozen=True)
class Facts:
    """What a call sees. Defaults: a float32 training call on the CPU with kernels on and nothing unusual."""

    kernels: bool = True  # lorakit.kernels.enabled (LORAKIT_KERNELS)
    device: str = "cpu"  # device type of the call's tensors
    dtype: str = "float32"  # input and base weight's common dtype (adapters: theirs or float32); else "mixed"
    grad: bool = True  # autograd records the call
    autocast: bool = False  # autocast is on for that device
    module_hooks: bool = False  # hooks or a replaced forward on the wrapped layer, or global module hooks
    saved_tensor_hooks: bool = False  # saved-tensor hooks (non-reentrant activation checkpointing, offloading)
    checkpointing: bool = False  # the model's activation checkpointing is on
    rows: bool = False  # per-row adapters (adapter_names)
    compiling: bool = False  # torch.compile is tracing the call
    learning: bool = False  # inside the fused loss's first check (no autograd)
    frozen_weight: bool = True  # the weight multiplied (a base layer's, the LM head's) does not train
    onednn: bool = True  # oneDNN's linear exists here and agreed with F.linear


@dataclass(frozen=True)
class Choice:
    linear: str
    dropout: str
    frozen: str
    loss: str
    ffn_skip: bool
    head: str


def choose(f: Facts) -> Choice:
    """The kernels for a call with facts ``f`` (the policy; see the module doc)."""
    cpu = f.kernels and f.device == "cpu" and not f.compiling
    if not cpu or f.rows or f.autocast or f.module_hooks or f.dtype == "mixed":
        linear = REFERENCE
    elif not f.grad:
        linear = LEARN if f.learning and f.dtype in _KERNEL and f.frozen_weight else GENERATION
    elif f.dtype in _KERNEL and f.frozen_weight and not f.saved_tensor_hooks:
        linear = SIBLINGS
    else:
        linear = BRANCH
    loss = FUSED if cpu and not f.rows else MODEL
    # the body's frozen products inside the fused loss's training forward (not recomputed by checkpointing);
    # float32 only: bfloat16's through torch (its bf16 matmul is oneDNN's already; onednn.FROZEN_DTYPES)
    frozen = ONEDNN if (loss == FUSED and f.onednn and f.grad and f.dtype == "float32" and not f.autocast
                        and not f.checkpointing) else TORCH
    # a frozen float32 or bfloat16 head in one pass (bfloat16 products, the softmax summed in float32)
    if f.device == "cpu" and f.dtype in _ONEDNN and f.frozen_weight:
        head = ONE_PASS_ONEDNN if f.onednn and not f.autocast else ONE_PASS
    else:
        head = CHUNKED
    return Choice(linear=linear, dropout=SHARED_MASK if cpu else TORCH, frozen=frozen, loss=loss,
                  ffn_skip=loss == FUSED and not f.checkpointing, head=head)


# what the dispatcher picks for LoRA dropout once the switch, the device and torch.compile are as in Facts()
_CPU_DROPOUT = choose(Facts()).dropout

# memo of the pure ``choose``: the same facts always get the same choice, so one process-wide table serves all
_MEMO: dict = {}


def decide(f: Facts) -> Choice:
    choice = _MEMO.get(f)
    if choice is None:
        choice = _MEMO[f] = choose(f)
    return choice


# -- facts of a call ---------------------------------------------------------------------------

# > 0 inside ``learning()``; per context (thread / task) like torch's own grad mode, not per process
_learning: contextvars.ContextVar[int] = contextvars.ContextVar("lorakit_learning", default=0)


@contextlib.contextmanager
def learning() -> Iterator[None]:
    """No-grad forwards inside teach LoRA linears which of them read one input (the fused loss's first
    check runs in one), so that the first training step already runs them as one node."""
    token = _learning.set(_learning.get() + 1)
    try:
        yield
    finally:
        _learning.reset(token)


def _dtype_name(dtype) -> str:
    return "mixed" if dtype is None else str(dtype).removeprefix("torch.")


def adapter_fits(dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Can a kernel computing in ``dtype`` read adapter ``weight``: the same dtype, or float32 under bfloat16
    (train.precision bf16: read as bfloat16 inside the kernel, its gradient float32)."""
    return weight.dtype is dtype or (dtype is torch.bfloat16 and weight.dtype is torch.float32)


def call_dtype(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor) -> torch.dtype | None:
    """The dtype a LoRA linear call computes in: the input's when the base weight has it and the adapter
    fits it (``adapter_fits``); None ("mixed") otherwise."""
    return x.dtype if W.dtype is x.dtype and adapter_fits(x.dtype, A) else None


# key of the gathered facts -> route; LoRA linears are called hundreds of times per forward, so the
# facts are gathered as a tuple and a Facts is built only the first time a tuple is seen
_LINEAR: dict = {}


def linear_route(x: torch.Tensor, base: torch.nn.Module, A: torch.Tensor, rows: bool) -> str:
    """The route of one LoRA linear call: input ``x``, wrapped layer ``base``, adapter weight ``A``.

    The switch, per-row routing, a device other than the CPU and torch.compile each settle the route alone
    (tests/kernels/test_dispatch.py checks that no other fact changes it), so the rest is not looked at
    (nor traced by torch.compile).
    """
    if rows or not STATE.on or not x.is_cpu or torch.compiler.is_compiling():
        return REFERENCE
    grad = torch.is_grad_enabled()
    W, hooks = guards.layer_facts(base)
    dtype = call_dtype(x, W, A)
    key = (grad, dtype, torch.is_autocast_enabled("cpu"), hooks, grad and guards.saved_tensor_hooks(),
           not grad and _learning.get() > 0, not W.requires_grad)
    route = _LINEAR.get(key)
    if route is None:
        facts = Facts(device="cpu", grad=grad, dtype=_dtype_name(dtype), autocast=key[2], module_hooks=hooks,
                      saved_tensor_hooks=key[4], learning=key[5], frozen_weight=key[6])
        route = _LINEAR[key] = choose(facts).linear
    return route


def dropout_route(x: torch.Tensor) -> str:
    """LoRA dropout's mask for input ``x``: shared-mask (CPU kernels) or torch (F.dropout on x's device)."""
    if not STATE.on or not x.is_cpu or torch.compiler.is_compiling():
        return TORCH  # each settles it alone (tests/kernels/test_dispatch.py)
    return _CPU_DROPOUT


def loss_facts(device: torch.device | str, dtype: torch.dtype | None = None, grad: bool | None = None,
               checkpointing: bool = False, rows: bool = False) -> Facts:
    """The facts of a training-loss call on ``device`` (a model of ``dtype``; grad mode: now)."""
    kind = device if isinstance(device, str) else device.type
    grad = torch.is_grad_enabled() if grad is None else grad
    cpu = kind == "cpu" and STATE.on
    return Facts(kernels=STATE.on, device=kind, dtype=_dtype_name(dtype) if dtype is not None else "float32",
                 grad=grad, autocast=torch.is_autocast_enabled(kind) if kind in ("cpu", "cuda") else False,
                 checkpointing=checkpointing, rows=rows, compiling=torch.compiler.is_compiling(),
                 onednn=cpu and onednn.available(dtype or torch.float32))


def head_route(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, frozen: bool) -> str:
    """The fused head's form for ``hidden`` [rows, H] times ``weight`` [V, H] (+ ``bias``); ``frozen``: no
    gradient for the head. Not gated by the switch: the fused loss that calls it is."""
    same = hidden.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
    dtype = _dtype_name(weight.dtype if same else None)
    kind = hidden.device.type
    cpu = kind == "cpu"
    facts = Facts(device=kind, dtype=dtype, frozen_weight=frozen, autocast=cpu and torch.is_autocast_enabled("cpu"),
                  onednn=cpu and dtype in _ONEDNN and onednn.available(weight.dtype))
    return decide(facts).head


# -- the table ---------------------------------------------------------------------------------

#: (what the row is, its facts): the rows ``python -m lorakit.kernels`` prints and the test checks
TABLE: tuple[tuple[str, Facts], ...] = (
    ("CPU float32 training", Facts()),
    ("CPU float32, base weight trains", Facts(frozen_weight=False)),
    ("CPU float64 training", Facts(dtype="float64")),
    ("CPU checkpointing (saved-tensor hooks)", Facts(saved_tensor_hooks=True, checkpointing=True)),
    ("CPU bf16 training (adapters float32)", Facts(dtype="bfloat16")),
    ("CPU bf16 generation (no grad)", Facts(dtype="bfloat16", grad=False)),
    ("CPU float16 training", Facts(dtype="float16")),
    ("CPU mixed dtypes (input, base, adapter)", Facts(dtype="mixed")),
    ("CPU autocast", Facts(autocast=True)),
    ("CPU hooks on the layer", Facts(module_hooks=True)),
    ("CPU no oneDNN", Facts(onednn=False)),
    ("CPU generation (no grad)", Facts(grad=False)),
    ("CPU fused loss's check (no grad)", Facts(grad=False, learning=True)),
    ("CPU per-row adapters", Facts(rows=True)),
    ("CPU torch.compile", Facts(compiling=True)),
    ("CPU kernels off", Facts(kernels=False)),
    ("CPU kernels off, generation", Facts(kernels=False, grad=False)),
    ("CUDA float32 training", Facts(device="cuda")),
    ("CUDA autocast training", Facts(device="cuda", autocast=True)),
    ("CUDA bf16 training", Facts(device="cuda", dtype="bfloat16")),
    ("CUDA generation (no grad)", Facts(device="cuda", grad=False)),
    ("meta training", Facts(device="meta")),
    ("meta generation (no grad)", Facts(device="meta", grad=False)),
)


def table() -> str:
    """The decision table: one line per row of ``TABLE``, the facts that differ from the defaults and the choice."""
    defaults = Facts()
    lines = [f"{'row':40} {'facts (others as in Facts())':44} {'linear':10} {'dropout':11} {'frozen':7} "
             f"{'loss':6} {'ffn_skip':8} head (fused loss)"]
    for label, facts in TABLE:
        diff = ", ".join(f"{f.name}={getattr(facts, f.name)}" for f in fields(Facts)
                         if getattr(facts, f.name) != getattr(defaults, f.name)) or "-"
        c = choose(facts)
        lines.append(f"{label:40} {diff:44} {c.linear:10} {c.dropout:11} {c.frozen:7} {c.loss:6} "
                     f"{str(c.ffn_skip):8} {c.head}")
    return "\n".join(lines)
