"""LoRA+ against peft's create_loraplus_optimizer: the same four groups, members, learning rates and decay."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle: a test dependency

from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

from lorakit import LoraConfig, LoraError, get_peft_model  # noqa: E402
from lorakit.optim import create_loraplus_optimizer  # noqa: E402

from tiny import FAMILIES, build, single_thread  # noqa: E402,F401


def _pair(family: str, **kw):
    kw.setdefault("task_type", FAMILIES[family].task_type)
    base = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    return get_peft_model(base, LoraConfig(**kw)), theirs


def _names(model, prefix: str) -> dict[int, str]:
    """id -> parameter name in peft's spelling (lorakit's wrapped model is ``model``, peft's ``base_model.model``)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix(prefix)
        out[id(p)] = re.sub(r"lora_magnitude_vector\.(\w+)$", r"lora_magnitude_vector.\1.weight", name)
    return out


def _groups(optimizer, names: dict[int, str]) -> list[tuple]:
    return [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


CASES = {
    "llama-all-linear-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"])),
    "gpt2-bias-layernorm": ("gpt2", dict(target_modules=["c_attn", "wte"], bias="all", modules_to_save=["ln_f"])),
    "bloom-lora-only": ("bloom", dict(bias="lora_only")),
    "llama-dora": ("llama", dict(target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_groups_match_peft(case):
    family, kw = CASES[case]
    ours, theirs = _pair(family, **kw)
    args = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_lr_embedding=3e-5, loraplus_weight_decay=0.01,
                betas=(0.8, 0.95))
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **args)
    other = peft_loraplus(theirs, torch.optim.AdamW, **args)
    got = _groups(mine, _names(ours, "model."))
    want = _groups(other, _names(theirs, "base_model.model."))
    assert got == want
    assert sum(len(g[2]) for g in got) == sum(p.requires_grad for p in ours.parameters())
    assert mine.defaults["betas"] == (0.8, 0.95)


def test_groups_have_the_documented_rates():
    ours, _ = _pair("gpt2", target_modules=["c_attn", "wte"], bias="all", modules_to_save=["ln_f"])
    opt = create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    names = _names(ours, "model.")
    a, emb, b, b_nodecay = (g["params"] for g in opt.param_groups)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-6, pytest.approx(0.4), pytest.approx(0.4)]
    assert all("lora_A" in names[id(p)] for p in a)
    assert {names[id(p)].split(".")[-2] for p in emb} == {"lora_embedding_A", "lora_embedding_B"}
    assert b and all("lora_B" in names[id(p)] for p in b)
    assert b_nodecay and all(names[id(p)].endswith("bias") or "ln_f" in names[id(p)] for p in b_nodecay)


def test_bad_ratio_and_frozen_model_are_refused():
    ours, _ = _pair("llama", target_modules=["q_proj"])
    with pytest.raises(LoraError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
    for p in ours.parameters():
        p.requires_grad_(False)
    with pytest.raises(LoraError, match="no trainable parameters"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)
