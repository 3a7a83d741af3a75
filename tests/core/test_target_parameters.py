"""target_parameters (LoRA on raw parameters, e.g. fused 3-D MoE experts) against peft's ParamWrapper, on tiny
Mixtral ([experts, out, in] experts) and gpt-oss ([experts, in, out], ``is_transposed``) models."""
from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle

from lorakit import LoraConfig, LoraError, TargetError, get_peft_model  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402

from tiny import assert_logits_close, batch_for, build, instantiate, logits, single_thread  # noqa: E402,F401
from core.peft_oracle import assert_same_merge, check_variant, make_pair, quiet  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_gpt_oss():
    """gpt-oss: experts stored [experts, in, out] with biases; intermediate size differs from the hidden one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: the YaRN factor of so short a context
        return instantiate("GptOssConfig", "GptOssForCausalLM", 0, vocab_size=100, hidden_size=32,
                           intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                           bos_token_id=1, eos_token_id=2).eval()


MODELS = {"mixtral": lambda: build("mixtral"), "gpt_oss": tiny_gpt_oss}
CASES = {
    "experts-and-attention": dict(target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS),
    "experts-only": dict(target_modules=[], target_parameters=EXPERTS),
    "rank-pattern": dict(target_modules=["q_proj"], target_parameters=EXPERTS, rank_pattern={"down_proj": 2},
                         alpha_pattern={"gate_up_proj": 4}),
    "one-parameter": dict(target_modules=[], target_parameters=["experts.down_proj"], use_rslora=True),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(model, case, tmp_path):
    ours, theirs = check_variant(MODELS[model], "mixtral", tmp_path, r=4, lora_alpha=8, **CASES[case])
    assert_same_merge(ours, theirs)


def test_keys_nest_as_peft_and_rank_pattern_reaches_each_parameter():
    ours, _ = make_pair(MODELS["mixtral"], r=4, target_modules=[], target_parameters=EXPERTS,
                        rank_pattern={"down_proj": 2})
    shapes = {k.removeprefix("base_model.model.model.layers.0.mlp.experts."): tuple(v.shape)
              for k, v in ours.lora_state_dict().items() if ".layers.0." in k}
    experts = 2  # the tiny Mixtral's
    assert shapes == {"base_layer.lora_A.weight": (4 * experts, 32), "base_layer.lora_B.weight": (128, 4 * experts),
                      "lora_A.weight": (2 * experts, 64), "lora_B.weight": (32, 2 * experts)}


def test_each_expert_gets_its_own_low_rank_update():
    model = get_peft_model(build("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS[:1]))
    layer = model.model.model.layers[0].mlp.experts
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    delta = layer.delta_weight("default")  # [experts, out, in]
    A = layer.lora_A["default"].weight.reshape(2, 2, -1)
    B = layer.lora_B["default"].weight.reshape(-1, 2, 2)
    for e in range(2):
        torch.testing.assert_close(delta[e], B[:, :, e] @ A[e] * layer.scaling["default"])
        assert torch.linalg.matrix_rank(delta[e]) <= 2


def test_a_second_adapter_joins_the_same_wrappers_and_switching_works():
    model = get_peft_model(build("mixtral"), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    model.add_adapter("b", LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    experts = model.model.model.layers[0].mlp.experts
    assert sorted(experts.r) == ["b", "default"] and sorted(experts.base_layer.r) == ["b", "default"]
    with pytest.raises(LoraError, match="same parameters"):
        model.add_adapter("c", LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS[:1]))
    batch = batch_for("mixtral")
    model.delete_adapter("default")
    model.delete_adapter("b")
    assert type(model.model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert_logits_close(logits(model, batch), logits(build("mixtral"), batch))


@pytest.mark.parametrize("kw,err,match", [
    (dict(target_parameters=["experts.nope"]), TargetError, "match no parameter"),
    (dict(target_parameters=EXPERTS, lora_dropout=0.1), TargetError, "lora_dropout"),
    (dict(target_parameters=EXPERTS, use_dora=True), TargetError, "use_dora"),
])
def test_bad_requests_are_refused_before_anything_changes(kw, err, match):
    model = build("mixtral")
    with pytest.raises(err, match=match):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], **kw))
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_config_takes_a_list_and_an_empty_target_modules_only_with_parameters():
    with pytest.raises(ConfigError, match="list of parameter names"):
        LoraConfig(target_parameters="mlp.experts.down_proj")
    with pytest.raises(ConfigError, match="empty list"):
        LoraConfig(target_modules=[])
    assert LoraConfig(target_modules=[], target_parameters=EXPERTS).target_modules == ()


def test_per_row_adapters_and_combining_are_refused_as_in_peft():
    model = get_peft_model(build("mixtral"), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    batch = batch_for("mixtral")
    with pytest.raises(LoraError, match="target_parameters"):
        model(input_ids=batch["input_ids"], adapter_names=["default", "__base__"])
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    with pytest.raises(LoraError, match="target_parameters"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")


def test_moe_defaults_name_what_they_leave_out():
    from lorakit.targets import MOE_EXPERT_PARAMETERS, default_target_modules

    assert default_target_modules("mixtral") == ("q_proj", "v_proj")
    assert MOE_EXPERT_PARAMETERS["mixtral"] == tuple(EXPERTS)
    assert set(MOE_EXPERT_PARAMETERS) >= {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "llama4"}
    # the parameters it names exist in the family's model
    names = {n.split(".", 3)[-1] for n, _ in build("mixtral").named_parameters() if ".layers.0." in n}
    assert all(p in names for p in MOE_EXPERT_PARAMETERS["mixtral"])
    from lorakit import dry_run

    table = dry_run(build("mixtral"), LoraConfig(r=4)).table()  # `lorakit inspect --model M` prints this
    assert "left out: the fused experts" in table and "target_parameters=['mlp.experts.gate_up_proj'" in table
    report = dry_run(build("mixtral"), LoraConfig(r=4, target_parameters=EXPERTS))
    assert "left out" not in report.table() and "param x2" in report.table()
    model = get_peft_model(build("mixtral"), LoraConfig(r=4, target_parameters=EXPERTS))
    assert report.trainable_params == model.get_nb_trainable_parameters()[0]


def test_lorakit_inspect_describes_a_saved_expert_adapter(tmp_path, capsys):
    """A raw parameter's pair holds r rows per expert: inspect takes it as such (not as a wrong rank)."""
    from lorakit.cli.main import main

    model = get_peft_model(build("mixtral"), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS,
                                                         rank_pattern={"down_proj": 2}))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target_parameters: ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']" in out
    assert "mlp.experts.base_layer.lora_A.weight  (8, 32)" in out


@pytest.mark.parametrize("family,params", [("llama", ["self_attn.q_proj.weight", "mlp.down_proj.weight"]),
                                           ("bloom", ["self_attention.dense.weight"])])
def test_a_2d_parameter_matches_peft(family, params, tmp_path):
    """A 2-D parameter (here a linear layer's weight, reached as a parameter): one pair, delta = s B A."""
    ours, theirs = check_variant(lambda: build(family), family, tmp_path, r=4, lora_alpha=8, target_modules=[],
                                 target_parameters=params)
    assert_same_merge(ours, theirs)
