"""Tiny models and data built in-process for the training tests."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, vocab: int = 97, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def freeze_all_but_one_layer(model) -> None:
    """Stand-in for LoRA: only the first layer's attention projections train."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("model.layers.0.self_attn.")


def tiny_examples(n: int = 24, seed: int = 1, vocab: int = 97) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(3, 9, (1,), generator=g))
        alen = int(torch.randint(1, 5, (1,), generator=g))
        ids = torch.randint(3, vocab, (plen + alen,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * plen + ids[plen:]})
    return out


def pad_batch(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
