"""lorakit eval RECIPE | --model M [--adapter DIR] --data FILE"""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_args

HELP = "held-out loss / perplexity, and accuracy for classification data"
DESCRIPTION = """Evaluate a model (+ adapter) on data: held-out loss and perplexity over answer tokens, and for
classification data the accuracy of the generated label with a per-class table.

With a RECIPE the data, template and labels come from it (its eval data, or the held-out fraction of
train), and the adapter defaults to <output.dir>/adapter when that exists. Without one, pass --data and
the template options.

examples:
  lorakit eval demo                                   # the demo recipe's test split and adapter
  lorakit eval job_b_raft --set model=embedded --set data.train=../shared/data/raft/twitter_complaints/train.csv
  lorakit eval --model embedded --adapter outputs/demo/adapter --data test.jsonl \\
      --template classification --label-column label"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML file or shipped recipe name (optional).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as in `lorakit train`.")
    add_model_args(p)
    p.add_argument("--base", action="store_true", help="with a recipe: evaluate the base model, no adapter.")
    p.add_argument("--data", help="data file to evaluate on (same forms as data.train in a recipe).")
    p.add_argument("--split", default=None, help="split of --data when it is a hub dataset / datasets folder.")
    p.add_argument("--template", help="prompt template: human_assistant, classification, chat, alpaca.")
    p.add_argument("--text-column", help="classification template: the text column.")
    p.add_argument("--label-column", help="the label column (makes it classification data).")
    p.add_argument("--label-names", help="comma-separated label names (default: the labels found in the data).")
    p.add_argument("--max-length", type=int, help="maximum tokens per example for the loss.")
    p.add_argument("--max-samples", type=int, help="evaluate on at most this many records.")
    p.add_argument("--batch-size", type=int, help="evaluation batch size.")
    p.add_argument("--no-accuracy", action="store_true", help="skip the (slower) generation accuracy.")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.data:
        out += [f"data.eval={args.data}", "data.train=", "data.eval_fraction=0"]
    if args.split:
        out.append(f"data.eval_split={args.split}")
    if args.model:
        out.append(f"model.name={args.model}")
    for flag, key in (("template", "data.template"), ("label_column", "data.label_column"),
                      ("label_names", "data.label_names"), ("max_length", "data.max_length"),
                      ("max_samples", "data.max_eval_samples"), ("batch_size", "eval.batch_size")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.text_column:
        out.append(f"data.template_args={{text_column: {args.text_column!r}}}")
    if args.no_accuracy:
        out.append("eval.accuracy=false")
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.errors import ConfigError
    from lorakit.train.config import config_from_dict
    from lorakit.train.recipe import load_recipe

    if args.recipe:
        cfg = load_recipe(args.recipe, _overrides(args))
    else:
        if not args.data:
            raise ConfigError("eval needs a RECIPE or --data FILE (with --model/--adapter and the template options)")
        cfg = config_from_dict({}, _overrides(args))
    if args.recipe and not args.adapter and not args.base:
        default = Path(cfg.output.dir) / "adapter"
        if (default / "adapter_config.json").is_file():
            args.adapter = str(default)
    if not args.model and not args.adapter:
        args.model = cfg.model.name

    from lorakit.cli.common import load_model
    from lorakit.data import Collator, tokenize_records
    from lorakit.eval import heldout_loss
    from lorakit.train.run import load_data, make_template

    _, records, labels = load_data(cfg, train=False)
    if not records:
        train_records, _, labels = load_data(cfg, train=True)
        records = train_records
    if not records:
        raise ConfigError("no records to evaluate: set data.eval (or --data), or data.eval_fraction > 0")
    model, tokenizer = load_model(args)
    template = make_template(cfg)
    print(f"model {args.model or cfg.model.name}" + (f" + adapter {args.adapter}" if args.adapter else "")
          + f"; {len(records)} records")
    data = tokenize_records(records, template, tokenizer, cfg.data.max_length)
    loss = heldout_loss(model, data.examples, Collator(tokenizer.pad_token_id), batch_size=cfg.eval.batch_size)
    print(f"loss {loss['loss']:.4f}  perplexity {loss['perplexity']:.3f}  ({loss['tokens']} answer tokens)")
    if cfg.wants_accuracy and labels:
        from lorakit.eval import classification_eval

        report = classification_eval(model, tokenizer, records, template, labels, batch_size=cfg.eval.batch_size)
        print(report.table())
    return 0
