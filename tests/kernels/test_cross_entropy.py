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


FORMS = ("chunked", "one-pass", "one-pass-onednn")


def _forced(monkeypatch, form):
    """linear_cross_entropy runs ``form`` whatever the dispatcher would choose."""
    from lorakit.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy.dispatch, "head_route", lambda *a, **k: form)


def _bf16_head(n, h=48, v=300, seed=0, bias=False, spread=None):
    """bfloat16 hidden rows (requiring grad), a frozen bfloat16 head (``spread``: row scales of the head,
    so the logits' range grows along the vocabulary), targets; and the same values in float64."""
    hidden, weight, b, targets = _data(n=n, h=h, v=v, dtype=torch.float32, seed=seed, bias=bias)
    weight = weight.detach()
    if spread is not None:
        weight = weight * torch.linspace(*spread, v).unsqueeze(1)
    low = [t.detach().to(torch.bfloat16) if t is not None else None for t in (hidden, weight, b)]
    low[0].requires_grad_()
    return (*low, targets)


def _upcast(hidden, weight, b, targets):
    """The model's own loss for a bfloat16 head (bfloat16 logits, cross-entropy in float32: HF's
    ``logits.float()``) and the exact loss of the same bfloat16 values (float64); each as (sum, gradient of
    ``sum / rows`` w.r.t. ``hidden``: the mean, as a training step takes it) in float64, and ``rows``."""
    rows = int((targets != -100).sum())

    def loss_and_grad(x, logits_of):
        x = x.detach().clone().requires_grad_()
        loss = F.cross_entropy(logits_of(x), targets, reduction="sum", ignore_index=-100)
        (g,) = torch.autograd.grad(loss / rows, x)
        return loss.double(), g.double()

    own = loss_and_grad(hidden, lambda x: F.linear(x, weight, b).float())
    wide = [None if t is None else t.double() for t in (weight, b)]
    exact = loss_and_grad(hidden.double(), lambda x: F.linear(x, *wide))
    return own, exact, rows


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_head_each_form_matches_the_upcast_reference(monkeypatch, form, bias):
    """A bfloat16 head (train.precision bf16): the loss is float32, as the model's own (bfloat16 logits,
    float32 softmax) to float32 rounding of its sum; the gradient has hidden's dtype and is the exact one to
    bfloat16 rounding. Several vocabulary blocks whose maxima grow, so the one-pass forms rescale."""
    from lorakit.kernels import cross_entropy

    _forced(monkeypatch, form)
    monkeypatch.setattr(cross_entropy, "_VOCAB_BLOCK", 64)
    hidden, weight, b, targets = _bf16_head(n=37, bias=bias, spread=(0.2, 3.0))
    targets[[4, 11]] = -100
    (own, g_own), (exact, g_exact), rows = _upcast(hidden, weight, b, targets)
    out = linear_cross_entropy(hidden, weight, targets, bias=b, half_scale=1.0 / rows)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), own, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.double(), exact, rtol=2e-3, atol=0)  # bfloat16 logits: ~1e-3 of a logit
    (got,) = torch.autograd.grad(out / rows, hidden)
    assert got.dtype == torch.bfloat16
    scale = g_exact.abs().max().item()
    assert scale > 0
    # each entry within a few bfloat16 roundings (2**-8) of the gradient's scale, as the model's own
    for want in (g_exact, g_own):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)
    assert (got.double() - g_exact).abs().max() <= 2 * (g_own - g_exact).abs().max() + 2 ** -8 * scale


@pytest.mark.parametrize("n", [5, 300])  # one block layout for few rows, the other for many (_WIDE_BLOCK_ROWS)
def test_bfloat16_one_pass_forms_agree_with_chunked_and_run_for_a_frozen_head(monkeypatch, n):
    from lorakit.kernels import cross_entropy

    calls = []
    for name in ("_one_pass", "_one_pass_onednn"):
        real = getattr(cross_entropy, name)
        monkeypatch.setattr(cross_entropy, name, lambda *a, real=real: calls.append(a[0].dtype) or real(*a))
    hidden, weight, _, targets = _bf16_head(n=n, v=5000)
    results = {}
    for form in (None, *FORMS):  # None: the dispatcher's choice
        if form is not None:
            _forced(monkeypatch, form)
        out = linear_cross_entropy(hidden, weight, targets)
        results[form] = (out, torch.autograd.grad(out, hidden)[0])
    assert calls[0] == torch.bfloat16  # the dispatcher sends a frozen bfloat16 head to one pass
    for form, (out, grad) in results.items():
        torch.testing.assert_close(out, results["chunked"][0], rtol=1e-5, atol=1e-3, msg=str(form))
        assert grad.dtype == torch.bfloat16
        ref = results["chunked"][1].float()
        torch.testing.assert_close(grad.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item(), msg=str(form))
    calls.clear()
    monkeypatch.undo()
    trainable = weight.detach().clone().requires_grad_()
    out = linear_cross_entropy(hidden, trainable, targets)  # a head that trains: chunked
    gh, gw = torch.autograd.grad(out, [hidden, trainable])
    assert calls == [] and gw.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(out, results["chunked"][0], rtol=0, atol=0)


def test_bfloat16_one_pass_with_a_masked_vocabulary_block(monkeypatch):
    from lorakit.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "_VOCAB_BLOCK", 10)
    hidden, weight, b, targets = _bf16_head(n=6, h=8, v=50, bias=True)
    b = b.clone()
    b[:20] = float("-inf")
    targets = targets % 30 + 20
    (own, g_own), _, rows = _upcast(hidden, weight, b, targets)
    for form in ("one-pass", "one-pass-onednn"):
        _forced(monkeypatch, form)
        out = linear_cross_entropy(hidden, weight, targets, bias=b)
        assert torch.isfinite(out)
        torch.testing.assert_close(out.double(), own, rtol=1e-5, atol=1e-3)
        (got,) = torch.autograd.grad(out / rows, hidden)
        torch.testing.assert_close(got.double(), g_own, rtol=2e-2, atol=2e-2 * g_own.abs().max().item())


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
