"""loss.ffn_skip: the loss path's feed-forward blocks run only where their result is read, same numbers."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model, kernels
from lorakit.kernels import guards
from lorakit.loss import ffn_skip as skip_rows
from lorakit.loss.lm_loss import IGNORE_INDEX, LossComputer, fast_loss_sum, fast_path_parts

from tiny import FAMILIES, VOCAB, build, perturb_lora, single_thread  # noqa: F401

CAUSAL = sorted(name for name, fam in FAMILIES.items() if fam.kind == "causal")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """Skipping is a kernel of the fused loss: compared here with the plain body, whatever LORAKIT_KERNELS says."""
    monkeypatch.setattr(guards, "_said", set())  # each test sees its own fallback warnings
    with kernels.enabled_as(True):
        yield


def _padded_batch(side: str, seed: int = 5) -> dict[str, torch.Tensor]:
    """Three rows of 9, 6 and 4 real tokens padded to 9; labels only on each row's last two tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, width = (9, 6, 4), 9
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(3, VOCAB - 2, (n,), generator=g)
        mask[i, cols] = 1
        real = ids[i, cols]
        lab = torch.full((n,), IGNORE_INDEX)
        lab[-2:] = real[-2:]
        labels[i, cols] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, skip: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not skip:
            m.setattr(skip_rows, "usable", lambda body: False)
        body, head = fast_path_parts(model)
        model.zero_grad(set_to_none=True)
        loss = fast_loss_sum(body, head, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", CAUSAL)
def test_same_loss_and_gradients_with_and_without_skipping(family, side, monkeypatch):
    model = get_peft_model(build(family), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                     target_modules="all-linear"))
    perturb_lora(model)
    model.train()
    batch = _padded_batch(side)
    if fast_path_parts(model) is None:  # logit soft-capping (gemma2): the model's own loss, nothing skipped
        assert not LossComputer(model).is_fast
        return
    skipped, g_skip = _loss_and_grads(model, batch, True, monkeypatch)
    plain, g_plain = _loss_and_grads(model, batch, False, monkeypatch)
    torch.testing.assert_close(skipped, plain, rtol=1e-5, atol=1e-5)
    assert g_skip.keys() == g_plain.keys() and g_skip
    for name in g_plain:
        torch.testing.assert_close(g_skip[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the model's own loss agrees (the fast path's one-time check would fall back otherwise)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        own = model(**batch).loss
    torch.testing.assert_close(skipped / n, own, rtol=1e-4, atol=1e-5)


def test_labels_on_padding_are_still_computed_exactly(monkeypatch):
    # a collator that copies input_ids into labels scores padded positions too: their hidden states are
    # read by the loss, so their feed-forward blocks must run in every layer
    model = get_peft_model(build("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    perturb_lora(model)
    model.train()
    batch = _padded_batch("right")
    batch["labels"] = batch["input_ids"].clone()
    skipped, g_skip = _loss_and_grads(model, batch, True, monkeypatch)
    plain, g_plain = _loss_and_grads(model, batch, False, monkeypatch)
    torch.testing.assert_close(skipped, plain, rtol=1e-5, atol=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_skip[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert LossComputer(model).is_fast


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "gpt_neox", "qwen2"])
def test_feed_forward_blocks_are_found_and_skipped(family):
    model = build(family)
    body, _ = fast_path_parts(model)
    blocks = skip_rows.feed_forward_blocks(body)
    assert blocks is not None and len(blocks) == model.config.num_hidden_layers
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out.shape[:2]))  # runs before the scatter
               for b in blocks]
    batch = _padded_batch("right")
    with torch.no_grad():
        fast_loss_sum(body, fast_path_parts(model)[1], batch)
    for h in handles:
        h.remove()
    real = int(batch["attention_mask"][:, :-1].sum())
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # every layer but the last sees the real tokens only, the last only the labelled positions
    assert seen == [torch.Size([1, real])] * (len(blocks) - 1) + [torch.Size([1, labelled])]
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # hooks removed after the call


class _FlatMLP(nn.Module):
    """A feed-forward block that returns [positions, hidden] (its layer reshapes): not one [b, s, h] tensor."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x).reshape(-1, x.shape[-1])


class _Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = _FlatMLP(d)

    def forward(self, x):
        return x + self.mlp(x).view_as(x)


class _ShapeBoundMLP(nn.Module):
    """A block whose code assumes the layer's [2, 5] batch shape: fails on gathered rows."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x.view(2, 5, -1))


class _BrokenMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()

    def forward(self, x):
        raise ValueError("broken block")


_KEEP = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def _stack(block_cls):
    layers = nn.ModuleList([_Layer(8), _Layer(8)])
    for layer in layers:
        layer.mlp = block_cls(8)
    return nn.Sequential(layers), layers


@pytest.mark.parametrize("block_cls", [_FlatMLP, _ShapeBoundMLP])
def test_a_block_that_cannot_take_gathered_rows_switches_skipping_off_and_gives_the_plain_result(block_cls, caplog):
    torch.manual_seed(0)
    body, layers = _stack(block_cls)
    x = torch.randn(2, 5, 8)

    def run():
        h = x
        for layer in layers:
            h = layer(h)
        return h

    with caplog.at_level(logging.WARNING, logger="lorakit.kernels"):
        out = skip_rows.run_with_rows(body, _KEEP, _KEEP, run)
    torch.testing.assert_close(out, run())
    assert not skip_rows.usable(body)
    assert not any(layer.mlp._forward_hooks or layer.mlp._forward_pre_hooks for layer in layers)
    # said once, with the reason
    assert "cannot run on gathered rows" in caplog.text and ("RuntimeError" in caplog.text or "_NotOneTensor" in caplog.text)
    other, _ = _stack(block_cls)
    assert skip_rows.usable(other)  # per body: another model keeps skipping


class _TypeErrorMLP(nn.Module):
    """A block that breaks on gathered rows with an error that is not a shape failure: not ours to swallow."""

    def __init__(self, d: int):
        super().__init__()

    def forward(self, x):
        if x.shape[0] == 1:
            raise TypeError("a bug in the block")
        return x


def test_only_shape_failures_switch_skipping_off():
    body, layers = _stack(_TypeErrorMLP)
    with pytest.raises(TypeError, match="a bug in the block"):
        skip_rows.run_with_rows(body, _KEEP, _KEEP, lambda: layers[0](torch.randn(2, 5, 8)))
    assert skip_rows.usable(body)


def test_an_error_without_skipping_reaches_the_caller():
    body, layers = _stack(_BrokenMLP)
    with pytest.raises(ValueError, match="broken block"):
        skip_rows.run_with_rows(body, _KEEP, _KEEP, lambda: layers[0](torch.randn(2, 5, 8)))
    assert not any(layer.mlp._forward_hooks or layer.mlp._forward_pre_hooks for layer in layers)
    assert skip_rows.usable(body)  # not skipping's fault: it stays on for the next call


def test_not_used_under_gradient_checkpointing(monkeypatch):
    model = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    perturb_lora(lora)
    lora.train()
    body, _ = fast_path_parts(lora)
    assert not skip_rows.usable(body)
    loss = LossComputer(lora)(_padded_batch("right"))
    loss.backward()  # recomputation in backward sees the same shapes: no checkpoint metadata error
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
