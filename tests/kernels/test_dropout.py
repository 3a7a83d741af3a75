import torch
import torch.utils.checkpoint as cp

from lorakit.kernels import SharedDropout, lora_delta


def _mask(d, x):
    return d.drop(x)[0] != 0


def test_forward_is_dropout_with_scale():
    torch.manual_seed(0)
    d = SharedDropout(0.2).train()
    x = torch.randn(400, 500) + 10.0           # no zeros
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.8)


def test_same_seed_reproduces_masks():
    d = SharedDropout(0.3).train()
    x1, x2 = torch.randn(50, 60), torch.randn(50, 60)
    torch.manual_seed(42)
    m1 = _mask(d, x1)
    torch.manual_seed(42)
    m2 = _mask(d, x2)
    assert torch.equal(m1, m2)


def test_masks_differ_between_steps():
    torch.manual_seed(0)
    d = SharedDropout(0.3).train()
    masks = [_mask(d, torch.randn(50, 60)) for _ in range(3)]   # each step has new tensors
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_mask_shared_only_for_the_same_unmodified_tensor():
    torch.manual_seed(0)
    d = SharedDropout(0.5).train()
    x = torch.randn(40, 70)
    first = d.drop(x)[0]
    assert d.drop(x)[0] is first                                   # same tensor: reused
    assert not torch.equal(_mask(d, x.clone()), first != 0)       # equal values, other tensor
    y = torch.randn(40, 70)
    my = _mask(d, y)
    y.mul_(2.0)                                                    # in-place change: fresh mask
    assert not torch.equal(_mask(d, y), my)


def test_eval_and_p0_are_identity():
    x = torch.randn(5, 6)
    assert SharedDropout(0.4).eval()(x) is x
    assert SharedDropout(0.0).train()(x) is x


def test_checkpoint_recomputation_regenerates_the_same_mask():
    torch.manual_seed(0)
    d = SharedDropout(0.5).train()
    A = torch.randn(4, 32, requires_grad=True)
    B = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 32, requires_grad=True)
    seen = []

    def block(h):
        hh = h * 1.0
        seen.append(_mask(d, hh))      # before the matmuls: recomputation stops after them
        return lora_delta(hh, A, B, 2.0, d)

    state = torch.get_rng_state()
    out = cp.checkpoint(block, x, use_reentrant=False)
    (out ** 2).sum().backward()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    # the gradients equal a run without checkpointing from the same RNG state
    g = (x.grad.clone(), A.grad.clone())
    x.grad = A.grad = None
    torch.set_rng_state(state)
    d.clear()
    (block(x) ** 2).sum().backward()
    torch.testing.assert_close((x.grad, A.grad), g)


def test_backward_masks_in_place_only_for_fresh_gradient_consumers():
    """A public drop() used in an op whose backward passes its gradient on as-is must not be corrupted."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    y = torch.randn(6, 8, requires_grad=True)
    d = SharedDropout(0.5).train()
    dropped, _ = d.drop(x, fresh_grads=True)
    again, _ = d.drop(x)                          # a second reader without the promise
    assert again is dropped
    (dropped + y).sum().backward()                # AddBackward hands the same gradient to both
    keep = (dropped != 0).float()
    torch.testing.assert_close(x.grad, keep)
    torch.testing.assert_close(y.grad, torch.ones_like(y))   # untouched by the mask


def test_in_place_backward_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    A = torch.randn(3, 16)
    grads = []
    for fresh in (True, False):
        d = SharedDropout(0.3).train()
        torch.manual_seed(1)
        dropped, _ = d.drop(x, fresh_grads=fresh)
        (dropped @ A.t()).pow(2).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1])


def test_where_the_dispatcher_says_torch_it_is_torchs_dropout_on_the_device():
    from lorakit import kernels

    x = torch.randn(30, 40)
    d = SharedDropout(0.3).train()
    with kernels.enabled_as(False):
        torch.manual_seed(3)
        got = d(x)
        dropped, factor = d.drop(x)
    torch.manual_seed(3)
    want = torch.nn.functional.dropout(x, 0.3, True)
    assert torch.equal(got, want) and factor == 1.0 and not torch.equal(dropped, got)  # a fresh mask each call
    assert SharedDropout(0.3).eval()(x) is x
