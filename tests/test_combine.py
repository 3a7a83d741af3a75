"""add_weighted_adapter (combine.py): the same combined adapters as peft's method, and clear refusals."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LoraError

from tiny import build, single_thread  # noqa: F401

peft = pytest.importorskip("peft")  # the oracle: a test dependency


def _deltas(model, name: str, lorakit: bool) -> dict[str, torch.Tensor]:
    """module path -> scaling * B @ A of adapter ``name`` (the [out, in] orientation)."""
    out = {}
    for path, m in model.named_modules():
        if lorakit:
            from lorakit.layers import LoraLayer
            if isinstance(m, LoraLayer) and name in m.r:
                from lorakit.combine import lora_pair
                A, B = lora_pair(m, name)
                out[path.removeprefix("model.")] = (B.float() @ A.float()) * m.scaling[name]
        else:
            from peft.tuners.lora import LoraLayer as PeftLayer
            if isinstance(m, PeftLayer) and (name in m.lora_A or name in m.lora_embedding_A):
                if name in m.lora_A:
                    A, B = m.lora_A[name].weight, m.lora_B[name].weight
                else:
                    A, B = m.lora_embedding_A[name], m.lora_embedding_B[name]
                out[path.removeprefix("base_model.model.")] = (B.float() @ A.float()) * m.scaling[name]
    return out


def _pair(family: str, ranks=(4, 4), targets=(("q_proj", "v_proj"), ("q_proj", "v_proj"))):
    """lorakit and peft models holding the same two adapters 'a' and 'b' (random A and B on both sides)."""
    base = build(family)
    theirs_base = copy.deepcopy(base)
    extra = {"fan_in_fan_out": True} if family == "gpt2" else {}  # Conv1D: peft wants it said
    ours = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=ranks[0], lora_alpha=8,
                                           target_modules=list(targets[0])), adapter_name="a")
    ours.add_adapter("b", LoraConfig(task_type="CAUSAL_LM", r=ranks[1], lora_alpha=16, target_modules=list(targets[1])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(task_type="CAUSAL_LM", r=ranks[0], lora_alpha=8,
                                                                  target_modules=list(targets[0]), **extra),
                                     adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(task_type="CAUSAL_LM", r=ranks[1], lora_alpha=16,
                                                target_modules=list(targets[1]), **extra))
    g = torch.Generator().manual_seed(7)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                key = name.removeprefix("base_model.model.")
                ours_params["model." + key if not key.startswith("model.") or "model." + key in ours_params
                            else key].copy_(p)
    return ours, theirs


def _check_same(ours, theirs, name):
    mine, peft_ = _deltas(ours, name, True), _deltas(theirs, name, False)
    assert mine.keys() == peft_.keys() and mine
    for path in mine:
        torch.testing.assert_close(mine[path], peft_[path], rtol=1e-4, atol=1e-5, msg=path)


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
@pytest.mark.parametrize("family,targets", [("llama", ("q_proj", "v_proj")),
                                            ("gpt2", ("c_attn", "wte"))])  # Conv1D and an embedding
def test_combined_adapter_matches_peft(kind, family, targets):
    ours, theirs = _pair(family, targets=(targets, targets))
    _check_same(ours, theirs, "a"), _check_same(ours, theirs, "b")  # the same sources on both sides
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind)
    _check_same(ours, theirs, "mix")
    assert ours.active_adapter == "a"  # not activated, not trained
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix" in n)


def test_cat_and_svd_are_the_exact_weighted_sum_and_svd_rank_cuts_it():
    ours, _ = _pair("llama", ranks=(2, 3))
    a, b = _deltas(ours, "a", True), _deltas(ours, "b", True)
    ours.add_weighted_adapter(["a", "b"], [2.0, 0.5], "cat", combination_type="cat")
    ours.add_weighted_adapter(["a", "b"], [2.0, 0.5], "svd5", combination_type="svd", svd_rank=5)
    ours.add_weighted_adapter(["a", "b"], [2.0, 0.5], "svd1", combination_type="svd", svd_rank=1)
    cat, svd5, svd1 = (_deltas(ours, n, True) for n in ("cat", "svd5", "svd1"))
    for path in a:
        want = 2.0 * a[path] + 0.5 * b[path]
        torch.testing.assert_close(cat[path], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(svd5[path], want, rtol=1e-3, atol=1e-4)  # rank 5 holds a rank-5 sum
        assert torch.linalg.matrix_rank(svd1[path]) == 1
    assert ours.peft_config["cat"].r == 5 and ours.peft_config["svd1"].r == 1


def test_modules_only_one_adapter_wraps_are_combined_and_the_rest_left_out():
    ours, _ = _pair("llama", targets=(("q_proj",), ("v_proj",)))
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    mix, a, b = (_deltas(ours, n, True) for n in ("mix", "a", "b"))
    assert mix.keys() == a.keys() | b.keys()
    for path, d in {**a, **b}.items():
        torch.testing.assert_close(mix[path], d, rtol=1e-4, atol=1e-5)


def test_bad_requests_are_refused_before_anything_changes():
    ours, _ = _pair("llama", ranks=(2, 3))
    before = set(ours.peft_config)
    with pytest.raises(LoraError, match="no adapter named 'c'"):
        ours.add_weighted_adapter(["a", "c"], [1, 1], "x")
    with pytest.raises(LoraError, match="one finite number per adapter"):
        ours.add_weighted_adapter(["a", "b"], [1], "x")
    with pytest.raises(LoraError, match="one rank"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(LoraError, match="needs density"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd")
    with pytest.raises(LoraError, match="needs density"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="dare_linear_svd", density=1.5)
    with pytest.raises(LoraError, match="majority_sign_method"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd", density=0.5,
                                  majority_sign_method="mean")
    with pytest.raises(LoraError, match="unknown combination_type"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="average")
    assert set(ours.peft_config) == before
    with pytest.warns(UserWarning, match="exists already"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "b", combination_type="cat")
    assert ours.peft_config["b"].r == 3


def test_combined_adapter_saves_and_loads_in_peft(tmp_path):
    ours, _ = _pair("llama")
    ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="svd")
    ours.set_adapter("mix")
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "mix" if (tmp_path / "mix").exists()
                                                else tmp_path)
    ids = torch.randint(3, 90, (2, 6))
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapters, weights", [("default", [1.0]), (["default"], 1.0), (("default",), "1")])
def test_adapters_and_weights_must_be_lists(adapters, weights):
    from lorakit import LoraConfig, LoraError, get_peft_model
    from tiny import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraError, match="must be a list"):
        model.add_weighted_adapter(adapters, weights, "mix", combination_type="cat")
    assert "mix" not in model.peft_config
