"""Which records a recipe trains and evaluates on, and the template that renders them.

Read from a recipe's ``data`` section (``lorakit.train.config.DataSection``; any object with its fields):
the training and held-out records (a file each, or a held-out fraction of the training file, or lists
already in memory), the label set, and seeded subsets. ``lorakit train`` and ``lorakit eval`` both
select their records here, so they agree on what was held out.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence

from lorakit.errors import ConfigError, DataError

__all__ = ["BUILTIN_PREFIX", "make_template", "recipe_records", "resolve_source", "sample_records"]

BUILTIN_PREFIX = "builtin:"


def resolve_source(source: str) -> str:
    """`builtin:NAME` -> the file shipped in lorakit/data/builtin; anything else unchanged."""
    if not source.startswith(BUILTIN_PREFIX):
        return source
    import lorakit.data.builtin as builtin

    folder = Path(builtin.__file__).resolve().parent
    shipped = sorted(p.name for p in folder.glob("*.json*"))
    name = source[len(BUILTIN_PREFIX):]
    path = (folder / name).resolve()
    # a built-in name is a file name in that folder: no path, no link leading out of it
    if name != Path(name).name or path.parent != folder or path.suffix not in (".json", ".jsonl", ".csv") \
            or not path.is_file():
        raise DataError(f"{source}: no such built-in data file (builtin:NAME takes the name of a file shipped with "
                        f"lorakit); built-in files: {shipped}")
    return str(path)


def make_template(data: Any):
    """The prompt template of a recipe's data section (classification gets its label column from it)."""
    from lorakit.data.prompts import get_template

    kw = dict(data.template_args)
    if data.template == "classification" and data.label_column and "label_column" not in kw:
        kw["label_column"] = data.label_column
    return get_template(data.template, **kw)


def sample_records(records: list, n: Optional[int], seed: int) -> list:
    """``n`` of ``records`` drawn with ``seed``, in their original order (all of them when n is None or too big)."""
    if n is None or n >= len(records):
        return records
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx]


def _hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(the rest, the held-out ``fraction`` of ``records``), drawn with ``seed``, each in file order."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * len(order)))])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def recipe_records(data: Any, seed: int, *, need_labels: bool = False, train: bool = True,
                   records: Optional[Sequence[dict]] = None,
                   eval_records: Optional[Sequence[dict]] = None) -> tuple[list, list, tuple]:
    """(train records, eval records, label names) as a recipe's data section describes them.

    ``seed``: the recipe's ``train.seed`` (the held-out split and the subsets are drawn with it).
    ``need_labels``: the recipe measures accuracy, so the label set must be known. ``train=False``: the
    training file is read only when the held-out records come from it. ``records`` / ``eval_records``:
    lists of dicts already in memory, used in place of ``data.train`` / ``data.eval`` (checked and
    label-normalised as files are; e.g. the folds of a cross-validation). Everything else of the section
    (columns, labels, eval_fraction, max_*_samples) applies as usual.
    """
    from lorakit.data.readers import load_records

    d = data
    if records is None and eval_records is None and not d.train and not d.eval:
        raise ConfigError("data.train is empty; set it in the recipe or with --set data.train=PATH")
    kw = dict(columns=list(d.columns) if d.columns else None, label_column=d.label_column,
              label_names=list(d.label_names) if d.label_names else None, subset=d.subset)
    train_records: list = []
    if records is not None:
        train_records = list(load_records(list(records), **kw))
    elif d.train and (train or not (d.eval or eval_records is not None)):
        train_records = list(load_records(resolve_source(d.train), split=d.train_split, **kw))
    if eval_records is not None:
        # an empty list means "no held-out set", as eval_fraction=0 does
        eval_records = list(load_records(list(eval_records), **kw)) if len(eval_records) else []
    elif d.eval:
        eval_records = list(load_records(resolve_source(d.eval), split=d.eval_split, **kw))
    elif d.eval_fraction > 0 and train_records:
        train_records, eval_records = _hold_out(train_records, d.eval_fraction, seed)
    else:
        eval_records = []
    labels = tuple(d.label_names)
    if not labels and d.label_column:  # from all records, before any subsetting
        seen = [r.get(d.label_column) for r in train_records + eval_records]
        labels = tuple(sorted({str(v) for v in seen if v is not None}))
    train_records = sample_records(train_records, d.max_train_samples, seed)
    eval_records = sample_records(eval_records, d.max_eval_samples, seed + 1)
    if need_labels and not labels:
        raise ConfigError("accuracy needs the label set: set data.label_column (and data.label_names), or "
                          "--set eval.accuracy=false")
    return train_records, eval_records, labels
