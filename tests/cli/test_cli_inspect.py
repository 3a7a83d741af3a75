"""`lorakit inspect ADAPTER`: fails on incomplete / inconsistent adapters; with --model, checks the fit."""

import json

from lorakit.cli.main import main

from .conftest import broken_copy, err_of


def test_inspect_folder_without_weights_fails(adapter, tmp_path, capsys):
    no_weights = broken_copy(adapter, tmp_path, "noweights", lambda d: (d / "adapter_model.safetensors").unlink())
    err = err_of(["inspect", str(no_weights)], capsys)
    assert "no adapter weights" in err and "adapter_model.safetensors" in err


def test_inspect_rank_mismatch_fails(adapter, tmp_path, capsys):
    def set_r(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["r"] = 2
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    bad_r = broken_copy(adapter, tmp_path, "bad_r", set_r)
    err = err_of(["inspect", str(bad_r)], capsys)
    assert "adapter_config.json says r=2" in err and "has rank 4" in err
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "lora_A" in out


def test_inspect_adapter_against_model(adapter, tiny_model_dir, tmp_path, capsys):
    assert main(["inspect", str(adapter), "--model", str(tiny_model_dir)]) == 0
    assert f"check: the adapter loads on {tiny_model_dir}" in capsys.readouterr().out
    # another model (other sizes): the adapter does not fit
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 16, 32
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    err = err_of(["inspect", str(adapter), "--model", str(other)], capsys)
    assert "does not match the model" in err or "shape" in err


def test_inspect_adapter_refuses_dry_run_options(adapter, capsys, no_model_load):
    err = err_of(["inspect", str(adapter), "--r", "16"], capsys)
    assert "--r: only for the dry run" in err
