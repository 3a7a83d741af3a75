"""Merging an adapter on one side of a tied embedding/head pair changes only that side (the merged model
computes what the unmerged one did); a pair whose LoRA is tied (ensure_weight_tying) stays tied."""
from __future__ import annotations

import warnings

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from tiny import perturb_lora, tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merge_on_one_side_of_a_tied_pair_keeps_the_outputs(target):
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the case under test
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[target, "q_proj"]))
    perturb_lora(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    assert any("tied" in str(w.message) for w in caught)
    torch.testing.assert_close(_logits(merged, ids), before, atol=1e-4, rtol=1e-4)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False


def test_merge_then_unmerge_restores_an_untied_copy():
    base = tiny_llama(tie_word_embeddings=True)
    original = base.lm_head.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"]))
    perturb_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(model.model.lm_head.base_layer.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.model.model.embed_tokens.weight, original, atol=0, rtol=0)


def test_untied_base_merges_without_a_copy():
    base = tiny_llama(tie_word_embeddings=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"]))
    perturb_lora(model)
    head = model.model.lm_head.base_layer.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to untie: no warning
        merged = model.merge_and_unload()
    assert merged.lm_head.weight is head
