"""lorakit inspect ADAPTER --check llama.cpp|vllm|ollama: what each runtime refuses or computes differently."""
from __future__ import annotations

import json

import pytest

from lorakit.cli.main import main
from lorakit.export.checks import check_adapter

from .conftest import save_adapter, save_tiny_llama


def levels(findings):
    return [(f.level, f.what) for f in findings]


def check(capsys, adapter, runtime, *extra):
    code = main(["inspect", str(adapter), "--check", runtime, *extra])
    out = capsys.readouterr().out
    return code, out[out.index(f"check {runtime}:"):]


def test_plain_adapter_passes_everywhere(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad")
    for runtime in ("llama.cpp", "vllm"):
        code, out = check(capsys, tmp_path / "ad", runtime)
        assert code == 0 and "nothing" in out, out


def test_rslora_differs_in_llama_cpp_only(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad", use_rslora=True, r=4, lora_alpha=8)
    code, out = check(capsys, tmp_path / "ad", "llama.cpp")
    assert code == 0 and "differs" in out and "0.5x lorakit's scale" in out and "folds this into lora_b" in out
    code, out = check(capsys, tmp_path / "ad", "vllm")
    assert code == 0 and "differs" not in out and "rsLoRA: vLLM scales by lora_alpha / sqrt(r) too" in out


def test_patterns_differ_in_vllm(tiny_base, tmp_path):
    save_adapter(tiny_base, tmp_path / "ad", r=4, lora_alpha=8, rank_pattern={"q_proj": 2},
                 alpha_pattern={"v_proj": 2})
    vllm = check_adapter(str(tmp_path / "ad"), "vllm")
    differs = {f.what for f in vllm if f.level == "differs"}
    # q_proj: lorakit 8/2 = 4, vLLM 8/4 = 2 -> 0.5x; v_proj: lorakit 2/4, vLLM 8/4 -> 4x
    assert any("0.5x" in w and "q_proj" in w for w in differs) and any("4x" in w and "v_proj" in w for w in differs)
    cpp = check_adapter(str(tmp_path / "ad"), "llama.cpp")
    assert [f.what for f in cpp if f.level == "differs"] == [
        "llama.cpp (alpha / r) scales model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj by 4x "
        "lorakit's scale"]  # q_proj's rank_pattern alone is what llama.cpp computes (alpha / its own r)
    assert any(f.level == "ok" and "rank_pattern" in f.what for f in cpp)


def test_rank_above_vllm_default_is_refused_with_the_flag_to_pass(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad", r=24, lora_alpha=48, target_modules=["q_proj"])
    code, out = check(capsys, tmp_path / "ad", "vllm")
    assert code == 1 and "rank 24 is above vLLM's default max_lora_rank 16" in out and "--max-lora-rank 32" in out


def test_modules_to_save_and_dora_are_refused(tiny_base, tmp_path, capsys):
    save_adapter(tiny_base, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["norm"])
    for runtime in ("llama.cpp", "vllm", "ollama"):
        code, out = check(capsys, tmp_path / "ad", runtime)
        assert code == 1 and "refuses modules_to_save tensors (model.norm.weight)" in out, out
    save_adapter(tiny_base, tmp_path / "dora", target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    findings = check_adapter(str(tmp_path / "dora"), "vllm")
    assert ("refuses", "DoRA (use_dora): vLLM has no per-row magnitude") in levels(findings)


def test_tied_embedding_is_refused_for_llama_cpp(tmp_path, capsys):
    save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    save_adapter(tmp_path / "tied", tmp_path / "ad", target_modules=["q_proj", "embed_tokens"])
    code, out = check(capsys, tmp_path / "ad", "llama.cpp")
    assert code == 1 and "model.embed_tokens: the model's head is tied" in out


def test_unknown_base_is_said(tiny_base, tmp_path):
    save_adapter(tiny_base, tmp_path / "ad", target_modules=["q_proj"])
    findings = check_adapter(str(tmp_path / "ad"), "llama.cpp", model=str(tmp_path / "missing"))
    assert any("base model not available" in f.what for f in findings)


def test_ollama_checks_the_chat_template(tiny_chat_base, tmp_path, capsys):
    save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj"])
    code, out = check(capsys, tmp_path / "ad", "ollama")
    assert code == 0 and "the chat template is chatml" in out
    (tmp_path / "ad" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    code, out = check(capsys, tmp_path / "ad", "ollama")
    assert code == 1 and "not one lorakit can translate" in out


def test_check_needs_an_adapter(capsys):
    assert main(["inspect", "--model", "embedded", "--check", "vllm"]) == 1
    assert "checks a saved adapter" in capsys.readouterr().err


@pytest.mark.parametrize("r, want", [(8, None), (16, None), (17, 32), (64, 64), (300, 320)])
def test_vllm_rank_rounding(tiny_base, tmp_path, r, want):
    save_adapter(tiny_base, tmp_path / "ad", r=r, lora_alpha=r, target_modules=["q_proj"])
    refusals = [f for f in check_adapter(str(tmp_path / "ad"), "vllm") if f.level == "refuses"]
    assert (refusals[0].fix if refusals else None) == (want and f"start vLLM with --max-lora-rank {want}")
