"""The Python API, table-driven: every bad input is refused with a LoraError-family error (never a bare
KeyError / AttributeError / TypeError / OverflowError) that names the field or value, and the caller's model
(weights, buffers, module structure, requires_grad flags, train/eval mode) is exactly as it was."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, LoraModel, TaskType, get_peft_model
from lorakit.errors import AdapterLoadError, ConfigError, LoraError, TargetError
from tiny import train_llama

from .helpers import assert_model_unchanged, model_snapshot, tree_snapshot

QV = ["q_proj", "v_proj"]


def base():
    return train_llama(0)


def wrapped():
    torch.manual_seed(0)
    return get_peft_model(base(), LoraConfig(r=4, target_modules=QV))


def refused(model, call, error, *needles):
    """``call(model)`` raises ``error`` naming each needle; ``model`` is unchanged."""
    before = model_snapshot(model)
    with pytest.raises(error) as e:
        call(model)
    assert isinstance(e.value, LoraError), f"{type(e.value).__name__} is not a LoraError: {e.value}"
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_model_unchanged(model, before)
    return msg


# ---------------------------------------------------------------------------------------------- config fields

#: (LoraConfig keyword arguments, what the message must name)
CONFIG_CASES = {
    "r zero": (dict(r=0), "r"),
    "r negative": (dict(r=-4), "r"),
    "r float": (dict(r=8.0), "r"),
    "r string": (dict(r="8"), "r"),
    "r bool": (dict(r=True), "r"),
    "r nan": (dict(r=math.nan), "r"),
    "r None": (dict(r=None), "r"),
    "alpha zero": (dict(lora_alpha=0), "lora_alpha"),
    "alpha inf": (dict(lora_alpha=math.inf), "lora_alpha"),
    "alpha nan": (dict(lora_alpha=math.nan), "lora_alpha"),
    "alpha string": (dict(lora_alpha="16"), "lora_alpha"),
    "alpha list": (dict(lora_alpha=[16]), "lora_alpha"),
    "dropout 1": (dict(lora_dropout=1.0), "lora_dropout"),
    "dropout negative": (dict(lora_dropout=-0.1), "lora_dropout"),
    "dropout nan": (dict(lora_dropout=math.nan), "lora_dropout"),
    "dropout string": (dict(lora_dropout="0.1"), "lora_dropout"),
    "bias unknown": (dict(bias="some"), "bias"),
    "bias None": (dict(bias=None), "bias"),
    "task_type unknown": (dict(task_type="CAUSAL"), "task_type"),
    "task_type int": (dict(task_type=5), "task_type"),
    "inference_mode string": (dict(inference_mode="yes"), "inference_mode"),
    "fan_in_fan_out int": (dict(fan_in_fan_out=1), "fan_in_fan_out"),
    "use_rslora None": (dict(use_rslora=None), "use_rslora"),
    "init_lora_weights unknown": (dict(init_lora_weights="xavier"), "init_lora_weights"),
    "init_lora_weights list": (dict(init_lora_weights=[]), "init_lora_weights"),
    "target_modules int": (dict(target_modules=5), "target_modules"),
    "target_modules empty": (dict(target_modules=[]), "target_modules"),
    "target_modules with an int": (dict(target_modules=["q_proj", 3]), "target_modules"),
    "target_modules empty name": (dict(target_modules=["q_proj", ""]), "target_modules"),
    "target_modules mapping": (dict(target_modules={"q_proj": 1}), "target_modules"),
    "target_modules bad regex": (dict(target_modules="(q_proj"), "target_modules"),
    "exclude_modules all-linear": (dict(exclude_modules="all-linear"), "exclude_modules"),
    "exclude_modules ints": (dict(exclude_modules=[1]), "exclude_modules"),
    "modules_to_save int": (dict(modules_to_save=5), "modules_to_save"),
    "modules_to_save mapping": (dict(modules_to_save={"lm_head": True}), "modules_to_save"),
    "layers_to_transform negative": (dict(target_modules=QV, layers_to_transform=[-1]), "layers_to_transform"),
    "layers_to_transform string": (dict(target_modules=QV, layers_to_transform="0"), "layers_to_transform"),
    "layers_to_transform bool": (dict(target_modules=QV, layers_to_transform=True), "layers_to_transform"),
    "layers_to_transform floats": (dict(target_modules=QV, layers_to_transform=[0.0]), "layers_to_transform"),
    "layers_to_transform empty": (dict(target_modules=QV, layers_to_transform=[]), "layers_to_transform"),
    "layers_to_transform with regex targets": (dict(target_modules=".*q_proj", layers_to_transform=[0]),
                                               "layers_to_transform"),
    "layers_pattern int": (dict(layers_pattern=5), "layers_pattern"),
    "layers_pattern int with layers": (dict(target_modules=QV, layers_to_transform=[0], layers_pattern=5),
                                       "layers_pattern"),
    "layers_pattern without layers": (dict(layers_pattern="layers"), "layers_pattern"),
    "layers_pattern empty name": (dict(target_modules=QV, layers_to_transform=[0], layers_pattern=[""]),
                                  "layers_pattern"),
    "layers_pattern bad regex": (dict(target_modules=QV, layers_to_transform=[0], layers_pattern="(layers"),
                                 "layers_pattern"),
    "rank_pattern string": (dict(rank_pattern="q_proj"), "rank_pattern"),
    "rank_pattern list": (dict(rank_pattern=[("q_proj", 4)]), "rank_pattern"),
    "rank_pattern zero rank": (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']"),
    "rank_pattern float rank": (dict(rank_pattern={"q_proj": 4.5}), "rank_pattern['q_proj']"),
    "rank_pattern int key": (dict(rank_pattern={5: 4}), "rank_pattern"),
    "rank_pattern bad regex key": (dict(rank_pattern={"(q": 4}), "rank_pattern"),
    "alpha_pattern list": (dict(alpha_pattern=[1]), "alpha_pattern"),
    "alpha_pattern None value": (dict(alpha_pattern={"q_proj": None}), "alpha_pattern['q_proj']"),
    "alpha_pattern negative": (dict(alpha_pattern={"q_proj": -1}), "alpha_pattern['q_proj']"),
    "alpha_pattern inf": (dict(alpha_pattern={"q_proj": math.inf}), "alpha_pattern['q_proj']"),
    "base_model_name_or_path int": (dict(base_model_name_or_path=5), "base_model_name_or_path"),
    "base_model_name_or_path list": (dict(base_model_name_or_path=["a"]), "base_model_name_or_path"),
    "revision float": (dict(revision=1.5), "revision"),
    "revision bytes": (dict(revision=b"main"), "revision"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_field(case):
    kwargs, field = CONFIG_CASES[case]
    msg = refused(base(), lambda m: get_peft_model(m, LoraConfig(**kwargs)), ConfigError, field)
    # says what was given, or what to write instead
    assert any(w in msg for w in ("got", "use", "e.g.", "Give", "Pass", "list the", "put the")), msg


# ---------------------------------------------------------------------------------------------- config vs. model

#: (config, error, what the message must name): valid configs that do not fit the model
PLAN_CASES = {
    "target typo": (dict(target_modules=["q_prj"]), TargetError, "q_prj"),
    "one of two targets a typo": (dict(target_modules=["q_proj", "v_prj"]), TargetError, "v_prj"),
    "target regex matching nothing": (dict(target_modules=r".*\.nothing"), TargetError, "nothing"),
    "target regex matching containers": (dict(target_modules=r".*self_attn"), TargetError, "self_attn"),
    "rank_pattern key matching no target": (dict(target_modules=QV, rank_pattern={"qproj": 2}), TargetError,
                                           "qproj"),
    "rank_pattern key of an untargeted module": (dict(target_modules=QV, rank_pattern={"k_proj": 2}), TargetError,
                                                "k_proj"),
    "alpha_pattern key matching no target": (dict(target_modules=QV, alpha_pattern={"v_prj": 2}), TargetError,
                                            "v_prj"),
    "layers_to_transform beyond the model": (dict(target_modules=QV, layers_to_transform=[0, 7]), TargetError, "7"),
    "layers_to_transform all beyond": (dict(target_modules=QV, layers_to_transform=[5]), TargetError, "5"),
    "layers_pattern naming no layer list": (dict(target_modules=QV, layers_to_transform=[0], layers_pattern="h"),
                                            TargetError, "layers_pattern"),
    "module in targets and modules_to_save": (dict(target_modules=QV, modules_to_save=["q_proj"]), TargetError,
                                              "modules_to_save"),
    "only target also saved": (dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), TargetError,
                               "lm_head"),
    "modules_to_save missing": (dict(target_modules=QV, modules_to_save=["score_head"]), TargetError,
                                "score_head"),
    "exclude every target": (dict(target_modules=QV, exclude_modules=QV), TargetError, "q_proj"),
    "r too large for any memory": (dict(target_modules=QV, r=10 ** 12), ConfigError, "r=1000000000000"),
    "rank_pattern too large for any memory": (dict(target_modules=QV, rank_pattern={"q_proj": 10 ** 12}),
                                              ConfigError, "rank_pattern"),
    "task without default targets": (dict(), None, None),  # llama has a default: accepted (control case)
}


@pytest.mark.parametrize("case", [c for c in PLAN_CASES if PLAN_CASES[c][1] is not None])
@pytest.mark.parametrize("entry", ["get_peft_model", "LoraModel", "add_adapter"])
def test_config_that_does_not_fit_the_model(case, entry):
    kwargs, error, needle = PLAN_CASES[case]
    config = LoraConfig(**kwargs)
    if entry == "add_adapter":
        refused(wrapped(), lambda m: m.add_adapter("second", config), error, needle)
    elif entry == "LoraModel":
        refused(base(), lambda m: LoraModel(m, config), error, needle)
    else:
        refused(base(), lambda m: get_peft_model(m, config), error, needle)


def test_the_control_case_is_accepted():
    get_peft_model(base(), LoraConfig(**PLAN_CASES["task without default targets"][0]))


# ---------------------------------------------------------------------------------------------- calls

def _sd(model, change):
    sd = {k: v.clone() for k, v in model.lora_state_dict().items()}
    key = next(iter(sd))
    change(sd, key)
    return sd


def _set(value):
    def change(sd, key):
        sd[key] = value(sd[key]) if callable(value) else value
    return change


def poisoned():
    """A LoraModel whose adapter holds a NaN: merging it would poison the base weights."""
    model = wrapped()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = math.nan
    return model


CALL_CASES = {
    "safe merge of a NaN adapter": (poisoned, lambda m: m.merge_adapter(safe_merge=True), LoraError, "NaN"),
    "safe merge_and_unload of a NaN adapter": (poisoned, lambda m: m.merge_and_unload(safe_merge=True), LoraError,
                                               "NaN"),
    "get_peft_model with a dict": (base, lambda m: get_peft_model(m, {"r": 8}), LoraError, "LoraConfig"),
    "get_peft_model with a peft-like object": (base, lambda m: get_peft_model(m, object()), LoraError, "LoraConfig"),
    "get_peft_model on a LoraModel": (wrapped, lambda m: get_peft_model(m, LoraConfig(target_modules=QV)), LoraError,
                                      "add_adapter"),
    "get_peft_model on a non-module": (lambda: torch.nn.Linear(2, 2), lambda m: get_peft_model(
        {"not": "a model"}, LoraConfig(target_modules=QV)), LoraError, "nn.Module"),
    "adapter name with a dot": (base, lambda m: get_peft_model(m, LoraConfig(target_modules=QV), "a.b"), LoraError,
                                "'a.b'"),
    "adapter name __base__": (base, lambda m: get_peft_model(m, LoraConfig(target_modules=QV), "__base__"),
                              LoraError, "__base__"),
    "adapter name int": (base, lambda m: get_peft_model(m, LoraConfig(target_modules=QV), 5), LoraError, "5"),
    "adapter name empty": (base, lambda m: get_peft_model(m, LoraConfig(target_modules=QV), ""), LoraError, "''"),
    "add_adapter existing name": (wrapped, lambda m: m.add_adapter("default", LoraConfig(target_modules=QV)),
                                  LoraError, "default"),
    "add_adapter with a dict": (wrapped, lambda m: m.add_adapter("b", {"r": 4}), LoraError, "LoraConfig"),
    "add_adapter bias=all beside another": (wrapped, lambda m: m.add_adapter(
        "b", LoraConfig(target_modules=QV, bias="all")), LoraError, "bias"),
    "set_adapter unknown": (wrapped, lambda m: m.set_adapter("nope"), LoraError, "nope"),
    "set_adapter a list": (wrapped, lambda m: m.set_adapter(["default"]), LoraError, "default"),
    "set_adapter None": (wrapped, lambda m: m.set_adapter(None), LoraError, "None"),
    "delete_adapter unknown": (wrapped, lambda m: m.delete_adapter("nope"), LoraError, "nope"),
    "merge_adapter unknown": (wrapped, lambda m: m.merge_adapter(["nope"]), LoraError, "nope"),
    "merge_adapter an int": (wrapped, lambda m: m.merge_adapter(5), LoraError, "adapter_names"),
    "merge_and_unload unknown": (wrapped, lambda m: m.merge_and_unload(adapter_names=["nope"]), LoraError, "nope"),
    "set_requires_grad unknown": (wrapped, lambda m: m.set_requires_grad("nope"), LoraError, "nope"),
    "set_requires_grad an int": (wrapped, lambda m: m.set_requires_grad(5), LoraError, "adapter_names"),
    "lora_state_dict unknown": (wrapped, lambda m: m.lora_state_dict("nope"), LoraError, "nope"),
    "adapter_parameters unknown": (wrapped, lambda m: m.adapter_parameters("nope"), LoraError, "nope"),
    "forward with an unknown row adapter": (wrapped, lambda m: m(torch.ones(1, 3, dtype=torch.long),
                                                                 adapter_names=["zz"]), LoraError, "zz"),
    "generate with an unknown row adapter": (wrapped, lambda m: m.generate(
        input_ids=torch.ones(1, 3, dtype=torch.long), adapter_names=["zz"], max_new_tokens=1), LoraError, "zz"),
    "save_pretrained unknown adapter": (wrapped, lambda m: m.save_pretrained("never-written",
                                                                             selected_adapters=["nope"]),
                                        LoraError, "nope"),
    "save_pretrained to a non-path": (wrapped, lambda m: m.save_pretrained(5), LoraError, "save_directory"),
    "save_pretrained to None": (wrapped, lambda m: m.save_pretrained(None), LoraError, "save_directory"),
    "forward with adapter_names a string": (wrapped, lambda m: m(torch.ones(1, 3, dtype=torch.long),
                                                                  adapter_names="default"), LoraError, "list"),
    "forward with adapter_names not dividing the batch": (wrapped, lambda m: m(
        torch.ones(3, 3, dtype=torch.long), adapter_names=["default", "__base__"]), LoraError, "3 rows"),
    "forward with no adapter_names": (wrapped, lambda m: m(torch.ones(2, 3, dtype=torch.long), adapter_names=[]),
                                      LoraError, "0 entries"),
    "save_pretrained adapters as an int": (wrapped, lambda m: m.save_pretrained("never-written", selected_adapters=3),
                                           LoraError, "selected_adapters"),
    "state dict a list": (wrapped, lambda m: m.load_lora_state_dict([1, 2]), AdapterLoadError, "list"),
    "state dict value a float": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, _set(1.0))), AdapterLoadError,
                                 "not a tensor"),
    "state dict value a list": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, _set(lambda t: t.tolist()))),
                                AdapterLoadError, "not a tensor"),
    "state dict value an int tensor": (wrapped, lambda m: m.load_lora_state_dict(
        _sd(m, _set(lambda t: t.to(torch.int32)))), AdapterLoadError, "int32"),
    "state dict value a bool tensor": (wrapped, lambda m: m.load_lora_state_dict(
        _sd(m, _set(lambda t: t > 0))), AdapterLoadError, "bool"),
    "state dict value a complex tensor": (wrapped, lambda m: m.load_lora_state_dict(
        _sd(m, _set(lambda t: t.to(torch.complex64)))), AdapterLoadError, "complex64"),
    "state dict wrong shape": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, _set(lambda t: t[:1]))),
                               AdapterLoadError, "shape"),
    "state dict NaN": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, _set(lambda t: t * math.nan))),
                       AdapterLoadError, "NaN"),
    "state dict missing key": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, lambda sd, k: sd.pop(k))),
                               AdapterLoadError, "missing"),
    "state dict extra key": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, lambda sd, k: sd.update(
        {"base_model.model.nowhere.lora_A.weight": sd[k]}))), AdapterLoadError, "nowhere"),
    "state dict int key": (wrapped, lambda m: m.load_lora_state_dict(_sd(m, lambda sd, k: sd.update(
        {7: sd[k]}))), AdapterLoadError, "7"),
    "from_pretrained with a non-path": (base, lambda m: LoraModel.from_pretrained(m, 5), AdapterLoadError, "path"),
    "load_adapter with a non-path": (wrapped, lambda m: m.load_adapter(["a"], "b"), AdapterLoadError, "path"),
    "config from a list": (base, lambda m: LoraConfig.from_dict([("r", 4)]), ConfigError, "mapping"),
    "config from a non-path": (base, lambda m: LoraConfig.from_pretrained(None), ConfigError, "path"),
    "state dict for an unknown adapter": (wrapped, lambda m: m.load_lora_state_dict(m.lora_state_dict(), "nope"),
                                          LoraError, "nope"),
}


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_bad_call(case, tmp_path, monkeypatch):
    make, call, error, needle = CALL_CASES[case]
    monkeypatch.chdir(tmp_path)
    refused(make(), call, error, needle)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------------- adapter folders


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_adapter") / "adapter"
    model = wrapped()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    model.save_pretrained(folder)
    return folder


def _edit_config(**changes):
    def edit(folder: Path):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(change):
    def edit(folder: Path):
        from safetensors.torch import load_file, save_file

        sd = load_file(str(folder / "adapter_model.safetensors"))
        change(sd)
        save_file(sd, str(folder / "adapter_model.safetensors"))
    return edit


def _first(sd):
    return sorted(sd)[0]


class _Code:
    """Unpickling this makes the folder ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _bin_only(payload):
    def edit(folder: Path):
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(payload)
    return edit


#: (how the folder is damaged, what the message must name)
FOLDER_CASES = {
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{'r': 4"), "adapter_config.json"),
    "config empty": (lambda f: (f / "adapter_config.json").write_text(""), "adapter_config.json"),
    "config a list": (lambda f: (f / "adapter_config.json").write_text("[1]"), "JSON object"),
    "config not UTF-8": (lambda f: (f / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "adapter_config.json"),
    "config missing": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
    "config a folder": (lambda f: ((f / "adapter_config.json").unlink(), (f / "adapter_config.json").mkdir()),
                        "adapter_config.json"),
    "weights missing": (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    "weights truncated": (lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:300]), "adapter_model.safetensors"),
    "weights empty": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors"),
    "weights garbage": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "corrupt"),
    "weights an int tensor": (_edit_weights(lambda sd: sd.update({_first(sd): sd[_first(sd)].to(torch.int64)})),
                              "int64"),
    "weights a float64 NaN": (_edit_weights(lambda sd: sd.update({_first(sd): sd[_first(sd)] * math.nan})), "NaN"),
    "weights of another rank": (_edit_weights(lambda sd: sd.update({_first(sd): sd[_first(sd)][:2]})), "shape"),
    "weights missing a key": (_edit_weights(lambda sd: sd.pop(_first(sd))), "missing"),
    "weights with a foreign key": (_edit_weights(lambda sd: sd.update(
        {"base_model.model.model.nowhere.lora_A.weight": sd[_first(sd)].clone()})), "nowhere"),
    "only a pickle": (_bin_only(pickle.dumps({})), "allow_pickle"),
    "config r a string": (_edit_config(r="4"), "r"),
    "config r zero": (_edit_config(r=0), "r"),
    "config lora_alpha a list": (_edit_config(lora_alpha=[8]), "lora_alpha"),
    "config lora_dropout 2": (_edit_config(lora_dropout=2), "lora_dropout"),
    "config target_modules an int": (_edit_config(target_modules=5), "target_modules"),
    "config target_modules a mapping": (_edit_config(target_modules={"q_proj": 1}), "target_modules"),
    "config rank_pattern a string": (_edit_config(rank_pattern="q_proj"), "rank_pattern"),
    "config alpha_pattern null value": (_edit_config(alpha_pattern={"q_proj": None}), "alpha_pattern"),
    "config layers_pattern an int": (_edit_config(layers_to_transform=[0], layers_pattern=5), "layers_pattern"),
    "config layers_to_transform a string": (_edit_config(layers_to_transform="0"), "layers_to_transform"),
    "config base_model_name_or_path an int": (_edit_config(base_model_name_or_path=5), "base_model_name_or_path"),
    "config revision a float": (_edit_config(revision=1.5), "revision"),
    "config task_type a list": (_edit_config(task_type=["CAUSAL_LM"]), "task_type"),
    "config bias an int": (_edit_config(bias=1), "bias"),
    "config inference_mode a string": (_edit_config(inference_mode="true"), "inference_mode"),
    "config modules_to_save an int": (_edit_config(modules_to_save=3), "modules_to_save"),
    "config init_lora_weights a list": (_edit_config(init_lora_weights=[]), "init_lora_weights"),
    "config another peft method": (_edit_config(peft_type="IA3"), "IA3"),
    "config of a bigger rank than the weights": (_edit_config(r=8), "shape"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter"])
def test_bad_adapter_folder(case, entry, saved, tmp_path):
    damage, needle = FOLDER_CASES[case]
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    damage(folder)
    on_disk = tree_snapshot(folder)
    if entry == "from_pretrained":
        refused(base(), lambda m: LoraModel.from_pretrained(m, folder), AdapterLoadError, needle)
    else:
        refused(wrapped(), lambda m: m.load_adapter(folder, "other"), AdapterLoadError, needle)
    assert tree_snapshot(folder) == on_disk  # reading never changes the folder


def test_a_pickle_that_would_run_code_is_refused_even_when_pickles_are_allowed(saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    marker = tmp_path / "code-ran"
    _bin_only(pickle.dumps({"x": _Code(marker)}))(folder)
    msg = refused(base(), lambda m: LoraModel.from_pretrained(m, folder, allow_pickle=True), AdapterLoadError,
                  "refused: not plain tensors")
    assert "weights_only" not in msg and not marker.exists()


def test_a_missing_folder_and_a_file_in_its_place(tmp_path, saved):
    refused(base(), lambda m: LoraModel.from_pretrained(m, tmp_path / "nope"), AdapterLoadError, "nope")
    (tmp_path / "file").write_text("x")
    refused(wrapped(), lambda m: m.load_adapter(tmp_path / "file", "other"), AdapterLoadError, "file")
    refused(wrapped(), lambda m: m.load_adapter(saved, "default"), LoraError, "default")


def test_a_second_adapter_training_shared_biases_is_refused_on_load(saved, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    _edit_config(bias="all")(folder)
    refused(wrapped(), lambda m: m.load_adapter(folder, "other"), LoraError, "bias='all'")


@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter"])
def test_a_failure_halfway_through_injection_puts_the_model_back(entry, monkeypatch):
    """The net under the checks: memory running out while the third LoRA pair is allocated."""
    from lorakit.layers import LoraLayer

    original, calls = LoraLayer.add_adapter, {"n": 0}

    def out_of_memory(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return original(self, *a, **k)

    model = base() if entry == "get_peft_model" else wrapped()
    before = model_snapshot(model)
    monkeypatch.setattr(LoraLayer, "add_adapter", out_of_memory)
    with pytest.raises(RuntimeError, match="allocate"):
        if entry == "get_peft_model":
            get_peft_model(model, LoraConfig(r=4, target_modules=QV))
        else:
            model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    assert_model_unchanged(model, before)
    monkeypatch.setattr(LoraLayer, "add_adapter", original)
    if entry == "add_adapter":  # its records too: the adapter can be added again, and works
        assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
        assert all(list(layer.r) == ["default"] for _, layer in model.lora_layers())
        model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
        model(torch.ones(1, 4, dtype=torch.long))
