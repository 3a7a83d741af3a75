"""Frozen linears with LoRA that read one input (q/k/v, gate/up), as one autograd node.

For sibling layers k = 1..n reading the same x [N, in], with frozen W_k [out_k, in], bias b_k,
LoRA A_k [r_k, in], B_k [out_k, r_k], factor f_k (scaling and the 1/(1-p) of dropout) and one
dropout keep mask m shared by all of them:

    h_k  = f_k (x * m) @ A_k.T
    y_k  = x @ W_k.T + b_k + h_k @ B_k.T        (x @ W_k.T through oneDNN: kernels.onednn)

Backward forms the input gradient in one buffer instead of 2n tensors that autograd adds up:

    gh_k = f_k g_k @ B_k;  grad A = gh.T @ (x * m);  grad B_k = g_k.T @ h_k   (gh: the siblings side by side)
    grad x = ((gh @ [A_1; ...; A_n]) * m) + sum_k g_k @ W_k

with the frozen products accumulated by GEMMs into the masked LoRA term (beta = 1, where BLAS reads
the buffer inside the product rather than in separate passes). For q/k/v that is one [N, in] buffer
where the per-module path wrote six and added them in five more passes, on a step whose non-GEMM time
is memory traffic. The mask is kept bit-packed (1 bit per element) for backward.

bfloat16 (train.precision bf16): everything runs in bf16, float32 adapters read as bf16 and their
gradients returned in float32 (as ``kernels.branch``). The frozen products then use torch's own
bf16 matmul (itself oneDNN's): faster than ``_linear_pointwise`` here, mostly for the input
gradient's accumulating product (``kernels.onednn.FROZEN_DTYPES``).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .branch import low, low_t, wide
from .dropout import mul_keep, mul_keep_
from .onednn import FROZEN_DTYPES, add_linear_t, base_linear
from .masks import pack_keep, unpack_keep

__all__ = ["sibling_linear"]


class _SiblingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, factors, n, *tensors):
        Ws, bs, As, Bs = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        ctx.dtypes = [t.dtype for t in (*As, *Bs)]
        As, Bts = [low(A, x.dtype) for A in As], [low_t(B, x.dtype) for B in Bs]
        onednn = x.dtype in FROZEN_DTYPES
        ctx.onednn = onednn
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if keep is None else mul_keep(x2, keep.reshape(x2.shape))
        outs, hs = [], []
        for k in range(n):
            # per sibling, the very products of the per-module kernel (kernels.branch): the same values bit for bit
            h = F.linear(xd, As[k])
            if factors[k] != 1.0:
                h.mul_(factors[k])
            y = base_linear(x2, Ws[k], bs[k]) if onednn else F.linear(x2, Ws[k], bs[k])
            y.addmm_(h, Bts[k])
            # in x's shape as a tensor of its own (detach: not a view made in here), which the model may then
            # modify in place through a view (DeBERTa's pos_query_layer /= ...); autograd forbids that of a view
            outs.append(y.view(*x.shape[:-1], y.shape[-1]).detach())
            hs.append(h)
        ctx.n, ctx.factors, ctx.x_shape = n, factors, x.shape
        ctx.set_materialize_grads(False)  # an output nobody reads: its sibling gets no gradient (None), as unfused
        ctx.packed = None
        if keep is not None and ctx.needs_input_grad[0]:
            ctx.packed = pack_keep(keep)
        ctx.save_for_backward(xd, *hs, *As, *Ws, *Bts)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        xd, *rest = ctx.saved_tensors
        hs, As, Ws, Bts = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        need_x = ctx.needs_input_grad[0]
        need_A = ctx.needs_input_grad[4 + 2 * n:4 + 3 * n]
        need_B = ctx.needs_input_grad[4 + 3 * n:]
        gs = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        grad_B = [None] * n
        for k in range(n):
            if need_B[k] and gs[k] is not None:
                grad_B[k] = wide((hs[k].t() @ gs[k]).t(), ctx.dtypes[n + k])  # h.T @ g: the fast layout
        grad_A = [None] * n
        grad_x = None
        live = [k for k in range(n) if gs[k] is not None]
        if live and (need_x or any(need_A)):
            # g @ B for every sibling side by side: one [N, sum r] buffer, then one GEMM each for grad A, grad x
            parts = []
            for k in live:
                part = F.linear(gs[k], Bts[k].contiguous())  # g @ B
                parts.append(part if ctx.factors[k] == 1.0 else part.mul_(ctx.factors[k]))
            gh = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            ranks = [As[k].shape[0] for k in live]
            if any(need_A):
                gA = gh.t() @ xd
                pieces = [gA] if len(live) == 1 else gA.split(ranks)
                for k, piece in zip(live, pieces):
                    if not need_A[k]:
                        continue
                    if piece.dtype is not ctx.dtypes[k]:
                        piece = piece.to(ctx.dtypes[k])  # float32 adapters: a tensor of its own
                    elif len(live) > 1:
                        piece = piece.clone()  # not a view of the shared buffer
                    grad_A[k] = piece
            if need_x:
                A = As[live[0]] if len(live) == 1 else torch.cat([As[k] for k in live])
                grad_x = gh @ A
                if ctx.packed is not None:
                    grad_x = mul_keep_(grad_x, unpack_keep(ctx.packed, grad_x.shape))
                for k in live:
                    grad_x = add_linear_t(grad_x, gs[k], Ws[k]) if ctx.onednn else grad_x.addmm_(gs[k], Ws[k])
                grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, None, *([None] * (2 * n)), *grad_A, *grad_B)


def sibling_linear(x: torch.Tensor, keep: torch.Tensor | None, factors, weights, biases, As, Bs) -> tuple:
    """The outputs ``x @ W_k.T + b_k + f_k * ((x * keep) @ A_k.T) @ B_k.T`` of n siblings (see module doc).

    ``keep``: a bool mask of x's shape shared by all siblings (None: no dropout); ``factors``: per
    sibling, scaling times 1/(1-p). Frozen weights and biases only (their gradients are not formed).
    """
    n = len(weights)
    return _SiblingLinear.apply(x, keep, tuple(float(f) for f in factors), n, *weights, *biases, *As, *Bs)
