"""ops.siblings: n frozen linears + LoRA reading one input, one autograd node, against the plain formula."""
import pytest
import torch
from torch.nn import functional as F

from lorakit.kernels import lora_add
from lorakit.kernels.masks import draw_keep_mask
from lorakit.kernels.siblings import sibling_linear


def _setup(outs=(10, 6, 6), ranks=(4, 2, 4), n_in=12, bias=True, dtype=torch.float64, keep_p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, n_in, generator=g, dtype=dtype).requires_grad_()
    Ws = [torch.randn(o, n_in, generator=g, dtype=dtype) for o in outs]
    bs = [torch.randn(o, generator=g, dtype=dtype) if bias else None for o in outs]
    As = [torch.randn(r, n_in, generator=g, dtype=dtype).requires_grad_() for r in ranks]
    Bs = [torch.randn(o, r, generator=g, dtype=dtype).requires_grad_() for o, r in zip(outs, ranks)]
    keep = None
    if keep_p:
        keep = torch.from_numpy(draw_keep_mask(x.numel(), keep_p, 7).reshape(x.shape))
    factors = [2.0 / (1 - keep_p) * (k + 1) for k in range(len(outs))]
    return x, keep, factors, Ws, bs, As, Bs


def _reference(x, keep, factors, Ws, bs, As, Bs):
    xd = x if keep is None else x * keep
    return [F.linear(x, W, b) + f * (xd @ A.t()) @ B.t() for f, W, b, A, B in zip(factors, Ws, bs, As, Bs)]


def _loss(outs, used):
    g = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for k, o in enumerate(outs) if k in used)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("keep_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_and_gradients_equal_the_formula(n, keep_p, bias):
    x, keep, factors, Ws, bs, As, Bs = _setup(keep_p=keep_p, bias=bias)
    args = (x, keep, factors[:n], Ws[:n], bs[:n], As[:n], Bs[:n])
    outs = sibling_linear(*args)
    ref = _reference(*args)
    assert len(outs) == n
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    params = [x, *As[:n], *Bs[:n]]
    got = torch.autograd.grad(_loss(outs, range(n)), params)
    want = torch.autograd.grad(_loss(ref, range(n)), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unused_outputs_contribute_nothing():
    """A sibling whose output nobody reads (None gradient in backward) gets no gradient and adds none."""
    x, keep, factors, Ws, bs, As, Bs = _setup()
    outs = sibling_linear(x, keep, factors, Ws, bs, As, Bs)
    ref = _reference(x, keep, factors, Ws, bs, As, Bs)
    loss = _loss(outs, {0, 2})
    loss.backward()
    got = [x.grad.clone(), *(A.grad.clone() for A in As[::2]), *(B.grad.clone() for B in Bs[::2])]
    assert As[1].grad is None and Bs[1].grad is None
    for t in [x, *As, *Bs]:
        t.grad = None
    _loss(ref, {0, 2}).backward()
    want = [x.grad, *(A.grad for A in As[::2]), *(B.grad for B in Bs[::2])]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, keep, factors, Ws, bs, As, Bs = _setup(outs=(3, 2), ranks=(2, 1), n_in=4)
    x = x[:1, :2].detach().requires_grad_()
    keep = keep[:1, :2].contiguous()
    fn = lambda x, a0, a1, b0, b1: sibling_linear(x, keep, factors[:2], Ws[:2], bs[:2], [a0, a1], [b0, b1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, As[0], As[1], Bs[0], Bs[1]))


def test_frozen_input_gets_no_gradient_and_adapters_still_train():
    x, keep, factors, Ws, bs, As, Bs = _setup()
    x = x.detach()
    outs = sibling_linear(x, keep, factors, Ws, bs, As, Bs)
    grads = torch.autograd.grad(_loss(outs, {0, 1, 2}), [*As, *Bs])
    want = torch.autograd.grad(_loss(_reference(x, keep, factors, Ws, bs, As, Bs), {0, 1, 2}), [*As, *Bs])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_outputs_do_not_depend_on_grouping():
    """A sibling's output is the same bits whether it ran with its group or alone (a learning step and a
    fused one agree), and equals the per-module path to float32 rounding."""
    x, keep, factors, Ws, bs, As, Bs = _setup(dtype=torch.float32, keep_p=0.0)
    with torch.no_grad():
        outs = sibling_linear(x, None, factors, Ws, bs, As, Bs)
        for k, o in enumerate(outs):
            alone = sibling_linear(x, None, factors[k:k + 1], Ws[k:k + 1], bs[k:k + 1], As[k:k + 1], Bs[k:k + 1])[0]
            assert torch.equal(o, alone)
    for k, o in enumerate(outs):
        x2 = x.detach().clone().requires_grad_()  # lora_add's autograd kernel, as a training layer runs it
        per_module = lora_add(F.linear(x2, Ws[k], bs[k]), x2, As[k], Bs[k], factors[k], None, True)
        torch.testing.assert_close(o, per_module.detach(), rtol=1e-5, atol=1e-5)
