"""kernels.onednn: the base model's frozen products through oneDNN, equal to F.linear to float32 rounding;
without the private op (or with a broken one) torch's own products run, with the same numbers."""
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorakit import LoraConfig, get_peft_model, kernels
from lorakit.kernels import guards
from lorakit.kernels import onednn as fl
from tiny import graph_nodes, ids, randomize_lora, tiny_llama


@pytest.fixture
def without_onednn(monkeypatch):
    """This torch as if it had no oneDNN linear (the private op taken away, the process's check undone)."""
    monkeypatch.setattr(fl, "_lp", None)
    monkeypatch.setattr(fl, "_checked", {})
    monkeypatch.setattr(guards, "_said", set())


def _data(shape=(3, 5, 24), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    W = torch.randn(16, shape[-1], generator=g)
    b = torch.randn(16, generator=g) if bias else None
    return x, W, b


def test_the_oneDNN_products_equal_F_linear_and_the_kernels_use_them(monkeypatch):
    if fl._lp is None:
        pytest.skip("this torch build has no oneDNN linear; test_without_the_private_op covers the fallback")
    assert fl.available()
    x, W, b = _data()
    torch.testing.assert_close(fl._lp(x, W, b, "none", [], ""), F.linear(x, W, b), rtol=1e-5, atol=1e-5)
    acc, g = torch.randn(11, 24), torch.randn(11, 16)
    torch.testing.assert_close(fl._lp.binary(g, acc.clone(), W.t(), None, "add"), acc + g @ W, rtol=1e-5, atol=1e-5)
    calls = []
    real = fl._lp
    counting = type("Counting", (), {"__call__": lambda self, *a: calls.append(1) or real(*a),
                                     "binary": staticmethod(real.binary)})()
    monkeypatch.setattr(fl, "_lp", counting)
    fl.base_linear(x, W, b)
    assert calls == [1]  # float32 CPU: through oneDNN
    fl.base_linear(x.double(), W.double(), None)
    assert calls == [1]  # other dtypes: torch's own


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_base_linear_and_add_linear_t_equal_the_plain_products(shape, bias):
    x, W, b = _data(shape, bias)
    torch.testing.assert_close(fl.base_linear(x, W, b), F.linear(x, W, b), rtol=1e-5, atol=1e-5)
    acc, gr = torch.randn(11, 24), torch.randn(11, 16)
    torch.testing.assert_close(fl.add_linear_t(acc.clone(), gr, W), acc + gr @ W, rtol=1e-5, atol=1e-5)
    xd, Wd = x.double(), W.double()  # other dtypes keep torch's own kernels, bit for bit
    assert torch.equal(fl.base_linear(xd, Wd, None), F.linear(xd, Wd))


def test_the_mode_takes_only_frozen_float32_linears_and_keeps_gradients():
    torch.manual_seed(0)
    frozen, trained = nn.Linear(24, 16), nn.Linear(16, 8)
    frozen.requires_grad_(False)
    x = torch.randn(4, 5, 24, requires_grad=True)

    def run(ctx):
        x.grad = None
        trained.zero_grad(set_to_none=True)
        with ctx:
            y = trained(frozen(x))
        names = graph_nodes(y)
        (y * torch.linspace(-1, 1, 8)).sum().backward()
        return y.detach(), x.grad.clone(), trained.weight.grad.clone(), names

    y, gx, gw, names = run(fl.frozen_linears())
    ry, rgx, rgw, ref_names = run(fl.frozen_linears(active=False))
    assert ("_FrozenLinearBackward" in names) == fl.available()
    assert "_FrozenLinearBackward" not in ref_names
    assert names.count("AddmmBackward0") == ref_names.count("AddmmBackward0") - int(fl.available())  # trained one kept
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)


def _step(m, batch):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=batch, labels=batch)
    names = graph_nodes(out.loss)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, names


def _model():
    m = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(m)
    return m.train()


def test_without_the_private_op_torch_products_run_with_the_same_numbers(without_onednn, caplog):
    x, W, b = _data()
    with caplog.at_level(logging.WARNING, logger="lorakit.kernels"):
        assert not fl.available()
    assert "not in this torch build" in caplog.text
    assert torch.equal(fl.base_linear(x, W, b), F.linear(x, W, b))
    acc, g = torch.randn(11, 24), torch.randn(11, 16)
    assert torch.equal(fl.add_linear_t(acc.clone(), g, W), acc.clone().addmm_(g, W))
    assert type(fl.frozen_linears()).__name__ == "nullcontext"
    batch = ids(2, 7)
    loss, grads, names = _step(_model(), batch)
    assert "_FrozenLinearBackward" not in names
    with kernels.enabled_as(False):
        ref_loss, ref_grads, _ = _step(_model(), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_a_failing_private_op_is_logged_once_and_leaves_torch_kernels(without_onednn, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(fl, "_lp", broken)
    with caplog.at_level(logging.WARNING, logger="lorakit.kernels"):
        assert not fl.available() and not fl.available()
    assert caplog.text.count("no oneDNN here") == 1
    frozen = nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    with fl.frozen_linears():
        y = frozen(x)
    assert torch.equal(y, F.linear(x, frozen.weight, frozen.bias)) and "_FrozenLinearBackward" not in graph_nodes(y)


def test_the_lookup_guard_finds_no_op_in_a_torch_without_it(monkeypatch):
    assert (guards._lookup_onednn_linear() is None) == (fl._lp is None)
    monkeypatch.setattr(torch, "ops", type("NoOps", (), {})())
    assert guards._lookup_onednn_linear() is None and guards._lookup_log_softmax_out() is None


def test_training_step_uses_it_for_the_base_layers_lora_does_not_wrap_and_the_switch_turns_it_off():
    m = _model()
    batch = ids(2, 7)
    m(input_ids=batch, labels=batch)  # the first call checks the fused loss
    _, _, names = _step(m, batch)
    # k, o, gate, up, down of both layers (q and v run in lorakit's sibling kernel), but layer 0's k: its input
    # (from the frozen embedding) needs no gradient, so it has no backward node
    assert names.count("_FrozenLinearBackward") == (9 if fl.available() else 0)
    with kernels.enabled_as(False):
        _, _, names = _step(m, batch)
    assert "_FrozenLinearBackward" not in names
    m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, _, names = _step(m, batch)
    assert "_FrozenLinearBackward" not in names
