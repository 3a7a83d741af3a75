"""ops.frozen_linear: the base model's frozen products through oneDNN, equal to F.linear to float32 rounding."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import onednn as fl
from tiny import graph_nodes, ids, randomize_lora, tiny_llama


@pytest.fixture
def fresh_check(monkeypatch):
    monkeypatch.setattr(fl, "_checked", None)
    return fl


def test_oneDNN_is_used_where_it_agrees_with_F_linear():
    # on this project's CPUs (x86 with torch's oneDNN) the self-test passes; the checks below hold either way
    assert fl.available() == fl._self_test()
    assert fl.available() == (fl._lp is not None and torch.backends.mkldnn.is_available() and fl._self_test())


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_base_linear_and_add_linear_t_equal_the_plain_products(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    W = torch.randn(16, 24, generator=g)
    b = torch.randn(16, generator=g) if bias else None
    torch.testing.assert_close(fl.base_linear(x, W, b), F.linear(x, W, b), rtol=1e-5, atol=1e-5)
    acc, gr = torch.randn(11, 24, generator=g), torch.randn(11, 16, generator=g)
    torch.testing.assert_close(fl.add_linear_t(acc.clone(), gr, W), acc + gr @ W, rtol=1e-5, atol=1e-5)
    # other dtypes keep torch's own kernels, bit for bit
    xd, Wd = x.double(), W.double()
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


def test_a_failed_self_test_leaves_torch_kernels(fresh_check, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(fl, "_lp", broken)
    assert not fl.available()
    frozen = nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    with fl.frozen_linears():
        y = frozen(x)
    assert torch.equal(y, F.linear(x, frozen.weight, frozen.bias)) and "_FrozenLinearBackward" not in graph_nodes(y)


def test_disabled_switch(monkeypatch):
    monkeypatch.setattr(fl, "enabled", False)
    assert not fl.available()
    assert type(fl.frozen_linears()).__name__ == "nullcontext"


def test_training_step_uses_it_for_the_base_layers_lora_does_not_wrap():
    m = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(m)
    m.train()
    batch = ids(2, 7)
    m(input_ids=batch, labels=batch)  # the first call checks the fused loss
    out = m(input_ids=batch, labels=batch)
    names = graph_nodes(out.loss)
    # k, o, gate, up, down of both layers (q and v run in lorakit's sibling kernel), but layer 0's k: its input
    # (from the frozen embedding) needs no gradient, so it has no backward node
    assert names.count("_FrozenLinearBackward") == (9 if fl.available() else 0)
    m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = m(input_ids=batch, labels=batch)
    assert "_FrozenLinearBackward" not in graph_nodes(out.loss)
