"""Read training/eval records from a file or a `datasets` name into a list of plain dicts.

Supported sources:
  * ``.json``                  a list of objects (Alpaca style); a file holding one object per line
                               is read as JSON Lines
  * ``.jsonl`` / ``.ndjson``   one JSON object per line (blank lines skipped)
  * ``.csv`` / ``.tsv``        a header row, then one row per record (e.g. RAFT: ``Tweet text``, ``Label``, ``ID``)
  * ``.parquet`` / ``.arrow``  read through ``datasets``
  * a folder saved by ``Dataset.save_to_disk`` (``split`` picks the split of a DatasetDict)
  * a hub name (``"tatsu-lab/alpaca"``, ``"ought/raft"`` with ``subset="twitter_complaints"``
    or ``"ought/raft:twitter_complaints"``): ``datasets.load_dataset(name, subset, split=split)``;
    works from the local cache when offline. A ``ClassLabel`` column from ``datasets`` is turned into
    its names (the hub RAFT's ``["Unlabeled", "complaint", "no complaint"]``: 0 -> unlabeled).

A ``.json`` file holding one object that wraps the list (``{"data": [...]}``) is refused with a message
that names the key and how to unwrap it: a one-line object could also be a single JSON Lines record, so
lorakit does not guess. The exception is one conversation (``{"messages": [{"role": ..., "content": ...}, ...]}``
or ShareGPT's ``conversations``), read as one record.

Every record keeps where it came from, e.g. ``"train.csv row 5 (line 6)"``: ``Records.locations[i]``, and
on the record itself (``records[i].location``; the records are :class:`Record`, a ``dict`` with that one
attribute), so a plain ``list(load_records(...))``, a subset or a split of it still lets later errors and
warnings (a missing field while rendering a prompt, a dropped empty answer) name the row.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lorakit.data.labels import LabelMapper, integer_labels_error, read_task_label_names
from lorakit.errors import DataError

__all__ = ["Record", "Records", "load_records", "record_location", "SUPPORTED_SUFFIXES"]

log = logging.getLogger(__name__)

_JSON = (".json",)
_JSONL = (".jsonl", ".ndjson")
_CSV = (".csv", ".tsv")
_ARROW = (".parquet", ".arrow")
SUPPORTED_SUFFIXES = _JSON + _JSONL + _CSV + _ARROW


class Record(dict):
    """A record: a plain ``dict`` of fields that also knows where it came from (``location``, e.g.
    ``"train.csv row 5 (line 6)"``; ``None`` when unknown). Equal to the same dict without it; ``dict(r)``
    or ``{**r}`` give a plain dict (the location is not a field)."""

    def __init__(self, *args: Any, location: str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.location = location


def record_location(record: Any, default: str) -> str:
    """Where ``record`` came from (a :class:`Record`'s ``location``), else ``default``."""
    loc = getattr(record, "location", None)
    return loc if isinstance(loc, str) and loc else default


class Records(list):
    """A ``list[dict]`` that also says where each record came from and what was dropped.

    ``locations[i]`` names record ``i`` in its source (for error messages);
    ``n_unlabeled`` counts rows dropped because their label was the "unlabeled" code 0 (or empty).
    """

    def __init__(self, items: Iterable[dict] = (), *, source: str = "", locations: Sequence[str] = (),
                 n_unlabeled: int = 0):
        super().__init__(items)
        self.source = source
        self.locations = list(locations)
        self.n_unlabeled = n_unlabeled

    def location(self, i: int) -> str:
        if i < len(self.locations):
            return self.locations[i]
        return record_location(self[i] if 0 <= i < len(self) else None, f"{self.source} record {i}")

    def __getitem__(self, i):  # a slice keeps the locations, so errors on a subset name the right rows
        if isinstance(i, slice):
            return Records(super().__getitem__(i), source=self.source, locations=self.locations[i],
                           n_unlabeled=self.n_unlabeled)
        return super().__getitem__(i)


def load_records(source: str | os.PathLike | Sequence[Mapping], *, split: str = "train",
                 columns: Sequence[str] | None = None, label_column: str | None = None,
                 label_names: Sequence[str] | None = None, subset: str | None = None) -> Records:
    """Read ``source`` (a file, a folder, a hub dataset name, or records already in memory: a list of
    dicts) into a list of dicts (a :class:`Records`).

    ``columns``: keep only these fields (each must exist in every row; the error lists those that do).
    ``label_column``: normalise that field to a label name. ``label_names`` is the label set; when not
    given it is read from a ``task.json`` beside the file if one is there (RAFT layout). Integer codes
    (the hub's RAFT form) map ``k -> label_names[k-1]``; code 0 (and an empty label) means unlabeled:
    such rows are dropped and counted in ``Records.n_unlabeled`` (with a log warning). A label outside
    the set is a :class:`DataError` naming the row, the label and the set. Integer codes with no label
    names known are a :class:`DataError` (asking for ``label_names``), whether JSON integers or, as in a
    CSV export, a column whose labels are all digit strings ("0", "1", "2").

    The records are :class:`Record` dicts whose ``location`` names their row (kept by ``list()``).
    """
    if isinstance(source, (list, tuple)):
        rows, locations, name = _read_memory(source)
    else:
        path = Path(os.fspath(source))
        if path.exists():
            if label_names is None and label_column is not None:
                label_names = read_task_label_names(path, label_column)
            rows, locations, name = _read_local(path, split)
        else:
            rows, locations, name = _read_hub(os.fspath(source), split, subset)

    if not rows:
        raise DataError(f"{name} contains no records (split {split!r}); "
                        "check the path/split, or add at least one record.")
    if columns is not None:
        rows = _select_columns(rows, locations, list(columns), name)
    n_unlabeled = 0
    if label_column is not None:
        mapper = LabelMapper(label_column, label_names)
        if label_names is None:
            _refuse_digit_labels(rows, locations, label_column)
        kept_rows, kept_locs = [], []
        for row, loc in zip(rows, locations):
            _require_column(row, label_column, loc)
            label = mapper(row[label_column], row, loc)
            if label is None:
                n_unlabeled += 1
                continue
            kept_rows.append({**row, label_column: label})
            kept_locs.append(loc)
        rows, locations = kept_rows, kept_locs
        if n_unlabeled:
            log.warning("%s: dropped %d unlabeled row(s) (label code 0 or empty); %d labelled row(s) left",
                        name, n_unlabeled, len(rows))
        if not rows:
            raise DataError(f"{name}: all {n_unlabeled} rows are unlabeled (label code 0 or empty in column "
                            f"{label_column!r}); use a labelled split (e.g. split='train'; recipe: "
                            "data.train_split / data.eval_split), or load without label_column (recipe: "
                            "data.label_column) to read the rows for prediction.")
    return Records((Record(row, location=loc) for row, loc in zip(rows, locations)), source=name,
                   locations=locations, n_unlabeled=n_unlabeled)


def _refuse_digit_labels(rows: list[dict], locations: list[str], column: str) -> None:
    """Labels written as digits in text (a CSV export of the hub's integer codes: RAFT's 0 = unlabeled,
    1.. = the names) with no label names known: the same error as integer labels in JSON, rather than
    training the codes as class names ("0" included). Empty labels are unlabeled and not looked at."""
    first = None
    for row, loc in zip(rows, locations):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str) or not value.strip().isdigit():
            return
        if first is None:
            first = (int(value.strip()), loc)
    if first is not None:
        raise integer_labels_error(column, first[0], first[1], as_text=True)


def _read_memory(records: Sequence[Any]) -> tuple[list[dict], list[str], str]:
    name = "in-memory records"
    rows, locs = [], []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DataError(f"{name}: record {i} is a {type(r).__name__}, not a dict of fields; "
                            f"pass a list of dicts such as {{'instruction': ..., 'output': ...}}.")
        rows.append(dict(r))
        locs.append(record_location(r, f"record {i}"))  # records read from a file before keep their place
    return rows, locs, name


# ---------------------------------------------------------------- local files

def _read_local(path: Path, split: str) -> tuple[list[dict], list[str], str]:
    name = str(path)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix in _JSON:
        rows, locs = _read_json(path)
    elif suffix in _JSONL:
        rows, locs = _read_jsonl(path)
    elif suffix in _CSV:
        rows, locs = _read_csv(path)
    elif suffix in _ARROW:
        rows, locs = _read_arrow(path)
    else:
        raise DataError(f"{path}: unknown file format {path.suffix or '(no extension)'!r}; "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)} (or a datasets folder / hub name), "
                        "or convert the file.")
    return rows, locs, name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8.") from None


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            wrapped = _wrapped_list_key(whole)
            one_line = len([line for line in text.splitlines() if line.strip()]) == 1
            if _is_one_conversation(whole):
                return [whole], [f"{path} record 0"]  # {"messages": [turns]}: one conversation, pretty-printed
            if wrapped is not None:
                # {"data": [{...}, ...]}: the records are wrapped in an object. Refused rather than unwrapped:
                # on one line it could as well be a single JSON Lines record with one list-valued field.
                raise DataError(
                    f"{path}: the file holds one JSON object (keys [{wrapped!r}]), not a list of records; its key "
                    f"{wrapped!r} holds a list of {len(whole[wrapped])} objects, which look like the records. "
                    f"Save that list as the file's top-level value (e.g. jq '.{wrapped}' {path.name} > "
                    f"{path.stem}_records.json), or write one record per line (JSON Lines)"
                    + ("; if the line really is a single record, name the file .jsonl." if one_line else "."))
            if not one_line:
                raise DataError(f"{path}: the file holds one JSON object (keys {list(whole)[:10]}), not a list of "
                                "records; save the records as a top-level list (or JSON Lines).")
        # Many ".json" files in the wild are JSON Lines; read them as such (one line: a single record).
        return _parse_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                        "fix that line (a JSON file must hold one list of objects).") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a list of records; check the file.") from None
    rows, locs = [], []
    for i, item in enumerate(data):
        loc = f"{path} record {i}"
        if not isinstance(item, dict):
            raise DataError(f"{loc} (0-based index in the top-level list) is a {type(item).__name__}, "
                            "not an object; every record must be an object like "
                            '{"instruction": ..., "input": ..., "output": ...}.')
        rows.append(item)
        locs.append(loc)
    return rows, locs


def _is_one_conversation(obj: dict) -> bool:
    """``{"messages": [...]}`` / ``{"conversations": [...]}`` whose list holds turns (role/from keys)."""
    from lorakit.data.conversations import CONVERSATION_COLUMNS, is_turn_list

    return any(is_turn_list(obj.get(k)) for k in CONVERSATION_COLUMNS)


def _wrapped_list_key(obj: dict) -> str | None:
    """The key of an object whose only value is a non-empty list of objects (``{"data": [{...}]}``), else None."""
    if len(obj) != 1:
        return None
    key, value = next(iter(obj.items()))
    return key if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) else None


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    return _parse_jsonl(path, _read_text(path))


def _parse_jsonl(path: Path, text: str) -> tuple[list[dict], list[str]]:
    rows, locs = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                            "fix that line: JSON Lines needs one complete object per line.") from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: nested too deeply to be a record; check that line.") from None
        if not isinstance(item, dict):
            raise DataError(f"{path} line {lineno}: a {type(item).__name__}, not an object; "
                            "each line must be one JSON object.")
        rows.append(item)
        locs.append(f"{path} line {lineno}")
    return rows, locs


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows, locs = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return [], []
            start = reader.line_num
            for n, values in enumerate(reader, start=1):
                if not values:
                    start = reader.line_num
                    continue
                if len(values) != len(header):
                    raise DataError(f"{path} row {n} (line {start + 1}): {len(values)} fields, but the header "
                                    f"has {len(header)} ({header}); quote fields that contain "
                                    f"{delimiter!r} or fix the row.")
                rows.append(dict(zip(header, values)))
                locs.append(f"{path} row {n} (line {start + 1})")
                start = reader.line_num
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8.") from None
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e}); fix the quoting on that line.") \
                from None
    return rows, locs


def _read_arrow(path: Path) -> tuple[list[dict], list[str]]:
    import datasets  # heavy: only when needed

    kind = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: could not read as {kind} ({type(e).__name__}: {e}); "
                        "check the file is complete, or convert it to JSONL/CSV.") from None
    return _rows_from_dataset(ds, str(path))


def _read_saved_dataset(path: Path, split: str) -> tuple[list[dict], list[str], str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not one written by Dataset.save_to_disk; "
                        f"pass a data file inside it ({', '.join(SUPPORTED_SUFFIXES)}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has no split {split!r}; splits there: {sorted(ds)}. Pass split=one of them "
                        "(recipe: data.train_split / data.eval_split).")
        ds = ds[split]
    rows, locs = _rows_from_dataset(ds, f"{path}[{split}]")
    return rows, locs, f"{path}[{split}]"


def _rows_from_dataset(ds: Any, name: str) -> tuple[list[dict], list[str]]:
    """Rows of a ``datasets.Dataset``; a ClassLabel column's integers become its own names (the
    dataset's names are authoritative), with -1 and a class named "unlabeled" (RAFT's 0) -> None."""
    rows = [dict(r) for r in ds]
    features = getattr(ds, "features", None) or {}
    class_names = {c: f.names for c, f in features.items() if type(f).__name__ == "ClassLabel"}
    for row in rows:
        for col, names in class_names.items():
            v = row.get(col)
            if isinstance(v, int) and not isinstance(v, bool):
                row[col] = None if not 0 <= v < len(names) or names[v].strip().casefold() == "unlabeled" \
                    else names[v]
    return rows, [f"{name} row {i}" for i in range(len(rows))]


# ---------------------------------------------------------------- hub names

def _read_hub(name: str, split: str, subset: str | None) -> tuple[list[dict], list[str], str]:
    if subset is None and ":" in name and not os.path.isabs(name):
        name, subset = name.split(":", 1)
    if _looks_like_path(name):
        raise DataError(f"{name}: no such file or folder; check the path "
                        f"(a relative path starts from {os.getcwd()}).")
    import datasets

    label = f"{name}" + (f" ({subset})" if subset else "") + f"[{split}]"
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except (ConnectionError, OSError) as e:
        if isinstance(e, FileNotFoundError) and not _offline():
            raise DataError(f"{name}: neither a local file nor a dataset on the hub ({e}); "
                            "check the name or pass a local file path.") from None
        raise DataError(f"dataset {label} is not cached locally and there is no network "
                        f"({'HF_HUB_OFFLINE=1' if _offline() else type(e).__name__}: {e}); "
                        "pass a local file path instead (.json/.jsonl/.csv/.parquet), or download it once "
                        "on a machine with network so it is in the datasets cache.") from None
    except ValueError as e:  # unknown split / missing config name
        raise DataError(f"dataset {label}: {e}; pass a valid split= or subset= (recipe: data.train_split / "
                        "data.eval_split, data.subset).") from None
    rows, locs = _rows_from_dataset(ds, label)
    return rows, locs, label


def _looks_like_path(name: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else that does not exist is a mistyped path."""
    return (Path(name).suffix.lower() in SUPPORTED_SUFFIXES or name.startswith((".", "/", "~", "\\"))
            or name.count("/") > 1 or "\\" in name)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ---------------------------------------------------------------- columns

def _require_column(row: dict, column: str, loc: str) -> None:
    if column not in row:
        raise DataError(f"{loc}: missing column {column!r}; columns there: {list(row)}. "
                        "Pass the right column name (recipe: data.label_column, data.columns; eval CLI: "
                        "--label-column) or fix the row.")


def _select_columns(rows: list[dict], locations: list[str], columns: list[str], name: str) -> list[dict]:
    out = []
    for row, loc in zip(rows, locations):
        for c in columns:
            _require_column(row, c, loc)
        out.append({c: row[c] for c in columns})
    return out
