import pytest

from lorakit import LoraConfig, TargetError
from lorakit.targets import DEFAULT_TARGET_MODULES, default_target_modules, select_targets

SEED_FAMILIES = ["t5", "mt5", "bart", "gpt2", "bloom", "blip-2", "opt", "gptj", "gpt_neox", "gpt_neo", "bert",
                 "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta", "layoutlm", "llama", "chatglm",
                 "gpt_bigcode", "mpt"]
TODAY = ["mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "falcon", "stablelm"]

LLAMA = {
    "": "LlamaForCausalLM",
    "model.embed_tokens": "embedding",
    **{f"model.layers.{i}.self_attn.{p}": "linear" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"model.layers.{i}.mlp.{p}": "linear" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")},
    **{f"model.layers.{i}.self_attn": "LlamaAttention" for i in range(3)},
    "lm_head": "linear",
}


def test_every_family_has_defaults():
    for fam in SEED_FAMILIES + TODAY:
        assert default_target_modules(fam), fam
    assert DEFAULT_TARGET_MODULES["bloom"] == ("query_key_value",)
    assert default_target_modules("xlm_roberta") == ("query", "value")  # '-' and '_' both work


def test_names_match_path_ends():
    got = select_targets(LLAMA, LoraConfig(target_modules=["q_proj", "self_attn.v_proj"]))
    assert got == [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]


def test_regex_is_full_match():
    got = select_targets(LLAMA, LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj"))
    assert got == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_all_linear_skips_output_head():
    got = select_targets(LLAMA, LoraConfig(target_modules="all-linear"), output_heads=["lm_head"])
    assert "lm_head" not in got and len(got) == 21 and "model.embed_tokens" not in got


def test_default_used_when_none():
    got = select_targets(LLAMA, LoraConfig(), model_type="llama")
    assert {g.rsplit(".", 1)[1] for g in got} == {"q_proj", "v_proj"}


def test_typo_is_an_error_even_when_others_match():
    with pytest.raises(TargetError) as e:
        select_targets(LLAMA, LoraConfig(target_modules=["q_proj", "v_prj"]))
    msg = str(e.value)
    assert "'v_prj'" in msg and "v_proj" in msg and "gate_proj" in msg  # lists what exists, suggests a fix


def test_unknown_family_lists_linear_modules():
    with pytest.raises(TargetError) as e:
        select_targets(LLAMA, LoraConfig(), model_type="brandnew")
    assert "brandnew" in str(e.value) and "all-linear" in str(e.value) and "down_proj" in str(e.value)


def test_regex_matching_nothing():
    with pytest.raises(TargetError, match="matches no module"):
        select_targets(LLAMA, LoraConfig(target_modules=r".*\.nothing"))


def test_container_cannot_be_wrapped():
    with pytest.raises(TargetError, match="cannot wrap"):
        select_targets(LLAMA, LoraConfig(target_modules=["self_attn"]))


def test_exclude_and_layers():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2],
                     layers_pattern="layers")
    assert select_targets(LLAMA, cfg) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_modules_to_save_are_never_targets():
    got = select_targets(LLAMA, LoraConfig(target_modules="all-linear"), modules_to_save=["lm_head"])
    assert "lm_head" not in got


def test_layers_that_match_nothing():
    with pytest.raises(TargetError, match="layers_to_transform"):
        select_targets(LLAMA, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
