"""lorakit merge --model M --adapter DIR --out DIR"""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_args

HELP = "fold an adapter into the base weights and save a plain model"
DESCRIPTION = """Merge an adapter into its base model (merge_and_unload) and save the result with the tokenizer.
The output folder loads with transformers' AutoModelForCausalLM.from_pretrained, no lorakit needed.

example:
  lorakit merge --model embedded --adapter outputs/demo/adapter --out outputs/demo/merged"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder to write the merged model + tokenizer to.")
    p.add_argument("--safe", action="store_true", help="check the merged weights for NaN/inf before saving.")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.errors import ConfigError

    if not args.adapter:
        raise ConfigError("merge needs --adapter DIR (the adapter to fold into --model)")
    from lorakit.cli.common import load_model

    args.device = args.device or "cpu"
    model, tokenizer = load_model(args)
    merged = model.merge_and_unload(safe_merge=args.safe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0
