"""add_weighted_adapter's task-arithmetic merges (TIES, DARE, magnitude pruning and their _svd forms)
against peft: the same combined adapter, the same logits through it, the same merged weights.

DARE prunes at random: both libraries draw from torch's default generator in the same order, so each
call is made from the same seed on both sides.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.errors import LoraError  # noqa: E402

from tiny import assert_logits_close, batch_for, build, logits, single_thread  # noqa: E402,F401

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "wte"], "bloom": ["query_key_value", "dense_4h_to_h"],
           "mixtral": ["q_proj", "o_proj"]}
KINDS = ["ties", "dare_linear", "dare_ties", "magnitude_prune",
         "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def _pair(family: str, rank_b: int = 4):
    """lorakit and peft models holding the same two random adapters 'a' and 'b'."""
    base = build(family)
    theirs_base = copy.deepcopy(base)
    targets = TARGETS[family]
    configs = [dict(r=4, lora_alpha=8, target_modules=targets), dict(r=rank_b, lora_alpha=16, target_modules=targets)]
    ours = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **configs[0]), adapter_name="a")
    ours.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", **configs[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(task_type="CAUSAL_LM", **configs[0]),
                                     adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(task_type="CAUSAL_LM", **configs[1]))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in ("a", "b"):
            sd = peft.get_peft_model_state_dict(theirs, adapter_name=name)
            for value in sd.values():
                value.copy_(torch.randn(value.shape, generator=g) * 0.3)
            ours.load_lora_state_dict(sd, name)
    return ours, theirs


@pytest.mark.parametrize("family", list(TARGETS))
@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_peft(family, kind):
    ours, theirs = _pair(family)
    kw = dict(combination_type=kind, density=0.6, majority_sign_method="frequency" if "ties" in kind else "total")
    torch.manual_seed(123)
    ours.add_weighted_adapter(["a", "b"], [0.8, -0.5], "mix", **kw)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a", "b"], [0.8, -0.5], "mix", **kw)
    mine, other = ours.lora_state_dict("mix"), peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert mine.keys() == other.keys()
    for key, value in other.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5, msg=key)
    pruned = [v for k, v in mine.items() if "lora_A" in k or "lora_embedding_A" in k]
    if not kind.endswith("svd"):  # pruning really zeroed entries of the A's
        assert any((v == 0).float().mean() > 0.1 for v in pruned)
    ours.set_adapter("mix"), theirs.set_adapter("mix")
    batch = batch_for(family)
    assert_logits_close(logits(ours, batch), logits(theirs, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload().state_dict()
    head = {k: v.clone() for k, v in ours.model.state_dict().items() if k == "lm_head.weight" and family == "gpt2"}
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_theirs.items():
        # GPT-2's head is tied to the targeted wte: lorakit merges into the embedding's own copy and the head
        # keeps its weight (merged == unmerged); peft's merge changes the head too
        torch.testing.assert_close(merged_ours[key], head.get(key, value), rtol=1e-5, atol=1e-6, msg=key)


def test_dare_depends_on_the_seed_and_density_one_keeps_everything():
    ours, _ = _pair("llama")
    for name, seed in (("x", 1), ("y", 2), ("z", 1)):
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="dare_linear", density=0.5)
    x, y, z = (ours.lora_state_dict(n) for n in "xyz")
    assert all(torch.equal(x[k], z[k]) for k in x) and not all(torch.equal(x[k], y[k]) for k in x)
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "full", combination_type="dare_linear", density=1.0)
    lin, full = ours.lora_state_dict("lin"), ours.lora_state_dict("full")
    assert all(torch.equal(lin[k], full[k]) for k in lin)


def test_ties_elects_the_sign_and_averages_the_agreeing_entries():
    """On hand-made tensors: the entry where adapters disagree keeps only the majority's values."""
    from lorakit.merging import merge_tensors

    a = torch.tensor([[2.0, -1.0, 0.5]])
    b = torch.tensor([[4.0, 3.0, -0.1]])
    c = torch.tensor([[-1.0, 2.0, 0.2]])
    out = merge_tensors("ties", [a, b, c], torch.tensor([1.0, 1.0, 1.0]), density=1.0, sign_method="total")
    # column 0: sum 5 > 0 -> mean of 2 and 4; column 1: sum 4 > 0 -> mean of 3, 2; column 2: sum 0.6 -> 0.5, 0.2
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.5, 0.35]]))
    freq = merge_tensors("ties", [a, b, c], torch.tensor([1.0, 1.0, 1.0]), density=1.0, sign_method="frequency")
    torch.testing.assert_close(freq, torch.tensor([[3.0, 2.5, 0.35]]))
    pruned = merge_tensors("magnitude_prune", [a], torch.tensor([1.0]), density=0.34)
    torch.testing.assert_close(pruned, torch.tensor([[2.0, 0.0, 0.0]]))  # int(0.34 * 3) = 1 entry kept


def test_pruning_merges_need_one_rank_and_a_density():
    ours, _ = _pair("llama", rank_b=2)
    with pytest.raises(LoraError, match="one rank"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties", density=0.5)
    ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd", density=0.5)  # svd: any ranks
    assert ours.peft_config["x"].r == 4
    with pytest.raises(LoraError, match="needs density"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "y", combination_type="dare_ties_svd", density=0)
    assert "y" not in ours.peft_config
