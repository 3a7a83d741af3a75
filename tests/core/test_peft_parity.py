"""lorakit against peft (the test-time oracle), on tiny models built in-process.

Each check gives peft its own deep copy of the same base model (both libraries change the model
in place), runs the same config through both, and compares: the wrapped module set, per-module
rank and scale, the trainable/total parameter counts, the PEFT state-dict keys, the logits with
identical A/B weights, adapter files both ways, and a short AdamW run.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle: a test dependency (pyproject [test]), never a runtime one

from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402

from lorakit import LoraConfig, LoraModel, TaskType, get_peft_model  # noqa: E402
from lorakit import kernels  # noqa: E402

from tiny import FAMILIES, assert_logits_close, batch_for, build, logits, perturb_lora, single_thread  # noqa: E402,F401
from core.peft_oracle import train as oracle_train  # noqa: E402

PARITY = ["bloom", "gpt2", "llama", "t5", "bart", "opt", "gpt_neox", "bert", "roberta", "deberta-v2"]


def _pair(family: str, seed: int | None = None, **kw):
    """(lorakit model, peft model) with the same config on two copies of one tiny base model.

    With ``seed`` both libraries initialise their adapters from the same random state."""
    kw.setdefault("task_type", FAMILIES[family].task_type)
    base = build(family)
    theirs_base = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for Conv1D, etc.
        if seed is not None:
            torch.manual_seed(seed)
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**kw))
        if seed is not None:
            torch.manual_seed(seed)
        ours = get_peft_model(base, LoraConfig(**kw))
    return ours, theirs


def _peft_layers(theirs) -> dict[str, PeftLoraLayer]:
    return {n: m for n, m in theirs.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)}


def _our_layers(ours) -> dict:
    return dict(ours.lora_layers())


def _copy_theirs_into_ours(ours, theirs) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: also saving a targeted embedding's base weight
        sd = peft.get_peft_model_state_dict(theirs)
    ours.load_lora_state_dict(sd)
    return sd


def _assert_same_structure(ours, theirs) -> None:
    mine, peft_layers = _our_layers(ours), _peft_layers(theirs)
    assert sorted(mine) == sorted(peft_layers)
    for name, layer in mine.items():
        other = peft_layers[name]
        assert layer.r["default"] == other.r["default"], name
        assert layer.scaling["default"] == pytest.approx(other.scaling["default"]), name
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("family", PARITY)
def test_default_targets_counts_and_logits_match_peft(family, tmp_path):
    ours, theirs = _pair(family, r=4, lora_alpha=8)
    _assert_same_structure(ours, theirs)

    perturb_lora(theirs)
    sd = _copy_theirs_into_ours(ours, theirs)
    assert set(ours.lora_state_dict()) == set(sd)  # the same PEFT key names
    batch = batch_for(family)
    expected = logits(theirs, batch)
    assert_logits_close(logits(ours, batch), expected)

    # lorakit's adapter file loads in peft ...
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "ours")
    assert_logits_close(logits(peft_loaded, batch), expected)
    # ... and peft's loads in lorakit
    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = LoraModel.from_pretrained(build(family), tmp_path / "theirs")
    assert sorted(_our_layers(ours_loaded)) == sorted(_our_layers(ours))
    assert_logits_close(logits(ours_loaded, batch), expected)
    assert ours_loaded.get_nb_trainable_parameters() == peft_loaded.get_nb_trainable_parameters()  # both frozen

    # loaded for training, both train the same parameters
    trainable = LoraModel.from_pretrained(build(family), tmp_path / "theirs", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_trainable = peft.PeftModel.from_pretrained(build(family), tmp_path / "theirs", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == peft_trainable.get_nb_trainable_parameters()

    # merged into plain models, both give the same weights
    mine = ours.merge_and_unload().state_dict()
    other = theirs.merge_and_unload().state_dict()
    assert sorted(mine) == sorted(other)
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_all_linear_matches_peft(family):
    ours, theirs = _pair(family, target_modules="all-linear")
    _assert_same_structure(ours, theirs)
    perturb_lora(theirs)
    _copy_theirs_into_ours(ours, theirs)
    batch = batch_for(family)
    assert_logits_close(logits(ours, batch), logits(theirs, batch))


@pytest.mark.parametrize("options", [
    dict(rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 6}, alpha_pattern={"v_proj": 4}),
    dict(rank_pattern={r"layers\.0\..*": 3}, alpha_pattern={r".*\.1\.self_attn\.q_proj": 20}),
    dict(layers_to_transform=[1]),
    dict(layers_to_transform=0, layers_pattern="layers"),
    dict(use_rslora=True, r=16, lora_alpha=8),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.down_proj"]),
    dict(target_modules=["embed_tokens", "v_proj"]),
    dict(modules_to_save=["lm_head"]),
], ids=["patterns", "regex-patterns", "layers", "layers-pattern", "rslora", "exclude", "embedding", "save-head"])
def test_options_match_peft_on_llama(options, tmp_path):
    ours, theirs = _pair("llama", **options)
    _assert_same_structure(ours, theirs)
    perturb_lora(theirs)
    _copy_theirs_into_ours(ours, theirs)
    batch = batch_for("llama")
    expected = logits(theirs, batch)
    assert_logits_close(logits(ours, batch), expected)
    # the options survive a round trip through each other's files
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_logits_close(logits(peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours"), batch), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: also saving the targeted embedding's base weight
        theirs.save_pretrained(tmp_path / "theirs")
    assert_logits_close(logits(LoraModel.from_pretrained(build("llama"), tmp_path / "theirs"), batch), expected)


@pytest.mark.parametrize("family,options", [
    ("gpt2", dict(layers_to_transform=[1], layers_pattern="h")),
    ("t5", dict(layers_to_transform=[1])),
    ("bloom", dict(target_modules=r".*\.h\.1\..*(query_key_value|dense_4h_to_h)")),
    ("bart", dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*decoder.*")),
    # no task_type: the classification head is a linear layer like any other (peft wraps it too)
    ("bert", dict(task_type=None, target_modules="all-linear")),
    ("roberta", dict(task_type=None, target_modules="all-linear")),
], ids=["gpt2-layers", "t5-layers", "bloom-regex", "bart-exclude-regex", "bert-no-task", "roberta-no-task"])
def test_selection_matches_peft(family, options):
    ours, theirs = _pair(family, **options)
    _assert_same_structure(ours, theirs)
    perturb_lora(theirs)
    _copy_theirs_into_ours(ours, theirs)
    batch = batch_for(family)
    assert_logits_close(logits(ours, batch), logits(theirs, batch))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_match_peft_on_bloom(bias, tmp_path):
    ours, theirs = _pair("bloom", bias=bias)
    _assert_same_structure(ours, theirs)
    perturb_lora(theirs)
    with torch.no_grad():  # trained biases are part of the adapter: give them new values too
        for name, p in theirs.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.1)
    sd = _copy_theirs_into_ours(ours, theirs)
    assert set(ours.lora_state_dict()) == set(sd)
    batch = batch_for("bloom")
    expected = logits(theirs, batch)
    assert_logits_close(logits(ours, batch), expected)
    theirs.save_pretrained(tmp_path)
    assert_logits_close(logits(LoraModel.from_pretrained(build("bloom"), tmp_path), batch), expected)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_peft_bias_all_adapter_with_a_saved_head_loads(family, tmp_path):
    """peft writes extra bias copies from inside the head's wrapper (modules_to_save / original_module)."""
    ours, theirs = _pair(family, bias="all")
    perturb_lora(theirs)
    theirs.save_pretrained(tmp_path)
    batch = batch_for(family)
    batch.pop("labels", None)
    expected = logits(theirs, batch)
    loaded = LoraModel.from_pretrained(build(family), tmp_path)
    assert_logits_close(logits(loaded, batch), expected)
    assert set(loaded.lora_state_dict()) <= set(peft.get_peft_model_state_dict(theirs))


def test_second_adapter_file_loads_in_peft(tmp_path):
    """A named (non-default) adapter goes into its own subfolder, which peft loads as an adapter folder."""
    ours = get_peft_model(build("llama"), LoraConfig(r=4))
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], lora_alpha=4))
    ours.set_adapter("other")
    perturb_lora(ours)
    batch = batch_for("llama")
    expected = logits(ours, batch)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "other", adapter_name="other")
    assert sorted(_peft_layers(theirs)) == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    assert_logits_close(logits(theirs, batch), expected)


def test_default_table_matches_peft():
    """Every family both libraries know has the same default targets."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    from lorakit.targets import DEFAULT_TARGET_MODULES

    shared = set(DEFAULT_TARGET_MODULES) & set(peft_table)
    assert {"t5", "bloom", "llama", "chatglm", "mpt", "falcon", "phi", "gemma2"} <= shared
    for family in shared:
        assert set(DEFAULT_TARGET_MODULES[family]) == set(peft_table[family]), family


def _peft_model(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft calls a deprecated transformers API
        return peft.get_peft_model(base, peft.LoraConfig(**kw))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_initialisation_matches_peft(init):
    """From the same random state both libraries draw the very same A (and B = 0)."""
    ours, theirs = _pair("llama", seed=7, r=4, init_lora_weights=init)
    mine = ours.lora_state_dict()
    other = peft.get_peft_model_state_dict(theirs)
    assert set(mine) == set(other)
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, atol=0, rtol=0, msg=key)
    a = torch.cat([v.flatten() for k, v in mine.items() if "lora_A" in k])
    if init == "gaussian":  # normal with std 1/r
        assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert all(not v.any() for k, v in mine.items() if "lora_B" in k)


def _train(model, batches, lr=1e-2) -> list[float]:
    return oracle_train(model, batches, lr, eval_after=False)


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2", "t5"])
def test_training_matches_peft(family):
    """10 AdamW steps from the same weights on the same batches end at the same loss."""
    ours, theirs = _pair(family, seed=5, r=4, lora_alpha=16, lora_dropout=0.0)
    _copy_theirs_into_ours(ours, theirs)
    batches = [batch_for(family, seed=100 + i % 2) for i in range(10)]  # two batches, 5 epochs: it can learn them
    mine, other = _train(ours, batches), _train(theirs, batches)
    assert mine[-2] < mine[0] and mine[-1] < mine[1], mine  # it learns the two batches
    assert mine == pytest.approx(other, rel=1e-4)
    sd = peft.get_peft_model_state_dict(theirs)
    for key, value in ours.lora_state_dict().items():
        torch.testing.assert_close(value, sd[key], atol=1e-5, rtol=1e-4, msg=key)


def test_readme_seed_example_trains_on_bloom():
    """The seed README's config, as written, on a tiny BLOOM: one training step moves the adapter."""
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules={'query_key_value'}, lora_alpha=32,
                        lora_dropout=0.1)
    model = get_peft_model(build("bloom"), config)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    n_layers = FAMILIES["bloom"].config["n_layer"]
    hidden = FAMILIES["bloom"].config["hidden_size"]
    assert trainable == n_layers * 8 * (hidden + 3 * hidden)  # A: r x h, B: 3h x r per layer
    assert total > trainable

    before = {k: v.clone() for k, v in model.lora_state_dict().items()}
    losses = _train(model, [batch_for("bloom")], lr=1e-3)
    assert torch.isfinite(torch.tensor(losses)).all()
    after = model.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)

    peft_model = _peft_model(build("bloom"), task_type=peft.TaskType.CAUSAL_LM, r=8,
                             target_modules={'query_key_value'}, lora_alpha=32, lora_dropout=0.1)
    assert peft_model.get_nb_trainable_parameters() == (trainable, total)


def test_inference_mode_trains_nothing():
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules={'query_key_value'}, lora_alpha=32,
                        lora_dropout=0.1, inference_mode=True)
    model = get_peft_model(build("bloom"), config)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert not any(p.requires_grad for p in model.parameters())
    theirs = _peft_model(build("bloom"), task_type=peft.TaskType.CAUSAL_LM, r=8, target_modules={'query_key_value'},
                         lora_alpha=32, lora_dropout=0.1, inference_mode=True)
    assert theirs.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def _half_precision_pair(family):
    kw = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    base = build(family).to(torch.bfloat16)
    theirs_base = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**kw))
    ours = get_peft_model(base, LoraConfig(**kw))
    perturb_lora(theirs)
    _copy_theirs_into_ours(ours, theirs)
    assert {p.dtype for n, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    return ours, theirs


def _train_grads(ours, theirs, batch):
    grads = []
    for m, prefix in ((ours, "model."), (theirs, "base_model.model.")):
        m.train()
        m(**batch).loss.backward()  # ours: the fused loss
        grads.append({n.removeprefix(prefix): p.grad for n, p in m.named_parameters() if p.requires_grad})
        m.eval()
    assert grads[0].keys() == grads[1].keys()
    return grads


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_half_precision_base_matches_peft_bit_for_bit(family):
    """float32 adapters over a bf16 base on lorakit's reference path (kernels off): the update is added in
    float32 and rounded once (forward, merge), and the fused loss rounds the logits' gradient after its 1/N,
    all as peft + HF do."""
    ours, theirs = _half_precision_pair(family)
    batch = batch_for(family)
    with kernels.enabled_as(False):
        torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=0, atol=0)
        grads = _train_grads(ours, theirs, batch)
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=0, atol=0, msg=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    for (n, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_half_precision_base_with_the_bf16_kernels_is_as_close_to_float32_as_peft(family):
    """The same with lorakit's CPU kernels (train.precision bf16: the LoRA branch in bf16, adapters' gradients
    float32): the logits agree with peft's to bf16 rounding, and the LoRA gradients are as close to the
    float32 model's as peft's are when its LoRA branch also runs in bf16 (under bf16 autocast): bf16
    rounding, not another computation. (peft without autocast computes the branch in float32: closer, and
    slower; lorakit's reference path, kernels off, is that bit for bit, above.)"""
    ours, theirs = _half_precision_pair(family)
    exact = copy.deepcopy(theirs).float()
    in_bf16 = copy.deepcopy(theirs)
    batch = batch_for(family)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=2e-2, atol=2e-2)
    grads = _train_grads(ours, theirs, batch)
    exact.train()
    exact(**batch).loss.backward()
    ref = {n.removeprefix("base_model.model."): p.grad for n, p in exact.named_parameters() if p.requires_grad}

    def error(g):
        return sum(float((g[n] - r).norm() / r.norm().clamp_min(1e-12)) for n, r in ref.items())

    in_bf16.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = in_bf16(**batch).loss
    loss.backward()
    autocast = {n.removeprefix("base_model.model."): p.grad for n, p in in_bf16.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 for g in grads[0].values())
    assert error(grads[0]) <= 1.1 * error(autocast), (error(grads[0]), error(autocast), error(grads[1]))
