"""One parity check against peft for a LoRA variant, shared by the variant tests (inits, tokens, parameters).

``check_variant`` builds the same config in both libraries on two copies of one base model, from one
seed, and asserts: the same initial adapter (and base weights: some inits change them), the same
trainable-parameter count, unchanged logits at the start where the variant promises it, the same 10
AdamW losses (rtol 1e-4), the same logits afterwards, adapter files loading both ways, and the same
merged weights.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_peft_model
from tiny import assert_logits_close, batch_for, logits

peft = pytest.importorskip("peft")


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for Conv1D, tied weights, ...
        return fn(*args, **kw)


def make_pair(build: Callable[[], torch.nn.Module], seed: int = 5, **kw):
    """(ours, theirs) from the same base weights and the same random state; each library gets its own
    copy of ``kw`` (peft edits lists in its config)."""
    base = build()
    theirs_base = copy.deepcopy(base)
    torch.manual_seed(seed)
    theirs = quiet(peft.get_peft_model, theirs_base, peft.LoraConfig(**copy.deepcopy(kw)))
    torch.manual_seed(seed)
    ours = quiet(get_peft_model, base, LoraConfig(**copy.deepcopy(kw)))
    return ours, theirs


def base_weights(model) -> dict[str, torch.Tensor]:
    """The transformers model's own weights (LoRA and saved copies left out), by their plain names."""
    inner = model.model if isinstance(model, LoraModel) else model.base_model.model
    out = {}
    for k, v in inner.state_dict().items():
        if any(part in k for part in ("lora_", "modules_to_save", "trainable_tokens", "original_module")):
            continue
        out[k.replace(".token_adapter", "").replace(".base_layer", "")] = v
    return out


def assert_same_state(ours, theirs, exact: bool = True) -> None:
    mine, other = ours.lora_state_dict(), peft.get_peft_model_state_dict(theirs)
    other = {k: v for k, v in other.items() if not k.endswith("base_layer.weight")}  # peft's embedding copies
    assert mine.keys() == other.keys()
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, **tol, msg=key)
    bw_ours, bw_theirs = base_weights(ours), base_weights(theirs)
    assert bw_ours.keys() == bw_theirs.keys()
    for key, value in bw_theirs.items():
        torch.testing.assert_close(bw_ours[key], value, **tol, msg=key)


def train(model, batches, lr: float = 1e-2, eval_after: bool = True) -> list[float]:
    """AdamW steps on ``batches``: the losses (the model is left in eval mode unless ``eval_after=False``)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if eval_after:
        model.eval()
    return losses


def check_variant(build: Callable[[], torch.nn.Module], family: str, tmp_path, *, unchanged_at_start: bool = True,
                  steps: int = 10, seed: int = 5, **kw) -> tuple:
    """Every parity check of the module docstring; returns (ours, theirs) after training (unmerged)."""
    ours, theirs = make_pair(build, seed=seed, **kw)
    assert_same_state(ours, theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    batch = batch_for(family)
    if unchanged_at_start:
        assert_logits_close(logits(ours, batch), logits(build(), batch))
    batches = [batch_for(family, seed=100 + i % 2) for i in range(steps)]
    mine, other = train(ours, batches), quiet(train, theirs, batches)
    assert mine == pytest.approx(other, rel=1e-4)
    assert mine[-2] < mine[0], mine  # it learns the two batches
    assert_same_state(ours, theirs, exact=False)
    expected = logits(theirs, batch)
    assert_logits_close(logits(ours, batch), expected)
    ours.save_pretrained(tmp_path / "ours")
    quiet(theirs.save_pretrained, tmp_path / "theirs")
    # loading re-runs a base-changing init on the fresh base (peft's way); from the seed of the first run a
    # randomised one (pissa_niter_N) draws the same numbers again
    for load, folder in ((peft.PeftModel.from_pretrained, "ours"), (LoraModel.from_pretrained, "theirs")):
        fresh = build()
        torch.manual_seed(seed)
        assert_logits_close(logits(quiet(load, fresh, tmp_path / folder), batch), expected)
    return ours, theirs


def assert_same_merge(ours, theirs) -> None:
    mine, other = ours.merge_and_unload().state_dict(), quiet(theirs.merge_and_unload).state_dict()
    assert mine.keys() == other.keys()
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5, msg=key)
