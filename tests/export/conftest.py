"""Tiny Llama bases saved as folders, and adapters on them with random (non-zero) LoRA weights."""
from __future__ import annotations

import shutil

import pytest
import torch


def tiny_llama(seed: int = 0, **kw):
    """tests/tiny.py's tiny Llama (hidden 32, 4 heads, 2 kv heads, head_dim 8, 2 layers), any field overridable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **kw})).eval()


def save_tiny_llama(folder, seed: int = 0, **kw):
    """A tiny Llama saved at ``folder``; returns the model."""
    model = tiny_llama(seed, **kw)
    model.save_pretrained(folder)
    return model


def save_adapter(base_dir, out_dir, seed: int = 3, **config):
    """An adapter for the model in ``base_dir`` with random A and B, saved at ``out_dir``; returns the LoraModel."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    config.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    lora = get_peft_model(model, LoraConfig(base_model_name_or_path=str(base_dir), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_pretrained(out_dir)
    return lora


@pytest.fixture
def tiny_base(tmp_path):
    folder = tmp_path / "base"
    save_tiny_llama(folder)
    return folder


@pytest.fixture
def tiny_chat_base(tmp_path, embedded_model_dir):
    """A tiny Llama with the embedded model's tokenizer and chat template (vocab 49152), tied head."""
    folder = tmp_path / "chat-base"
    save_tiny_llama(folder, vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir / name, folder / name)
    return folder
