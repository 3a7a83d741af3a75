"""The LoRA branch, scaling * B(A(dropout(x))), added into the base output on the CPU, touching big tensors least.

With x [N, in], A [r, in], B [out, r], mask m and keep rate 1-p:

    delta = ((x * m) @ A.T * (scaling / (1-p))) @ B.T

Both scale factors multiply the small [N, r] product instead of an [N, in] or [N, out]
tensor, and ``x * m`` is computed once per input tensor and shared by every module reading
it (SharedDropout), so backward saves one dropped activation per input instead of one float
copy plus one mask per module. The same map as ``layers.linear.lora_linear_delta`` (the reference,
which scales the output as peft does), to float rounding.

``generation_add`` (no autograd) adds the branch with one accumulating GEMM (``addmm_``, the scale as
its alpha); ``branch_add`` (autograd) is one node whose backward picks the operand layouts BLAS
runs fast for skinny [N, r] products: ``g @ B`` as ``linear(g, B.T.contiguous())`` and ``g.T @ h``
as ``(h.T @ g).T``, several times faster on the CPU than the layouts of autograd's generic backward
of ``linear``. Both return None when their operands do not fit (dtypes, layout); the caller then
runs the reference. ``kernels.dispatch`` chooses between them.

bfloat16 (train.precision bf16): over bf16 activations and a bf16 base the branch runs in bf16 whatever
the adapters' dtype; float32 adapters are read as bf16 inside the node (a cast of an [r, in] and an
[out, r] matrix per call), and their gradients, formed by bf16 products accumulated in float32, come
back in float32. Forming them from float32 copies instead would cast the [N, in] input and the [N, out]
gradient (the big operands of each skinny product): ~3e-3 -> ~5e-7 relative error against float64 of
the same bf16 operands, but ~8x the branch's time at SmolLM2-135M's shapes (1024 tokens, one thread);
the bf16 rounding is below what the bf16 activations themselves carry. Generation over a few rows
(one token at a time) is the exception: there float32 is the faster (``generation_add``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import guards
from .dispatch import adapter_fits
from .dropout import SharedDropout

__all__ = ["branch_add", "generation_add", "lora_add", "lora_delta", "low", "low_t", "wide"]


def low(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as ``dtype`` (itself when it is already): an adapter read in the activations' dtype."""
    return weight if weight.dtype is dtype else weight.to(dtype)


def low_t(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B.T`` [r, out] in ``dtype``: a view of B when it has that dtype, else its cast laid out contiguous, the
    one copy serving both forward's ``h @ B.T`` and backward's ``g @ B`` (``linear(g, B.T)``)."""
    if B.dtype is dtype:
        return B.t()
    return B.t().to(dtype, memory_format=torch.contiguous_format)


def wide(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient in its parameter's ``dtype`` (float32 adapters under bfloat16 activations)."""
    return grad if grad is None or grad.dtype is dtype else grad.to(dtype)


def _drop(x: torch.Tensor, dropout: nn.Module | None) -> tuple[torch.Tensor, float]:
    if isinstance(dropout, SharedDropout):
        return dropout.drop(x, fresh_grads=True)  # only matmuls and casts read it (see branch_add)
    if dropout is not None:
        return dropout(x), 1.0
    return x, 1.0


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               dropout: nn.Module | None) -> torch.Tensor:
    """scaling * B(A(dropout(x))) with x [..., in], A [r, in], B [out, r], as a new tensor, the scale
    folded into the [N, r] product (for code that adds the update itself, e.g. the benchmarks' hand wrapper)."""
    x, keep_scale = _drop(x, dropout)
    factor = float(scaling) * keep_scale
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    h = F.linear(x, A)
    if factor != 1.0:
        # linear's backward needs its input and weight, not its output: scaling h in place is safe
        h = h.mul_(factor)
    return F.linear(h, B)


class _AddBranch(torch.autograd.Function):
    """result + factor * (x @ A.T) @ B.T, in place into ``result`` when ``inplace``.

    Saves x (the shared dropped input: no copy per module), A, B (in x's dtype) and the [N, r] product.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, factor: float, inplace: bool):
        ctx.dtypes = (A.dtype, B.dtype)
        A, Bt = low(A, x.dtype), low_t(B, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, A)
        if factor != 1.0:
            h.mul_(factor)
        if inplace:
            result.view(-1, result.shape[-1]).addmm_(h, Bt)
            ctx.mark_dirty(result)
            out = result
        else:
            # a fresh tensor, not a view of one: the caller may modify the output in place
            # (Falcon's ``mlp_output += attention_output`` after a Linear subclass)
            out = torch.empty(result.shape, dtype=result.dtype, device=result.device)
            torch.addmm(result.reshape(-1, result.shape[-1]), h, Bt, out=out.view(-1, out.shape[-1]))
        ctx.save_for_backward(x, A, Bt, h)
        ctx.factor = factor
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, Bt, h = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (h.t() @ g2).t()  # [out, r]; h.T @ g is the fast layout for this skinny product
        if need_x or need_A:
            gh = F.linear(g2, Bt.contiguous())  # g @ B
            if ctx.factor != 1.0:
                gh.mul_(ctx.factor)
            if need_A:
                grad_A = gh.t() @ x.reshape(-1, x.shape[-1])
            if need_x:
                grad_x = (gh @ A).view(x.shape)
        return grad, grad_x, wide(grad_A, ctx.dtypes[0]), wide(grad_B, ctx.dtypes[1]), None, None


# up to this many rows the generation kernel runs a bf16 call's branch in float32: bf16 products this small
# cost ~25 us each in fixed overhead on the CPU (oneDNN), float32 ones a few (with the input's cast: 15 vs
# 65 us per LoRA linear for one token at SmolLM2-135M's shapes; float32 still ahead at 32 rows, not at 128)
_FEW_ROWS = 32


def _fits(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    return (x.dtype is result.dtype and adapter_fits(x.dtype, A) and adapter_fits(x.dtype, B)
            and x.shape[:-1] == result.shape[:-1])


def generation_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                   dropout: nn.Module | None, inplace: bool) -> torch.Tensor | None:
    """``result += scaling * B(A(dropout(x)))`` without autograd: one F.linear and one accumulating GEMM with
    the scale as its alpha (one token at a time, each op's fixed cost is what counts). None unless ``result``
    may be written (``inplace``), is contiguous and the dtypes fit (``adapter_fits``)."""
    if not (inplace and result.is_contiguous() and _fits(result, x, A, B)):
        return None
    factor = float(scaling)
    if dropout is not None:
        x, keep_scale = _drop(x, dropout)
        factor *= keep_scale
    if x.dtype is torch.bfloat16 and x.numel() <= _FEW_ROWS * x.shape[-1]:
        # a few bf16 rows (one token at a time): in float32, as the reference, the sum rounded once
        result.add_(F.linear(F.linear(x.float(), A.float()), B.float()), alpha=factor)
        return result
    h = F.linear(x, low(A, x.dtype))
    result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), low_t(B, x.dtype), alpha=factor)
    return result


def branch_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               dropout: nn.Module | None, inplace: bool) -> torch.Tensor | None:
    """``result + scaling * B(A(dropout(x)))`` as one autograd node, written into ``result`` when ``inplace``
    allows (only the caller knows whether something saved ``result`` for backward: torch's own Linear does
    not). None unless the dtypes fit (``adapter_fits``) and something needs a gradient."""
    if not (_fits(result, x, A, B) and (x.requires_grad or A.requires_grad or B.requires_grad)):
        return None
    factor = float(scaling)
    if dropout is not None:
        x, keep_scale = _drop(x, dropout)
        factor *= keep_scale
    inplace = inplace and not guards.is_view(result) and result.is_contiguous()
    return _AddBranch.apply(result, x, A, B, factor, inplace)


def lora_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
             dropout: nn.Module | None, inplace: bool) -> torch.Tensor | None:
    """The kernel for the current grad mode (``generation_add`` or ``branch_add``), for callers outside
    the dispatcher (benchmarks); None when its operands do not fit."""
    kernel = branch_add if torch.is_grad_enabled() else generation_add
    return kernel(result, x, A, B, scaling, dropout, inplace)
