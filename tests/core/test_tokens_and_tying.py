"""trainable_token_indices and ensure_weight_tying against peft: the same keys and initial values, the same
training, files both ways, the same merged weights; a tied embedding/head pair stays tied."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")  # the oracle

from lorakit import LoraConfig, LoraModel, TargetError, get_peft_model  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402

from tiny import assert_logits_close, batch_for, build, logits, single_thread, tiny_llama  # noqa: E402,F401
from core.peft_oracle import assert_same_merge, check_variant, train  # noqa: E402


def tied_llama():
    """The tiny llama with tie_word_embeddings=True: lm_head.weight is model.embed_tokens.weight."""
    return tiny_llama(tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)


CASES = {
    "llama-list": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    "gpt2-tied-list": ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=[3, 5, 7])),
    "bloom-dict": ("bloom", dict(target_modules=["query_key_value"], trainable_token_indices={"word_embeddings": [4, 9]})),
    "mixtral-list": ("mixtral", dict(target_modules=["q_proj"], trainable_token_indices=[10, 11])),
    "tied-tokens": ("tied", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5])),
    "tied-both-same-rows": ("tied", dict(target_modules=["q_proj"], ensure_weight_tying=True,
                                         trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 5]})),
    "tie-lora-embedding": ("tied", dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True)),
    "tie-lora-head": ("tied", dict(target_modules=["lm_head", "v_proj"], ensure_weight_tying=True)),
    "tie-lora-gaussian": ("tied", dict(target_modules=["embed_tokens"], ensure_weight_tying=True,
                                       init_lora_weights="gaussian")),
    "tie-saved-embedding": ("tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                         ensure_weight_tying=True)),
    "tie-saved-head": ("tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)),
}


def _builder(family):
    return tied_llama if family == "tied" else (lambda: build(family))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case, tmp_path):
    family, kw = CASES[case]
    ours, theirs = check_variant(_builder(family), "llama" if family == "tied" else family, tmp_path,
                                 r=4, lora_alpha=8, **kw)
    model = ours.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if family in ("tied", "gpt2") and (kw.get("ensure_weight_tying") or "trainable_token_indices" in kw):
        _assert_tied(emb, head)
    if case.startswith("tie-lora"):
        _assert_merged_once(ours)  # peft adds a tied pair's update twice when merging: not compared
    else:
        assert_same_merge(ours, theirs)


def _assert_merged_once(model):
    """The shared table takes the tied update once: the merged model computes what the adapter did."""
    batch = batch_for("llama")
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert_logits_close(logits(merged, batch), expected)


def _assert_tied(emb, head):
    """The head computes with the embedding's table (rows, LoRA update or saved copy), also after training."""
    from lorakit.layers import LoraLayer

    if hasattr(emb, "token_adapter"):
        assert head.source is emb
        torch.testing.assert_close(head.table(head.active_adapters), emb.table(emb.active_adapters), rtol=0, atol=0)
    elif isinstance(emb, LoraLayer):
        torch.testing.assert_close(head.delta_weight("default"), emb.delta_weight("default"), rtol=0, atol=0)
    else:
        assert head.active_module.weight is emb.active_module.weight


def test_only_the_chosen_rows_train_and_the_rest_of_the_table_stays():
    model = get_peft_model(build("llama"), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 8]))
    before = model.model.model.embed_tokens.base_layer.weight.detach().clone()
    train(model, [batch_for("llama", seed=100 + i) for i in range(3)])
    table = model.model.model.embed_tokens.table(["default"]).detach()
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [4, 8]
    assert torch.equal(model.model.model.embed_tokens.base_layer.weight, before)  # the base is untouched
    merged = model.merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, table)


def test_tokens_of_two_adapters_route_per_row_and_unmerge_restores_the_rows():
    model = get_peft_model(build("llama"), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 8]))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 8]))
    with torch.no_grad():
        model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
        model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["b"].add_(-1.0)
    batch = batch_for("llama")
    batch["input_ids"][:, 0] = 4
    solo = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        solo[name] = logits(model, batch)
    mixed = model(input_ids=batch["input_ids"], adapter_names=["default", "b"]).logits.detach()
    torch.testing.assert_close(mixed[0], solo["default"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], solo["b"][1], rtol=0, atol=1e-5)
    emb = model.model.model.embed_tokens
    original = emb.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert not torch.equal(emb.base_layer.weight, original)
    model.unmerge_adapter()
    assert torch.equal(emb.base_layer.weight, original)


@pytest.mark.parametrize("kw,err,match", [
    (dict(trainable_token_indices=[3, 100]), TargetError, "100 rows"),
    (dict(trainable_token_indices={"nope": [3]}), TargetError, "matches no module"),
    (dict(trainable_token_indices={"embed_tokens": [3]}, modules_to_save=["embed_tokens"]), TargetError, "one way"),
    (dict(trainable_token_indices=[3], target_modules=["embed_tokens"]), TargetError, "one way"),
])
def test_bad_token_requests_are_refused(kw, err, match):
    kw.setdefault("target_modules", ["q_proj"])
    model = build("llama")
    with pytest.raises(err, match=match):
        get_peft_model(model, LoraConfig(**kw))
    assert type(model.model.embed_tokens).__name__ == "Embedding"


@pytest.mark.parametrize("value", [[3, 3], ["a"], [-1], "3", 3])
def test_token_indices_are_checked_in_the_config(value):
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices=value)


def test_different_rows_for_a_tied_pair_are_refused_with_ensure_weight_tying():
    kw = dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3], "lm_head": [4]})
    with pytest.raises(ConfigError, match="different rows"):
        get_peft_model(tied_llama(), LoraConfig(**kw, ensure_weight_tying=True))
    untied = get_peft_model(tied_llama(), LoraConfig(**kw))  # as peft: each keeps its own rows, untied
    assert untied.model.lm_head.source is untied.model.lm_head


def test_without_ensure_weight_tying_a_tied_target_warns_that_it_unties():
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        get_peft_model(tied_llama(), LoraConfig(target_modules=["embed_tokens"]))


def test_tied_lora_pair_is_one_storage_and_the_ranks_must_agree():
    model = get_peft_model(tied_llama(), LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True))
    emb, head = model.model.model.embed_tokens, model.model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    with pytest.raises(TargetError, match="one rank"):
        get_peft_model(tied_llama(), LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True,
                                                rank_pattern={"lm_head": 2}))


def test_a_tied_pair_merges_its_update_once_and_unmerges_it():
    """peft merges a tied LoRA pair's update into the shared table twice; lorakit once (layers/tied.py)."""
    model = get_peft_model(tied_llama(), LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True))
    with torch.no_grad():
        model.model.model.embed_tokens.lora_embedding_A["default"].normal_()
    batch = batch_for("llama")
    expected = logits(model, batch)
    table = model.model.model.embed_tokens.base_layer.weight
    original = table.detach().clone()
    model.merge_adapter()
    assert_logits_close(logits(model, batch), expected)
    torch.testing.assert_close(table - original, model.model.model.embed_tokens.delta_weight("default"))
    model.unmerge_adapter()
    torch.testing.assert_close(table, original, rtol=0, atol=1e-6)
    assert_logits_close(logits(model.merge_and_unload(), batch), expected)


@pytest.mark.parametrize("case", ["llama-list", "tied-tokens", "tie-lora-head", "tie-saved-head"])
def test_dry_run_counts_what_the_model_trains(case):
    from lorakit import dry_run

    family, kw = CASES[case]
    report = dry_run(_builder(family)(), LoraConfig(r=4, **kw))
    model = get_peft_model(_builder(family)(), LoraConfig(r=4, **kw))
    assert report.trainable_params == model.get_nb_trainable_parameters()[0]
    assert (" rows " in report.table()) == ("trainable_token_indices" in kw)  # token rows: "2 rows"
