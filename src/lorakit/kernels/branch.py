"""The LoRA branch, scaling * B(A(dropout(x))), arranged to touch big tensors least.

With x [N, in], A [r, in], B [out, r], mask m and keep rate 1-p:

    delta = ((x * m) @ A.T * (scaling / (1-p))) @ B.T

Both scale factors multiply the small [N, r] product instead of an [N, in] or [N, out]
tensor, and ``x * m`` is computed once per input tensor and shared by every module reading
it (SharedDropout), so backward saves one dropped activation per input instead of one float
copy plus one mask per module.

``lora_add`` adds the branch straight into the base layer's output with one GEMM that
accumulates (``addmm_``), and its backward picks the operand layouts that BLAS runs fast
for skinny [N, r] products: on CPU ``g @ B`` as ``linear(g, B.T.contiguous())`` and
``g.T @ h`` as ``(h.T @ g).T`` are 2.5-4x faster than the layouts autograd's generic
backward of ``linear`` uses (measured on the 2-core dev VM, MKL, N=1024, r=8).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .dropout import SharedDropout

__all__ = ["add_delta", "lora_add", "lora_delta"]


def _drop(x: torch.Tensor, dropout: nn.Module | None) -> tuple[torch.Tensor, float]:
    if isinstance(dropout, SharedDropout):
        return dropout.drop(x, fresh_grads=True)  # only matmuls and casts read it (see lora_add)
    if dropout is not None:
        return dropout(x), 1.0
    return x, 1.0


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               dropout: nn.Module | None) -> torch.Tensor:
    """scaling * B(A(dropout(x))) with x [..., in], A [r, in], B [out, r], as a new tensor."""
    x, keep_scale = _drop(x, dropout)
    factor = float(scaling) * keep_scale
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    # F.linear takes [..., in] as it is (no transposed views, one flattened GEMM): the cheapest call
    # per layer, which is what decides generation speed with an unmerged adapter
    h = F.linear(x, A)
    if factor != 1.0:
        # linear's backward needs its input and weight, not its output: scaling h in place is safe
        h = h.mul_(factor)
    return F.linear(h, B)


def add_delta(result: torch.Tensor, delta: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``result + delta``, into ``result`` when ``inplace``.

    A delta in a wider dtype (float32 adapters over a bf16/fp16 base) is added in that dtype and the
    sum rounded once to the result's dtype, as peft does; rounding the delta first and then the sum
    would round twice.
    """
    if delta.dtype == result.dtype:
        return result.add_(delta) if inplace else result + delta
    total = result.to(delta.dtype) + delta
    return result.copy_(total) if inplace else total.to(result.dtype)


class _AddBranch(torch.autograd.Function):
    """result + factor * (x @ A.T) @ B.T, in place into ``result`` when ``inplace``.

    Saves x (the shared dropped input: no copy per module), A, B and the [N, r] product.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, factor: float, inplace: bool):
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, A)
        if factor != 1.0:
            h.mul_(factor)
        if inplace:
            result.view(-1, result.shape[-1]).addmm_(h, B.t())
            ctx.mark_dirty(result)
            out = result
        else:
            # a fresh tensor, not a view of one: the caller may modify the output in place
            # (Falcon's ``mlp_output += attention_output`` after a Linear subclass)
            out = torch.empty(result.shape, dtype=result.dtype, device=result.device)
            torch.addmm(result.reshape(-1, result.shape[-1]), h, B.t(), out=out.view(-1, out.shape[-1]))
        ctx.save_for_backward(x, A, B, h)
        ctx.factor = factor
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, B, h = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (h.t() @ g2).t()  # [out, r]; h.T @ g is the fast layout for this skinny product
        if need_x or need_A:
            gh = F.linear(g2, B.t().contiguous())  # g @ B
            if ctx.factor != 1.0:
                gh.mul_(ctx.factor)
            if need_A:
                grad_A = gh.t() @ x.reshape(-1, x.shape[-1])
            if need_x:
                grad_x = (gh @ A).view(x.shape)
        return grad, grad_x, grad_A, grad_B, None, None


def lora_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
             dropout: nn.Module | None, inplace: bool) -> torch.Tensor:
    """``result + scaling * B(A(dropout(x)))``, written into ``result`` when ``inplace`` allows.

    ``inplace`` must be False when something saved ``result`` for backward (only the caller
    knows: torch's own Linear does not). Without autograd (generation), in place with one dtype, it is
    one F.linear and one accumulating GEMM with the scale as its alpha, the fewest calls per layer; with
    autograd, matching dtypes and a contiguous result, the ``_AddBranch`` kernel; anything else the
    generic path.
    """
    if dropout is not None:
        x, keep_scale = _drop(x, dropout)
        factor = float(scaling) * keep_scale
    else:
        factor = float(scaling)
    if (not torch.is_grad_enabled() and inplace and x.dtype == A.dtype == B.dtype == result.dtype
            and result.is_contiguous() and x.shape[:-1] == result.shape[:-1]):
        # generation: two calls per layer, the scale applied inside the accumulating product (one token
        # at a time, each op's fixed cost is what counts: ~7% of an unmerged decoding step)
        h = F.linear(x, A)
        result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=factor)
        return result
    if (not torch.is_grad_enabled() or x.dtype != A.dtype or result.dtype != A.dtype
            or x.shape[:-1] != result.shape[:-1] or not (x.requires_grad or A.requires_grad or B.requires_grad)):
        return add_delta(result, lora_delta(x, A, B, factor, None), inplace)
    inplace = inplace and result._base is None and result.is_contiguous()
    return _AddBranch.apply(result, x, A, B, factor, inplace)
