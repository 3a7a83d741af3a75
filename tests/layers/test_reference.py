"""layers/: the LoRA math as plain torch, checked against the paper's formula; merging uses the same delta."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.layers.embedding import lora_embedding_delta, lora_embedding_weight
from lorakit.layers.linear import lora_linear_delta, lora_linear_weight


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_linear_delta_is_scale_B_A_x_and_the_merged_weight_is_the_same_map():
    g = _g()
    x, A, B = torch.randn(3, 5, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    delta = lora_linear_delta(x, A, B, 2.5)
    torch.testing.assert_close(delta, 2.5 * (x @ A.t() @ B.t()))
    torch.testing.assert_close(F.linear(x, lora_linear_weight(A, B, 2.5)), delta, rtol=1e-5, atol=1e-5)


def test_linear_delta_applies_the_dropout_module_to_the_input():
    g = _g(1)
    x, A, B = torch.randn(6, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    half = lambda t: t * 0.5  # noqa: E731 - any module-like callable
    torch.testing.assert_close(lora_linear_delta(x, A, B, 3.0, half), 3.0 * ((0.5 * x) @ A.t() @ B.t()))


def test_embedding_delta_looks_up_the_low_rank_table_merging_adds():
    g = _g(2)
    base = nn.Embedding(20, 8, padding_idx=0)
    A, B = torch.randn(4, 20, generator=g), torch.randn(8, 4, generator=g)
    ids = torch.randint(0, 20, (3, 7), generator=g)
    delta = lora_embedding_delta(ids, A, B, 0.5, base)
    table = lora_embedding_weight(A, B, 0.5)
    torch.testing.assert_close(delta, 0.5 * (A.t()[ids] @ B.t()))
    torch.testing.assert_close(delta, table[ids], rtol=1e-5, atol=1e-6)


def _adapted(layer, r=4, scale=2.0):
    layer.add_adapter("default", r, 2 * r, scale, None, "gaussian")
    for p in layer.adapter_parameters("default"):
        nn.init.normal_(p)  # both factors random: the update changes the output
    layer.set_active(["default"])
    return layer


def _conv1d(n_in, n_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 10), lambda: _conv1d(12, 10), lambda: nn.Embedding(20, 10)])
def test_layer_output_is_base_plus_delta_and_merging_gives_the_same_output(make):
    torch.manual_seed(0)
    layer = _adapted(LoraEmbedding(make()) if isinstance(make(), nn.Embedding) else LoraLinear(make()))
    x = torch.randint(0, 20, (2, 5)) if isinstance(layer, LoraEmbedding) else torch.randn(2, 5, 12)
    with torch.no_grad():
        want = layer.base_layer(x) + layer._delta("default", x)
        out = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        again = layer(x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)
