"""lorakit train RECIPE [--set k=v ...] [--resume [DIR|latest]]"""

from __future__ import annotations

import argparse

HELP = "fine-tune with a recipe (YAML file or shipped recipe name)"
DESCRIPTION = """Fine-tune a model with LoRA as a recipe describes.

RECIPE is a YAML file or the name of a shipped recipe (demo, job_a_alpaca_zh, job_b_raft).
Outputs go to output.dir: adapter/ (PEFT format), checkpoints/, metrics.jsonl, tb/, loss.png,
recipe.yaml (the resolved recipe) and, with output.merge, merged/.

examples:
  lorakit train job_b_raft --set model=embedded \\
      --set data.train=../shared/data/raft/twitter_complaints/train.csv --set train.max_steps=20
  lorakit train my.yaml --set lora.r=16 --set train.lr=1e-4
  lorakit train my.yaml --precision fp32    # float32 throughout (default auto: bf16 where it is faster)
  lorakit train my.yaml --resume            # continue from the newest checkpoint in output.dir
  lorakit train --list-keys                 # every recipe key with its type and meaning"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML file or shipped recipe name.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted, e.g. lora.r=16, train.lr=1e-4, model=embedded); "
                        "repeatable; the value is parsed as the key's type.")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in the output folder (refused without it)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR|latest",
                   help="continue from a checkpoint folder, or (no value / `latest`) the newest one under "
                        "output.dir/checkpoints. Use the same recipe and overrides as the first run.")
    p.add_argument("--output-dir", help="overrides output.dir.")
    p.add_argument("--precision", metavar="auto|fp32|bf16",
                   help="overrides train.precision: bf16 = base weights and activations in bfloat16 (LoRA weights, "
                        "gradients and optimizer state float32); fp32; auto = measured once per machine.")
    p.add_argument("--list-keys", action="store_true", help="print every recipe key, its type and help; exit.")


def list_keys() -> str:
    from lorakit.train.config import TrainConfig, field_help, get_value, valid_keys

    default = TrainConfig()
    lines = []
    for key in valid_keys():
        _, help = field_help(key)
        lines.append(f"{key} (default {get_value(default, key)!r}): {help}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print(list_keys())
        return 0
    from lorakit.errors import ConfigError

    if not args.recipe:
        raise ConfigError("no recipe given: `lorakit train RECIPE.yaml` (or a shipped name: demo, job_b_raft, "
                          "job_a_alpaca_zh)")
    from lorakit.cli.common import check_model_source, check_output_dir, load_recipe_checked
    from lorakit.models.precision import check_precision_option

    options = ([f"output.dir={args.output_dir}"] if args.output_dir else []) + \
        ([f"train.precision={check_precision_option(args.precision)}"] if args.precision is not None else [])
    source = "--set" + "".join(f"/{o}" for o, v in (("--output-dir", args.output_dir), ("--precision", args.precision))
                               if v is not None)
    cfg = load_recipe_checked(args.recipe, list(args.overrides) + options, source)
    # before the model load: where the outputs go, and what the model name points at
    check_output_dir(cfg.output.dir, "--output-dir" if args.output_dir else "output.dir")
    check_model_source(cfg.model.name, "model.name")
    from lorakit.train.outputs import is_main_process
    from lorakit.train.run import train

    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts a new run and --resume continues one: pass only one of them")
    main = is_main_process()  # a data-parallel run: the other processes train quietly
    outputs = train(cfg, resume=args.resume, overwrite=args.overwrite, print_fn=print if main else _quiet)
    if not main:
        return 0
    res = outputs.result
    loss = f"{res.final_loss:.4f}" if res.final_loss is not None else "n/a"
    print(f"done: {res.steps} steps, final loss {loss}, {res.tokens:,d} tokens in {res.seconds:.0f}s")
    for k, v in res.eval.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    if outputs.report is not None:
        print(outputs.report.table())
    print(f"adapter:     {res.adapter_dir}")
    if outputs.merged_dir:
        print(f"merged model: {outputs.merged_dir}")
    if res.checkpoint:
        print(f"checkpoint:  {res.checkpoint}")
    print(f"metrics:     {res.output_dir / 'metrics.jsonl'}")
    if res.loss_plot:
        print(f"loss plot:   {res.loss_plot}")
    return 0


def _quiet(_: str) -> None:
    """print_fn of the processes other than the main one in a data-parallel run."""
