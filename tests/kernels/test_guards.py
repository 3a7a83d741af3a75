"""kernels.guards: each private torch name taken away -> the fallback runs, with the same numbers, and says so once."""
import logging

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import guards, linear_cross_entropy
from tiny import ids, randomize_lora, tiny_llama, train_step


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(guards, "_said", set())


def _model(dropout=0.1):
    m = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    randomize_lora(m)
    return m.train()


def _same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_lookups_return_none_for_names_this_torch_lacks(monkeypatch):
    assert guards._lookup_top_hooks() is not None and guards._lookup_global_hooks() is not None
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    monkeypatch.delattr(nn.modules.module, "_global_forward_hooks")
    assert guards._lookup_top_hooks() is None and guards._lookup_global_hooks() is None


def test_without_the_saved_tensor_hooks_query_the_sibling_kernel_stays_off(monkeypatch, caplog):
    batch = ids(3, 9)
    m = _model()
    train_step(m, batch)  # learns the groups
    fused = train_step(m, batch, seed=1)
    assert fused[2].count("_SiblingLinearBackward") == 8  # q/k/v, gate/up, o, down in each of two layers
    monkeypatch.setattr(guards, "_TOP_HOOKS", None)
    with caplog.at_level(logging.WARNING, logger="lorakit.kernels"):
        alone = train_step(m, batch, seed=1)
    assert "_SiblingLinearBackward" not in alone[2] and "_AddBranchBackward" in alone[2]
    assert caplog.text.count("_top_saved_tensors_default_hooks") == 1  # once, however many calls
    _same(fused, alone)  # the same masks through the per-module kernel: the same numbers


def test_without_the_global_hooks_table_every_layer_takes_the_reference(monkeypatch, caplog):
    batch = ids(3, 9)
    m = _model(dropout=0.0)
    train_step(m, batch)
    fused = train_step(m, batch, seed=1)
    monkeypatch.setattr(guards, "_GLOBAL_HOOKS", None)
    with caplog.at_level(logging.WARNING, logger="lorakit.kernels"):
        plain = train_step(m, batch, seed=1)
    assert not {"_SiblingLinearBackward", "_AddBranchBackward"} & set(plain[2])
    assert "_global_forward_hooks" in caplog.text
    _same(fused, plain)


def test_module_guards_fall_back_to_public_access():
    class Odd:  # keeps neither a parameter table nor hook tables under torch's names
        weight = torch.ones(2, 2)

    assert guards.module_weight(Odd()) is Odd.weight
    assert guards.module_hooks(Odd()) is True
    layer = nn.Linear(3, 2)
    assert guards.module_weight(layer) is layer.weight and guards.module_hooks(layer) is False
    assert guards.layer_facts(layer) == (layer.weight, False) and guards.layer_facts(Odd()) == (Odd.weight, True)


@pytest.mark.parametrize("hook", ["forward", "pre", "replaced", "global"])
def test_every_kind_of_hook_is_seen(hook):
    layer = nn.Linear(3, 2)
    if hook == "forward":
        handle = layer.register_forward_hook(lambda *a: None)
    elif hook == "pre":
        handle = layer.register_forward_pre_hook(lambda *a: None)
    elif hook == "global":
        handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    else:
        layer.forward = lambda x: x
        handle = None
    try:
        assert guards.module_hooks(layer) is True and guards.layer_facts(layer) == (layer.weight, True)
    finally:
        if handle is not None:
            handle.remove()


def test_without_log_softmax_out_the_chunked_head_gives_the_same_loss(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)  # a trainable head: the chunked form
    targets = torch.randint(0, 50, (40,), generator=g)
    want = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    want_g = torch.autograd.grad(want, (hidden, weight))
    monkeypatch.setattr(guards, "_LOG_SOFTMAX_OUT", None)
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    got_g = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_without_tensor_versions_nothing_cached_per_input_is_reused(monkeypatch):
    from lorakit.kernels import SharedDropout

    monkeypatch.setattr(guards, "_HAS_VERSION", False)
    x = torch.randn(40, 50)
    d = SharedDropout(0.5).train()
    first = d.drop(x)[0]
    assert d.drop(x)[0] is not first  # cannot tell the tensor is unchanged: a fresh mask, never a stale one
    batch = ids(3, 9)
    m = _model(dropout=0.0)
    monkeypatch.setattr(guards, "_HAS_VERSION", True)
    train_step(m, batch)
    with_versions = train_step(m, batch, seed=1)
    monkeypatch.setattr(guards, "_HAS_VERSION", False)
    without = train_step(m, batch, seed=1)
    assert "_SiblingLinearBackward" in without[2]  # each layer alone (no group can be verified), same numbers
    _same(with_versions, without)


def test_without_tensor_bases_nothing_is_written_in_place(monkeypatch):
    from lorakit.kernels import branch_add

    monkeypatch.setattr(guards, "_HAS_BASE", False)
    g = torch.Generator().manual_seed(0)
    x, A, B = (torch.randn(*s, generator=g, requires_grad=True) for s in ((4, 6), (2, 6), (3, 2)))
    result = torch.zeros(4, 3)
    out = branch_add(result, x, A, B, 2.0, None, True)
    assert out.data_ptr() != result.data_ptr() and not result.any()
    torch.testing.assert_close(out, 2.0 * (x @ A.t() @ B.t()))
