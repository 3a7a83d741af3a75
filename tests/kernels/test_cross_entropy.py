import pytest
import torch
from torch.nn import functional as F

from lorakit.kernels import linear_cross_entropy


def _data(n=23, h=16, v=50, dtype=torch.float64, seed=0, bias=False, train_head=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_(train_head)
    b = (torch.randn(v, generator=g, dtype=dtype).requires_grad_(train_head)) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk", [None, 1, 5, 23, 100])
@pytest.mark.parametrize("bias,train_head", [(False, False), (True, True), (False, True)])
def test_equals_linear_then_cross_entropy_with_gradients(chunk, bias, train_head):
    hidden, weight, b, targets = _data(bias=bias, train_head=train_head, dtype=torch.float32)
    targets[[2, 7]] = -100
    out = linear_cross_entropy(hidden, weight, targets, bias=b, chunk_rows=chunk)
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum", ignore_index=-100)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    params = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(out * 0.7, params)
    want = torch.autograd.grad(ref * 0.7, params)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_bfloat16_head_matches_the_upcast_reference():
    hidden, weight, _, targets = _data(dtype=torch.bfloat16, v=64)
    out = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    (gh,) = torch.autograd.grad(out, hidden)
    (rh,) = torch.autograd.grad(ref, hidden)
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)


def test_leading_dims_and_no_grad():
    hidden, weight, _, targets = _data(n=12)
    with torch.no_grad():
        out = linear_cross_entropy(hidden.view(3, 4, -1), weight, targets.view(3, 4))
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(out, ref.float())


def test_all_rows_ignored_gives_zero_and_zero_grad():
    hidden, weight, _, targets = _data(n=4, dtype=torch.float32)
    out = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert out.item() == 0.0
    out.backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_bad_inputs_are_named():
    hidden, weight, _, targets = _data(n=4)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_cross_entropy(hidden, weight, targets + 1000)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(hidden, weight[:, :5], targets)


@pytest.mark.parametrize("n", [40, 100, 300])  # the few-rows and the many-rows GEMM layouts
def test_row_count_layouts_agree(n):
    hidden, weight, _, targets = _data(n=n, h=24, v=70, dtype=torch.float32, train_head=True)
    out = linear_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    for a, e in zip(torch.autograd.grad(out, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [7, 16, 50, 4096])  # uneven last block, several blocks, one block
@pytest.mark.parametrize("bias", [False, True])
def test_one_pass_over_vocabulary_blocks_matches_the_reference(monkeypatch, block, bias):
    # a frozen float32 head with few rows reads the head once, block by block (online softmax); the
    # logits span a wide range so that later blocks raise the running maximum many times
    from lorakit.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "_VOCAB_BLOCK", block)
    hidden, weight, b, targets = _data(n=9, h=12, v=50, dtype=torch.float32, bias=bias)
    weight = (weight * torch.linspace(0.1, 8.0, 50).unsqueeze(1)).detach()  # maxima grow along the vocabulary
    targets[3] = -100
    out = linear_cross_entropy(hidden, weight, targets, bias=b)
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum", ignore_index=-100)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    (got,) = torch.autograd.grad(out * 0.3, hidden)
    (want,) = torch.autograd.grad(ref * 0.3, hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, bias=b), ref, rtol=1e-5, atol=1e-4)


def test_one_pass_is_used_for_few_rows_and_not_for_a_trainable_head(monkeypatch):
    from lorakit.kernels import cross_entropy

    calls = []
    for name in ("_one_pass", "_one_pass_onednn"):  # the second where oneDNN is usable (ops.frozen_linear)
        real = getattr(cross_entropy, name)
        monkeypatch.setattr(cross_entropy, name, lambda *a, real=real: calls.append(a[0].shape[0]) or real(*a))
    hidden, weight, _, targets = _data(n=5, dtype=torch.float32)
    linear_cross_entropy(hidden, weight, targets).backward()
    assert calls == [5]
    linear_cross_entropy(hidden, weight.detach().requires_grad_(), targets).backward()  # head grads: chunked path
    linear_cross_entropy(hidden.double(), weight.double(), targets).backward()  # not float32: chunked path
    assert calls == [5]
    monkeypatch.setattr(cross_entropy, "_ONE_PASS_ROWS", 4)  # rows in groups, each one pass
    hidden, weight, _, targets = _data(n=11, dtype=torch.float32)
    out = linear_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(out, hidden)[0], torch.autograd.grad(ref, hidden)[0],
                               rtol=1e-4, atol=1e-5)
    assert calls == [5, 4, 4, 3]


@pytest.mark.parametrize("n", [3, 40])
def test_one_pass_layouts_agree(n):
    """The oneDNN row-major one-pass and MKL's block-major one agree (and with the plain loss)."""
    from lorakit.kernels import cross_entropy, onednn as frozen_linear

    hidden, weight, bias, targets = _data(n=n, dtype=torch.float32, bias=True)
    hidden = hidden.detach()  # the kernels run inside the loss's autograd node, on plain tensors
    for b in (None, bias):
        t1, g1 = cross_entropy._one_pass(hidden, weight, b, targets, True, 16)
        t2, g2 = cross_entropy._one_pass_onednn(hidden, weight, b, targets, True, 16)
        ref = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
        torch.testing.assert_close(t1, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(t2, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert frozen_linear.usable(hidden, weight) == frozen_linear.available()


def test_one_pass_with_a_vocabulary_block_masked_to_minus_infinity(monkeypatch):
    from lorakit.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "_VOCAB_BLOCK", 10)
    hidden, weight, b, targets = _data(n=6, h=8, v=50, dtype=torch.float32, bias=True)
    b = b.detach().clone()
    b[:20] = float("-inf")            # the first two blocks can never be predicted
    targets = targets % 30 + 20
    out = linear_cross_entropy(hidden, weight, targets, bias=b)
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(out, hidden)[0], torch.autograd.grad(ref, hidden)[0],
                               rtol=1e-4, atol=1e-5)
