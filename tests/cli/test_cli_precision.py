"""--precision on the command line: `lorakit train --precision` is train.precision; eval / generate / chat / serve
load the model in the same choice (``--dtype`` still overrides it); bad values are one clear line."""
import json

import pytest
import torch

from lorakit.cli.main import main

from .conftest import err_of


def train_argv(model_dir, out, *extra):
    return ["train", "demo", "--set", f"model={model_dir}", "--set", "data.max_train_samples=4",
            "--set", "data.max_eval_samples=4", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
            "--set", f"output.dir={out}", "--set", "train.progress=false", "--set", "output.tensorboard=false",
            "--set", "output.plot=false", "--set", "eval.accuracy=false", "--set", "train.cpu=true", *extra]


@pytest.mark.parametrize("option, name", [("bf16", "bf16"), ("fp32", "fp32"), ("bfloat16", "bf16")])
def test_train_precision_option_is_train_precision(tiny_model_dir, tmp_path, capsys, option, name):
    assert main(train_argv(tiny_model_dir, tmp_path, "--precision", option)) == 0
    assert (tmp_path / "recipe.yaml").read_text().startswith(f"# precision: {name} ({name}: asked for")
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["precision"] == name and state["config"]["train"]["precision"] == name
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values()} == \
        {torch.float32}


@pytest.mark.parametrize("argv, needle", [
    (["train", "demo", "--precision", "fp8"], "--precision: unknown precision 'fp8'. Fix: use one of auto, fp32, bf16"),
    (["train", "demo", "--set", "train.precision=half"], "train.precision expects one of 'auto', 'fp32', 'bf16'"),
    (["train", "demo", "--precision", "fp32", "--set", "model.dtype=bfloat16"],
     "model.dtype = 'bfloat16' contradicts train.precision = 'fp32'"),
    (["train", "demo", "--precision", "bf16", "--set", "train.mixed_precision=bf16"],
     "--set train.mixed_precision=no"),
    (["generate", "--model", "MODEL", "--precision", "fp8", "--prompt", "hi"], "--precision: unknown precision 'fp8'"),
    (["chat", "--model", "MODEL", "--precision", "int4"], "--precision: unknown precision 'int4'"),
    (["eval", "--model", "MODEL", "--data", "builtin:demo_test.jsonl", "--label-column", "label",
      "--precision", "x"], "--precision: unknown precision 'x'"),
    (["serve", "--model", "MODEL", "--precision", "fp64"], "--precision: unknown precision 'fp64'"),
])
def test_bad_precision_values_are_one_line_before_any_load(argv, needle, tiny_model_dir, capsys, no_model_load):
    argv = [str(tiny_model_dir) if a == "MODEL" else a for a in argv]
    err = err_of(argv, capsys)
    assert needle in err and len(err.strip().splitlines()) == 1, err


def loaded_dtype(monkeypatch, argv, capsys):
    """Run a command with the model load spied on: (the dtype it loaded in, stderr)."""
    from tiny import spy_model_loads

    seen = spy_model_loads(monkeypatch)
    assert main(argv) == 0
    return seen, capsys.readouterr().err


@pytest.mark.parametrize("extra, dtype, line", [
    (["--precision", "bf16"], torch.bfloat16, "precision: bf16 (bf16: asked for"),
    (["--precision", "fp32"], torch.float32, "precision: fp32 (fp32: asked for"),
    (["--precision", "bf16", "--dtype", "float32"], torch.float32, "--dtype float32 as given, overriding precision bf16"),
    (["--dtype", "float16"], torch.float16, "precision: fp16 (auto: --dtype float16 as given)"),
])
def test_generate_loads_in_the_precision_and_dtype_overrides_it(tiny_model_dir, adapter, monkeypatch, capsys,
                                                                 extra, dtype, line):
    from lorakit import precision

    monkeypatch.setattr(precision, "_announced", set())
    seen, err = loaded_dtype(monkeypatch, ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                                           "--prompt", "Ticket : hello Label : ", "--max-new-tokens", "2", *extra],
                             capsys)
    assert seen == [dtype] and line in err


def test_eval_and_chat_honour_precision(tiny_model_dir, adapter, monkeypatch, capsys):
    import io

    seen, _ = loaded_dtype(monkeypatch, ["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data",
                                         "builtin:demo_test.jsonl", "--label-column", "label", "--max-samples", "2",
                                         "--no-accuracy", "--precision", "bf16"], capsys)
    assert seen == [torch.bfloat16]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    seen, _ = loaded_dtype(monkeypatch, ["chat", "--adapter", str(adapter), "--max-new-tokens", "1",
                                         "--precision", "fp32"], capsys)
    assert seen == [torch.float32]


def test_eval_of_a_recipe_takes_its_precision(tiny_model_dir, tmp_path, monkeypatch, capsys):
    seen, _ = loaded_dtype(monkeypatch, ["eval", "demo", "--set", f"model={tiny_model_dir}", "--set",
                                         f"output.dir={tmp_path}", "--set", "data.max_eval_samples=2", "--no-accuracy",
                                         "--set", "train.precision=bf16"], capsys)
    assert seen == [torch.bfloat16]


def test_auto_is_the_measured_generation_choice(tiny_model_dir, adapter, monkeypatch, capsys, tmp_path):
    """Without --precision, generate loads in what auto chooses for one-token products (mocked both ways)."""
    from lorakit import precision

    amx = "model name\t: Test AMX CPU {}\nflags\t\t: avx512_bf16 amx_bf16\n"
    real = precision.cpu_facts
    monkeypatch.setattr(precision, "CACHE_DIR", tmp_path)
    for speedup, dtype in ((4.0, torch.bfloat16), (0.4, torch.float32)):
        monkeypatch.setattr(precision, "cpu_facts", lambda cpuinfo=None, s=speedup: real(amx.format(s)))
        asked = []
        monkeypatch.setattr(precision, "measure_products", lambda shapes, workload="train", s=speedup:
                            asked.append(workload) or {"fp32": 1.0, "bf16": 1.0 / s})
        seen, err = loaded_dtype(monkeypatch, ["generate", "--adapter", str(adapter), "--prompt", "hi",
                                               "--max-new-tokens", "1", "--device", "cpu"], capsys)
        assert seen == [dtype] and asked == ["generate"]


def test_merge_writes_float32_by_default(tiny_model_dir, adapter, tmp_path):
    from safetensors.torch import load_file

    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "m" / "model.safetensors")).values()} == {torch.float32}


def test_inspect_estimates_memory_at_the_precision(tiny_model_dir, capsys):
    """The dry run's base-weight memory is the base as training would load it: bf16 half of fp32's."""
    import re

    sizes = {}
    for p in ("fp32", "bf16"):
        assert main(["inspect", "--model", str(tiny_model_dir), "--precision", p]) == 0
        out = capsys.readouterr().out
        value, unit = re.search(r"base_weights ([\d.]+) (\w+)", out).groups()
        sizes[p] = float(value) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]
    assert abs(sizes["bf16"] / sizes["fp32"] - 0.5) < 0.01
    err = err_of(["inspect", "--model", str(tiny_model_dir), "--precision", "fp8"], capsys)
    assert "unknown precision 'fp8'" in err
