"""init_lora_weights that read the base weights (PiSSA, OLoRA, LoftQ, orthogonal) against peft, and the
conversion of such an adapter into a plain LoRA for the unmodified base
(``path_initial_model_for_weight_conversion``)."""
from __future__ import annotations

import inspect
import json
import textwrap
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle

from lorakit import ConfigError, LoraConfig, LoraError, LoraModel, TargetError, get_peft_model  # noqa: E402

from tiny import assert_logits_close, batch_for, build, logits, single_thread  # noqa: E402,F401
from core.peft_oracle import assert_same_merge, check_variant, make_pair, quiet, train  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "bloom": ["query_key_value", "dense_4h_to_h"],
           "mixtral": ["q_proj", "o_proj"]}


@pytest.mark.parametrize("family", list(TARGETS))
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal"])
def test_init_matches_peft(family, init, tmp_path):
    """The same A, B and changed base from one seed, the model unchanged at the start, the same training."""
    if init == "olora" and family == "gpt2":
        pytest.skip("peft's OLoRA does not transpose Conv1D weights and fails on GPT-2; see the next test")
    ours, theirs = check_variant(lambda: build(family), family, tmp_path, r=4, lora_alpha=8,
                                 target_modules=TARGETS[family], init_lora_weights=init)
    assert_same_merge(ours, theirs)


def test_olora_on_conv1d_works_in_the_base_weights_layout():
    """GPT-2's Conv1D stores W as [in, out]: OLoRA's QR runs on W as [out, in] (peft's fails: wrong shapes)."""
    model = get_peft_model(build("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"))
    batch = batch_for("gpt2")
    assert_logits_close(logits(model, batch), logits(build("gpt2"), batch))
    layer = model.model.transformer.h[0].attn.c_attn
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)  # Q's columns: orthonormal
    assert torch.allclose(A, torch.triu(A), atol=1e-6)  # R's rows: upper triangular


def test_pissa_takes_the_principal_part_and_leaves_the_residual():
    W = build("llama").model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                                      init_lora_weights="pissa"))
    layer = model.model.model.layers[0].self_attn.q_proj
    part = layer.delta_weight("default")
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(part, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight + part, W, atol=1e-6, rtol=0)


def _cpu_loftq(monkeypatch):
    """peft's loftq_init hard-codes a CUDA/XPU device; run its own code with that one word changed to "cpu"."""
    import peft.tuners.lora.layer as peft_layer
    import peft.utils.loftq_utils as loftq_utils

    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    assert '"xpu" if is_xpu_available() else "cuda"' in source
    namespace = dict(vars(loftq_utils))
    exec(source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"'), namespace)  # noqa: S102 - the oracle's own code
    monkeypatch.setattr(peft_layer, "loftq_init", namespace["loftq_init"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1)])
def test_loftq_matches_peft(family, bits, iters, monkeypatch, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("scipy")  # peft's LoftQ config asks for it
    _cpu_loftq(monkeypatch)
    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS[family][:1], init_lora_weights="loftq",
              loftq_config={"loftq_bits": bits, "loftq_iter": iters})
    if family == "gpt2":  # peft's LoftQ does not transpose Conv1D weights either: compare on llama's layout only
        model = get_peft_model(build("gpt2"), LoraConfig(**kw))
        layer = model.model.transformer.h[0].attn.c_attn
        assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)
        return
    ours, theirs = check_variant(lambda: build(family), family, tmp_path, unchanged_at_start=False, **kw)
    assert_same_merge(ours, theirs)


def test_loftq_base_holds_quantized_values_and_the_adapter_fits_the_residual():
    pytest.importorskip("bitsandbytes")
    W = build("llama").model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(build("llama"), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"],
                                                      init_lora_weights="loftq",
                                                      loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    layer = model.model.model.layers[0].self_attn.q_proj
    Q = layer.base_layer.weight.detach()
    assert len(torch.unique(Q[:1, :64])) <= 16  # one NF4 block: at most 16 levels
    before, after = (W - Q).norm(), (W - Q - layer.delta_weight("default")).norm()
    assert after < 0.8 * before  # the low-rank part takes up the quantization error


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_is_a_plain_lora_for_the_original_base(family, init, tmp_path):
    """Trained from PiSSA/OLoRA, saved with path_initial_model_for_weight_conversion: rank 2r, init True,
    and on the *original* base it gives the fine-tuned model, in lorakit and in peft; peft's conversion
    of the same training gives the same file."""
    if init == "olora" and family == "gpt2":
        pytest.skip("peft's OLoRA fails on Conv1D")
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=init)
    ours, theirs = make_pair(lambda: build(family), **kw)
    ours.save_pretrained(tmp_path / "ours_init")
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe for its initial adapter
    quiet(theirs.save_pretrained, tmp_path / "theirs_init")
    theirs.peft_config["default"].init_lora_weights = init
    batches = [batch_for(family, seed=100 + i % 2) for i in range(4)]
    assert train(ours, batches) == pytest.approx(quiet(train, theirs, batches), rel=1e-4)
    batch = batch_for(family)
    tuned = logits(theirs, batch)
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    quiet(theirs.save_pretrained, tmp_path / "theirs",
          path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    for folder in ("ours", "theirs"):
        assert_logits_close(logits(LoraModel.from_pretrained(build(family), tmp_path / folder), batch), tuned)
        assert_logits_close(logits(quiet(peft.PeftModel.from_pretrained, build(family), tmp_path / folder), batch),
                            tuned)
    from safetensors.torch import load_file

    mine, other = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine.keys() == other.keys()
    for key in other:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-4, atol=1e-5, msg=key)


def test_an_adapter_saved_without_conversion_reloads_the_init_on_the_original_base(tmp_path):
    """PiSSA's file says init 'pissa': loading it on the original base re-runs the decomposition, as peft does."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    ours, theirs = make_pair(lambda: build("llama"), **kw)
    train(ours, [batch_for("llama", seed=100)] * 3)
    batch = batch_for("llama")
    tuned = logits(ours, batch)
    ours.save_pretrained(tmp_path)
    assert_logits_close(logits(LoraModel.from_pretrained(build("llama"), tmp_path), batch), tuned)
    assert_logits_close(logits(quiet(peft.PeftModel.from_pretrained, build("llama"), tmp_path), batch), tuned)


@pytest.mark.parametrize("value,match", [
    ("eva", "EVA"), ("corda", "CorDA"), ("lora_ga", "gradients"), ("mica", "MiCA"), ("PiSSA", "unknown"),
    ("pissa_niter_x", "unknown"), ("olora ", "unknown"),
])
def test_inits_lorakit_lacks_are_refused_by_name(value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(init_lora_weights=value)


@pytest.mark.parametrize("kw,match", [
    (dict(init_lora_weights="loftq"), "needs loftq_config"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 3}), "not valid"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0}), "not valid"),
    (dict(init_lora_weights="pissa", loftq_config={"loftq_bits": 4}), "only with init_lora_weights='loftq'"),
])
def test_loftq_config_is_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)


def _unchanged(model_fn, config, err, match):
    model = model_fn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        get_peft_model(model, config)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bad_combinations_are_refused_before_any_weight_changes():
    _unchanged(lambda: build("llama"), LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"),
               TargetError, "even rank")
    _unchanged(lambda: build("llama"), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights="pissa",
                                                  rank_pattern={"k_proj": 20}), TargetError, "r <= 16")
    _unchanged(lambda: build("mixtral"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa",
                                                    target_parameters=["experts.down_proj"]),
               TargetError, "target_parameters cannot be combined")


def test_pissa_on_a_quantized_base_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from lorakit import bnb_4bit_config

    build("llama").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_4bit_config("float32"))
    with pytest.raises(LoraError, match="quantized"):
        get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_conversion_refuses_a_mismatched_initial_folder_and_rslora_with_patterns(tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    model = get_peft_model(build("llama"), LoraConfig(**kw))
    other = get_peft_model(build("llama"), LoraConfig(**{**kw, "target_modules": ["v_proj"]}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(LoraError, match="does not match this adapter"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    rs = get_peft_model(build("llama"), LoraConfig(**kw, use_rslora=True, rank_pattern={"q_proj": 2}))
    rs.save_pretrained(tmp_path / "rs_init")
    with pytest.raises(LoraError, match="use_rslora"):
        rs.save_pretrained(tmp_path / "rs", path_initial_model_for_weight_conversion=tmp_path / "rs_init")


def test_replace_lora_weights_loftq_on_a_4bit_base_matches_peft(tmp_path, monkeypatch):
    """A model already loaded in 4 bits: each pair becomes the SVD of W - dequant(Q), W from the model's file."""
    pytest.importorskip("bitsandbytes")
    import peft.utils.loftq_utils as loftq_utils
    from transformers import AutoModelForCausalLM

    from lorakit import bnb_4bit_config, replace_lora_weights_loftq

    source = textwrap.dedent(inspect.getsource(loftq_utils._loftq_init_new))
    namespace = dict(vars(loftq_utils))
    exec(source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"'), namespace)  # noqa: S102 - the oracle
    monkeypatch.setattr(loftq_utils, "_loftq_init_new", namespace["_loftq_init_new"])
    build("llama").save_pretrained(tmp_path)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_4bit_config("float32"))

    kw = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ours = get_peft_model(load(), LoraConfig(**kw))
    theirs = quiet(peft.get_peft_model, load(), peft.LoraConfig(**kw))
    replace_lora_weights_loftq(ours, model_path=tmp_path)
    quiet(loftq_utils.replace_lora_weights_loftq, theirs, model_path=str(tmp_path))
    mine, other = ours.lora_state_dict(), peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == other.keys()
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # a callback that rejects every layer leaves the adapter as it was
    fresh = get_peft_model(load(), LoraConfig(**kw))
    before = {k: v.clone() for k, v in fresh.lora_state_dict().items()}
    replace_lora_weights_loftq(fresh, model_path=tmp_path, callback=lambda model, name: False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.lora_state_dict().items())
    with pytest.raises(LoraError, match="4-bit base"):
        replace_lora_weights_loftq(get_peft_model(build("llama"), LoraConfig(**kw)), model_path=tmp_path)
