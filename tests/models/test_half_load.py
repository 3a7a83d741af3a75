"""Loading in bf16 / fp16 from float32 files tensor by tensor (models.half_load), and the precision of a model to
be loaded (models.precision): the same model transformers' loader builds, at a lower peak."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit.errors import ConfigError
from lorakit.models import load_model_and_tokenizer
from lorakit.models.half_load import load_half
from lorakit.models.precision import check_precision_option, config_shapes, model_precision, precision_for


def saved(folder, shards=False, **config):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **config))
    model.generation_config.max_new_tokens = 7  # something of the folder's own, to see it is read
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "5GB")
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards, tie", [(False, False), (True, False), (False, True)])
def test_the_same_model_as_from_pretrained(tmp_path, dtype, shards, tie):
    folder = saved(tmp_path / "m", shards=shards, tie_word_embeddings=tie)
    assert shards == (folder / "model.safetensors.index.json").is_file()
    ours = load_half(AutoModelForCausalLM, str(folder), dtype, False, {})
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    assert ours is not None and not ours.training and ours.config._name_or_path == str(folder)
    assert ours.generation_config.max_new_tokens == 7
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_other_cases_are_left_to_from_pretrained(tmp_path):
    folder = saved(tmp_path / "m")
    assert load_half(AutoModelForCausalLM, str(folder), torch.float32, False, {}) is None  # not a half dtype
    assert load_half(AutoModelForCausalLM, str(folder), torch.bfloat16, False, {"device_map": "cpu"}) is None
    assert load_half(AutoModelForCausalLM, str(folder), torch.bfloat16, True, {}) is None
    assert load_half(AutoModelForCausalLM, "some/hub-id", torch.bfloat16, False, {}) is None
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert load_half(AutoModelForCausalLM, str(folder), torch.bfloat16, False, {}) is None


def test_load_model_and_tokenizer_takes_it(tmp_path, embedded_model_dir, monkeypatch):
    import lorakit.models.half_load as half_load

    from .test_embedded import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path, embedded_model_dir)
    used = []
    real = half_load.half_state_dict
    monkeypatch.setattr(half_load, "half_state_dict", lambda *a: used.append(1) or real(*a))
    model, _ = load_model_and_tokenizer(str(folder), dtype="bfloat16")
    assert used == [1] and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.pad_token_id is not None


def test_precision_for_a_model_before_loading_it(tmp_path):
    folder = saved(tmp_path / "m")
    assert config_shapes(str(folder)) == [(32, 64), (64, 32), (32, 32)]
    assert config_shapes(str(tmp_path / "missing")) is None
    assert precision_for(str(folder), "fp32").dtype == torch.float32
    assert precision_for(str(folder), "bf16").dtype == torch.bfloat16
    given = precision_for(str(folder), "auto", dtype="float16", dtype_source="--dtype")
    assert (given.name, given.dtype, given.reason) == ("fp16", torch.float16, "--dtype float16 as given")
    over = precision_for(str(folder), "bf16", dtype="float32", dtype_source="--dtype")
    assert over.name == "fp32" and "overriding precision bf16" in over.reason
    seen = []
    auto = precision_for(str(folder), "auto", measure=lambda shapes: seen.append(shapes) or {"fp32": 1, "bf16": 0.2})
    assert auto.setting == "auto" and auto.name in ("fp32", "bf16")  # fp32 without measuring on a CPU lacking bf16
    assert seen in ([], [[(32, 64), (64, 32), (32, 32)]])
    with pytest.raises(ConfigError, match=r"^--precision: unknown precision 'fp4'"):
        check_precision_option("fp4")
    assert check_precision_option("BFloat16") == "bf16"


def test_model_precision_reads_the_frozen_weights(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert model_precision(model) == "fp32"
    model.requires_grad_(False)
    assert model_precision(model.to(torch.bfloat16)) == "bf16"
    model.config.quantization_config = {"bnb_4bit_compute_dtype": "float32"}
    assert model_precision(model) == "fp32"
