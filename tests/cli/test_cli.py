"""The `lorakit` command line end to end on a tiny model saved to disk."""

import io
import json

import pytest
import torch

from lorakit.cli.main import main


def run_train(tmp_path, model_dir, *extra):
    out = tmp_path / "run"
    rc = main(["train", "demo", "--set", f"model={model_dir}", "--set", "data.max_train_samples=16",
               "--set", "data.max_eval_samples=8", "--set", "train.max_steps=4", "--set", "train.batch_size=4",
               "--set", f"output.dir={out}", "--set", "output.save_every=2", "--set", "train.progress=false",
               "--set", "output.tensorboard=false", *extra])
    return rc, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("cli")
    rc, out = run_train(tmp, tiny_model_dir)
    assert rc == 0
    return out


def test_train_writes_everything(trained, tiny_model_dir):
    out = trained
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["r"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").is_file() and (out / "recipe.yaml").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_accuracy" in r and "eval_loss" in r for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # the merged model loads with plain transformers and equals base + adapter
    from transformers import AutoModelForCausalLM

    from lorakit import LoraModel

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    lora = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    torch.testing.assert_close(merged(ids).logits, lora(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_resume_latest_via_cli(trained, tiny_model_dir, capsys, tmp_path):
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    rc, _ = run_train(tmp_path, tiny_model_dir, "--resume")
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out


def test_eval_generate_merge_inspect(trained, tiny_model_dir, tmp_path, capsys):
    adapter = str(trained / "adapter")
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", adapter, "--data", "builtin:demo_test.jsonl",
                 "--template", "classification", "--label-column", "label", "--max-samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "accuracy" in out and "billing" in out

    assert main(["eval", "demo", "--set", f"model={tiny_model_dir}", "--set", f"output.dir={trained}",
                 "--set", "data.max_eval_samples=4", "--no-accuracy"]) == 0
    out = capsys.readouterr().out
    assert "+ adapter" in out and "loss" in out

    assert main(["generate", "--adapter", adapter, "--prompt", "Ticket : hello Label : ",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", adapter, "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    assert AutoTokenizer.from_pretrained(merged) is not None

    assert main(["inspect", "--model", str(tiny_model_dir), "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "trainable" in out
    assert main(["inspect", adapter]) == 0
    assert "lora_A" in capsys.readouterr().out


def test_chat_repl_reads_stdin(trained, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/reset\nagain\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(trained / "adapter"), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant>") == 2
    assert "conversation cleared" in captured.err


@pytest.mark.parametrize("argv, needle", [
    (["train", "demo", "--set", "lora.rank=3"], "unknown recipe key 'lora.rank'"),
    (["train", "demo", "--set", "train.lr=fast"], "train.lr expects a number"),
    (["train", "no_such_recipe"], "Shipped recipes"),
    (["train"], "no recipe given"),
    (["generate", "--model", "embedded"], "no prompt given"),
    (["merge", "--model", "x", "--out", "y"], "needs --adapter"),
    (["inspect"], "needs --model"),
    (["eval"], "needs a RECIPE or --data"),
])
def test_bad_options_give_clear_errors(argv, needle, capsys):
    assert main(argv) == 1
    assert needle in capsys.readouterr().err


def test_help_for_every_command(capsys):
    from lorakit.cli.main import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: lorakit " + name in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "--bogus"])
    assert e.value.code == 2


def test_list_keys(capsys):
    assert main(["train", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "lora.r (default 8)" in out and "train.lr" in out


def test_cli_import_is_light():
    import subprocess
    import sys

    code = ("import sys, lorakit.cli.main; heavy = [m for m in ('torch', 'transformers', 'accelerate') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
