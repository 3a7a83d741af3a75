import pytest
import torch
from torch import nn

from lorakit.kernels import SharedDropout, lora_delta


def _params(n_in=12, n_out=10, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64).requires_grad_()
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(3, 5, n_in, generator=g, dtype=torch.float64).requires_grad_()
    return x, A, B


def _grads(out, *ts):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), ts)


@pytest.mark.parametrize("dropout", [None, "p0", "eval"])
def test_no_dropout_equals_plain_formula(dropout):
    x, A, B = _params()
    d = {None: None, "p0": SharedDropout(0.0), "eval": SharedDropout(0.3).eval()}[dropout]
    out = lora_delta(x, A, B, 2.5, d)
    ref = (x @ A.t() @ B.t()) * 2.5
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(_grads(out, x, A, B), _grads(ref, x, A, B)):
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


def test_float32_dropout0_matches_reference_exactly_enough():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=g)
    A, B = torch.randn(8, 96, generator=g), torch.randn(40, 8, generator=g)
    torch.testing.assert_close(lora_delta(x, A, B, 4.0, None), x @ A.t() @ B.t() * 4.0)


def test_other_dropout_modules_are_called():
    x, A, B = _params()
    out = lora_delta(x, A, B, 1.0, nn.Identity())
    torch.testing.assert_close(out, x @ A.t() @ B.t())


def test_dropout_forward_and_grads_equal_explicit_masked_formula():
    p, s = 0.25, 3.0
    x, A, B = _params(n_in=64, n_out=32)
    d = SharedDropout(p).train()
    out = lora_delta(x, A, B, s, d)
    dropped, _ = d.drop(x)                       # same tensor -> the cached dropped input
    mask = (dropped != 0).to(x.dtype)            # x is Gaussian: no exact zeros
    ref = ((x * mask / (1 - p)) @ A.t() @ B.t()) * s
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(_grads(out, x, A, B), _grads(ref, x, A, B)):
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


def test_shared_mask_sums_gradients_of_all_readers():
    p = 0.5
    x, A, B = _params(n_in=32, n_out=16)
    _, A2, B2 = _params(n_in=32, n_out=16, seed=9)
    d = SharedDropout(p).train()
    out = lora_delta(x, A, B, 2.0, d) + lora_delta(x, A2, B2, 0.5, d)
    mask = (d.drop(x)[0] != 0).to(x.dtype)
    xd = x * mask / (1 - p)
    ref = xd @ A.t() @ B.t() * 2.0 + xd @ A2.t() @ B2.t() * 0.5
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(_grads(out, x, A, B, A2, B2), _grads(ref, x, A, B, A2, B2)):
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


def test_input_without_grad_still_trains_A_and_B():
    x, A, B = _params()
    x = x.detach()
    d = SharedDropout(0.2).train()
    gA, gB = torch.autograd.grad(lora_delta(x, A, B, 1.0, d).sum(), (A, B))
    assert gA.abs().sum() > 0 and gB.abs().sum() > 0


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_add_equals_base_plus_delta_with_gradients(inplace, p):
    from lorakit.kernels import lora_add

    x, A, B = _params(n_in=64, n_out=32)
    base_w = torch.randn(32, 64, dtype=torch.float64)
    d = SharedDropout(p).train()
    torch.manual_seed(5)
    out = lora_add(x @ base_w.t(), x, A, B, 2.0, d, inplace)
    torch.manual_seed(5)
    d.clear()
    ref = x @ base_w.t() + lora_delta(x, A, B, 2.0, d)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(_grads(out, x, A, B), _grads(ref, x, A, B)):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-10)


def test_lora_add_in_place_reuses_the_base_output_and_no_grad_path_agrees():
    from lorakit.kernels import lora_add

    x, A, B = _params()
    base = torch.zeros(3, 5, 10, dtype=torch.float64)
    with torch.no_grad():
        out = lora_add(base, x, A, B, 1.5, None, True)
    assert out.data_ptr() == base.data_ptr()
    torch.testing.assert_close(out, (x @ A.t() @ B.t() * 1.5).detach())
    view_base = torch.zeros(3, 10, 5, dtype=torch.float64).transpose(1, 2)  # not contiguous: no in-place
    out2 = lora_add(view_base, x, A, B, 1.5, None, True)
    assert out2.data_ptr() != view_base.data_ptr() and not view_base.any()


# -- the kernels against the reference math (layers.linear) ------------------------------------

def _reference(base_out, x, A, B, s):
    from lorakit.layers.linear import lora_linear_delta

    return base_out + lora_linear_delta(x, A, B, s)


def test_generation_kernel_equals_the_reference_and_declines_unfit_operands():
    from lorakit.kernels import generation_add

    x, A, B = _params()
    base_w = torch.randn(10, 12, dtype=torch.float64)
    with torch.no_grad():
        want = _reference(x @ base_w.t(), x, A, B, 1.5)
        result = x @ base_w.t()
        out = generation_add(result, x, A, B, 1.5, None, True)
        assert out is result  # written into the base output
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        assert generation_add(x @ base_w.t(), x, A, B, 1.5, None, False) is None  # may not write the output
        assert generation_add((x @ base_w.t()).float(), x, A, B, 1.5, None, True) is None  # dtypes differ
        odd = torch.zeros(3, 10, 5, dtype=torch.float64).transpose(1, 2)
        assert generation_add(odd, x, A, B, 1.5, None, True) is None and not odd.any()


@pytest.mark.parametrize("inplace", [True, False])
def test_autograd_kernel_equals_the_reference_with_gradients(inplace):
    from lorakit.kernels import branch_add

    x, A, B = _params()
    base_w = torch.randn(10, 12, dtype=torch.float64)
    out = branch_add(x @ base_w.t(), x, A, B, 2.5, None, inplace)
    ref = _reference(x @ base_w.t(), x, A, B, 2.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(_grads(out, x, A, B), _grads(ref, x, A, B)):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-10)
    frozen = [t.detach() for t in (x, A, B)]
    assert branch_add(frozen[0] @ base_w.t(), *frozen, 2.5, None, inplace) is None  # nothing needs a gradient


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_a_lora_layer_through_its_kernels_equals_its_reference_path(conv1d, grad):
    from lorakit import kernels
    from lorakit.layers import LoraLinear

    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(10, 12)
    else:
        base = nn.Linear(12, 10)
    layer = LoraLinear(base.requires_grad_(False))
    layer.add_adapter("default", 4, 8, 2.0, None, "gaussian")
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.set_active(["default"])
    x = torch.randn(3, 5, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
        with kernels.enabled_as(False):
            ref = layer(x)
    node = type(out.grad_fn).__name__ if out.grad_fn is not None else None
    # a plain nn.Linear trains in the sibling kernel (a group of one), Conv1D in the per-module one
    assert node == (None if not grad else "_AddBranchBackward" if conv1d else "_SiblingLinearBackward")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if grad:
        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        for g, gr in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)
