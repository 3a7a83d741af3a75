"""Every model family of the default target table, on a tiny model built in-process.

For each family, with the family's default targets (target_modules=None):
a fresh adapter changes nothing (B = 0); forward + backward give gradients to LoRA (and saved
head) parameters only; with random B, merged == unmerged outputs, unmerge restores the base
weights, unload gives back plain modules with the original outputs, merge_and_unload keeps the
adapted outputs, and save_pretrained -> from_pretrained on a fresh base reproduces them.

chatglm ships only as hub remote code (not in transformers), so only its table entry is checked.
BLIP-2 is built tiny (vision + Q-Former + OPT); its default targets hit the OPT q_proj/v_proj.
"""
from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, LoraModel, get_peft_model, kernels
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.targets import DEFAULT_TARGET_MODULES, default_target_modules

from tiny import fused_and_own

from tiny import FAMILIES, assert_logits_close, batch_for, build, logits, perturb_lora, single_thread  # noqa: F401

FAMILY_NAMES = sorted(FAMILIES)


def _config(family: str, **kw) -> LoraConfig:
    return LoraConfig(task_type=FAMILIES[family].task_type, r=4, lora_alpha=8, **kw)


def _lora_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _wrappers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


def _adapted(family: str) -> tuple[LoraModel, dict, torch.Tensor]:
    """A model with a perturbed (output-changing) default adapter, its batch and its logits."""
    model = get_peft_model(build(family), _config(family))
    perturb_lora(model)
    batch = batch_for(family)
    return model, batch, logits(model, batch)


def test_every_family_is_covered():
    """The tiny-model table covers every family transformers ships that has a default entry here."""
    seed = {"t5", "mt5", "bart", "gpt2", "bloom", "blip-2", "opt", "gptj", "gpt_neox", "gpt_neo", "bert",
            "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta", "layoutlm", "llama", "gpt_bigcode",
            "mpt"}
    today = {"mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "falcon", "stablelm"}
    assert seed | today <= set(FAMILIES)
    assert set(FAMILIES) <= set(DEFAULT_TARGET_MODULES)


def test_chatglm_default_entry():
    """chatglm is remote code on the hub, not in transformers: only its table entry can be checked."""
    assert default_target_modules("chatglm") == ("query_key_value",)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_type_matches_table_key(family):
    """The tiny model reports the model_type the table is keyed by, so the default is found."""
    model = build(family)
    assert default_target_modules(model.config.model_type) == DEFAULT_TARGET_MODULES[family]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fresh_adapter_is_identity_and_trains_only_lora(family):
    base = build(family)
    batch = batch_for(family)
    before = logits(base, batch)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}

    model = get_peft_model(base, _config(family))
    paths = _lora_paths(model.model)
    defaults = DEFAULT_TARGET_MODULES[family]
    assert paths, f"{family}: the default targets {defaults} wrapped nothing"
    assert all(p.rsplit(".", 1)[-1] in defaults for p in paths)
    assert_logits_close(logits(model, batch), before)

    out = model(**batch)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for n, p in model.named_parameters():
        is_adapter = ".lora_" in n or ".modules_to_save." in n
        assert p.requires_grad == is_adapter, n
        assert (p.grad is not None) == is_adapter, n
    b_grads = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert any(g.abs().sum() > 0 for g in b_grads), "LoRA B got only zero gradients"
    if FAMILIES[family].kind == "seq_cls":  # the head trains as modules_to_save
        assert any(".modules_to_save." in n for n in trainable)
    # training the adapter never touches the base weights
    for n, p in base.named_parameters():
        key = n.replace(".base_layer", "").replace(".original_module", "")
        if ".lora_" not in n and ".modules_to_save." not in n:
            assert torch.equal(p, frozen[key]), n


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_unmerge_unload(family):
    base_out = logits(build(family), batch_for(family))
    model, batch, adapted = _adapted(family)
    assert not torch.allclose(adapted, base_out, atol=1e-3), "random B should change the output"
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.merge_adapter()
    assert all(l.merged for _, l in model.lora_layers())
    assert_logits_close(logits(model, batch), adapted)
    model.merge_adapter()  # merging twice is a no-op
    assert_logits_close(logits(model, batch), adapted)

    model.unmerge_adapter()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=f"{n} not restored")
    assert_logits_close(logits(model, batch), adapted)

    with model.disable_adapter():
        assert_logits_close(logits(model, batch), base_out)

    plain = model.unload()
    assert not _wrappers(plain)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    assert_logits_close(logits(plain, batch), base_out)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_load_and_merge_and_unload(family, tmp_path):
    model, batch, adapted = _adapted(family)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()

    loaded = LoraModel.from_pretrained(build(family), tmp_path)
    assert _lora_paths(loaded.model) == _lora_paths(model.model)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default
    torch.testing.assert_close(logits(loaded, batch), adapted, atol=0, rtol=0)

    merged = loaded.merge_and_unload()
    assert not _wrappers(merged)
    assert_logits_close(logits(merged, batch), adapted)


CAUSAL = [f for f in FAMILY_NAMES if FAMILIES[f].kind == "causal"]


@pytest.mark.parametrize("family", CAUSAL)
def test_training_loss_with_labels_equals_the_models_own(family):
    """LoraModel.forward's fused loss (training, labels) against the model's own forward and loss."""
    model = get_peft_model(build(family), _config(family))
    perturb_lora(model)
    model.train()
    batch = batch_for(family)
    batch["labels"][:, :3] = -100                              # a prompt that is not scored
    with kernels.enabled_as(True):  # the fused loss is a kernel: compared here whatever LORAKIT_KERNELS says
        out, ref, fused, own = fused_and_own(model, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, g in own.items():
        torch.testing.assert_close(fused[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # the fast path applies to every plain head(body(x)) family; soft-capped logits keep their own loss
    assert (type(out).__name__ == "FusedLossOutput") == (family != "gemma2"), family
    # read from the fused output, the logits are computed then: the model's own values and shape
    torch.testing.assert_close(out.logits, ref.logits, msg=family)
