"""kernels.dispatch: which kernel runs, as a table of facts -> choice, and the GPU route proven without a GPU."""
import itertools
from dataclasses import fields, replace

import pytest
import torch
from torch import nn

from lorakit import kernels
from lorakit.kernels import dispatch, dropout as dropout_mod, onednn
from lorakit.kernels.dispatch import Choice, Facts, choose
from lorakit.layers import LoraLinear

R, G, BR, S, L = "reference", "generation", "branch", "siblings", "learn"

#: row of dispatch.TABLE -> (linear, dropout, frozen, loss, ffn_skip, head)
EXPECTED = {
    "CPU float32 training": (S, "shared-mask", "onednn", "fused", True, "one-pass-onednn"),
    "CPU float32, base weight trains": (BR, "shared-mask", "onednn", "fused", True, "chunked"),
    "CPU float64 training": (S, "shared-mask", "torch", "fused", True, "chunked"),
    "CPU checkpointing (saved-tensor hooks)": (BR, "shared-mask", "torch", "fused", False, "one-pass-onednn"),
    "CPU bf16 training (adapters float32)": (S, "shared-mask", "torch", "fused", True, "one-pass-onednn"),
    "CPU bf16 generation (no grad)": (G, "shared-mask", "torch", "fused", True, "one-pass-onednn"),
    "CPU float16 training": (BR, "shared-mask", "torch", "fused", True, "chunked"),
    "CPU mixed dtypes (input, base, adapter)": (R, "shared-mask", "torch", "fused", True, "chunked"),
    "CPU autocast": (R, "shared-mask", "torch", "fused", True, "one-pass"),
    "CPU hooks on the layer": (R, "shared-mask", "onednn", "fused", True, "one-pass-onednn"),
    "CPU no oneDNN": (S, "shared-mask", "torch", "fused", True, "one-pass"),
    "CPU generation (no grad)": (G, "shared-mask", "torch", "fused", True, "one-pass-onednn"),
    "CPU fused loss's check (no grad)": (L, "shared-mask", "torch", "fused", True, "one-pass-onednn"),
    "CPU per-row adapters": (R, "shared-mask", "torch", "model", False, "one-pass-onednn"),
    "CPU torch.compile": (R, "torch", "torch", "model", False, "one-pass-onednn"),
    "CPU kernels off": (R, "torch", "torch", "model", False, "one-pass-onednn"),
    "CPU kernels off, generation": (R, "torch", "torch", "model", False, "one-pass-onednn"),
    "CUDA float32 training": (R, "torch", "torch", "model", False, "chunked"),
    "CUDA autocast training": (R, "torch", "torch", "model", False, "chunked"),
    "CUDA bf16 training": (R, "torch", "torch", "model", False, "chunked"),
    "CUDA generation (no grad)": (R, "torch", "torch", "model", False, "chunked"),
    "meta training": (R, "torch", "torch", "model", False, "chunked"),
    "meta generation (no grad)": (R, "torch", "torch", "model", False, "chunked"),
}


@pytest.mark.parametrize("label", [label for label, _ in dispatch.TABLE])
def test_the_decision_table(label):
    facts = dict(dispatch.TABLE)[label]
    assert choose(facts) == Choice(*EXPECTED[label]), label


def test_the_table_lists_every_row_once_and_prints():
    assert [label for label, _ in dispatch.TABLE] == list(EXPECTED)
    text = dispatch.table()
    assert len(text.splitlines()) == len(EXPECTED) + 1 and "CUDA float32 training" in text


def _all_facts():
    """Every combination of the boolean facts, on three devices and four dtypes."""
    flags = [f.name for f in fields(Facts) if isinstance(f.default, bool)]
    for device, dtype in itertools.product(("cpu", "cuda", "meta"), ("float32", "float64", "bfloat16", "float16", "mixed")):
        for values in itertools.product((False, True), repeat=len(flags)):
            yield Facts(device=device, dtype=dtype, **dict(zip(flags, values)))


def _reference_only(c: Choice) -> bool:
    return c.linear == R and c.dropout == "torch" and c.frozen == "torch" and c.loss == "model" and not c.ffn_skip


def test_off_the_cpu_every_choice_is_torch_on_the_device():
    """The GPU route, proven for every combination: no kernel, no shared host mask, no oneDNN mode, no fused loss."""
    for f in _all_facts():
        if f.device != "cpu" or not f.kernels or f.compiling:
            assert _reference_only(choose(f)), f


def test_the_facts_linear_route_stops_at_settle_the_route():
    """``linear_route`` and ``dropout_route`` return at once for per-row routing, kernels off, a device other
    than the CPU and torch.compile: no other fact changes the route there."""
    for f in _all_facts():
        if f.rows or not f.kernels or f.device != "cpu" or f.compiling:
            assert choose(f).linear == R, f
        if not f.kernels or f.device != "cpu" or f.compiling:
            assert choose(f).dropout == "torch", f
        else:
            assert choose(f).dropout == dispatch._CPU_DROPOUT == "shared-mask", f


def test_kernels_need_matching_dtypes_and_siblings_need_kernel_floats_and_frozen_weights():
    for f in _all_facts():
        c = choose(f)
        if c.linear != R:
            assert f.dtype != "mixed" and not (f.autocast or f.module_hooks or f.rows or f.compiling), f
        if c.linear in (S, L):
            assert f.dtype in ("float32", "float64", "bfloat16") and f.frozen_weight, f
        if c.linear == S:
            assert f.grad and not f.saved_tensor_hooks, f
        if c.frozen == "onednn":
            assert f.onednn and f.grad and f.dtype == "float32" and not (f.checkpointing or f.autocast), f


# -- the facts a call gathers ------------------------------------------------------------------

def _layer(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    base = nn.Linear(8, 6, device=device, dtype=dtype).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("default", 2, 4, 2.0, None, "gaussian")
    layer.set_active(["default"])
    return layer


def _route(layer, x, rows=False):
    return dispatch.linear_route(x, layer.base_layer, layer.lora_A["default"].weight, rows)


def test_linear_route_reads_the_call():
    layer = _layer()
    x = torch.randn(3, 8)
    assert _route(layer, x) == S
    assert _route(layer, x, rows=True) == R
    with torch.no_grad():
        assert _route(layer, x) == G
        with dispatch.learning():
            assert _route(layer, x) == L
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _route(layer, x) == R
    assert _route(layer, x.double()) == R  # input and weights disagree
    assert _route(layer, x.bfloat16()) == R  # a bf16 input into a float32 base
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert _route(layer, x) == BR
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert _route(layer, x) == R
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert _route(layer, x) == R
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert _route(layer, x) == BR
    layer.base_layer.weight.requires_grad_(False)
    with kernels.enabled_as(False):
        assert _route(layer, x) == R
    assert _route(layer, x.to("meta")) == R
    assert _route(layer, x) == S


def test_the_switch_is_one_attribute_and_a_function(monkeypatch):
    assert kernels.enabled is True
    kernels.enabled = False
    try:
        assert not kernels.is_enabled() and dispatch.dropout_route(torch.ones(2)) == "torch"
    finally:
        kernels.enabled = True
    assert kernels.set_enabled(False) is True and kernels.set_enabled(True) is False
    with pytest.raises(TypeError, match="True or False"):
        kernels.set_enabled("no")
    monkeypatch.setattr(kernels, "enabled", False)
    assert _route(_layer(), torch.randn(2, 8)) == R


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("False", False), ("1", True), ("", True)])
def test_the_environment_variable(monkeypatch, value, on):
    from lorakit.kernels import switch

    monkeypatch.setenv("LORAKIT_KERNELS", value)
    assert switch._from_env() is on


def test_loss_facts_send_other_devices_to_the_models_own_loss():
    assert dispatch.decide(dispatch.loss_facts("cpu", torch.float32, grad=True)).loss == "fused"
    for device in ("cuda", "meta"):
        c = dispatch.decide(dispatch.loss_facts(device, torch.float32, grad=True))
        assert c.loss == "model" and c.frozen == "torch" and not c.ffn_skip, device
    with kernels.enabled_as(False):
        assert dispatch.decide(dispatch.loss_facts("cpu", torch.float32, grad=True)).loss == "model"


# -- a non-CPU device end to end (meta stands in for cuda) -------------------------------------

@pytest.fixture
def no_host_kernels(monkeypatch):
    """Fail on any host-side kernel work: numpy masks, host RNG draws, host copies of masks, oneDNN's mode."""
    def refuse(*a, **k):
        raise AssertionError("a CPU kernel ran for a tensor on another device")

    monkeypatch.setattr(dropout_mod, "draw_keep_mask", refuse)
    monkeypatch.setattr(dropout_mod, "torch_seed", refuse)
    monkeypatch.setattr(dropout_mod, "mul_keep", refuse)
    monkeypatch.setattr(onednn._FrozenLinearMode, "__init__", refuse)
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("grad", [True, False])
def test_a_lora_layer_on_another_device_runs_torch_ops_only(no_host_kernels, grad):
    layer = _layer(device="meta")
    drop = kernels.SharedDropout(0.3).train()
    layer.lora_dropout["default"] = drop
    x = torch.empty(4, 5, 8, device="meta", requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    assert out.device.type == "meta" and out.shape == (4, 5, 6)
    assert no_host_kernels == [1]  # LoRA dropout: torch's own, on the tensor's device
    assert drop.drop(x)[1] == 1.0 and len(no_host_kernels) == 2
    assert onednn.frozen_linears(dispatch.decide(dispatch.loss_facts("meta")).frozen == "onednn").__class__.__name__ \
        == "nullcontext"


def test_facts_defaults_are_a_cpu_training_call():
    assert replace(Facts(), device="cpu") == Facts() and choose(Facts()).linear == S


def test_under_torch_compile_a_lora_layer_traces_its_reference_path(monkeypatch):
    layer = _layer()
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.lora_dropout["default"] = kernels.SharedDropout(0.2)
    seen = []
    real = dispatch.linear_route
    monkeypatch.setattr(dispatch, "linear_route", lambda *a: seen.append(real(*a)) or seen[-1])
    x = torch.randn(3, 8)
    compiled = torch.compile(layer.eval(), backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    assert seen[0] == R and seen[-1] == G  # traced: the reference; run eagerly: the generation kernel


def test_a_bf16_base_with_float32_adapters_takes_the_kernels():
    """train.precision bf16: base weights and activations bf16, adapters float32: the CPU kernels' dtype."""
    layer = _layer()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert _route(layer, x) == S
    with torch.no_grad():
        assert _route(layer, x) == G
    assert dispatch.call_dtype(x, layer.base_layer.weight, layer.lora_A["default"].weight) is torch.bfloat16
    # float16 activations over float32 adapters are not a kernel dtype: the reference
    layer.base_layer.to(torch.float16)
    assert _route(layer, x.half()) == R
