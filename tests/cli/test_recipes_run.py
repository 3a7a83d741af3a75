"""Every shipped recipe trains through the CLI on a local model and local data (overrides via --set)."""

import json

import pytest

from lorakit.cli.main import main

# What each recipe needs to run offline: a local file (under ../shared/data) in place of its hub dataset.
LOCAL = {
    "job_a_alpaca_zh": "alpaca/alpaca_zh_demo.json",
    "job_b_raft": "raft/twitter_complaints/train.csv",
    "demo": None,  # ships its data
}


def train_recipe(name, model, out, shared_data, steps=2, extra=("--set", "eval.accuracy=false")):
    local = ["--set", f"data.train={shared_data(LOCAL[name])}"] if LOCAL[name] else []
    argv = ["train", name, "--set", f"model={model}", "--set", f"train.max_steps={steps}",
            "--set", "data.max_train_samples=16", "--set", "data.max_eval_samples=2", "--set", "train.batch_size=4",
            "--set", f"output.dir={out}", "--set", "output.merge=false", "--set", "output.tensorboard=false",
            "--set", "train.progress=false", "--set", "eval.every_steps=null", *local, *extra]
    return main(argv)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_recipe_runs_on_tiny_model_and_local_data(name, tiny_model_dir, tmp_path, shared_data):
    assert train_recipe(name, tiny_model_dir, tmp_path, shared_data) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOCAL))
def test_recipe_runs_on_embedded_model(name, tmp_path, shared_data):
    assert train_recipe(name, "embedded", tmp_path, shared_data, steps=3) == 0
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)



def test_qlora_recipe_on_tiny_model(tiny_model_dir, tmp_path, shared_data):
    """model.load_in_4bit: the base in NF4 (bitsandbytes runs on the CPU), adapter saved as usual."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig

    # bitsandbytes' CPU kernels need layer widths of at least one 64-value quantisation block
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny64"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    extra = ("--set", "eval.accuracy=false", "--set", "model.load_in_4bit=true", "--set", "lora.use_rslora=true",
             "--set", "output.merge=true")  # merged into the base loaded at full precision (4-bit cannot hold it)
    assert train_recipe("job_b_raft", model_dir, out, shared_data, extra=extra) == 0
    cfg = LoraConfig.from_pretrained(out / "adapter")
    assert cfg.use_rslora
    from lorakit import LoraModel

    merged = LlamaForCausalLM.from_pretrained(out / "merged")
    adapted = LoraModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    x = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-4, rtol=1e-4)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)
