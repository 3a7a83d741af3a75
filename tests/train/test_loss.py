import pytest
import torch

from lorakit import kernels
from lorakit.loss.lm_loss import LossComputer, count_label_tokens, fast_loss_sum, fast_path_parts
from tiny import pad_batch, tiny_examples, train_llama


@pytest.mark.parametrize("tie", [False, True])
def test_fast_loss_equals_hf_loss(tie):
    model = train_llama(tie=tie).eval()
    batch = pad_batch(tiny_examples(6))
    parts = fast_path_parts(model)
    assert parts is not None
    n = count_label_tokens(batch["labels"])
    fast = fast_loss_sum(*parts, batch) / n
    ref = model(**batch).loss
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_fast_loss_gradients_match():
    model = train_llama()
    batch = pad_batch(tiny_examples(4))
    n = count_label_tokens(batch["labels"])
    (fast_loss_sum(*fast_path_parts(model), batch) / n).backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(**batch).loss.backward()
    for a, p in zip(g_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)


def test_logit_transform_architectures_fall_back():
    model = train_llama()
    model.config.final_logit_softcapping = 30.0
    assert fast_path_parts(model) is None
    comp = LossComputer(model)
    assert not comp.is_fast
    batch = pad_batch(tiny_examples(2))
    n = count_label_tokens(batch["labels"])
    torch.testing.assert_close(comp(batch) / n, model(**batch).loss)


def test_self_check_switches_to_model_loss_when_they_disagree():
    model = train_llama()
    comp = LossComputer(model)
    body, head = comp.parts
    comp.parts = (body, torch.nn.Linear(head.in_features, head.out_features, bias=False))  # wrong head
    batch = pad_batch(tiny_examples(2))
    with pytest.warns(UserWarning, match="fast loss"), kernels.enabled_as(True):  # the fused loss is a kernel
        comp(batch)
    assert not comp.is_fast
