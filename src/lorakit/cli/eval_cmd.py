"""lorakit eval RECIPE | --model M [--adapter DIR] --data FILE"""

from __future__ import annotations

import argparse
import contextlib
import sys

from lorakit.cli.common import add_model_args

HELP = "held-out loss / perplexity, and accuracy for classification data"
DESCRIPTION = """Evaluate a model (+ adapter) on data: held-out loss and perplexity over answer tokens, and for
classification data the accuracy of the generated label with a per-class table.

With a RECIPE the data, template and labels come from it (its eval data, or the held-out fraction of
train), and the adapter defaults to <output.dir>/adapter when that exists. A recipe with neither is
evaluated on its training records, with a warning. Without a recipe, pass --data and the template
options; --label-column (or --text-column / --text-label) makes it classification data. The first
lines say which data is scored and how many records the loss and the accuracy used.

examples:
  lorakit eval demo                                   # the demo recipe's test split and adapter
  lorakit eval job_b_raft --set model=embedded --set data.train=../shared/data/raft/twitter_complaints/train.csv
  lorakit eval --model embedded --adapter outputs/demo/adapter --data builtin:demo_test.jsonl \\
      --label-column label --text-label Ticket       # prompts "Ticket : ... Label : ", as the demo trains"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML file or shipped recipe name (optional).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as in `lorakit train`.")
    add_model_args(p)
    p.add_argument("--base", action="store_true", help="with a recipe: evaluate the base model, no adapter.")
    p.add_argument("--data", help="data file to evaluate on (same forms as data.train in a recipe).")
    p.add_argument("--split", default=None, help="split of --data when it is a hub dataset / datasets folder.")
    p.add_argument("--template", help="prompt template: human_assistant, classification, chat, alpaca "
                                      "(default with --label-column: classification).")
    p.add_argument("--text-column", help="classification template: the text column (default text).")
    p.add_argument("--text-label", help="classification template: the name written before the text in the "
                                        "prompt, \"TEXT_LABEL : text Label : \" (default: the text column's "
                                        "name; the demo recipe uses Ticket).")
    p.add_argument("--label-column", help="the label column; makes it classification data (classification "
                                          "template, unless --template says otherwise).")
    p.add_argument("--label-names", help="comma-separated label names (default: the labels found in the data).")
    p.add_argument("--max-length", type=int, help="maximum tokens per example for the loss.")
    p.add_argument("--max-samples", type=int, help="evaluate on at most this many records (a fixed random "
                                                   "subset; with or without a recipe).")
    p.add_argument("--batch-size", type=int, help="evaluation batch size.")
    p.add_argument("--no-accuracy", action="store_true", help="skip the (slower) generation accuracy.")


_CLASSIFICATION_ONLY = (("text_column", "--text-column"), ("text_label", "--text-label"))


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
    if args.no_accuracy:
        out.append("eval.accuracy=false")
    return out


def _check_options(args: argparse.Namespace) -> None:
    """Option combinations, before anything is read; fills in the template --label-column implies."""
    from lorakit.errors import ConfigError

    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.base and args.adapter:
        raise ConfigError("--base evaluates the base model without an adapter; drop --base or --adapter")
    given = [opt for key, opt in _CLASSIFICATION_ONLY if getattr(args, key) is not None]
    if args.template is None and not args.recipe and (args.label_column or given):
        args.template = "classification"  # labelled data: score the label, "TEXT : ... Label : LABEL"
    if given and args.template is not None and args.template != "classification":
        raise ConfigError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the "
                          f"classification template, not of --template "
                          f"{args.template}; use --template classification (or drop {', '.join(given)})")


def _load_config(args: argparse.Namespace):
    """The TrainConfig from the recipe (or none) and the command line; --text-column / --text-label are
    merged into the recipe's data.template_args (not replacing its other entries)."""
    import json

    from lorakit.cli.common import load_recipe_checked
    from lorakit.errors import ConfigError
    from lorakit.train.config import config_from_dict

    def load(overrides):
        if args.recipe:
            return load_recipe_checked(args.recipe, overrides, "command line (--set / options)")
        return config_from_dict({}, overrides)

    overrides = _overrides(args)
    cfg = load(overrides)
    extra = {key: getattr(args, key) for key, _ in _CLASSIFICATION_ONLY if getattr(args, key) is not None}
    if extra:
        if cfg.data.template != "classification":
            opts = ", ".join(opt for key, opt in _CLASSIFICATION_ONLY if key in extra)
            raise ConfigError(f"{opts}: only for the classification template, but the recipe's data.template is "
                              f"{cfg.data.template!r}; add --template classification")
        merged = {**dict(cfg.data.template_args), **extra}
        cfg = load(overrides + [f"data.template_args={json.dumps(merged)}"])
    return cfg


def _select_records(cfg) -> tuple[list, tuple, str, bool, int]:
    """(records, labels, where they come from, whether they are training records, records available)."""
    import dataclasses

    from lorakit.data.selection import recipe_records, sample_records

    d = cfg.data
    held_out = bool(d.eval) or d.eval_fraction > 0
    everything = dataclasses.replace(d, max_eval_samples=None)
    train_records, eval_records, labels = recipe_records(everything, cfg.train.seed, need_labels=cfg.wants_accuracy,
                                                         train=not held_out)
    if d.eval:
        where = f"{d.eval}"
        pool = eval_records
    elif held_out:
        where = (f"the held-out {d.eval_fraction:g} of {d.train} (the same split training holds out, "
                 f"train.seed={cfg.train.seed})")
        pool = eval_records
    else:
        where = f"{d.train}"
        pool = train_records
    records = sample_records(list(pool), d.max_eval_samples, cfg.train.seed + 1)
    return records, labels, where, not held_out, len(pool)


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Hold back a logger's records for the block (this command prints the same counts itself)."""
    import logging

    logger = logging.getLogger(logger_name)
    drop = lambda record: False  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.errors import ConfigError, DataError

    _check_options(args)
    if not args.recipe and not args.data:
        raise ConfigError("eval needs a RECIPE or --data FILE (with --model/--adapter and the template options)")
    cfg = _load_config(args)
    if args.recipe and not args.adapter and not args.base:
        default = Path(cfg.output.dir) / "adapter"
        if (default / "adapter_config.json").is_file():
            args.adapter = str(default)
    if not args.model and not args.adapter:
        args.model = cfg.model.name
    if args.precision is None:  # the recipe's (or the default's) precision, unless the command line says
        args.precision = cfg.train.precision
        if args.dtype is None and cfg.model.dtype != "auto":
            args.dtype = cfg.model.dtype

    from lorakit.cli.common import check_model_inputs, load_model
    from lorakit.data import Collator, tokenize_records
    from lorakit.eval import heldout_loss
    from lorakit.data.selection import make_template

    name = check_model_inputs(args)  # device, adapter folder, model folder: before the slow parts
    records, labels, where, on_train, available = _select_records(cfg)
    if not records:
        raise ConfigError("no records to evaluate: set data.eval (or --data), or data.eval_fraction > 0")
    template = make_template(cfg.data)
    conversations = getattr(template, "is_conversation", None) is not None and template.is_conversation(records)
    for i, rec in enumerate([] if conversations else records):  # conversations: checked when tokenized
        if template.answer_column not in rec:
            fix = ("pass --label-column COLUMN for labelled (classification) data, or a --template whose answer "
                   "field the data has" if not args.recipe else
                   "fix data.template / data.template_args / data.label_column in the recipe (or with --set)")
            raise DataError(f"record {i} of {where}: no answer field {template.answer_column!r} to evaluate "
                            f"(template {cfg.data.template}); fields there: {list(rec)}. {fix}")

    subset = (f"{len(records)} of {available} records (--max-samples {cfg.data.max_eval_samples})"
              if len(records) < available else f"{len(records)} records")
    print(f"model {name}" + (f" + adapter {args.adapter}" if args.adapter else "")
          + f"; data: {'TRAINING records of ' if on_train else ''}{where}: {subset}")
    if on_train:
        print("warning: the recipe has no held-out data (no data.eval, data.eval_fraction=0), so this scores "
              "the records the adapter was trained on: it measures fit, not generalisation. Evaluate on "
              "other data with --data FILE, or --set data.eval=FILE / data.eval_fraction=0.1 (as in "
              "training).", file=sys.stderr)

    model, tokenizer = load_model(args)
    with _quiet("lorakit.data.tokenize"), _quiet("lorakit.data.chat"):
        data = tokenize_records(records, template, tokenizer, cfg.data.max_length)
    loss = heldout_loss(model, data.examples, Collator(tokenizer.pad_token_id), batch_size=cfg.eval.batch_size)
    used = f"{len(data.examples)} of {len(records)} records" if data.n_dropped else f"{len(records)} records"
    print(f"loss {loss['loss']:.4f}  perplexity {loss['perplexity']:.3f}  ({loss['tokens']} answer tokens, "
          f"{used})")
    notes = []
    n_empty = getattr(data, "n_empty", 0)
    if n_empty:
        notes.append(f"{n_empty} record(s) with a null or blank answer (or text) left out of the loss")
    if data.n_dropped - n_empty > 0:
        notes.append(f"{data.n_dropped - n_empty} record(s) whose whole answer cannot fit "
                     f"data.max_length={cfg.data.max_length} left out of the loss")
    if data.n_truncated:
        cut = getattr(data, "n_answer_truncated", 0)
        notes.append(f"{data.n_truncated} example(s) shortened to fit data.max_length={cfg.data.max_length}"
                     + (f" ({cut} with the answer's end cut)" if cut else ""))
    if notes:
        first = f"; e.g. record {data.dropped[0]}" if data.dropped else ""
        print("note: " + "; ".join(notes) + first + " (--max-length raises the limit)")
    if cfg.wants_accuracy and labels:
        from lorakit.eval import classification_eval

        report = classification_eval(model, tokenizer, records, template, labels, batch_size=cfg.eval.batch_size)
        print(f"accuracy over all {report.n} records (generated label; no max_length cut):")
        print(report.table())
    return 0
