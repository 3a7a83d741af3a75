"""train.loraplus_lr_ratio: the training loop builds LoRA+'s optimizer (B learns ratio x faster than A)."""
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.train.config import config_from_dict
from lorakit.train.loop import train_loop

from tiny import pad_batch, tiny_examples, train_llama

BASE = ["train.progress=false", "train.batch_size=8", "train.lr=1e-3", "output.tensorboard=false",
        "output.plot=false", "lora.dropout=0.0", "train.max_steps=1", "train.scheduler=constant",
        "train.max_grad_norm=null", "output.save_every=null"]


def _first_step(tmp_path, extra):
    model = get_peft_model(train_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    cfg = config_from_dict({}, BASE + extra)
    train_loop(model, tiny_examples(8), pad_batch, cfg, tmp_path, print_fn=lambda s: None)
    b = torch.cat([p.detach().abs().flatten() for n, p in model.named_parameters() if "lora_B" in n])
    a_same = all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if "lora_A" in n)
    return b.max().item(), a_same


def test_b_takes_ratio_times_the_learning_rate(tmp_path):
    # Adam's first step moves each weight by about lr (m / sqrt(v) = sign(g)); A has no gradient while B = 0
    plain, a_same = _first_step(tmp_path / "plain", [])
    assert a_same and plain == pytest.approx(1e-3, rel=1e-3)
    plus, a_same = _first_step(tmp_path / "plus", ["train.loraplus_lr_ratio=4"])
    assert a_same and plus == pytest.approx(4e-3, rel=1e-3)


def test_bad_ratio_is_a_recipe_error():
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio"):
        config_from_dict({}, ["train.loraplus_lr_ratio=0"])
