"""Every CLI command, table-driven: a bad option, recipe, data file, model folder or adapter folder ends in
one clean error line (exit code non-zero, no traceback, no last-resort "internal error") that names the
field, value or file, and nothing in the working folders changes (no output written, no input touched).

The commands run in-process (``lorakit.cli.main.main``); the inputs live in one "zoo" folder per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .helpers import assert_one_clean_error, run_cli, tree_snapshot


def _model_variant(zoo: Path, model_dir: Path, name: str, damage) -> None:
    folder = zoo / name
    shutil.copytree(model_dir, folder)
    damage(folder)


def _remote_code(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="zoo_custom", auto_map={"AutoConfig": "zoo_code.Config",
                                                   "AutoModelForCausalLM": "zoo_code.Model"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "zoo_code.py").write_text("raise SystemExit('model code ran')\n")


def _adapter_variant(zoo: Path, adapter_dir: Path, name: str, damage) -> None:
    folder = zoo / name
    shutil.copytree(adapter_dir, folder)
    damage(folder)


def _config_edit(**changes):
    def edit(folder: Path):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, model_dir, adapter_dir):
    """Bad inputs of every kind, built once: damaged models and adapters, recipes, data files."""
    z = tmp_path_factory.mktemp("zoo")
    models = {
        "m_truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:200]),
        "m_bad_tokenizer": lambda f: (f / "tokenizer.json").write_text("{not json"),
        "m_bad_config": lambda f: (f / "config.json").write_text("{not json"),
        "m_config_list": lambda f: (f / "config.json").write_text("[1, 2]"),
        "m_no_weights": lambda f: (f / "model.safetensors").unlink(),
        "m_remote_code": _remote_code,
    }
    for name, damage in models.items():
        _model_variant(z, model_dir, name, damage)
    adapters = {
        "a_r_string": _config_edit(r="8"),
        "a_alpha_list": _config_edit(lora_alpha=[1]),
        "a_targets_int": _config_edit(target_modules=5),
        "a_rank_pattern_str": _config_edit(rank_pattern="q_proj"),
        "a_base_int": _config_edit(base_model_name_or_path=5),
        "a_no_base": _config_edit(base_model_name_or_path=None),
        "a_rank_mismatch": _config_edit(r=8),
        "a_bad_json": lambda f: (f / "adapter_config.json").write_text("{'r': 4"),
        "a_truncated": lambda f: (f / "adapter_model.safetensors").write_bytes(
            (f / "adapter_model.safetensors").read_bytes()[:100]),
        "a_no_weights": lambda f: (f / "adapter_model.safetensors").unlink(),
    }
    for name, damage in adapters.items():
        _adapter_variant(z, adapter_dir, name, damage)
    (z / "a_file").write_text("not a folder")
    (z / "nonempty").mkdir()
    (z / "nonempty" / "keep.txt").write_text("keep")
    files = {
        "r_non_utf8.yaml": b"model: \xff\xfe embedded\n",
        "r_bad.yaml": b"model: [unclosed\n",
        "r_list.yaml": b"- 1\n- 2\n",
        "r_unknown_key.yaml": b"lora:\n  rank: 8\n",
        "r_wrong_type.yaml": b"lora:\n  r: big\n",
        "r_inf.yaml": b"train:\n  epochs: .inf\n",
        "r_nested.yaml": b"model: " + b"[" * 2000 + b"]" * 2000 + b"\n",
        "d_non_utf8.jsonl": b'{"text": "\xff\xfe", "label": "x"}\n',
        "d_bad.jsonl": b'{"text": "a", "label": "x"}\n{"text": \n',
        "d_no_label.jsonl": b'{"text": "a", "kind": "x"}\n{"text": "b", "kind": "y"}\n',
        "d_empty.jsonl": b"",
        "d_not_objects.jsonl": b"[1, 2]\n3\n",
        "d_bad.csv": b"text,label\n\"unclosed,x\n",
        "d_deep.jsonl": b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
        "d_deep.json": b"[" * 100000 + b"]" * 100000,
    }
    for name, data in files.items():
        (z / name).write_bytes(data)
    return z


def _recipe(zoo: Path, model_dir: Path, name: str, **data: str) -> Path:
    """A valid recipe on the tiny model whose data section can be swapped for a bad file."""
    d = {"train": "builtin:demo_train.jsonl", "template": "classification", "label_column": "label"} | data
    lines = [f"model: {model_dir}", "data:"] + [f"  {k}: {v}" for k, v in d.items()] + [
        "  max_train_samples: 8", "train:", "  max_steps: 1", "  progress: false",
        "eval:", "  accuracy: false", f"output:", f"  dir: {zoo / ('out_' + name)}", "  tensorboard: false"]
    path = zoo / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


#: name -> (argv with {zoo}/{model}/{adapter}/{recipe:DATAFILE} placeholders, needles the message must hold)
CASES = {
    # ---- train: recipes
    "train without a recipe": (["train"], ["no recipe given"]),
    "train recipe missing": (["train", "{zoo}/missing.yaml"], ["missing.yaml", "not found"]),
    "train recipe not UTF-8": (["train", "{zoo}/r_non_utf8.yaml"], ["r_non_utf8.yaml", "UTF-8"]),
    "train recipe bad YAML": (["train", "{zoo}/r_bad.yaml"], ["r_bad.yaml", "YAML"]),
    "train recipe a list": (["train", "{zoo}/r_list.yaml"], ["r_list.yaml", "mapping"]),
    "train recipe unknown key": (["train", "{zoo}/r_unknown_key.yaml"], ["lora.rank", "lora.r"]),
    "train recipe wrong type": (["train", "{zoo}/r_wrong_type.yaml"], ["lora.r", "'big'"]),
    "train recipe epochs .inf": (["train", "{zoo}/r_inf.yaml"], ["train.epochs"]),
    "train recipe nested too deep": (["train", "{zoo}/r_nested.yaml"], ["r_nested.yaml"]),
    "train recipe a folder": (["train", "{zoo}/nonempty"], ["nonempty", "is a folder"]),
    # ---- train: --set values
    "train epochs inf": (["train", "demo", "--set", "train.epochs=inf"], ["train.epochs", "inf"]),
    "train epochs nan": (["train", "demo", "--set", "train.epochs=nan"], ["train.epochs", "nan"]),
    "train epochs huge": (["train", "demo", "--set", "train.epochs=1e300"], ["train.epochs", "1e+300"]),
    "train epochs negative": (["train", "demo", "--set", "train.epochs=-1"], ["train.epochs", "-1"]),
    "train epochs overflow": (["train", "demo", "--set", "train.epochs=1e999"], ["train.epochs"]),
    "train lr inf": (["train", "demo", "--set", "train.lr=inf"], ["train.lr"]),
    "train lr zero": (["train", "demo", "--set", "train.lr=0"], ["train.lr"]),
    "train max_grad_norm nan": (["train", "demo", "--set", "train.max_grad_norm=nan"], ["train.max_grad_norm"]),
    "train r zero": (["train", "demo", "--set", "lora.r=0"], ["lora.r"]),
    "train r text": (["train", "demo", "--set", "lora.r=big"], ["lora.r", "big"]),
    "train dropout 1": (["train", "demo", "--set", "lora.dropout=1"], ["lora.dropout"]),
    "train batch size 0": (["train", "demo", "--set", "train.batch_size=0"], ["train.batch_size"]),
    "train max_steps text": (["train", "demo", "--set", "train.max_steps=many"], ["train.max_steps", "many"]),
    "train betas out of range": (["train", "demo", "--set", "train.betas=[2, 3]"], ["train.betas"]),
    "train max_length 2": (["train", "demo", "--set", "data.max_length=2"], ["data.max_length"]),
    "train warmup_ratio 1": (["train", "demo", "--set", "train.warmup_ratio=1"], ["train.warmup_ratio"]),
    "train --set without =": (["train", "demo", "--set", "lora.r"], ["KEY=VALUE", "lora.r"]),
    "train --set unknown key": (["train", "demo", "--set", "lora.rr=4"], ["lora.rr"]),
    "train --set a section": (["train", "demo", "--set", "lora=4"], ["lora"]),
    "train --overwrite with --resume": (["train", "demo", "--overwrite", "--resume", "--output-dir",
                                         "{zoo}/out_ow"], ["--overwrite", "--resume"]),
    "train output dir a file": (["train", "demo", "--output-dir", "{zoo}/a_file"], ["a_file", "file"]),
    "train output dir under a file": (["train", "demo", "--output-dir", "{zoo}/a_file/run"], ["a_file"]),
    "train output dir empty": (["train", "demo", "--set", "output.dir="], ["output.dir", "empty"]),
    "train model name empty": (["train", "demo", "--set", "model="], ["model.name", "empty"]),
    "train targets an empty list": (["train", "demo", "--set", "lora.target_modules=[]"], ["lora.target_modules"]),
    # ---- train: models
    "train model an adapter folder": (["train", "demo", "--set", "model={adapter}", "--output-dir", "{zoo}/o1"],
                                      ["adapter"]),
    "train model path missing": (["train", "demo", "--set", "model=./no/such/model", "--output-dir", "{zoo}/o2"],
                                 ["no/such/model"]),
    "train model a file": (["train", "demo", "--set", "model={zoo}/a_file", "--output-dir", "{zoo}/o3"],
                           ["a_file"]),
    "train model truncated weights": (["train", "{recipe:m_truncated}"], ["m_truncated"]),
    "train model broken tokenizer": (["train", "{recipe:m_bad_tokenizer}"], ["m_bad_tokenizer"]),
    "train model broken config": (["train", "{recipe:m_bad_config}"], ["m_bad_config"]),
    "train model config a list": (["train", "{recipe:m_config_list}"], ["m_config_list"]),
    "train model without weights": (["train", "{recipe:m_no_weights}"], ["m_no_weights"]),
    "train model needing its own code": (["train", "{recipe:m_remote_code}"], ["m_remote_code",
                                                                                "--trust-remote-code"]),
    "train targets matching nothing": (["train", "{recipe:}", "--set", "lora.target_modules=[q_prj]"],
                                       ["q_prj"]),
    # ---- train: data
    "train data missing": (["train", "{recipe:d_missing.jsonl}"], ["d_missing.jsonl"]),
    "train data not UTF-8": (["train", "{recipe:d_non_utf8.jsonl}"], ["d_non_utf8.jsonl"]),
    "train data bad JSON line": (["train", "{recipe:d_bad.jsonl}"], ["d_bad.jsonl"]),
    "train data without the label column": (["train", "{recipe:d_no_label.jsonl}"], ["label"]),
    "train data empty": (["train", "{recipe:d_empty.jsonl}"], ["d_empty.jsonl"]),
    "train data not objects": (["train", "{recipe:d_not_objects.jsonl}"], ["d_not_objects.jsonl"]),
    "train data bad CSV": (["train", "{recipe:d_bad.csv}"], ["d_bad.csv"]),
    "train data nested too deep (JSON Lines)": (["train", "{recipe:d_deep.jsonl}"], ["d_deep.jsonl", "nested"]),
    "train data nested too deep (JSON)": (["train", "{recipe:d_deep.json}"], ["d_deep.json", "nested"]),
    "train builtin escaping": (["train", "{recipe:builtin:../../../etc/passwd}"], ["builtin:../../../etc/passwd"]),
    "train builtin absolute": (["train", "{recipe:builtin:/etc/passwd}"], ["builtin:/etc/passwd"]),
    "train builtin unknown": (["train", "{recipe:builtin:nope.jsonl}"], ["builtin:nope.jsonl"]),
    # ---- train: resume
    "train resume without a checkpoint": (["train", "{recipe:}", "--resume"], ["no checkpoint"]),
    "train resume a folder that is no checkpoint": (["train", "{recipe:}", "--resume", "{zoo}/nonempty"],
                                                    ["nonempty", "checkpoint"]),
    # ---- eval
    "eval without recipe or data": (["eval"], ["--data"]),
    "eval max-samples 0": (["eval", "--data", "builtin:demo_test.jsonl", "--max-samples", "0"], ["--max-samples"]),
    "eval base with adapter": (["eval", "demo", "--base", "--adapter", "{adapter}"], ["--base"]),
    "eval data missing": (["eval", "--model", "{model}", "--data", "{zoo}/nope.jsonl", "--label-column", "label"],
                          ["nope.jsonl"]),
    "eval data bad JSON": (["eval", "--model", "{model}", "--data", "{zoo}/d_bad.jsonl", "--label-column", "label"],
                           ["d_bad.jsonl"]),
    "eval data not UTF-8": (["eval", "--model", "{model}", "--data", "{zoo}/d_non_utf8.jsonl", "--label-column",
                             "label"], ["d_non_utf8.jsonl"]),
    "eval adapter config wrong type": (["eval", "--adapter", "{zoo}/a_r_string", "--data",
                                        "builtin:demo_test.jsonl", "--label-column", "label"], ["a_r_string", "r"]),
    "eval text column with another template": (["eval", "--data", "builtin:demo_test.jsonl", "--template", "alpaca",
                                                "--text-column", "text"], ["--text-column"]),
    "eval set epochs inf": (["eval", "demo", "--set", "train.epochs=inf"], ["train.epochs"]),
    # ---- generate
    "generate without a prompt": (["generate", "--model", "{model}"], ["no prompt"]),
    "generate empty prompt": (["generate", "--model", "{model}", "--prompt", ""], ["empty"]),
    "generate temperature -1": (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"],
                                ["--temperature", "-1"]),
    "generate temperature nan": (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "nan"],
                                 ["--temperature", "nan"]),
    "generate temperature inf": (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "inf"],
                                 ["--temperature", "inf"]),
    "generate temperature text": (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "hot"],
                                  ["--temperature", "hot"]),
    "generate top-p 5": (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "5"], ["--top-p", "5"]),
    "generate top-p 0": (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "0"], ["--top-p", "0"]),
    "generate top-p negative": (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "-0.5"],
                                ["--top-p", "-0.5"]),
    "generate max-new-tokens 0": (["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "0"],
                                  ["--max-new-tokens", "0"]),
    "generate seed too big": (["generate", "--model", "{model}", "--prompt", "x", "--seed", str(2 ** 70)],
                              ["--seed"]),
    "generate system without chat": (["generate", "--model", "{model}", "--prompt", "x", "--system", "be brief"],
                                     ["--system", "--chat"]),
    "generate adapter missing": (["generate", "--model", "{model}", "--adapter", "{zoo}/nope", "--prompt", "x"],
                                 ["nope"]),
    "generate adapter a file": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_file", "--prompt", "x"],
                                ["a_file"]),
    "generate adapter r a string": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_r_string",
                                     "--prompt", "x"], ["a_r_string", "r must be"]),
    "generate adapter alpha a list": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_alpha_list",
                                       "--prompt", "x"], ["lora_alpha"]),
    "generate adapter targets an int": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_targets_int",
                                         "--prompt", "x"], ["target_modules"]),
    "generate adapter rank_pattern a string": (["generate", "--model", "{model}", "--adapter",
                                                "{zoo}/a_rank_pattern_str", "--prompt", "x"], ["rank_pattern"]),
    "generate adapter base an int": (["generate", "--adapter", "{zoo}/a_base_int", "--prompt", "x"],
                                     ["base_model_name_or_path"]),
    "generate adapter naming no base": (["generate", "--adapter", "{zoo}/a_no_base", "--prompt", "x"],
                                        ["--model"]),
    "generate adapter bad JSON": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_bad_json",
                                   "--prompt", "x"], ["adapter_config.json"]),
    "generate adapter truncated weights": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_truncated",
                                            "--prompt", "x"], ["adapter_model.safetensors"]),
    "generate adapter without weights": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_no_weights",
                                          "--prompt", "x"], ["a_no_weights"]),
    "generate adapter of another rank": (["generate", "--model", "{model}", "--adapter", "{zoo}/a_rank_mismatch",
                                          "--prompt", "x"], ["shape"]),
    "generate device bogus": (["generate", "--model", "{model}", "--prompt", "x", "--device", "tpu9"], ["tpu9"]),
    "generate device cuda:7": (["generate", "--model", "{model}", "--prompt", "x", "--device", "cuda:7"],
                               ["cuda:7"]),
    "generate model truncated weights": (["generate", "--model", "{zoo}/m_truncated", "--prompt", "x"],
                                         ["m_truncated"]),
    "generate model broken tokenizer": (["generate", "--model", "{zoo}/m_bad_tokenizer", "--prompt", "x"],
                                        ["m_bad_tokenizer"]),
    "generate model needing its own code": (["generate", "--model", "{zoo}/m_remote_code", "--prompt", "x"],
                                            ["--trust-remote-code"]),
    "generate model folder empty": (["generate", "--model", "{zoo}/nonempty", "--prompt", "x"], ["config.json"]),
    # ---- chat
    "chat temperature -1": (["chat", "--model", "{model}", "--temperature", "-1"], ["--temperature"]),
    "chat top-p 5": (["chat", "--model", "{model}", "--top-p", "5"], ["--top-p"]),
    "chat max-new-tokens 0": (["chat", "--model", "{model}", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    "chat adapter missing": (["chat", "--model", "{model}", "--adapter", "{zoo}/nope"], ["nope"]),
    "chat model broken config": (["chat", "--model", "{zoo}/m_bad_config"], ["m_bad_config"]),
    # ---- merge
    "merge without adapter": (["merge", "--model", "{model}", "--out", "{zoo}/merged1"], ["--adapter"]),
    "merge out a file": (["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{zoo}/a_file"],
                         ["a_file"]),
    "merge out not empty": (["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{zoo}/nonempty"],
                            ["nonempty", "--overwrite"]),
    "merge out holding the adapter": (["merge", "--model", "{model}", "--adapter", "{adapter}", "--out",
                                       "{adapter_parent}", "--overwrite"], ["--adapter"]),
    "merge out empty": (["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", ""], ["--out", "empty"]),
    "merge adapter broken": (["merge", "--model", "{model}", "--adapter", "{zoo}/a_bad_json", "--out",
                              "{zoo}/merged2"], ["adapter_config.json"]),
    "merge model truncated": (["merge", "--model", "{zoo}/m_truncated", "--adapter", "{adapter}", "--out",
                               "{zoo}/merged3"], ["m_truncated"]),
    # ---- inspect
    "inspect without arguments": (["inspect"], ["--model"]),
    "inspect adapter with --r": (["inspect", "{adapter}", "--r", "4"], ["--r"]),
    "inspect adapter missing": (["inspect", "{zoo}/nope"], ["nope"]),
    "inspect adapter bad JSON": (["inspect", "{zoo}/a_bad_json"], ["adapter_config.json"]),
    "inspect adapter of another rank": (["inspect", "{zoo}/a_rank_mismatch"], ["rank"]),
    "inspect adapter truncated": (["inspect", "{zoo}/a_truncated"], ["adapter_model.safetensors"]),
    "inspect dry run r 0": (["inspect", "--model", "{model}", "--r", "0"], ["--r"]),
    "inspect dry run targets matching nothing": (["inspect", "--model", "{model}", "--targets", "q_prj"],
                                                 ["q_prj"]),
    "inspect model config a list": (["inspect", "--model", "{zoo}/m_config_list"], ["m_config_list"]),
    "inspect adapter on a broken model": (["inspect", "{adapter}", "--model", "{zoo}/m_truncated"],
                                          ["m_truncated"]),
    # ---- demo
    "demo r 0": (["demo", "--set", "lora.r=0"], ["lora.r"]),
    "demo epochs inf": (["demo", "--set", "train.epochs=inf"], ["train.epochs"]),
    "demo out a file": (["demo", "--out", "{zoo}/a_file"], ["a_file"]),
    # ---- export
    "export without adapter": (["export", "--model", "{model}", "--to", "gguf", "--out", "{zoo}/x.gguf"],
                               ["--adapter"]),
    "export adapter missing": (["export", "--adapter", "{zoo}/nope", "--to", "gguf", "--out", "{zoo}/x.gguf"],
                               ["nope"]),
    "export merged option without ollama": (["export", "--adapter", "{adapter}", "--to", "gguf", "--merged",
                                             "--out", "{zoo}/x.gguf"], ["--merged"]),
    "export out empty": (["export", "--adapter", "{adapter}", "--to", "gguf", "--out", ""], ["--out", "empty"]),
    "export unknown target": (["export", "--adapter", "{adapter}", "--to", "onnx", "--out", "{zoo}/x"], ["--to"]),
    # ---- serve
    "serve port -1": (["serve", "--model", "{model}", "--port", "-1"], ["--port"]),
    "serve port too big": (["serve", "--model", "{model}", "--port", "70000"], ["--port"]),
    "serve adapter without a name": (["serve", "--model", "{model}", "--adapter", "{adapter}"], ["--adapter"]),
    "serve adapter name with a dot": (["serve", "--model", "{model}", "--adapter", "a.b={adapter}"], ["a.b"]),
    "serve adapter name twice": (["serve", "--model", "{model}", "--adapter", "a={adapter}", "--adapter",
                                  "a={adapter}"], ["twice"]),
    "serve adapter root not a folder": (["serve", "--model", "{model}", "--adapter-root", "{zoo}/a_file"],
                                        ["a_file"]),
}


def _fill(arg: str, zoo: Path, model_dir: Path, adapter_dir: Path) -> str:
    if arg.startswith("{recipe:"):
        data = arg[len("{recipe:"):-1]
        if data.startswith("m_"):
            return str(_recipe(zoo, zoo / data, data))
        if not data:
            return str(_recipe(zoo, model_dir, "plain"))
        source = data if data.startswith("builtin:") else str(zoo / data)
        name = "d_" + "".join(c if c.isalnum() else "_" for c in data)
        return str(_recipe(zoo, model_dir, name, train=json.dumps(source)))
    return arg.format(zoo=zoo, model=model_dir, adapter=adapter_dir, adapter_parent=adapter_dir.parent)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses_cleanly_and_changes_nothing(case, zoo, model_dir, adapter_dir, capsys, monkeypatch, tmp_path):
    argv, needles = CASES[case]
    monkeypatch.chdir(tmp_path)  # outputs of a recipe with a relative output.dir would land here
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    argv = [_fill(a, zoo, model_dir, adapter_dir) for a in argv]
    watched = [zoo, model_dir, adapter_dir.parent, tmp_path]
    before = [tree_snapshot(f, hash_below=1 << 16) for f in watched]
    rc, out, err = run_cli(argv, capsys)
    assert_one_clean_error(rc, err, *needles)
    lines = [l for l in err.splitlines() if "error" in l]
    assert len(lines) == 1, err  # one error line (progress bars and warnings aside)
    after = [tree_snapshot(f, hash_below=1 << 16) for f in watched]
    for folder, b, a in zip(watched, before, after):
        assert a == b, f"{folder} changed: {sorted(set(a.items()) ^ set(b.items()))[:6]}"
