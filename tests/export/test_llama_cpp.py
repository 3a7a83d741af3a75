"""Exported files run in llama.cpp (llama-cpp-python) against lorakit, on lorakit's own token ids.

Tiny models in float32 must agree to rounding: the merged model file (tied and untied heads, llama.cpp's q/k
row order, the tokenizer) and the LoRA adapter file (every linear, the embedding and the head, rsLoRA,
rank_pattern and alpha_pattern folded). On the embedded SmolLM2 the base is its own Q4_1 GGUF file, which
llama.cpp also runs with quantised activations, so lorakit's dequantised model and llama.cpp do not agree
exactly even without an adapter: that agreement is measured first, and the adapter is held to it.

Needs llama-cpp-python (pip install 'lorakit[gguf-check]'; `make test-slow` installs it). Without it these
tests are skipped, except under CI=true, where they fail.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lorakit.cli.main import main

from .conftest import save_adapter, save_tiny_llama

pytestmark = pytest.mark.slow

IDS = [1, 4093, 314, 253, 1345, 28, 13, 880, 9, 2, 1, 4093, 198, 1683, 2, 198, 1, 520, 9531, 198]
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        from lorakit.export.llama_cpp import INSTALL_HINT

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return llama_cpp


def cpp_model(path, lora=None, exact=False):
    """``exact``: attention cache in float32, so a float32 file agrees with transformers to rounding."""
    from lorakit.export.llama_cpp import LlamaCppModel

    return LlamaCppModel(path, lora, n_ctx=256, f32_cache=exact)


def export(*args):
    assert main(["export", *map(str, args)]) == 0


def chat_base(folder, embedded_model_dir, **kw):
    import shutil

    model = save_tiny_llama(folder, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir / name, folder / name)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_merged_model_matches_transformers(llama_cpp, tmp_path, embedded_model_dir, tied):
    model = chat_base(tmp_path / "base", embedded_model_dir, tie_word_embeddings=tied)
    export("--model", tmp_path / "base", "--to", "gguf-merged", "--out", tmp_path / "m.gguf", "--outtype", "f32")
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0].numpy()
    got = cpp_model(tmp_path / "m.gguf", exact=True).logits(IDS)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_merged_file_tokenizes_like_transformers(llama_cpp, tmp_path, embedded_model_dir):
    from transformers import AutoTokenizer

    chat_base(tmp_path / "base", embedded_model_dir)
    export("--model", tmp_path / "base", "--to", "gguf-merged", "--out", tmp_path / "m.gguf", "--outtype", "f32")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    cpp = cpp_model(tmp_path / "m.gguf")
    conversation = [{"role": "user", "content": "Où est la gare ? 3 tickets, 12.50€ each!"},
                    {"role": "assistant", "content": "  Two streets north.\n\tThen left."}]
    texts = ["Hello world", "  leading spaces and\nnew lines\n\n", "naïve café 😀 1234567 x==y",
             tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)]
    for text in texts:
        assert cpp.tokenize(text) == tokenizer.encode(text, add_special_tokens=False), text


def test_tiny_adapter_matches_lorakit(llama_cpp, tmp_path, embedded_model_dir):
    chat_base(tmp_path / "base", embedded_model_dir, tie_word_embeddings=False)
    export("--model", tmp_path / "base", "--to", "gguf-merged", "--out", tmp_path / "base.gguf", "--outtype", "f32")
    lora = save_adapter(tmp_path / "base", tmp_path / "ad", target_modules=ALL_TARGETS + ["embed_tokens", "lm_head"],
                        use_rslora=True, rank_pattern={"v_proj": 2, "lm_head": 6}, alpha_pattern={"o_proj": 3})
    export("--adapter", tmp_path / "ad", "--to", "gguf", "--out", tmp_path / "ad.gguf")
    with torch.no_grad():
        want = lora(input_ids=torch.tensor([IDS])).logits[0].numpy()
    got = cpp_model(tmp_path / "base.gguf", tmp_path / "ad.gguf", exact=True).logits(IDS)
    without = cpp_model(tmp_path / "base.gguf", exact=True).logits(IDS)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale
    assert np.abs(without - want).max() > 0.1 * scale  # the adapter's effect is there, and llama.cpp applies it


def embedded_sequences(tokenizer) -> list[list[int]]:
    """Real prompts: the demo's test tickets with their answers, and chat turns from the chat demo data."""
    import json
    from importlib.resources import files

    from lorakit.data.selection import make_template, recipe_records
    from lorakit.data.tokenize import encode_answer, encode_prompt
    from lorakit.train.recipe import load_recipe

    cfg = load_recipe("demo")
    _, records, _ = recipe_records(cfg.data, cfg.train.seed, need_labels=True)
    template = make_template(cfg.data)
    seqs = []
    for rec in records[:40]:
        prompt, answer = template.render(rec, tokenizer)
        seqs.append(encode_prompt(tokenizer, [prompt])[0] + encode_answer(tokenizer, [answer])[0])
    lines = files("lorakit.data.builtin").joinpath("chat_train.jsonl").read_text().splitlines()[:10]
    for line in lines:
        messages = json.loads(line)["messages"]
        seqs.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)[:160])
    return seqs


def agreement(a, b) -> float:
    return sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b)) / sum(len(x) for x in a)


def test_embedded_model_adapter_agrees_with_lorakit_as_well_as_the_base_does(llama_cpp, tmp_path):
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import embedded_gguf_path, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("embedded", dtype="float32")
    seqs = embedded_sequences(tokenizer)
    with torch.no_grad():
        base_ours = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    plain = cpp_model(embedded_gguf_path())
    base_cpp = [plain.logits(s) for s in seqs]
    baseline = agreement(base_ours, base_cpp)

    torch.manual_seed(0)  # lorakit's own A init; B random at the size a few hundred training steps reach
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS,
                                            base_model_name_or_path="embedded"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora.save_pretrained(tmp_path / "ad")
    export("--adapter", tmp_path / "ad", "--to", "gguf", "--out", tmp_path / "ad.gguf")
    with torch.no_grad():
        ad_ours = [lora(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
    cpp = cpp_model(embedded_gguf_path(), tmp_path / "ad.gguf")
    ad_cpp = [cpp.logits(s) for s in seqs]
    cpp.close()
    plain.close()
    with_adapter = agreement(ad_ours, ad_cpp)
    print(f"top-1 agreement lorakit vs llama.cpp: base {baseline:.4f}, base + adapter {with_adapter:.4f} "
          f"({sum(map(len, seqs))} positions); adapter changed top-1 at {1 - agreement(base_ours, ad_ours):.1%} "
          f"(lorakit), {1 - agreement(base_cpp, ad_cpp):.1%} (llama.cpp)")
    assert baseline >= 0.95
    assert with_adapter >= 0.95 and with_adapter >= baseline - 0.02
    assert 1 - agreement(base_ours, ad_ours) > 0.05  # the adapter's effect is visible ...
    assert 1 - agreement(base_cpp, ad_cpp) > 0.05  # ... in both


def test_embedded_model_adapter_is_exact_on_a_float32_base(llama_cpp, tmp_path):
    """The same adapter file on the embedded model's dequantised weights written as float32: no quantisation
    on either side, so llama.cpp and lorakit agree to rounding at every position."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("embedded", dtype="float32")
    seqs = embedded_sequences(tokenizer)[:12]
    export("--model", "embedded", "--to", "gguf-merged", "--out", tmp_path / "base.gguf", "--outtype", "f32")
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS, use_rslora=True,
                                            base_model_name_or_path="embedded"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora.save_pretrained(tmp_path / "ad")
    export("--adapter", tmp_path / "ad", "--to", "gguf", "--out", tmp_path / "ad.gguf")
    cpp = cpp_model(tmp_path / "base.gguf", tmp_path / "ad.gguf", exact=True)
    with torch.no_grad():
        ours = [lora(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
    theirs = [cpp.logits(s) for s in seqs]
    cpp.close()
    assert agreement(ours, theirs) >= 0.998  # a top-1 flip needs a tie within rounding
    assert max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(ours, theirs)) < 1e-3
