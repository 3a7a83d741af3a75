"""train.precision bf16: the CPU kernels over a bfloat16 base and bfloat16 activations with float32 adapters.

The LoRA branch runs in bfloat16 (the adapters read as bfloat16), the adapters' gradients come back in
float32 and the input's in bfloat16. Each kernel is held to the exact math of the same bfloat16 operands
(float64) within bfloat16 rounding, and to the reference path (``layers.linear``: the input cast to
float32, as peft does) by being about as close to that exact math as the reference is.
"""
import pytest
import torch
from torch.nn import functional as F

from lorakit import LoraConfig, get_peft_model, kernels
from lorakit.kernels import SharedDropout, branch_add, fusion, generation_add, onednn
from lorakit.kernels.masks import draw_keep_mask
from lorakit.kernels.siblings import sibling_linear
from lorakit.layers import linear as linear_mod
from lorakit.layers.base import add_delta
from lorakit.layers.linear import lora_linear_delta
from tiny import ids, randomize_lora, single_thread, tiny_llama, train_step  # noqa: F401

BF16 = torch.bfloat16
# bfloat16 keeps 8 bits: one rounding is within 2**-8 of a value; the kernels' outputs and gradients take a
# few (the adapters read as bfloat16, the [N, r] product, the result), the reference's one or two
ROUND = 2 ** -8


def _relative(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _operands(n_in=48, n_out=40, r=4, adapters=torch.float32, seed=0, rows=(3, 7)):
    """x [*rows, in] and the frozen W [out, in] in bfloat16, A [r, in] and B [out, r] in ``adapters``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, n_in, generator=g).to(BF16).requires_grad_()
    W = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(BF16)
    A = (torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(adapters).requires_grad_()
    B = torch.randn(n_out, r, generator=g).to(adapters).requires_grad_()
    return x, W, A, B


def _weights(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64)


def _grads(out, params):
    """Gradients of sum(out * w) for a fixed random w (bfloat16 values: the same w for every dtype)."""
    w = _weights(out).to(BF16).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), params)


def _exact(x, W, A, B, s, keep=None):
    """The branch's math in float64 on the very operands (bfloat16 x and W, the adapters as they are)."""
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    xd = x64 if keep is None else x64 * keep
    out = x64 @ W64.t() + s * (xd @ A64.t()) @ B64.t()
    return out, _grads(out, [x64, A64, B64])


def _check(out, grads, want, want_grads, x, A, B):
    assert out.dtype == BF16 and grads[0].dtype == BF16
    assert grads[1].dtype == A.dtype and grads[2].dtype == B.dtype  # float32 adapters: float32 gradients
    assert _relative(out, want) < 2 * ROUND
    for got, exact in zip(grads, want_grads):
        assert _relative(got, exact) < 3 * ROUND


@pytest.mark.parametrize("adapters", [torch.float32, BF16])
@pytest.mark.parametrize("inplace", [True, False])
def test_branch_kernel_in_bfloat16(adapters, inplace):
    x, W, A, B = _operands(adapters=adapters)
    out = branch_add(F.linear(x, W), x, A, B, 2.5, None, inplace)
    assert out is not None and type(out.grad_fn).__name__ == "_AddBranchBackward"
    grads = _grads(out, [x, A, B])
    want, want_grads = _exact(x, W, A, B, 2.5)
    _check(out, grads, want, want_grads, x, A, B)
    # about as close to the exact math as the reference path (x cast to the adapters' dtype, the sum rounded once)
    ref = add_delta(F.linear(x, W), lora_linear_delta(x, A, B, 2.5))
    assert _relative(out, want) < 2 * _relative(ref, want) + ROUND / 4
    for got, r, exact in zip(grads, _grads(ref, [x, A, B]), want_grads):
        assert _relative(got, exact) < 2 * _relative(r, exact) + ROUND, got.shape


def test_branch_kernel_in_bfloat16_with_shared_dropout():
    x, W, A, B = _operands(rows=(3, 40))
    drop = SharedDropout(0.3).train()
    torch.manual_seed(0)
    out = branch_add(F.linear(x, W), x, A, B, 2.0, drop, True)
    dropped, scale = drop.drop(x)  # the same tensor: the cached mask
    assert dropped.dtype == BF16 and scale == pytest.approx(1 / 0.7)
    keep = (dropped != 0).double()  # x is Gaussian: no exact zeros
    assert 0.6 < keep.mean() < 0.8
    want, want_grads = _exact(x, W, A, B, 2.0 * scale, keep)
    _check(out, _grads(out, [x, A, B]), want, want_grads, x, A, B)


@pytest.mark.parametrize("rows", [(1, 1), (3, 7), (4, 40)])
@pytest.mark.parametrize("adapters", [torch.float32, BF16])
def test_generation_kernel_in_bfloat16(rows, adapters):
    """Up to 32 rows (one token at a time) the branch runs in float32 (bf16 products that small cost more
    than the casts), the sum rounded once as in the reference; more rows: in bfloat16."""
    x, W, A, B = _operands(rows=rows, adapters=adapters)
    want, _ = _exact(x, W, A, B, 1.5)
    few = x.numel() // x.shape[-1] <= 32
    with torch.no_grad():
        result = F.linear(x, W)
        out = generation_add(result, x, A, B, 1.5, None, True)
        assert out is result and out.dtype == BF16  # written into the base output
        assert _relative(out, want) < (ROUND / 2 if few else 2 * ROUND)
        ref = add_delta(F.linear(x, W), lora_linear_delta(x, A.float(), B.float(), 1.5))  # rounded once
        assert _relative(out, want) < 2 * _relative(ref, want) + ROUND / 4
        if few:
            assert _relative(out, ref) < ROUND / 8  # the reference's sum, to float32 rounding
        # float16 adapters under bfloat16 activations (or float32 ones under float16): not a kernel dtype
        assert generation_add(F.linear(x, W), x, A.half(), B.half(), 1.5, None, True) is None
        assert generation_add(F.linear(x, W).half(), x.half(), A, B, 1.5, None, True) is None


def _siblings(n, keep_p, bias, adapters=torch.float32):
    g = torch.Generator().manual_seed(0)
    outs, ranks, n_in = (40, 16, 16)[:n], (4, 2, 4)[:n], 48
    x = torch.randn(3, 7, n_in, generator=g).to(BF16).requires_grad_()
    Ws = [(torch.randn(o, n_in, generator=g) / n_in ** 0.5).to(BF16) for o in outs]
    bs = [torch.randn(o, generator=g).to(BF16) if bias else None for o in outs]
    As = [(torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(adapters).requires_grad_() for r in ranks]
    Bs = [torch.randn(o, r, generator=g).to(adapters).requires_grad_() for o, r in zip(outs, ranks)]
    keep = torch.from_numpy(draw_keep_mask(x.numel(), keep_p, 7).reshape(x.shape)) if keep_p else None
    factors = [2.0 / (1 - keep_p) * (k + 1) for k in range(n)]
    return x, keep, factors, Ws, bs, As, Bs


def _siblings_exact(x, keep, factors, Ws, bs, As, Bs):
    x64 = x.detach().double().requires_grad_()
    A64 = [A.detach().double().requires_grad_() for A in As]
    B64 = [B.detach().double().requires_grad_() for B in Bs]
    xd = x64 if keep is None else x64 * keep
    outs = [F.linear(x64, W.double(), None if b is None else b.double()) + f * (xd @ A.t()) @ B.t()
            for f, W, b, A, B in zip(factors, Ws, bs, A64, B64)]
    return outs, [x64, *A64, *B64]


def _loss(outs):
    return sum((o * _weights(o, seed=k).to(BF16).to(o.dtype)).sum() for k, o in enumerate(outs))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("keep_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapters", [torch.float32, BF16])
def test_sibling_kernel_in_bfloat16(n, keep_p, bias, adapters):
    x, keep, factors, Ws, bs, As, Bs = _siblings(n, keep_p, bias, adapters)
    outs = sibling_linear(x, keep, factors, Ws, bs, As, Bs)
    params = [x, *As, *Bs]
    grads = torch.autograd.grad(_loss(outs), params)
    want, exact_params = _siblings_exact(x, keep, factors, Ws, bs, As, Bs)
    want_grads = torch.autograd.grad(_loss(want), exact_params)
    for o, w in zip(outs, want):
        assert o.dtype == BF16 and _relative(o, w) < 2 * ROUND
    assert [g.dtype for g in grads] == [p.dtype for p in params]  # x bfloat16, the adapters their own dtype
    for g, w in zip(grads, want_grads):
        assert _relative(g, w) < 3 * ROUND


def test_bfloat16_frozen_products_are_torchs_and_float32_ones_onednns(monkeypatch):
    """The sibling kernel's frozen products: torch's bf16 matmul (measured faster here than oneDNN's
    _linear_pointwise for a training step), oneDNN's for float32 (``onednn.FROZEN_DTYPES``)."""
    if onednn._lp is None or not onednn.available():
        pytest.skip("this torch build has no oneDNN linear")
    calls = []
    real = onednn._lp
    counting = type("Counting", (), {"__call__": lambda self, *a: calls.append(a[0].dtype) or real(*a),
                                     "binary": staticmethod(lambda *a: calls.append(a[0].dtype) or real.binary(*a))})()
    monkeypatch.setattr(onednn, "_lp", counting)
    for dtype in (BF16, torch.float32):
        x, keep, factors, Ws, bs, As, Bs = _siblings(2, 0.3, True)
        x = x.detach().to(dtype).requires_grad_()
        outs = sibling_linear(x, keep, factors, [W.to(dtype) for W in Ws], [b.to(dtype) for b in bs], As, Bs)
        torch.autograd.grad(_loss(outs), [x, *As])
    assert calls == [torch.float32] * 4  # float32 only: two forward products, two accumulated input gradients


def test_shared_dropout_masks_bfloat16_and_its_gradient():
    torch.manual_seed(0)
    d = SharedDropout(0.25).train()
    x = (torch.randn(40, 60) + 10.0).to(BF16).requires_grad_()  # no zeros
    dropped, scale = d.drop(x, fresh_grads=True)
    kept = dropped != 0
    assert dropped.dtype == BF16 and abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(dropped[kept], x.detach()[kept])  # kept values untouched, no rounding
    (gx,) = torch.autograd.grad((dropped * 3.0).sum(), x)
    assert gx.dtype == BF16 and torch.equal(gx, kept.to(BF16) * 3.0)
    y = d(x)  # forward: the scaled dropout, in bfloat16
    assert y.dtype == BF16 and torch.equal(y != 0, kept)


# -- a tiny Llama cast to bfloat16 with lorakit's float32 adapters ---------------------------------

def _model(dropout=0.0, dora=False, seed=0):
    base = tiny_llama(seed).to(BF16)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                        use_dora=dora))
    randomize_lora(m)
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    return m.train()


def test_a_bfloat16_llama_trains_through_the_kernels_as_through_the_reference():
    """One training step, kernels on (the sibling kernel for q/k/v and gate/up, learned by the fused loss's
    check) and off (the reference path and the model's own loss): the loss within bfloat16 rounding, every
    LoRA gradient float32 and about as close to the float32 model's as the reference's are."""
    batch = ids(3, 9)
    m = _model()
    loss, grads, nodes = train_step(m, batch)
    with kernels.enabled_as(False):
        ref_loss, ref_grads, ref_nodes = train_step(m, batch)
    assert nodes.count("_SiblingLinearBackward") == 8 and "_SiblingLinearBackward" not in ref_nodes
    torch.testing.assert_close(loss, ref_loss, rtol=2 * ROUND, atol=1e-3)
    # the same adapters over the same (bfloat16-rounded) base, all in float32
    exact = get_peft_model(tiny_llama(0).to(BF16).float(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    exact.load_state_dict(m.state_dict())
    with kernels.enabled_as(False):
        _, exact_grads, _ = train_step(exact.train(), batch)
    assert grads.keys() == ref_grads.keys() == exact_grads.keys() and len(grads) == 2 * 7 * 2
    # each gradient ~1% off the float32 model's, kernels or not (bfloat16's rounding through the body's
    # backward); taken together, the kernels' as close as the reference's
    errors, ref_errors = [], []
    for n in grads:
        assert grads[n].dtype == torch.float32, n
        errors.append(_relative(grads[n], exact_grads[n]))
        ref_errors.append(_relative(ref_grads[n], exact_grads[n]))
        assert errors[-1] < 4e-2 and _relative(grads[n], ref_grads[n]) < 5e-2, n
    assert sum(errors) < 1.3 * sum(ref_errors)


def test_a_bfloat16_llama_with_dropout_fused_and_per_module_agree(monkeypatch):
    """With dropout (masks shared, so the same numbers whichever kernel applies them): the sibling kernel and
    the per-module branch kernel give one loss and the same float32 gradients to bfloat16 rounding."""
    batch = ids(3, 9)
    m = _model(dropout=0.1)
    train_step(m, batch, 0)  # groups learned
    loss, grads, nodes = train_step(m, batch, 1)
    with monkeypatch.context() as patch:
        patch.setattr(fusion, "fused_forward", lambda layer, x: None)
        alone, alone_grads, alone_nodes = train_step(m, batch, 1)
    assert nodes.count("_SiblingLinearBackward") == 8 and alone_nodes.count("_AddBranchBackward") == 14
    torch.testing.assert_close(loss, alone, rtol=ROUND, atol=1e-3)
    for n in grads:
        assert grads[n].dtype == torch.float32 and _relative(grads[n], alone_grads[n]) < 2e-2, n


def test_bfloat16_dora_adapters_take_the_reference():
    batch = ids(2, 6)
    m = _model(dora=True)
    loss, grads, nodes = train_step(m, batch)
    assert not {"_SiblingLinearBackward", "_AddBranchBackward"} & set(nodes)
    with kernels.enabled_as(False):
        with torch.no_grad():
            off = m(input_ids=batch).logits
    with torch.no_grad():
        on = m(input_ids=batch).logits
    assert torch.equal(on, off)  # the same path
    assert all(g.dtype == torch.float32 for g in grads.values()) and loss.isfinite()


def test_bfloat16_generation_through_the_kernel_matches_the_reference(monkeypatch):
    m = _model().eval()
    batch = ids(2, 6)
    taken = []
    real = linear_mod.generation_add

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(linear_mod, "generation_add", spy)
    with torch.no_grad():
        on = m(input_ids=batch).logits
        with kernels.enabled_as(False):
            off = m(input_ids=batch).logits
    assert len(taken) == 2 * 7 and all(taken)  # every LoRA linear, through the generation kernel
    assert on.dtype == off.dtype == BF16
    torch.testing.assert_close(on.float(), off.float(), rtol=4 * ROUND, atol=4 * ROUND * off.abs().max().item())
    assert (on.argmax(-1) == off.argmax(-1)).float().mean() > 0.9
