"""Label sets for classification data: names from task.json, integer codes -> names.

The hub copy of RAFT stores labels as integers with 0 = unlabeled and k >= 1 = ``label_names[k-1]``;
its CSV export stores the names themselves. :class:`LabelMapper` accepts both, so one recipe serves both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lorakit.errors import DataError

__all__ = ["LabelMapper", "read_task_label_names", "integer_labels_error", "UNLABELED_CODE"]

UNLABELED_CODE = 0  # RAFT: 0 = unlabeled (the test split); real labels start at 1


def read_task_label_names(path: Path, label_column: str) -> list[str] | None:
    """Label names for ``label_column`` from a ``task.json`` beside ``path`` (RAFT layout), or None."""
    task = (path if path.is_dir() else path.parent) / "task.json"
    if not task.is_file():
        return None
    try:
        meta = json.loads(task.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{task} line {e.lineno}: malformed JSON ({e.msg}); fix it, or delete it and pass "
                        "label_names explicitly (recipe: data.label_names).") from None
    names = (meta.get("label_columns") or {}).get(label_column) if isinstance(meta, dict) else None
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{task}: label_columns[{label_column!r}] must be a list of strings, got {names!r}.")
    return names


def integer_labels_error(column: str, code: int, loc: str, *, as_text: bool = False) -> DataError:
    """Integer label codes with no label names to map them to (the hub's RAFT form: 0 = unlabeled)."""
    what = (f"holds only whole numbers as labels (e.g. {str(code)!r})" if as_text
            else f"holds the integer label {code}")
    digits = (" If the numbers are themselves the class names, list them all the same, e.g. "
              "data.label_names=['0','1'].") if as_text else ""
    return DataError(
        f"{loc}: column {column!r} {what}, but no label names are known, so the codes cannot be mapped to "
        "classes; pass label_names=[...] (recipe: data.label_names, e.g. for RAFT twitter_complaints "
        "--set 'data.label_names=[complaint,\"no complaint\"]'; code k means label_names[k-1], "
        "0 = unlabeled and dropped) or put a task.json with label_columns beside the file." + digits)


def _short(row: Any, limit: int = 300) -> str:
    text = repr(row)
    return text if len(text) <= limit else text[:limit] + "...}"


class LabelMapper:
    """Turn a raw label (name, integer code, or digit string) into a label name; None = unlabeled."""

    def __init__(self, column: str, names: Sequence[str] | None):
        self.column = column
        self.names = list(names) if names is not None else None
        if self.names is not None:
            if not self.names or len(set(self.names)) != len(self.names):
                raise DataError(f"label_names (recipe: data.label_names) must be a non-empty list of distinct "
                                f"names, got {self.names!r}.")
            self._by_fold = {n.strip().casefold(): n for n in self.names}

    def __call__(self, value: Any, row: dict, loc: str) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            return self._bad(value, row, loc)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return self._from_code(value, row, loc)
        if not isinstance(value, str):
            return self._bad(value, row, loc)
        text = value.strip()
        if not text:
            return None
        if self.names is None:
            return text
        if text.casefold() in self._by_fold:
            return self._by_fold[text.casefold()]
        if text.isdigit():  # a CSV export of the integer form
            return self._from_code(int(text), row, loc)
        return self._bad(value, row, loc)

    def _from_code(self, code: int, row: dict, loc: str) -> str | None:
        if self.names is None:
            raise integer_labels_error(self.column, code, loc)
        if code == UNLABELED_CODE:
            return None
        if 1 <= code <= len(self.names):
            return self.names[code - 1]
        return self._bad(code, row, loc)

    def _bad(self, value: Any, row: dict, loc: str) -> str:
        codes = f"integer codes 0 (unlabeled) or 1..{len(self.names)}" if self.names else "a label name"
        raise DataError(f"{loc}: label {value!r} in column {self.column!r} is not in the label set "
                        f"{self.names} ({codes}); row: {_short(row)}. Fix the row, or pass the right label_names "
                        "(recipe: data.label_names).")
