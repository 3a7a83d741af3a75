"""User errors get one clear line (no traceback), checked before the model load: output folders,
devices, model paths, prompts, corrupt adapter files, --set errors; file-system errors in general."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.cli.main import main

from .conftest import broken_copy, err_of


def test_output_dir_under_a_file_is_reported_before_loading(tmp_path, tiny_model_dir, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = err_of(["train", "demo", "--set", f"model={tiny_model_dir}", "--output-dir", str(afile / "out")], capsys)
    assert "--output-dir" in err and "is a file" in err and str(afile) in err
    err = err_of(["train", "demo", "--set", f"model={tiny_model_dir}", "--output-dir", str(afile)], capsys)
    assert "is a file, not a folder" in err
    assert afile.read_text() == "x"


def test_merge_out_under_a_file_is_reported_before_loading(tmp_path, adapter, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = err_of(["merge", "--adapter", str(adapter), "--out", str(afile / "merged")], capsys)
    assert "--out" in err and "is a file" in err


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys (Linux)")
def test_unwritable_output_dir_is_reported_before_loading(tiny_model_dir, adapter, capsys, no_model_load):
    try:
        os.mkdir("/sys/lorakit-probe")
        os.rmdir("/sys/lorakit-probe")
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    err = err_of(["train", "demo", "--set", f"model={tiny_model_dir}", "--output-dir", "/sys/out"], capsys)
    assert "cannot write in /sys" in err
    err = err_of(["merge", "--adapter", str(adapter), "--out", "/sys/merged"], capsys)
    assert "--out /sys/merged: cannot write in /sys" in err


@pytest.mark.parametrize("device, needle", [
    ("foo", "--device 'foo' is not a device"),
    ("meta", "lorakit runs on cpu, cuda[:N] or mps"),
])
def test_bad_device_string(device, needle, tiny_model_dir, capsys, no_model_load):
    err = err_of(["generate", "--model", str(tiny_model_dir), "--device", device, "--prompt", "hi"], capsys)
    assert needle in err


def test_cuda_without_cuda(monkeypatch, tiny_model_dir, capsys, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = err_of(["generate", "--model", str(tiny_model_dir), "--device", "cuda", "--prompt", "hi"], capsys)
    assert "--device cuda:" in err and "use --device cpu" in err


def test_cuda_index_out_of_range(monkeypatch, tiny_model_dir, capsys, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = err_of(["generate", "--model", str(tiny_model_dir), "--device", "cuda:3", "--prompt", "hi"], capsys)
    assert "has 1 CUDA device(s)" in err


def test_model_that_is_not_a_model(tmp_path, adapter, capsys, no_model_load):
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"\0" * 8)
    err = err_of(["generate", "--model", str(empty), "--prompt", "hi"], capsys)
    assert "has no config.json (it is empty)" in err
    err = err_of(["generate", "--model", str(afile), "--prompt", "hi"], capsys)
    assert "is a file, not a model folder" in err
    err = err_of(["generate", "--model", str(adapter), "--prompt", "hi"], capsys)
    assert "is a LoRA adapter folder, not a base model" in err and f"--adapter {adapter}" in err
    err = err_of(["inspect", "--model", str(empty)], capsys)
    assert "has no config.json" in err
    err = err_of(["train", "demo", "--set", f"model={adapter}", "--set", f"output.dir={tmp_path / 'o'}"], capsys)
    assert "model.name" in err and "LoRA adapter folder" in err


def test_model_folder_with_a_broken_config(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{ not json")
    err = err_of(["generate", "--model", str(broken), "--prompt", "hi"], capsys)
    assert f"cannot load a model from {broken}" in err


def test_empty_prompt(tiny_model_dir, capsys, no_model_load):
    err = err_of(["generate", "--model", str(tiny_model_dir), "--prompt", ""], capsys)
    assert "the prompt is empty" in err
    err = err_of(["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--prompt", ""], capsys)
    assert "prompt 2 is empty" in err


def test_corrupt_weights_and_config_in_inspect_and_generate(adapter, tmp_path, capsys, no_model_load):
    def truncate(d):
        f = d / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:200])

    trunc = broken_copy(adapter, tmp_path, "trunc", truncate)
    err = err_of(["inspect", str(trunc)], capsys)
    assert "is corrupt or truncated" in err
    bad_json = broken_copy(adapter, tmp_path, "badjson",
                           lambda d: (d / "adapter_config.json").write_text("{\n'r': 4}"))
    err = err_of(["inspect", str(bad_json)], capsys)
    assert "adapter_config.json is not valid JSON" in err
    err = err_of(["generate", "--adapter", str(bad_json), "--prompt", "hi"], capsys)  # no --model
    assert "adapter_config.json is not valid JSON" in err


def test_os_errors_become_one_line(monkeypatch, capsys):
    import lorakit.cli.inspect_cmd as inspect_cmd

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/x")

    monkeypatch.setattr(inspect_cmd, "run", denied)
    err = err_of(["inspect", "whatever"], capsys)
    assert err.strip() == ("lorakit inspect: error: Permission denied: /data/x; choose a path you can write to, "
                           "or fix its permissions")

    def bug(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(inspect_cmd, "run", bug)
    err = err_of(["inspect", "whatever"], capsys)  # a bug: one line that says so, how to report it, how to see more
    assert err.count("\n") == 1 and "internal error: RuntimeError: a real bug" in err and "LORAKIT_DEBUG=1" in err
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a real bug"):  # LORAKIT_DEBUG=1: the traceback
        main(["inspect", "whatever"])

def test_system_without_chat(tiny_model_dir, capsys, no_model_load):
    err = err_of(["generate", "--model", str(tiny_model_dir), "--system", "be brief", "--prompt", "hi"], capsys)
    assert "--system only applies with --chat" in err


def test_set_errors_name_the_command_line_not_the_recipe(capsys, no_model_load):
    err = err_of(["train", "demo", "--set", "lora.r=0"], capsys)
    assert err.startswith("lorakit train: error: --set: lora.r = 0 must be >= 1") and "demo.yaml" not in err
    err = err_of(["train", "demo", "--set", "lora.rr=3"], capsys)
    assert "--set: unknown recipe key 'lora.rr'" in err and "demo.yaml" not in err
