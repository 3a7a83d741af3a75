"""lorakit export --to gguf: names, shapes and metadata read back with gguf's reader; the delta llama.cpp computes
from the file (alpha / r * B @ A, rows in llama.cpp's q/k order) equals lorakit's merged delta; refusals."""
from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from .conftest import save_adapter, save_tiny_llama
from lorakit.cli.main import main
from lorakit.errors import ExportError

N_HEAD, N_KV, HEAD_DIM, LAYERS = 4, 2, 8, 2  # tests/tiny.py's tiny_llama
LLAMA_CPP_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def export(adapter, out, *extra):
    return main(["export", "--adapter", str(adapter), "--to", "gguf", "--out", str(out), *extra])


def read(path):
    """{name: (values in torch order as float32, ggml shape, type)} and the metadata fields."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        tuple(reversed(t.shape.tolist()))), t.shape.tolist(), t.tensor_type) for t in reader.tensors}
    return tensors, {k: f.contents() for k, f in reader.fields.items()}


def from_llama_cpp_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, written out row by row: llama.cpp's row h*hd + 2j + t is transformers'
    row h*hd + t*hd/2 + j (rotary halves interleaved per head)."""
    out = np.empty_like(b)
    hd = b.shape[0] // n_head
    for h in range(n_head):
        for j in range(hd // 2):
            for t in range(2):
                out[h * hd + t * hd // 2 + j] = b[h * hd + 2 * j + t]
    return out


def gguf_deltas(path):
    """Per transformers module: the weight delta llama.cpp adds, alpha / r * B @ A, in transformers' row order."""
    tensors, fields = read(path)
    alpha = fields["adapter.lora.alpha"]
    deltas = {}
    for layer in range(LAYERS):
        for hf, cpp in LLAMA_CPP_NAMES.items():
            a = tensors[f"blk.{layer}.{cpp}.weight.lora_a"][0]
            b = tensors[f"blk.{layer}.{cpp}.weight.lora_b"][0]
            if hf in ("q_proj", "k_proj"):
                b = from_llama_cpp_rows(b, N_HEAD if hf == "q_proj" else N_KV)
            part = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            deltas[f"model.layers.{layer}.{part}.{hf}"] = alpha / b.shape[1] * (b @ a)
    return deltas


def lorakit_deltas(lora):
    """What lorakit adds to each weight: merged minus base, from lorakit's own merge."""
    base = {n: m.base_layer.weight.detach().clone() for n, m in lora.model.named_modules() if hasattr(m, "base_layer")}
    merged = lora.merge_and_unload()
    mods = dict(merged.named_modules())
    return {n: (mods[n].weight.detach() - w).numpy() for n, w in base.items()}


def test_names_shapes_and_metadata(tiny_base, tmp_path):
    save_adapter(tiny_base, tmp_path / "ad")
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 0
    tensors, fields = read(tmp_path / "ad.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    want = {f"blk.{i}.{cpp}.weight.lora_{ab}" for i in range(LAYERS) for cpp in LLAMA_CPP_NAMES.values()
            for ab in "ab"}
    assert set(tensors) == want
    hidden, ffn, kv = 32, 64, N_KV * HEAD_DIM
    ins = {"attn_q": hidden, "attn_k": hidden, "attn_v": hidden, "attn_output": hidden, "ffn_gate": hidden,
           "ffn_up": hidden, "ffn_down": ffn}
    outs = {"attn_q": hidden, "attn_k": kv, "attn_v": kv, "attn_output": hidden, "ffn_gate": ffn, "ffn_up": ffn,
            "ffn_down": hidden}
    for cpp in LLAMA_CPP_NAMES.values():  # ggml shapes: lora_a [in, r], lora_b [r, out] (what llama.cpp checks)
        assert tensors[f"blk.1.{cpp}.weight.lora_a"][1] == [ins[cpp], 4]
        assert tensors[f"blk.1.{cpp}.weight.lora_b"][1] == [4, outs[cpp]]
        assert tensors[f"blk.1.{cpp}.weight.lora_a"][2] == gguf.GGMLQuantizationType.F32


def test_pairs_hold_A_and_B_with_llama_cpp_row_order(tiny_base, tmp_path):
    lora = save_adapter(tiny_base, tmp_path / "ad")
    export(tmp_path / "ad", tmp_path / "ad.gguf")
    tensors, _ = read(tmp_path / "ad.gguf")
    layer = lora.model.model.layers[1].self_attn
    A = layer.q_proj.lora_A["default"].weight.detach().numpy()
    B = layer.q_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_a"][0], A)
    assert not np.array_equal(tensors["blk.1.attn_q.weight.lora_b"][0], B)  # reordered ...
    np.testing.assert_array_equal(from_llama_cpp_rows(tensors["blk.1.attn_q.weight.lora_b"][0], N_HEAD), B)  # ... only
    Bv = layer.v_proj.lora_B["default"].weight.detach().numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"][0], Bv)  # v: transformers' order


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True, "r": 8, "lora_alpha": 4},
    {"alpha_pattern": {"v_proj": 32, r"model\.layers\.1\.mlp\.down_proj": 2}},
    {"rank_pattern": {"q_proj": 2, "up_proj": 6}, "alpha_pattern": {"q_proj": 5}, "use_rslora": True},
], ids=["plain", "rslora", "alpha_pattern", "rank_and_alpha_pattern_rslora"])
def test_llama_cpp_delta_equals_lorakit_merge(tiny_base, tmp_path, config):
    lora = save_adapter(tiny_base, tmp_path / "ad", **config)
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 0
    got, want = gguf_deltas(tmp_path / "ad.gguf"), lorakit_deltas(lora)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_f16_and_q8_0_round_trip_error_is_small(tiny_base, tmp_path):
    save_adapter(tiny_base, tmp_path / "ad", r=4)
    export(tmp_path / "ad", tmp_path / "f32.gguf")
    ref, _ = read(tmp_path / "f32.gguf")
    for outtype, tol in (("f16", 1e-3), ("q8_0", 1.5e-2)):
        export(tmp_path / "ad", tmp_path / f"{outtype}.gguf", "--outtype", outtype)
        got, fields = read(tmp_path / f"{outtype}.gguf")
        for name, (values, shape, qtype) in got.items():
            scale = np.abs(ref[name][0]).max()
            assert np.abs(values - ref[name][0]).max() <= tol * scale, name
            assert shape == ref[name][1]
        a, b = got["blk.0.attn_q.weight.lora_a"][2], got["blk.0.attn_q.weight.lora_b"][2]
        if outtype == "f16":
            assert a == b == gguf.GGMLQuantizationType.F16
        else:  # lora_a rows (32 long) are q8_0 blocks; lora_b rows (r=4 long) cannot be and stay f16
            assert (a, b) == (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16)
        assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[outtype]


def test_q8_0_changes_the_delta_little(tiny_base, tmp_path):
    lora = save_adapter(tiny_base, tmp_path / "ad", r=4)
    export(tmp_path / "ad", tmp_path / "q.gguf", "--outtype", "q8_0")
    got, want = gguf_deltas(tmp_path / "q.gguf"), lorakit_deltas(lora)
    for name in want:
        err = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
        assert err < 0.02, (name, err)


@pytest.mark.parametrize("config, says", [
    ({"modules_to_save": ["norm"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "lm_head"]}, None),  # untied head: exported (llama.cpp's output.weight)
])
def test_whole_tensors_are_refused_untied_head_is_not(tiny_base, tmp_path, capsys, config, says):
    save_adapter(tiny_base, tmp_path / "ad", **config)
    code = export(tmp_path / "ad", tmp_path / "ad.gguf")
    if says is None:
        assert code == 0
        tensors, _ = read(tmp_path / "ad.gguf")
        assert tensors["output.weight.lora_b"][1] == [4, 100]
        return
    err = capsys.readouterr().err
    assert code == 1 and says in err and "--to gguf-merged" in err
    assert not (tmp_path / "ad.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_trained_biases_are_refused(tmp_path, capsys):
    save_tiny_llama(tmp_path / "biased", attention_bias=True)
    save_adapter(tmp_path / "biased", tmp_path / "ad", bias="lora_only")
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 1
    err = capsys.readouterr().err
    assert "trained biases" in err and "q_proj.base_layer.bias" in err and "--to gguf-merged" in err


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_head_or_embedding_is_refused(tmp_path, capsys, target):
    save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    save_adapter(tmp_path / "tied", tmp_path / "ad", target_modules=["q_proj", target])
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 1
    err = capsys.readouterr().err
    assert "tied" in err and "--to gguf-merged" in err and not (tmp_path / "ad.gguf").exists()


def test_untied_embedding_is_written_as_llama_cpp_expects(tiny_base, tmp_path):
    lora = save_adapter(tiny_base, tmp_path / "ad", target_modules=["embed_tokens"])
    export(tmp_path / "ad", tmp_path / "ad.gguf")
    tensors, fields = read(tmp_path / "ad.gguf")
    emb = lora.model.model.embed_tokens
    A, B = emb.lora_embedding_A["default"].detach().numpy(), emb.lora_embedding_B["default"].detach().numpy()
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a[1] == [4, 100] and b[1] == [4, 32]  # llama.cpp: a ne[1] = vocab, b ne[1] = hidden
    delta = fields["adapter.lora.alpha"] / 4 * (a[0] @ b[0].T)  # one row per token: A[:, t] through B
    np.testing.assert_allclose(delta, lorakit_deltas(lora)["model.embed_tokens"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a[0], A.T)
    np.testing.assert_array_equal(b[0], B)


def test_other_architectures_are_refused(tmp_path, capsys):
    from tiny import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    save_adapter(tmp_path / "gpt2", tmp_path / "ad", target_modules=["c_attn"])
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 1
    err = capsys.readouterr().err
    assert "'gpt2' model" in err and "llama" in err and "convert_hf_to_gguf.py" in err


def test_dora_is_refused(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad", target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 1
    err = capsys.readouterr().err
    assert "DoRA" in err or "use_dora" in err
    assert not (tmp_path / "ad.gguf").exists()


def test_existing_output_needs_overwrite_and_links_are_refused(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad")
    out = tmp_path / "ad.gguf"
    out.write_bytes(b"keep me")
    assert export(tmp_path / "ad", out) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert export(tmp_path / "ad", out, "--overwrite") == 0
    assert out.read_bytes()[:4] == b"GGUF" and oct(out.stat().st_mode & 0o777) != "0o600"
    link = tmp_path / "link.gguf"
    os.symlink(tmp_path / "elsewhere.gguf", link)
    assert export(tmp_path / "ad", link, "--overwrite") == 1
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere.gguf").exists()
    assert export(tmp_path / "ad", tmp_path / "ad.bin") == 1
    assert ".gguf" in capsys.readouterr().err


def test_a_failure_while_writing_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    import lorakit.export.gguf_adapter as mod

    save_adapter(tiny_base, tmp_path / "ad")
    calls = []

    def failing(data, outtype, force_f32=False):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return np.asarray(data, dtype=np.float32), gguf.GGMLQuantizationType.F32

    monkeypatch.setattr(mod, "encode", failing)
    assert export(tmp_path / "ad", tmp_path / "ad.gguf") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]


def test_exported_delta_matches_with_torch_reference(tiny_base, tmp_path):
    """The same check through lorakit's forward: base + the file's deltas gives the adapted model's logits."""
    lora = save_adapter(tiny_base, tmp_path / "ad", use_rslora=True)
    export(tmp_path / "ad", tmp_path / "ad.gguf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    mods = dict(plain.named_modules())
    with torch.no_grad():
        for name, delta in gguf_deltas(tmp_path / "ad.gguf").items():
            mods[name].weight += torch.from_numpy(delta)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lora(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
