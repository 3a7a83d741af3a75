"""linear_cross_entropy: the LM head and the token cross-entropy without the full logits.

``sum_i CE(hidden_i @ W.T + b, target_i)``, the number HF's causal-LM loss sums, without ever
holding the [tokens, vocab] logits. The usual path writes the logits, copies them for the label
shift, writes log-softmax, and in backward writes a zero-filled gradient, the log-softmax
gradient and the shift's gradient: six passes over the largest tensor of a step (200 MB for 1024
tokens of a 49k vocabulary), each a fresh allocation. Here each chunk of rows gets its logits, its
log-softmax and, while they are in hand, the gradient of the loss with respect to the hidden rows
(``(softmax - onehot) @ W``): backward only scales that saved [tokens, hidden] tensor. The GEMMs are
the same ones autograd would run; the loss and gradients agree with the plain path to float32
rounding (tests/kernels/test_cross_entropy.py).

Which form runs is ``kernels.dispatch``'s choice (``Choice.head``):

* ``chunked``: row chunks over the whole vocabulary. Trainable heads (``W`` or ``b`` requiring grad)
  also get their gradient accumulated per chunk; half-precision heads compute logits in their dtype and
  the softmax in float32, as HF's loss does.
* ``one-pass`` (a float32 or bfloat16 frozen head on the CPU, the usual LoRA case there): row chunks over
  the whole vocabulary make two products per chunk that each read the head, and with few rows (a short answer:
  1-3 labelled tokens a row) they are memory-bound skinny GEMMs that MKL runs badly; with many rows the
  [rows, vocab] logits and their softmax pass through memory several times. So the head is walked in
  vocabulary blocks instead, once per 1024 rows: each block's logits, a running maximum and sum (the
  online softmax) and the running ``softmax @ W`` are formed while the block is in cache.
* ``one-pass-onednn``: the same with oneDNN's products (``kernels.onednn``), which have no slow layout
  for few rows.

A bfloat16 head (train.precision bf16) in one pass: both products in bfloat16 (each block's logits
rounded to bfloat16 as the model's own head rounds them; the block's probabilities rounded to bfloat16
for ``softmax @ W``), everything summed in float32: the running maximum and sum, the log-sum-exp, the
running ``softmax @ W`` and the gradient, which is rounded to ``hidden``'s dtype only in backward. The
loss is then the model's own (bfloat16 logits, float32 cross-entropy) to float32 rounding, and the
products run at bfloat16 speed: faster than the float32 one-pass where the CPU has bfloat16 dot products,
and than chunked, whose float32 passes over [rows, vocab] cost nearly as much as its products.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..constants import IGNORE_INDEX
from . import dispatch, guards
from . import onednn

__all__ = ["linear_cross_entropy"]

#: logits held at once, in elements (64 MiB of float32, 341 rows of a 49k vocabulary): bounded
#: memory, and GEMMs tall enough to run near the machine's peak (128-row chunks cost ~10% more)
_CHUNK_ELEMENTS = 16 * 1024 * 1024
#: below this many rows the transposed products are faster on MKL (a 49k vocabulary)
_FEW_ROWS = 64
#: a frozen head is read once per this many rows, in vocabulary blocks (see above)
_ONE_PASS_ROWS = 1024
#: vocabulary rows per block of the one-pass path (2048 x 576 float32 = 4.5 MiB: in L3 for both
#: products); half that above _WIDE_BLOCK_ROWS rows, so the [block, rows] logits stay a few MiB
_VOCAB_BLOCK = 2048
_WIDE_BLOCK_ROWS = 256


def _chunk_rows(vocab: int, rows: int) -> int:
    return max(1, min(rows, _CHUNK_ELEMENTS // max(vocab, 1)))


def _one_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              need_h: bool, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy and its float32 gradient w.r.t. ``hidden``, reading the head once.

    Online softmax over vocabulary blocks: with m the running maximum of a row's logits and
    s = sum exp(logit - m), a block with a larger maximum m' rescales s and the running
    ``sum_v exp(logit_v - m) W_v`` by exp(m - m'). At the end lse = m + log s and the gradient of
    CE w.r.t. the row is ``(sum_v exp(logit_v - m) W_v) / s - W_target``. A bfloat16 head: both
    products in bfloat16 (see the module doc), m, s and the running sum in float32.
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    h_t = hidden.t()
    # a finite start: a block whose logits are all -inf (a bias masking part of the vocabulary) then
    # rescales by exp(0) and adds exp(-inf) = 0 instead of making NaN from -inf - -inf
    run_max = hidden.new_full((1, n), torch.finfo(torch.float32).min, dtype=torch.float32)
    run_sum = hidden.new_zeros((1, n), dtype=torch.float32)
    acc = hidden.new_zeros(hidden.shape, dtype=torch.float32) if need_h else None
    buf = hidden.new_empty((min(block, vocab), n), dtype=torch.float32)
    exact = weight.dtype == torch.float32
    for v0 in range(0, vocab, block):
        w_b = weight[v0:v0 + block]
        b_b = None if bias is None else bias[v0:v0 + block, None]
        if exact:                                                 # [block, n]: the fast layout for few rows
            logits = torch.mm(w_b, h_t, out=buf[:w_b.shape[0]])
            if b_b is not None:
                logits.add_(b_b)
        else:  # bfloat16 logits (as the model's own head makes them), float32 from here on
            logits = buf[:w_b.shape[0]].copy_(torch.mm(w_b, h_t) if b_b is None else torch.addmm(b_b, w_b, h_t))
        new_max = torch.maximum(run_max, logits.amax(0, keepdim=True))
        rescale = (run_max - new_max).exp_()
        probs = logits.sub_(new_max).exp_()                       # unnormalised, relative to the new maximum
        run_sum.mul_(rescale).add_(probs.sum(0, keepdim=True))
        if acc is not None:
            acc.mul_(rescale.t())
            if exact:
                acc.addmm_(probs.t(), w_b)
            else:
                acc.add_(torch.mm(probs.t().to(weight.dtype), w_b))
        run_max = new_max
    return _finish(hidden, weight, bias, targets, run_max.t(), run_sum.t(), acc)


def _finish(hidden, weight, bias, targets, run_max, run_sum, acc) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE and float32 grad w.r.t. ``hidden`` from an online softmax's running max, sum and
    ``sum exp W`` (``run_max``, ``run_sum``: [rows, 1], float32)."""
    w_target = weight.index_select(0, targets)
    target_logit = (hidden.float() * w_target.float()).sum(1)
    if bias is not None:
        target_logit = target_logit + bias.index_select(0, targets).float()
    if weight.dtype != torch.float32:  # rounded as the block products round every other logit
        target_logit = target_logit.to(weight.dtype).float()
    total = (run_max + run_sum.log()).squeeze(1).sub(target_logit).sum()
    grad_h = acc.div_(run_sum).sub_(w_target) if acc is not None else None
    return total, grad_h


def _one_pass_onednn(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     need_h: bool, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_one_pass`` with oneDNN's products (``kernels.onednn``), logits laid out [rows, block]."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    run_max = hidden.new_full((n, 1), torch.finfo(torch.float32).min, dtype=torch.float32)  # see _one_pass
    run_sum = hidden.new_zeros((n, 1), dtype=torch.float32)
    acc = hidden.new_zeros(hidden.shape, dtype=torch.float32) if need_h else None
    exact = weight.dtype == torch.float32
    for v0 in range(0, vocab, block):
        w_b = weight[v0:v0 + block]
        logits = onednn.base_linear(hidden, w_b, None if bias is None else bias[v0:v0 + block]).float()
        new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
        rescale = (run_max - new_max).exp_()
        probs = logits.sub_(new_max).exp_()
        run_sum.mul_(rescale).add_(probs.sum(1, keepdim=True))
        if acc is not None:
            if exact:
                acc = onednn.add_linear_t(acc.mul_(rescale), probs, w_b)
            else:  # the bfloat16 product of this block, summed in float32
                acc.mul_(rescale).add_(onednn.base_linear(probs.to(weight.dtype), w_b.t()))
        run_max = new_max
    return _finish(hidden, weight, bias, targets, run_max, run_sum, acc)


def _blocked(hidden, weight, bias, targets, need_h: bool, use_onednn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen-head path: ``_one_pass`` per group of ``_ONE_PASS_ROWS`` rows (gradient in float32)."""
    n = hidden.shape[0]
    one_pass = _one_pass
    block = _VOCAB_BLOCK if n <= _WIDE_BLOCK_ROWS else _VOCAB_BLOCK // 2
    if use_onednn and onednn.usable(hidden, weight, bias):
        one_pass, block = _one_pass_onednn, _VOCAB_BLOCK
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    for start in range(0, n, _ONE_PASS_ROWS):
        end = min(n, start + _ONE_PASS_ROWS)
        part, g = one_pass(hidden[start:end], weight, bias, targets[start:end], need_h, block)
        total += part
        if g is not None:
            grad_h[start:end] = g
    return total, grad_h


def _chunked(hidden, weight, bias, targets, chunk: int, half_scale: float, need_h: bool, need_w: bool,
             need_b: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Row chunks over the whole vocabulary: trainable heads and half precision."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    fp32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
    rows = min(chunk, n)
    if fp32 and n:
        # two buffers reused by every chunk: no fresh multi-MB allocation per chunk
        buf_logits = hidden.new_empty((rows, vocab))
        buf_logp = hidden.new_empty((rows, vocab))
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h, t = hidden[start:end], targets[start:end]
        m = end - start
        if fp32:
            if m <= _FEW_ROWS:  # few rows: [V, m] = W @ h.T then transposed is the faster GEMM
                logits = buf_logits[:m].copy_(torch.mm(weight, h.t()).t())
            else:
                logits = torch.mm(h, weight.t(), out=buf_logits[:m])
            if bias is not None:
                logits.add_(bias)
            logp = guards.log_softmax_into(logits, buf_logp[:m])
        else:
            logp = torch.log_softmax(F.linear(h, weight, bias).float(), dim=1)
        total += logp.gather(1, t.unsqueeze(1)).sum().neg()
        if not (need_h or need_w or need_b):
            continue
        probs = logp.exp_()  # d loss / d logits = softmax - onehot
        probs[torch.arange(m, device=probs.device), t] -= 1.0
        # half precision: scale before rounding to the head's dtype, where HF's loss has its 1/N
        g = probs if fp32 else (probs if half_scale == 1.0 else probs * half_scale).to(weight.dtype)
        if need_h:
            if fp32 and m > 4 * _FEW_ROWS:
                torch.mm(g, weight, out=grad_h[start:end])
            else:  # up to ~256 rows, (W.T @ g.T).T runs 5-30% faster than g @ W
                grad_h[start:end].copy_(torch.mm(weight.t(), g.t()).t())
        if need_w:
            grad_w.addmm_(probs.t(), h.float())
        if need_b:
            grad_b += probs.sum(0)
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, half_scale: float):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        fp32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
        route = dispatch.head_route(hidden, weight, bias, frozen=not (need_w or need_b))
        if route != dispatch.CHUNKED:
            (total, grad_h), grad_w, grad_b = (_blocked(hidden, weight, bias, targets, need_h,
                                                        route == dispatch.ONE_PASS_ONEDNN), None, None)
        else:
            total, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, targets, chunk, half_scale,
                                                     need_h, need_w, need_b)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        # only the chunked half-precision path rounds a scaled gradient (the one-pass one keeps float32)
        ctx.half_scale = 1.0 if fp32 or route != dispatch.CHUNKED else half_scale
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hdt, wdt, bdt = ctx.dtypes
        # grad_h already holds half_scale (half precision only): the usual backward grad is 1/N * 1.0 there
        g_h = grad if ctx.half_scale == 1.0 else grad / ctx.half_scale
        out_h = (grad_h * g_h.to(grad_h.dtype)).to(hdt) if grad_h is not None else None
        out_w = (grad_w * grad).to(wdt) if grad_w is not None else None
        out_b = (grad_b * grad).to(bdt) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         chunk_rows: int | None = None, half_scale: float = 1.0) -> torch.Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T + bias, targets)``, in float32.

    hidden [..., H], weight [V, H], targets [...] (rows equal to ``ignore_index`` count nothing).
    Divide by the number of counted rows for the mean. ``half_scale``: for a half-precision head, the
    factor the caller will multiply the sum by (1/N for a mean): the logits' gradient is then rounded
    to the head's dtype after scaling, as in HF's loss, which gives the same gradients bit for bit
    when the loss's own gradient is 1. Float32 ignores it.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         f"need hidden [..., H] with targets [...]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not map hidden size {hidden.shape[-1]} to a vocabulary")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal {ignore_index}; "
                         f"got values in [{int(targets.min())}, {int(targets.max())}]")
    chunk = chunk_rows or _chunk_rows(weight.shape[0], hidden.shape[0])
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, bias, targets, int(chunk), float(half_scale))
