"""Tiny models and data built in-process (no download), for the whole suite.

Every model comes from one builder, ``instantiate`` (a transformers config and model class by name,
initialised from a seed). Presets:

- ``tiny_llama`` / ``tiny_bloom`` / ``tiny_gpt2``: 2 layers, hidden 32, vocab 100, in eval mode (core tests);
- ``tokenizer_llama``: a Llama over a real tokenizer's vocabulary (the CLI and evaluation tests);
- ``train_llama``: the training tests' Llama (vocab 97, pad / bos / eos ids 0 / 1 / 2, as ``pad_batch``
  pads with 0), in train mode;
- ``FAMILIES`` / ``build(family)``: one tiny model of every family lorakit has a default target table
  entry for, with ``batch_for`` giving a matching input batch.

Data: ``ids`` (random token ids), ``tiny_examples`` + ``pad_batch`` (tokenized prompt/answer examples and
their collation). Helpers for LoRA tests: ``randomize_lora``, ``perturb_lora``, ``fused_and_own``,
``graph_nodes``, ``logits``, ``assert_logits_close``. ``single_thread``: import it into a test module to
run its tiny models on one thread.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

VOCAB = 100


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread: their products are too small to split, and thread start-up
    and spin waits dominate when other processes share the cores. Import this fixture into a test module
    to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def instantiate(config_cls: str, model_cls: str, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A freshly initialised transformers ``model_cls`` of a ``config_cls`` built from ``config``, from ``seed``."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))


def tiny_llama(seed: int = 0, **kw) -> torch.nn.Module:
    """A 2-layer Llama (hidden 32, vocab 100, grouped-query attention), eval mode; ``kw``: config overrides."""
    return instantiate("LlamaConfig", "LlamaForCausalLM", seed, vocab_size=VOCAB, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       **kw).eval()


def tiny_bloom(seed: int = 0) -> torch.nn.Module:
    return instantiate("BloomConfig", "BloomForCausalLM", seed, vocab_size=VOCAB, hidden_size=32, n_layer=2,
                       n_head=4).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    return instantiate("GPT2Config", "GPT2LMHeadModel", seed, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                       n_positions=64).eval()


def train_llama(seed: int = 0, vocab: int = 97, tie: bool = False) -> torch.nn.Module:
    """The training tests' Llama: token ids 0 / 1 / 2 are pad / bos / eos (``tiny_examples`` draws from 3 up),
    in train mode."""
    return instantiate("LlamaConfig", "LlamaForCausalLM", seed, vocab_size=vocab, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


def tokenizer_llama(tokenizer, seed: int = 0, tie: bool = False) -> torch.nn.Module:
    """A 2-layer Llama over a real tokenizer's vocabulary and special tokens (train mode, as constructed)."""
    return instantiate("LlamaConfig", "LlamaForCausalLM", seed, vocab_size=len(tokenizer), hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=tie)


# ---------------------------------------------------------------------------------------------- every family

@dataclasses.dataclass(frozen=True)
class Family:
    """How to build a tiny model of one transformers ``model_type``."""

    name: str              # transformers model_type (the key of lorakit's default target table)
    config_cls: str        # transformers config class name
    model_cls: str         # transformers model class name (the head used for the test)
    kind: str              # "causal" | "seq2seq" | "seq_cls" | "vision2seq"
    config: dict[str, Any]  # config kwargs

    @property
    def task_type(self) -> str:
        return {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS",
                "vision2seq": "CAUSAL_LM"}[self.kind]


_DEC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    # --- the seed's table -----------------------------------------------------------------
    Family("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    Family("mt5", "MT5Config", "MT5ForConditionalGeneration", "seq2seq",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    Family("bart", "BartConfig", "BartForConditionalGeneration", "seq2seq",
           dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2)),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", "causal",
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    Family("bloom", "BloomConfig", "BloomForCausalLM", "causal",
           dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, hidden_dropout=0.0, attention_dropout=0.0)),
    Family("blip-2", "Blip2Config", "Blip2ForConditionalGeneration", "vision2seq", dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                         dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=4, image_token_index=VOCAB - 1)),
    Family("opt", "OPTConfig", "OPTForCausalLM", "causal",
           dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)),
    Family("gptj", "GPTJConfig", "GPTJForCausalLM", "causal",
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "causal",
           dict(_DEC, hidden_dropout=0.0, attention_dropout=0.0)),
    Family("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", "causal",
           dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                attention_types=[[["global", "local"], 1]], window_size=8, embed_dropout=0.0,
                attention_dropout=0.0, resid_dropout=0.0, bos_token_id=1, eos_token_id=2)),
    Family("bert", "BertConfig", "BertForSequenceClassification", "seq_cls", dict(_ENC)),
    Family("roberta", "RobertaConfig", "RobertaForSequenceClassification", "seq_cls", dict(_ENC, pad_token_id=1)),
    Family("xlm-roberta", "XLMRobertaConfig", "XLMRobertaForSequenceClassification", "seq_cls",
           dict(_ENC, pad_token_id=1)),
    Family("electra", "ElectraConfig", "ElectraForSequenceClassification", "seq_cls",
           dict(_ENC, embedding_size=16)),
    Family("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", "seq_cls",
           dict(_ENC, pooler_dropout=0.0, pooler_hidden_size=32, relative_attention=True,
                pos_att_type=["p2c", "c2p"], max_relative_positions=16)),
    Family("deberta", "DebertaConfig", "DebertaForSequenceClassification", "seq_cls",
           dict(_ENC, pooler_dropout=0.0, pooler_hidden_size=32, relative_attention=True,
                pos_att_type=["p2c", "c2p"], max_relative_positions=16)),
    Family("layoutlm", "LayoutLMConfig", "LayoutLMForSequenceClassification", "seq_cls", dict(_ENC)),
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "causal", dict(_DEC, num_key_value_heads=2)),
    Family("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "causal",
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    Family("mpt", "MptConfig", "MptForCausalLM", "causal",
           dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64,
                resid_pdrop=0.0, emb_pdrop=0.0)),  # attention dropout is 0 by default
    # --- today's families ------------------------------------------------------------------
    Family("mistral", "MistralConfig", "MistralForCausalLM", "causal", dict(_DEC, num_key_value_heads=2)),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", "causal",
           dict(_DEC, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "causal", dict(_DEC, num_key_value_heads=2)),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "causal", dict(_DEC, num_key_value_heads=2, head_dim=8)),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", "causal", dict(_DEC, num_key_value_heads=2, head_dim=8)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "causal",
           dict(_DEC, num_key_value_heads=2, head_dim=8, sliding_window=8)),
    Family("phi", "PhiConfig", "PhiForCausalLM", "causal",
           dict(_DEC, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    Family("falcon", "FalconConfig", "FalconForCausalLM", "causal",
           dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)),
    Family("stablelm", "StableLmConfig", "StableLmForCausalLM", "causal", dict(_DEC, num_key_value_heads=2)),
]}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny model of ``family`` in eval mode (dropout off), built from ``seed``."""
    fam = FAMILIES[family]
    return instantiate(fam.config_cls, fam.model_cls, seed, **fam.config).eval()


def batch_for(family: str, seed: int = 1, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Inputs (with labels, so the output has a loss) for a tiny model of ``family``."""
    fam = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if fam.kind == "causal":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if fam.kind == "seq2seq":
        dec = torch.randint(3, VOCAB - 2, (batch, 5), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": dec}
    if fam.kind == "seq_cls":
        labels = torch.randint(0, fam.config["num_labels"], (batch,), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # vision2seq (BLIP-2): image tokens in front of the text, one per query token
    n_query = fam.config["num_query_tokens"]
    img = torch.full((batch, n_query), fam.config["image_token_index"])
    ids = torch.cat([img, ids], dim=1)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch`` without gradients."""
    with torch.no_grad():
        return model(**batch).logits.detach().clone()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """``atol`` on logits scaled to at most 1 in size: float32 rounding grows with the logits (mT5's reach ~30)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual / scale, expected / scale, atol=atol, rtol=0)


def perturb_lora(model: torch.nn.Module, seed: int = 3, scale: float = 0.5) -> None:
    """Give every LoRA B (and embedding A) random values, and nudge saved heads, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)



# ---------------------------------------------------------------------------------------------- data and LoRA


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


def train_step(model, batch, seed: int = 0) -> tuple:
    """One causal-LM training step's (loss, {name: gradient}, autograd node names) on ``batch`` (inputs = labels)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    nodes = graph_nodes(loss)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, nodes


def spy_model_loads(monkeypatch) -> list:
    """The dtypes ``lorakit.models.load_model_and_tokenizer`` is asked for from now on in the test, in order."""
    import lorakit.models

    dtypes = []
    real = lorakit.models.load_model_and_tokenizer

    def spy(name, **kw):
        dtypes.append(kw["dtype"])
        return real(name, **kw)

    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer", spy)
    return dtypes


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
