"""The chat template travels with the adapter: training writes it into the adapter folder; generate, chat and
merge use the adapter's template before the base model's. And `data.template=chat` trains on conversations
(the chat_sft recipe, on a tiny model)."""
import io
import json
import shutil
import sys

import pytest

from lorakit.cli.main import main

# a template unlike the base's ChatML, so that which one was used shows in the text
MARKED = ("{% for m in messages %}{{ '<<' + m['role'] + '>> ' + m['content'] + '<|im_end|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<<assistant>> ' }}{% endif %}")


@pytest.fixture
def marked_adapter(adapter, tmp_path):
    out = tmp_path / "adapter"
    shutil.copytree(adapter, out)
    (out / "chat_template.jinja").write_text(MARKED)
    return out


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompt text each generation was asked to continue (the model is not run)."""
    import lorakit.cli.common as common

    seen = []

    def fake_generate(model, tokenizer, prompt_ids, *a, **k):
        seen.append(tokenizer.decode(prompt_ids))
        return "fine"

    monkeypatch.setattr(common, "generate_text", fake_generate)
    return seen


def test_generate_and_chat_use_the_adapters_template(marked_adapter, tiny_model_dir, prompts_seen, monkeypatch):
    argv = ["--model", str(tiny_model_dir), "--adapter", str(marked_adapter), "--device", "cpu"]
    assert main(["generate", *argv, "--chat", "--prompt", "hello"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\n/exit\n"))
    assert main(["chat", *argv, "--system", "Be brief."]) == 0
    assert prompts_seen == ["<<user>> hello<|im_end|><<assistant>> ",
                            "<<system>> Be brief.<|im_end|><<user>> hi there<|im_end|><<assistant>> "]


def test_without_a_template_in_the_adapter_the_base_template_is_used(adapter, tiny_model_dir, prompts_seen):
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--chat",
                 "--prompt", "hello", "--device", "cpu"]) == 0
    assert prompts_seen[0].endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_merge_writes_the_adapters_template(marked_adapter, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(marked_adapter), "--out", str(out)]) == 0
    assert (out / "chat_template.jinja").read_text() == MARKED


def test_chat_sft_trains_on_conversations_and_saves_the_template(tiny_model_dir, tmp_path):
    from lorakit.data.chat_template import load_chat_template

    out = tmp_path / "run"
    assert main(["train", "chat_sft", "--set", f"model={tiny_model_dir}", "--set", "train.max_steps=2",
                 "--set", "data.max_train_samples=8", "--set", "data.max_eval_samples=4", "--set", "train.batch_size=4",
                 "--set", f"output.dir={out}", "--set", "output.tensorboard=false", "--set", "output.plot=false",
                 "--set", "train.progress=false"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and any("eval_loss" in r for r in rows)
    base_template = load_chat_template(tiny_model_dir)
    assert base_template and load_chat_template(out / "adapter") == base_template
