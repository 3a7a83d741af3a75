"""lorakit inspect [ADAPTER_DIR] | --model M [--targets ...] [--r 8]"""

from __future__ import annotations

import argparse

HELP = "dry run on a model (what LoRA would wrap) or describe a saved adapter"
DESCRIPTION = """Two uses:

  lorakit inspect --model M [--targets q_proj v_proj] [--r 8] [--alpha 16]
      dry run: the modules LoRA would wrap, the family's default targets, trainable parameters and a
      memory estimate. The model is loaded but not changed.
  lorakit inspect ADAPTER_DIR
      what a saved adapter holds: its config and its tensors."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", nargs="?", help="a saved adapter folder to describe.")
    p.add_argument("--model", help="model to dry-run on: local folder, hub id, or `embedded`.")
    p.add_argument("--targets", nargs="+", help="target module names, a regex, or all-linear "
                                                "(default: the family's default).")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8).")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16).")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub.")


def _describe_adapter(path: str) -> None:
    import json
    from pathlib import Path

    from lorakit.cli.common import adapter_base

    adapter_base(path)  # clear error when it is not an adapter folder
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    keys = ("base_model_name_or_path", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias")
    for k in keys:
        print(f"{k}: {cfg.get(k)}")
    weights = Path(path) / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        total = 0
        with safe_open(str(weights), "pt") as f:
            names = list(f.keys())
            for name in names:
                shape = f.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
        print(f"tensors: {len(names)}, parameters: {total:,d}")
        for name in names[:6]:
            print(f"  {name}")
        if len(names) > 6:
            print(f"  ... {len(names) - 6} more")


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError

    if args.adapter_dir and not args.model:
        _describe_adapter(args.adapter_dir)
        return 0
    if not args.model:
        raise ConfigError("inspect needs --model M (dry run) or an ADAPTER_DIR to describe")
    if args.r < 1:
        raise ConfigError(f"--r must be >= 1, got {args.r}")
    from lorakit import LoraConfig, TaskType, dry_run
    from lorakit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    targets = args.targets
    if targets and len(targets) == 1 and (targets[0] == "all-linear" or any(c in targets[0] for c in "*^$|")):
        targets = targets[0]
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=args.alpha, target_modules=targets)
    print(dry_run(model, cfg).table())
    return 0
