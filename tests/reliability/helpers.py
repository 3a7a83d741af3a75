"""Shared pieces of the reliability battery: a tiny model folder, snapshots that prove nothing changed, and
the CLI run in-process (a subprocess only where a kill -9 needs one)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def build_model_dir(out: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised 2-layer Llama over a real tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_adapter(model_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     base_model_name_or_path=str(model_dir))
    model = get_peft_model(base, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- snapshots


def model_snapshot(model: torch.nn.Module) -> dict:
    """Weights (exact copies), module structure (paths and classes) and requires_grad flags."""
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "structure": [(n, type(m).__name__) for n, m in model.named_modules()],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": model.training}


def assert_model_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert after["structure"] == before["structure"], "module structure changed"
    assert after["grad"] == before["grad"], "requires_grad flags changed"
    assert after["training"] == before["training"], "train/eval mode changed"
    assert after["weights"].keys() == before["weights"].keys()
    for n, w in before["weights"].items():
        assert _same(after["weights"][n], w), f"weight {n} changed"
    for n, b in before["buffers"].items():
        assert _same(after["buffers"][n], b), f"buffer {n} changed"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, a NaN matching a NaN in the same place."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def tree_snapshot(folder: Path, hash_below: int = 1 << 30) -> dict:
    """Every entry under ``folder``: kind, and for files the size, modification time and (below ``hash_below``
    bytes) a hash of the bytes; links are recorded, not followed."""
    out = {}
    if not folder.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < hash_below else None
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``lorakit ARGV`` in-process: (exit code, stdout, stderr); argparse's own exits give their code."""
    from lorakit.cli.main import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_clean_error(rc: int, err: str, *needles: str) -> None:
    """A refusal: non-zero exit, no traceback, no last-resort 'internal error', and the message names
    each of ``needles`` (the field, value or file)."""
    assert rc != 0, f"accepted; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    assert "internal error" not in err, err[-1000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err[-1500:]}"


# ---------------------------------------------------------------------------------------------- training runs


def recipe_text(model_dir: Path, out: Path, **over: str) -> str:
    """A tiny, fast recipe: the tiny model on 24 built-in tickets, 6 steps, a checkpoint every 2 steps, LoRA
    dropout on (so the random state matters for an exact resume)."""
    values = {"max_steps": "6", "save_every": "2", "keep_last": "2", "plot": "true"}
    values.update(over)
    return f"""description: reliability test run
model:
  name: {model_dir}
data:
  train: builtin:demo_train.jsonl
  template: classification
  template_args: {{text_label: Ticket}}
  label_column: label
  max_length: 48
  max_train_samples: 24
lora:
  r: 4
  alpha: 8
  dropout: 0.1
  target_modules: [q_proj, v_proj]
train:
  max_steps: {values['max_steps']}
  batch_size: 4
  lr: 1.0e-3
  progress: false
  precision: fp32   # the killed subprocess and the in-process runs compared byte for byte: one arithmetic
eval:
  accuracy: false
output:
  dir: {out}
  save_every: {values['save_every']}
  keep_last: {values['keep_last']}
  tensorboard: false
  plot: {values['plot']}
"""


def write_recipe(folder: Path, model_dir: Path, out: Path, **over: str) -> Path:
    path = folder / f"recipe-{out.name}.yaml"
    path.write_text(recipe_text(model_dir, out, **over), encoding="utf-8")
    return path


def adapter_bytes(out: Path) -> dict[str, bytes]:
    """The final adapter's files, byte for byte."""
    return {n: (out / "adapter" / n).read_bytes() for n in ("adapter_model.safetensors", "adapter_config.json")}
