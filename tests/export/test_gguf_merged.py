"""lorakit export --to gguf-merged: the merged weights under llama.cpp's names and row order, the hyperparameters, the
tokenizer (the same as llama.cpp's own converter wrote into the embedded model's GGUF file), the chat template the
adapter carries; refusals."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from lorakit.cli.main import main

from .conftest import save_adapter, save_tiny_llama
from .test_gguf_adapter import from_llama_cpp_rows


def export(*args):
    return main(["export", *map(str, args)])


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        tuple(reversed(t.shape.tolist()))), t.tensor_type) for t in reader.tensors}
    return tensors, {k: f.contents() for k, f in reader.fields.items()}


def test_merged_weights_names_and_hyperparameters(tiny_chat_base, tmp_path):
    lora = save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj", "k_proj", "down_proj"])
    merged = {k: v.numpy() for k, v in lora.merge_and_unload().state_dict().items()}
    assert export("--adapter", tmp_path / "ad", "--to", "gguf-merged", "--out", tmp_path / "m.gguf",
                  "--outtype", "f32") == 0
    tensors, fields = read(tmp_path / "m.gguf")
    assert fields["general.type"] == "model" and fields["general.architecture"] == "llama"
    assert {k: fields[f"llama.{k}"] for k in ("block_count", "embedding_length", "feed_forward_length",
                                              "attention.head_count", "attention.head_count_kv", "vocab_size",
                                              "rope.dimension_count")} == {
        "block_count": 2, "embedding_length": 32, "feed_forward_length": 64, "attention.head_count": 4,
        "attention.head_count_kv": 2, "vocab_size": 49152, "rope.dimension_count": 8}
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}  # tied head: no output.weight
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"][0], merged["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(from_llama_cpp_rows(tensors["blk.1.attn_q.weight"][0], 4),
                                  merged["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(from_llama_cpp_rows(tensors["blk.0.attn_k.weight"][0], 2),
                                  merged["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(tensors["token_embd.weight"][0], merged["model.embed_tokens.weight"])


def test_tokenizer_is_the_one_llama_cpp_wrote_for_the_embedded_model(embedded_model_dir):
    """The general path (transformers tokenizer -> GGUF) rebuilds the original GGUF file's tokenizer exactly."""
    from lorakit.export.vocab import add_vocab
    from lorakit.models import embedded_gguf_path

    writer = gguf.GGUFWriter(path=None, arch="llama")
    add_vocab(writer, embedded_model_dir, 49152)
    ours = {k: v.value for k, v in writer.kv_data[0].items() if k.startswith("tokenizer.")}
    original = gguf.GGUFReader(embedded_gguf_path())
    compared = 0
    for key, field in original.fields.items():
        if not key.startswith("tokenizer.ggml.") or key == "tokenizer.ggml.add_space_prefix":
            continue  # add_space_prefix: read by llama.cpp for SentencePiece vocabularies only
        assert list(ours[key]) == list(field.contents()) if isinstance(ours[key], list) else \
            ours[key] == field.contents(), key
        compared += 1
    assert compared == 10 and len(ours["tokenizer.ggml.tokens"]) == 49152 and ours["tokenizer.ggml.pre"] == "smollm"


def test_chat_template_comes_from_the_adapter(tiny_chat_base, tmp_path):
    save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj"])
    trained = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "ad" / "chat_template.jinja").write_text(trained)
    export("--adapter", tmp_path / "ad", "--to", "gguf-merged", "--out", tmp_path / "m.gguf")
    _, fields = read(tmp_path / "m.gguf")
    assert fields["tokenizer.chat_template"] == trained
    assert export("--model", tiny_chat_base, "--to", "gguf-merged", "--out", tmp_path / "base.gguf") == 0
    _, fields = read(tmp_path / "base.gguf")
    assert fields["tokenizer.chat_template"] == (tiny_chat_base / "chat_template.jinja").read_text()


@pytest.mark.parametrize("outtype, tol, qtype", [("f16", 1e-3, gguf.GGMLQuantizationType.F16),
                                                 ("q8_0", 1e-2, gguf.GGMLQuantizationType.Q8_0)])
def test_f16_and_q8_0(tiny_chat_base, tmp_path, outtype, tol, qtype):
    export("--model", tiny_chat_base, "--to", "gguf-merged", "--out", tmp_path / "f32.gguf", "--outtype", "f32")
    export("--model", tiny_chat_base, "--to", "gguf-merged", "--out", tmp_path / "x.gguf", "--outtype", outtype)
    ref, _ = read(tmp_path / "f32.gguf")
    got, fields = read(tmp_path / "x.gguf")
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[outtype]
    for name, (values, t) in got.items():
        assert t == (gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else qtype), name
        assert np.abs(values - ref[name][0]).max() <= tol * np.abs(ref[name][0]).max(), name


def test_untied_head_and_llama3_rope(tmp_path, embedded_model_dir):
    import shutil

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    save_tiny_llama(tmp_path / "b", vocab_size=49152, tie_word_embeddings=False, rope_parameters=rope,
                    max_position_embeddings=128)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / "b" / name)
    assert export("--model", tmp_path / "b", "--to", "gguf-merged", "--out", tmp_path / "m.gguf") == 0
    tensors, fields = read(tmp_path / "m.gguf")
    assert "output.weight" in tensors and fields["llama.rope.freq_base"] == 500000.0
    factors = tensors["rope_freqs.weight"][0]
    # wavelengths 2*pi*500000^(i/8), i = 0, 2, 4, 6: 6.3 (< 32/4: factor 1), then 167 and more (> 32/1: the full 8)
    np.testing.assert_array_equal(factors, [1.0, 8.0, 8.0, 8.0])


@pytest.mark.parametrize("change, says", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64}}, "'yarn' rotary scaling"),
])
def test_unsupported_settings_are_refused(tmp_path, capsys, embedded_model_dir, change, says):
    import shutil

    save_tiny_llama(tmp_path / "b", vocab_size=49152, **change)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / "b" / name)
    assert export("--model", tmp_path / "b", "--to", "gguf-merged", "--out", tmp_path / "m.gguf") == 1
    assert says in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_other_architectures_and_tokenizers_are_refused(tmp_path, capsys, tiny_chat_base):
    from tiny import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert export("--model", tmp_path / "gpt2", "--to", "gguf-merged", "--out", tmp_path / "g.gguf") == 1
    assert "'gpt2' model" in capsys.readouterr().err and not (tmp_path / "g.gguf").exists()
    spec = json.loads((tiny_chat_base / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["use_regex"] = False  # no splitting into words first: other merges apply
    (tiny_chat_base / "tokenizer.json").write_text(json.dumps(spec))
    assert export("--model", tiny_chat_base, "--to", "gguf-merged", "--out", tmp_path / "t.gguf") == 1
    err = capsys.readouterr().err
    assert "does not recognise this tokenizer's pre-tokenizer" in err and not (tmp_path / "t.gguf").exists()


@pytest.mark.parametrize("extra", [[], ["lm_head"], ["embed_tokens"]], ids=["linears", "tied_head", "tied_embedding"])
def test_merged_model_output_equals_the_adapter_through_torch(tiny_chat_base, tmp_path, extra):
    """Read back, un-permuted and loaded into a transformers model, the file gives the adapted model's logits,
    also when the adapter wraps one side of a tied embedding/head pair (the file then holds both tensors)."""
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] + extra
    lora = save_adapter(tiny_chat_base, tmp_path / "ad", use_rslora=True, target_modules=targets)
    export("--adapter", tmp_path / "ad", "--to", "gguf-merged", "--out", tmp_path / "m.gguf", "--outtype", "f32")
    tensors, _ = read(tmp_path / "m.gguf")
    assert ("output.weight" in tensors) == bool(extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_base, dtype=torch.float32).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # fill both separately
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    with torch.no_grad():
        for key, p in model.state_dict().items():
            name = names.get_name(key, try_suffixes=(".weight",))
            value = tensors[name if name in tensors else "token_embd.weight"][0]
            if ".q_proj." in key or ".k_proj." in key:
                value = from_llama_cpp_rows(value, 4 if ".q_proj." in key else 2)
            p.copy_(torch.from_numpy(value))
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 28, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lora(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
