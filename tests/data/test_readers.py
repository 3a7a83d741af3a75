"""load_records: every format, RAFT label forms, and every error naming file + row + fix."""
import json

import pytest

from lorakit.data import load_records
from lorakit.errors import DataError

from .conftest import ALPACA_ZH, RAFT_DIR  # paths under ../shared/data (the shared_data fixture)


# ---------------------------------------------------------------- real shared data

def test_alpaca_zh_demo_has_1000_records(shared_data):
    recs = load_records(shared_data(ALPACA_ZH))
    assert len(recs) == 1000
    assert set(recs[0]) == {"instruction", "input", "output"}
    assert sum(1 for r in recs if r["input"]) == 139  # documented in SOURCES.md
    assert recs.locations[3] == f"{shared_data(ALPACA_ZH)} record 3"


def test_raft_train_csv_50_rows_17_complaints(shared_data):
    recs = load_records(shared_data(f"{RAFT_DIR}/train.csv"), label_column="Label")
    assert len(recs) == 50
    assert sum(r["Label"] == "complaint" for r in recs) == 17
    assert set(recs[0]) == {"Tweet text", "Label", "ID"}
    assert recs.n_unlabeled == 0
    assert recs.locations[0].endswith("train.csv row 1 (line 2)")


def test_raft_test_unlabeled_reads_without_labels(shared_data):
    recs = load_records(shared_data(f"{RAFT_DIR}/test_unlabeled.csv"), columns=["Tweet text"])
    assert len(recs) == 3399
    assert set(recs[0]) == {"Tweet text"}


def test_raft_label_names_come_from_task_json(tmp_path, shared_data):
    # integer codes with the task.json beside the file: 1 -> complaint, 2 -> no complaint, 0 dropped
    (tmp_path / "task.json").write_text(shared_data(f"{RAFT_DIR}/task.json").read_text())
    (tmp_path / "train.csv").write_text('Tweet text,Label,ID\n"a, b",1,0\nc,2,1\nd,0,2\ne,complaint,3\n')
    recs = load_records(tmp_path / "train.csv", label_column="Label")
    assert [r["Label"] for r in recs] == ["complaint", "no complaint", "complaint"]
    assert recs[0]["Tweet text"] == "a, b"
    assert recs.n_unlabeled == 1


# ---------------------------------------------------------------- RAFT integer codes (hub form)

def test_raft_int_codes_map_to_names_and_zero_is_dropped(tmp_path, caplog):
    path = tmp_path / "raft.jsonl"
    rows = [{"Tweet text": "t0", "Label": 1}, {"Tweet text": "t1", "Label": 2}, {"Tweet text": "t2", "Label": 0},
            {"Tweet text": "t3", "Label": "no complaint"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    recs = load_records(path, label_column="Label", label_names=["complaint", "no complaint"])
    assert [r["Label"] for r in recs] == ["complaint", "no complaint", "no complaint"]
    assert recs.n_unlabeled == 1
    assert "dropped 1 unlabeled" in caplog.text


def test_int_codes_without_label_names_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 1: .*integer label 1.*pass label_names"):
        load_records(path, label_column="label")


def test_all_unlabeled_is_an_error(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n')
    with pytest.raises(DataError, match="all 2 rows are unlabeled"):
        load_records(path, label_column="label", label_names=["yes", "no"])


def test_label_outside_set_names_row_label_and_set(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Tweet text,Label\nfine,complaint\nbroken,compliant\n")
    with pytest.raises(DataError) as e:
        load_records(path, label_column="Label", label_names=["complaint", "no complaint"])
    msg = str(e.value)
    assert "bad.csv row 2 (line 3)" in msg
    assert "'compliant'" in msg and "['complaint', 'no complaint']" in msg
    assert "'Tweet text': 'broken'" in msg  # the row itself


def test_int_code_out_of_range(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a", "label": 3}\n')
    with pytest.raises(DataError, match=r"r.jsonl line 1: label 3 .*not in the label set \['a', 'b'\]"):
        load_records(path, label_column="label", label_names=["a", "b"])


def test_label_case_and_whitespace_map_to_canonical_name(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\nx, Complaint \n")
    assert load_records(path, label_column="label", label_names=["complaint"])[0]["label"] == "complaint"


# ---------------------------------------------------------------- formats

def test_jsonl_and_json_list_and_json_that_is_jsonl(tmp_path):
    rows = [{"instruction": "i1", "input": "", "output": "o1"}, {"instruction": "i2", "input": "x", "output": "o2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "a.jsonl", "lines.json"):
        assert list(load_records(tmp_path / name)) == rows


def test_parquet_via_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a", "label": 1}, {"text": "b", "label": 2}]).to_parquet(
        str(tmp_path / "d.parquet"))
    recs = load_records(tmp_path / "d.parquet", label_column="label", label_names=["pos", "neg"])
    assert [r["label"] for r in recs] == ["pos", "neg"]


def test_saved_dataset_dict_folder_picks_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}]),
                               "test": datasets.Dataset.from_list([{"text": "b"}, {"text": "c"}])})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert len(load_records(tmp_path / "ds", split="test")) == 2
    with pytest.raises(DataError, match=r"no split 'validation'; splits there: \['test', 'train'\]"):
        load_records(tmp_path / "ds", split="validation")


def test_columns_selects_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1, "b": 2, "c": 3}\n')
    assert list(load_records(path, columns=["a", "c"])) == [{"a": 1, "c": 3}]


# ---------------------------------------------------------------- errors

def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 3: malformed JSON .*fix that line"):
        load_records(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 3"):
        load_records(path)


def test_json_item_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"instruction": "a"}, "oops"]')
    with pytest.raises(DataError, match=r"list.json record 1 .*is a str, not an object"):
        load_records(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"bad.csv row 2 \(line 3\): 3 fields, but the header has 2"):
        load_records(path)


@pytest.mark.parametrize("content", ["[]", "", "\n\n"])
def test_empty_json_dataset(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty.json contains no records"):
        load_records(path)


def test_empty_csv_header_only(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("Tweet text,Label\n")
    with pytest.raises(DataError, match=r"empty.csv contains no records"):
        load_records(path)


def test_missing_column_lists_existing_columns(tmp_path, shared_data):
    with pytest.raises(DataError) as e:
        load_records(shared_data(f"{RAFT_DIR}/train.csv"), label_column="label")
    msg = str(e.value)
    assert "train.csv row 1 (line 2): missing column 'label'" in msg
    assert "['Tweet text', 'Label', 'ID']" in msg


def test_missing_column_via_columns(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"a.jsonl line 2: missing column 'output'; columns there: \['instruction'\]"):
        load_records(path, columns=["instruction", "output"])


def test_unknown_file_format(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"data.xlsx: unknown file format '.xlsx'; use one of .json, .jsonl"):
        load_records(path)


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_records(tmp_path / "nope.jsonl")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_records("lorakit-test-owner/not-a-cached-dataset", split="train")
    msg = str(e.value)
    assert "not cached locally" in msg and "no network" in msg and "local file path" in msg


def test_hub_name_with_subset_syntax_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"ought/raft \(twitter_complaints\)\[train\] is not cached locally"):
        load_records("ought/raft:twitter_complaints")


def test_classlabel_column_uses_the_datasets_names(tmp_path):
    # the hub RAFT layout: ClassLabel(names=["Unlabeled", "complaint", "no complaint"])
    import datasets

    feats = datasets.Features({"Tweet text": datasets.Value("string"),
                               "Label": datasets.ClassLabel(names=["Unlabeled", "complaint", "no complaint"])})
    ds = datasets.Dataset.from_dict({"Tweet text": ["a", "b", "c"], "Label": [1, 2, 0]}, features=feats)
    ds.save_to_disk(str(tmp_path / "raft"))
    recs = load_records(tmp_path / "raft", label_column="Label", label_names=["complaint", "no complaint"])
    assert [r["Label"] for r in recs] == ["complaint", "no complaint"] and recs.n_unlabeled == 1
    # a plain ClassLabel (no "unlabeled" class): code k -> names[k]
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}, features=feats).save_to_disk(str(tmp_path / "s"))
    assert [r["label"] for r in load_records(tmp_path / "s", label_column="label")] == ["neg", "pos"]


def test_slices_keep_locations(shared_data):
    recs = load_records(shared_data(f"{RAFT_DIR}/train.csv"), label_column="Label")[10:12]
    assert recs.location(0).endswith("row 11 (line 12)") and len(recs) == 2


def test_json_object_instead_of_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{\n  "data": [{"instruction": "a"}]\n}\n')
    with pytest.raises(DataError, match=r"obj.json: the file holds one JSON object \(keys \['data'\]\), not a list"):
        load_records(path)


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text"):
        load_records(path)


@pytest.mark.parametrize("one_line", [True, False])
def test_json_object_wrapping_the_records_says_how_to_unwrap(tmp_path, one_line):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": rows}, indent=None if one_line else 2))
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert "wrapped.json: the file holds one JSON object (keys ['data']), not a list of records" in msg
    assert "its key 'data' holds a list of 2 objects" in msg and "jq '.data' wrapped.json" in msg
    assert "fields there" not in msg


def test_one_line_json_with_a_single_record_is_still_read(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert list(load_records(path)) == [{"instruction": "a", "input": "", "output": "b"}]


def test_csv_digit_labels_without_names_is_an_error_like_jsonl(tmp_path):
    # a CSV export of the hub's RAFT: 0 = unlabeled, 1 = complaint, 2 = no complaint
    path = tmp_path / "raft_int.csv"
    path.write_text('Tweet text,Label,ID\nfirst job,0,0\n"late, again",1,1\nthanks,2,2\nnone yet,,3\n')
    with pytest.raises(DataError) as e:
        load_records(path, label_column="Label")
    msg = str(e.value)
    assert "raft_int.csv row 1 (line 2): column 'Label' holds only whole numbers as labels" in msg
    assert "no label names are known" in msg and "data.label_names" in msg
    assert """--set 'data.label_names=[complaint,"no complaint"]'""" in msg and "0 = unlabeled" in msg
    # with the names: the same rows as the hub form, 0 dropped
    recs = load_records(path, label_column="Label", label_names=["complaint", "no complaint"])
    assert [r["Label"] for r in recs] == ["complaint", "no complaint"] and recs.n_unlabeled == 2
    # digits that are the class names themselves: listed, each is its own class (0 included)
    recs = load_records(path, label_column="Label", label_names=["0", "1", "2"])
    assert [r["Label"] for r in recs] == ["0", "1", "2"]


def test_csv_label_names_as_text_need_no_label_names(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\na,complaint\nb,2\n")
    assert [r["label"] for r in load_records(path, label_column="label")] == ["complaint", "2"]


def test_label_errors_name_the_recipe_key(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 1: .*integer label 1.*recipe: data.label_names"):
        load_records(path, label_column="label")
    path.write_text('{"text": "a", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"pass the right label_names \(recipe: data.label_names\)"):
        load_records(path, label_column="label", label_names=["yes", "no"])
    with pytest.raises(DataError, match=r"missing column 'Label'.*recipe: data.label_column"):
        load_records(path, label_column="Label")


def test_records_know_their_location(tmp_path):
    import copy
    import pickle

    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    recs = load_records(path)
    rows = list(recs)
    assert rows == [{"a": 1}, {"a": 2}] and all(isinstance(r, dict) for r in rows)
    assert [r.location for r in rows] == [f"{path} line 1", f"{path} line 3"]
    assert "location" not in rows[0] and json.dumps(rows[0]) == '{"a": 1}'
    for clone in (copy.deepcopy(rows[1]), pickle.loads(pickle.dumps(rows[1]))):
        assert clone == {"a": 2} and clone.location == f"{path} line 3"
