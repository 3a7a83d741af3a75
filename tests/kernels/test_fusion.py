"""kernels.fusion: LoRA linears reading one input run as one node, learned from calls, never at the cost of a value."""
import copy

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model, kernels
from lorakit.kernels import fusion
from lorakit.layers import LoraLinear
from tiny import graph_nodes, ids, randomize_lora, tiny_llama


def _model(dropout=0.1, targets="all-linear", **kw):
    m = get_peft_model(tiny_llama(0, **kw), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    randomize_lora(m)
    return m.train()


def _step(model, batch, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    nodes = graph_nodes(loss).count("_SiblingLinearBackward")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, nodes


def _pair(*outs):
    """LoRA linears over frozen nn.Linear(6, out), scaling 2, random (output-changing) B."""
    torch.manual_seed(0)
    layers = [LoraLinear(nn.Linear(6, o)) for o in outs]
    for layer in layers:
        layer.base_layer.requires_grad_(False)
        layer.add_adapter("default", 2, 4, 2.0, None, "gaussian")
        nn.init.normal_(layer.lora_B["default"].weight)
        layer.set_active(["default"])
    return layers


@pytest.fixture
def no_fusion(monkeypatch):
    """Run ``fn`` with the sibling kernel declining every call: each layer takes the per-module branch kernel
    (the same masks, so the same numbers even with dropout)."""
    def run(fn, *a, **kw):
        with monkeypatch.context() as m:
            m.setattr(fusion, "fused_forward", lambda layer, x: None)
            return fn(*a, **kw)
    return run


@pytest.fixture
def reference():
    """Run ``fn`` with every kernel off: the reference path (torch's dropout: use it without dropout)."""
    def run(fn, *a, **kw):
        with kernels.enabled_as(False):
            return fn(*a, **kw)
    return run


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_training_equals_the_per_module_path(dropout, no_fusion):
    a, b = _model(dropout), _model(dropout)
    batch = ids(3, 9)
    for step in range(3):
        la, ga, nodes = _step(a, batch, step)
        lb, gb, plain = no_fusion(_step, b, batch, step)
        # groups are learned by the first call (or the fused loss's check before it): q/k/v and gate/up,
        # o and down alone, in each of the two layers
        assert plain == 0 and (nodes == 8 or step == 0)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)  # same masks, same products
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)
    attn = a.model.model.layers[0].self_attn
    mlp = a.model.model.layers[0].mlp
    assert attn.q_proj._fuse.siblings == (attn.q_proj, attn.k_proj, attn.v_proj)
    assert mlp.gate_proj._fuse.siblings == (mlp.gate_proj, mlp.up_proj)
    assert attn.o_proj._fuse.siblings == () and mlp.down_proj._fuse.siblings == ()


def test_fused_training_equals_the_reference_path(reference):
    a, b = _model(0.0), _model(0.0)
    batch = ids(3, 9)
    for step in range(2):
        la, ga, nodes = _step(a, batch, step)
        lb, gb, plain = reference(_step, b, batch, step)
        assert plain == 0 and (nodes == 8 or step == 0)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_groups_are_learned_without_autograd_so_the_first_step_is_fused():
    m = _model()
    batch = ids(2, 6)
    with torch.no_grad():
        m.eval()(input_ids=batch)  # a plain evaluation teaches nothing (generation pays no bookkeeping)
    assert m.model.model.layers[0].self_attn.q_proj._fuse.siblings == ()
    with torch.no_grad(), fusion.learning():  # as the fused loss's first check runs (kernels.dispatch.learning)
        m(input_ids=batch)
    m.train()
    _, _, nodes = _step(m, batch, 0)
    # two layers, each: one q/k/v node, one gate/up node, o and down alone
    assert nodes == 2 * 4


def test_a_wrong_guess_costs_nothing_but_time():
    """A learned sibling called later with another input: the right value, and the group is given up."""
    q, k = _pair(5, 3)
    x = torch.randn(4, 6, requires_grad=True)
    q(x), k(x)  # learned: k reads q's input
    assert q._fuse.siblings == (q, k)
    y = torch.randn(4, 6)
    out_q, out_k = q(x), k(y)  # this time k reads another tensor
    want_k = k.base_layer(y) + 2.0 * y @ k.lora_A["default"].weight.t() @ k.lora_B["default"].weight.t()
    torch.testing.assert_close(out_k, want_k)
    assert q._fuse.ok is False and q._fuse.siblings == () and k._fuse.pending is None
    out_k.sum().backward()
    assert k.lora_A["default"].weight.grad is not None


def test_an_input_changed_in_place_is_not_served_a_stale_output():
    q, k = _pair(5, 5)
    x = torch.randn(4, 6, requires_grad=True)
    q(x), k(x)
    h = x * 1.0
    q(h)
    h.mul_(3)
    torch.testing.assert_close(k(h), k.base_layer(h) + k._delta("default", h))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, no_fusion):
    a, b = _model(0.0), _model(0.0)
    for m in (a, b):
        m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.model.enable_input_require_grads()
    batch = ids(2, 6)
    for step in range(2):
        la, ga, _ = _step(a, batch, step)
        lb, gb, _ = no_fusion(_step, b, batch, step)
        torch.testing.assert_close(la, lb)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


def test_not_fused_under_autocast_or_around_a_hooked_base_layer():
    m = _model()
    batch = ids(2, 6)
    _step(m, batch, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=batch, labels=batch).loss
    assert "_SiblingLinearBackward" not in graph_nodes(loss)
    calls = []
    handle = m.model.model.layers[0].self_attn.k_proj.base_layer.register_forward_hook(lambda *a: calls.append(1))
    _, _, nodes = _step(m, batch, 1)
    handle.remove()
    assert calls == [1]  # the hooked base layer ran as a module: k alone, q and v alone this time
    assert nodes == 9
    _, _, nodes = _step(m, batch, 2)
    assert nodes == 8  # the group is still known


def test_copies_start_without_groups_and_train_alike():
    m = _model()
    batch = ids(2, 6)
    _step(m, batch, 0)
    _step(m, batch, 1)
    c = copy.deepcopy(m)
    assert c.model.model.layers[0].self_attn.q_proj._fuse.siblings == ()
    la, ga, _ = _step(m, batch, 2)
    lc, gc, _ = _step(c, batch, 2)
    torch.testing.assert_close(la, lc)
    for n in ga:
        torch.testing.assert_close(ga[n], gc[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_may_be_modified_in_place_through_a_view(dtype):
    """DeBERTa divides a permuted view of a LoRA linear's output in place (``pos_query_layer /= ...``): the
    kernels' outputs are tensors of their own, so autograd allows it and the gradients are the reference's."""
    import warnings

    from lorakit.precision import PrecisionChoice, apply_precision
    from tiny import batch_for, build

    warnings.simplefilter("ignore")
    m = get_peft_model(build("deberta"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(m)
    apply_precision(m, PrecisionChoice("p", dtype, "test", "test"))
    m.train()
    grads = []
    for on in (True, False):
        m.zero_grad(set_to_none=True)
        with kernels.enabled_as(on):
            m(**batch_for("deberta")).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (grads[0] - grads[1]).norm() <= tol * grads[1].norm()
