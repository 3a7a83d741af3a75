"""Tiny models built in-process (no download) shared by the core tests."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_bloom(seed: int = 0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    return BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def ids(batch: int = 2, length: int = 7, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def randomize_lora(model, seed: int = 3) -> None:
    """Give every LoRA weight random values, so adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def fused_and_own(model, batch):
    """One training forward + backward through LoraModel's fused loss and one through the model's own
    (``return_logits=True``), same seed: (fused output, own output, fused grads, own grads) by name."""
    def run(**kw):
        torch.manual_seed(0)
        out = model(**batch, **kw)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return out, grads

    out, fused = run()
    ref, own = run(return_logits=True)
    return out, ref, fused, own


def graph_nodes(t) -> list[str]:
    """Class names of every autograd node behind tensor ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return [type(fn).__name__ for fn in seen]
