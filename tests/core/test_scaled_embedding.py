"""A scaled embedding (Gemma 3 multiplies looked-up rows by ``embed_scale``): the LoRA update is scaled the
same way, so the unmerged output equals the merged one and peft's, plain and DoRA."""
from __future__ import annotations

import pytest
import torch

from core.peft_oracle import make_pair, peft, quiet
from tiny import assert_logits_close, instantiate, logits, perturb_lora


def tiny_gemma3():
    return instantiate("Gemma3TextConfig", "Gemma3ForCausalLM", vocab_size=100, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       sliding_window=16, tie_word_embeddings=False)  # untied: merging the table leaves the head


@pytest.mark.parametrize("use_dora", [False, True])
def test_scaled_embedding_update_matches_peft_and_its_own_merge(use_dora):
    base = tiny_gemma3()
    emb = base.get_input_embeddings()
    assert float(getattr(emb, "embed_scale", 1.0)) != 1.0  # the case under test: a scaled embedding
    ours, theirs = make_pair(tiny_gemma3, target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8,
                             use_dora=use_dora)
    perturb_lora(ours)
    with torch.no_grad():
        sd = ours.lora_state_dict()
        peft.set_peft_model_state_dict(theirs, sd)
    batch = {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))}
    mine = logits(ours, batch)
    assert_logits_close(mine, quiet(logits, theirs, batch))
    merged = ours.merge_and_unload()
    assert_logits_close(logits(merged, batch), mine, atol=1e-4)
