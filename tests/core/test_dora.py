"""DoRA (use_dora=True) against peft, the oracle: the same numbers on llama, gpt2 (Conv1D) and bloom.

Each check builds both libraries on copies of one tiny base model and compares: structure and
trainable counts (the magnitude vectors included), the magnitudes a fresh adapter starts from, logits
with the same adapter weights (both ways through each other's files), merged and unmerged weights,
10 AdamW steps (also with LoRA dropout, through one fixed mask both libraries apply), and refusals.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # the oracle: a test dependency

from lorakit import LoraConfig, LoraError, LoraModel, TargetError, get_peft_model  # noqa: E402
from lorakit.layers import LoraLayer  # noqa: E402

from tiny import FAMILIES, assert_logits_close, batch_for, build, logits, perturb_lora, single_thread  # noqa: E402,F401
from core.peft_oracle import train as oracle_train  # noqa: E402

#: families whose head is tied to a targeted embedding: the head's key keeps the unmerged weight when merging
TIED = {"gpt2": ("lm_head.weight",)}
TARGETS = {
    "llama": ["embed_tokens", "q_proj", "v_proj", "down_proj"],
    "gpt2": ["wte", "c_attn", "c_fc", "c_proj"],  # Conv1D, and an embedding
    "bloom": None,  # the family default: the fused query_key_value
}


def _pair(family: str, seed: int = 0, **kw):
    kw.setdefault("task_type", FAMILIES[family].task_type)
    kw.setdefault("target_modules", TARGETS[family])
    kw.setdefault("use_dora", True)
    base = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for Conv1D
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
        torch.manual_seed(seed)
        ours = get_peft_model(base, LoraConfig(**kw))
    return ours, theirs


def _perturb(theirs, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random B (and embedding A) and magnitudes away from ||W + s B A||, in peft; returns its state dict."""
    perturb_lora(theirs, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model_state_dict(theirs)


def _synced(family: str, **kw):
    ours, theirs = _pair(family, **kw)
    sd = _perturb(theirs)
    ours.load_lora_state_dict(sd)
    return ours, theirs, sd


def _peft_load(family: str, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(family), path, **kw)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_structure_counts_and_fresh_magnitudes_match_peft(family):
    ours, theirs = _pair(family)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = peft.get_peft_model_state_dict(theirs)
    other = {k: v for k, v in other.items() if not k.endswith(".base_layer.weight")}  # peft: a targeted embedding's base
    mine = ours.lora_state_dict()
    assert set(mine) == set(other)  # base_model.model.<path>.lora_magnitude_vector, as peft writes it
    magnitudes = [k for k in other if k.endswith("lora_magnitude_vector")]
    assert magnitudes
    for key in magnitudes:  # a fresh adapter (B = 0) starts at ||W|| per output feature
        torch.testing.assert_close(mine[key], other[key], atol=1e-6, rtol=1e-6, msg=key)
    batch = batch_for(family)
    with ours.disable_adapter():
        plain = logits(ours, batch)
    assert_logits_close(logits(ours, batch), plain)  # a fresh DoRA adapter changes nothing


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_logits_and_files_match_peft_both_ways(family, tmp_path):
    ours, theirs, sd = _synced(family)
    batch = batch_for(family)
    expected = logits(theirs, batch)
    got = logits(ours, batch)
    assert_logits_close(got, expected)
    with ours.disable_adapter():
        assert (logits(ours, batch) - got).abs().max() > 1e-3  # the adapter (and its magnitude) does something
    ours.save_pretrained(tmp_path / "ours")  # lorakit's file in peft
    assert_logits_close(logits(_peft_load(family, tmp_path / "ours"), batch), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")  # peft's file in lorakit
    loaded = LoraModel.from_pretrained(build(family), tmp_path / "theirs")
    assert loaded.peft_config["default"].use_dora
    assert_logits_close(logits(loaded, batch), expected)
    trainable = LoraModel.from_pretrained(build(family), tmp_path / "theirs", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == _peft_load(family, tmp_path / "theirs",
                                                                 is_trainable=True).get_nb_trainable_parameters()


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_merge_unmerge_unload_match_peft(family):
    ours, theirs, _ = _synced(family)
    batch = batch_for(family)
    expected = logits(theirs, batch)
    before = {k: v.clone() for k, v in ours.model.state_dict().items() if "lora_" not in k}
    ours.merge_adapter()
    theirs.merge_adapter()
    # GPT-2's head is tied to the embedding: lorakit merges wte's update into the embedding's own copy, so the
    # merged model computes the unmerged one's logits; peft's merge changes the head too (its logits move)
    assert_logits_close(logits(ours, batch), expected)
    if family not in TIED:
        assert_logits_close(logits(ours, batch), logits(theirs, batch))
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    after = {k: v for k, v in ours.model.state_dict().items() if "lora_" not in k}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0, msg=key)
    mine = ours.merge_and_unload().state_dict()
    other = theirs.merge_and_unload().state_dict()
    assert sorted(mine) == sorted(other)
    for key, value in other.items():
        if key in TIED.get(family, ()):  # lorakit's head keeps the unmerged weight (see above)
            torch.testing.assert_close(mine[key], before[key], atol=0, rtol=0, msg=key)
            continue
        torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=0, msg=key)


def test_safe_merge_refuses_a_broken_dora_adapter():
    ours, _, _ = _synced("llama")
    layer = dict(ours.lora_layers())["model.layers.0.self_attn.q_proj"]
    weights = {k: v.clone() for k, v in ours.model.state_dict().items()}
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = float("inf")
    with pytest.raises(LoraError, match="NaN/inf"):
        ours.merge_adapter(safe_merge=True)
    for key, value in ours.model.state_dict().items():
        if "lora_magnitude_vector" not in key:
            assert torch.equal(value, weights[key]), key


def test_two_merged_adapters_match_peft():
    """A DoRA adapter merged after another one: the norm is taken of the weight without merges (peft's rule)."""
    ours, theirs, _ = _synced("llama", target_modules=["q_proj", "v_proj"])
    extra = dict(target_modules=["q_proj"], r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("second", peft.LoraConfig(use_dora=True, **extra))
    ours.add_adapter("second", LoraConfig(use_dora=True, **extra))
    sd = _perturb(theirs, seed=11)
    second = {k: v for k, v in peft.get_peft_model_state_dict(theirs, adapter_name="second").items()}
    ours.load_lora_state_dict(second, "second")
    ours.load_lora_state_dict({k: v for k, v in sd.items()}, "default")
    base_before = {k: v.clone() for k, v in ours.model.state_dict().items() if "lora_" not in k}
    ours.merge_adapter(["default", "second"])
    theirs.merge_adapter(adapter_names=["default", "second"])
    mine = {k: v for k, v in ours.model.state_dict().items() if "lora_" not in k}
    other = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" not in k}
    for key, value in mine.items():
        torch.testing.assert_close(value, other[key.replace("q_proj.weight", "q_proj.base_layer.weight")
                                               .replace("v_proj.weight", "v_proj.base_layer.weight")]
                                   if key not in other else other[key], atol=1e-6, rtol=0, msg=key)
    ours.unmerge_adapter()
    for key, value in base_before.items():
        torch.testing.assert_close(ours.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def _train(model, batches, lr=1e-2) -> list[float]:
    return oracle_train(model, batches, lr, eval_after=False)


class FixedMask(nn.Module):
    """Dropout with a mask fixed by the input's shape, so both libraries drop the very same elements."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.p = p

    def forward(self, x):
        g = torch.Generator().manual_seed(x.shape[-1] * 1000 + x.shape[-2])
        keep = (torch.rand(x.shape, generator=g) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


def _fix_dropout(model) -> None:
    for m in model.modules():
        if hasattr(m, "lora_dropout") and isinstance(m.lora_dropout, nn.ModuleDict):
            for name in list(m.lora_dropout):
                if not isinstance(m, nn.Embedding) and "Embedding" not in type(m).__name__:
                    m.lora_dropout[name] = FixedMask()


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_training_matches_peft(family, dropout):
    """10 AdamW steps from the same weights end at the same losses and weights. With dropout, DoRA runs on the
    dropped input (an extra product with the base weight), as peft computes it, and the kernels stay out."""
    ours, theirs, _ = _synced(family, lora_dropout=0.1 if dropout else 0.0)
    if dropout:
        _fix_dropout(ours)
        _fix_dropout(theirs)
    batches = [batch_for(family, seed=100 + i % 2) for i in range(10)]
    mine, other = _train(ours, batches), _train(theirs, batches)
    assert mine[-2] < mine[0] and mine[-1] < mine[1], mine
    assert mine == pytest.approx(other, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = peft.get_peft_model_state_dict(theirs)
    for key, value in ours.lora_state_dict().items():
        torch.testing.assert_close(value, sd[key], atol=1e-5, rtol=1e-4, msg=key)


def test_real_dropout_trains_the_magnitudes():
    """lorakit's own dropout (no mask swap): every magnitude gets a gradient and moves."""
    ours, _, _ = _synced("llama", lora_dropout=0.1)
    mags = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    _train(ours, [batch_for("llama", seed=100)] * 2)
    for name, p in ours.named_parameters():
        if name in mags:
            assert not torch.equal(p.detach(), mags[name]), name


def test_per_row_adapters_are_refused_as_in_peft():
    ours, theirs, _ = _synced("llama")
    ours.eval(), theirs.eval()
    batch = batch_for("llama")
    batch.pop("labels")
    with pytest.raises(ValueError, match="DoRA"):
        with torch.no_grad():
            theirs(**batch, adapter_names=["default", "__base__"])
    with pytest.raises(LoraError, match="DoRA"):
        with torch.no_grad():
            ours(**batch, adapter_names=["default", "__base__"])
    with torch.no_grad():  # only the base model's rows: nothing DoRA runs, as in peft
        out = ours(**batch, adapter_names=["__base__", "__base__"]).logits
    with ours.disable_adapter():
        assert_logits_close(out, logits(ours, batch))


def test_delete_and_unload_leave_no_magnitude():
    ours, _, _ = _synced("llama")
    ours.add_adapter("plain", LoraConfig(target_modules=["q_proj"]))
    ours.delete_adapter("default")
    assert not any("lora_magnitude_vector" in n for n, _ in ours.named_parameters())
    assert all(isinstance(l, LoraLayer) for _, l in ours.lora_layers())
    plain = ours.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_dora_is_refused_on_an_8bit_layer(monkeypatch):
    import lorakit.plan as plan

    monkeypatch.setattr(plan, "quantized_kind", lambda w: "bnb 8bit" if w is not None else None)
    base = build("llama")
    with pytest.raises(TargetError, match="use_dora=True on the 8-bit layer"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert not any(p.requires_grad is False for p in base.parameters())  # nothing changed


def test_qdora_on_a_4bit_base_matches_peft(tmp_path):
    """DoRA over a bitsandbytes 4-bit base (QDoRA): the weight's values are dequantized for the norm and the
    dropped-input product, as peft does; fresh magnitudes, logits and 5 AdamW steps equal peft's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorakit import bnb_4bit_config

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_4bit_config(), device_map="cpu")

    kw = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(), peft.LoraConfig(**kw))
    ours = get_peft_model(load(), LoraConfig(**kw))
    other = peft.get_peft_model_state_dict(theirs)
    for key, value in ours.lora_state_dict().items():
        if key.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(value, other[key], atol=1e-6, rtol=1e-6, msg=key)
    ours.load_lora_state_dict(_perturb(theirs))
    ours.train(), theirs.train()  # (bitsandbytes would repack 4-bit weights for CPU inference in eval mode)
    x = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        assert_logits_close(ours(input_ids=x).logits, theirs(input_ids=x).logits)
    batches = [{"input_ids": x, "labels": x}] * 5
    assert _train(ours, batches) == pytest.approx(_train(theirs, batches), rel=1e-4)


@pytest.mark.parametrize("family,path", [("llama", "model.layers.0.self_attn.q_proj"), ("gpt2", "transformer.h.0.attn.c_attn"),
                                         ("llama", "model.embed_tokens")])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_layer_computes_the_papers_weight(family, path, grad):
    """W' = m (W + s B A) / ||W + s B A|| per output feature, whatever route the call takes (kernels on)."""
    ours, _, _ = _synced(family)
    layer = dict(ours.lora_layers())[path]
    ours.eval()
    W = layer._rows(layer.base_layer.weight.detach())
    V = W + layer._rows(layer.delta_weight("default"))
    Wp = layer.lora_magnitude_vector["default"].detach().view(-1, 1) * V / V.norm(dim=1, keepdim=True)
    if "embed" in path:
        x = torch.randint(0, 100, (2, 5))
        want = torch.nn.functional.embedding(x, Wp.t())
    else:
        x = torch.randn(2, 5, layer.in_features)
        want = x @ Wp.t() + (layer.base_layer.bias if layer.base_layer.bias is not None else 0)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_weighted_combination_of_dora_adapters_matches_peft(combination):
    """add_weighted_adapter over DoRA adapters: the new adapter is DoRA, its magnitude starts at ||W|| (B = 0 when
    it is made) and keeps it after A and B are combined, as in peft."""
    ours, theirs, _ = _synced("llama", target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_adapter("b", peft.LoraConfig(use_dora=True, target_modules=["q_proj", "v_proj"]))
    ours.add_adapter("b", LoraConfig(use_dora=True, target_modules=["q_proj", "v_proj"]))
    _perturb(theirs, seed=9)
    for name in ("default", "b"):
        ours.load_lora_state_dict(peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    theirs.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix", combination_type=combination)
    ours.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix", combination_type=combination)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert ours.peft_config["mix"].use_dora
    batch = batch_for("llama")
    assert_logits_close(logits(ours, batch), logits(theirs, batch))


def test_serving_refuses_a_dora_adapter_before_loading(tmp_path):
    """lorakit serve batches rows of several adapters (adapter_names), which DoRA does not allow: refused by name."""
    from lorakit.errors import AdapterLoadError
    from lorakit.serve.adapters import attach

    ours, _, _ = _synced("llama")
    ours.save_pretrained(tmp_path)
    base = build("llama")
    with pytest.raises(AdapterLoadError, match="DoRA adapter"):
        attach(base, "dora", str(tmp_path))
    assert not any("lora_" in n for n, _ in base.named_parameters())  # nothing was loaded


def test_training_loop_with_dora_equals_the_models_own_loss(tmp_path):
    """lorakit's loop (fused head, feed-forward blocks on real rows only) trains a DoRA adapter exactly as the
    model's own forward and loss do."""
    import json

    from tiny import pad_batch, tiny_examples, train_llama

    from lorakit.train.config import config_from_dict
    from lorakit.train.loop import train_loop

    losses = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(train_llama(0), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
        cfg = config_from_dict({}, ["train.progress=false", "train.batch_size=4", "train.lr=1e-2", "train.max_steps=8",
                                    "output.tensorboard=false", "output.plot=false", "lora.dropout=0.0",
                                    f"train.fast_loss={str(fast).lower()}", "lora.use_dora=true",
                                    "train.loraplus_lr_ratio=4"])
        out = tmp_path / str(fast)
        train_loop(model, tiny_examples(8), pad_batch, cfg, out, print_fn=lambda s: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[fast] = [r["loss"] for r in rows if "loss" in r]
    mine = losses[True]
    assert len(mine) == 8 and mine[-1] + mine[-2] < mine[0] + mine[1], mine  # 4 epochs of 2 batches: it learns
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_base_matches_peft_bit_for_bit(family):
    """float32 adapters and magnitudes over a bfloat16 base: the same logits and merged weights, bit for bit."""
    base = build(family).to(torch.bfloat16)
    kw = dict(r=4, target_modules=TARGETS[family][:2], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = get_peft_model(base, LoraConfig(**kw))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    ours.load_lora_state_dict(_perturb(theirs))
    batch = batch_for(family)
    assert torch.equal(logits(ours, batch), logits(theirs, batch))
    head = {k: v.clone() for k, v in ours.model.state_dict().items() if k in TIED.get(family, ())}
    mine, other = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    for key, value in other.items():
        assert torch.equal(mine[key], head.get(key, value)), key  # a tied head keeps its weight (see above)
