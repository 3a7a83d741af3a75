"""`lorakit eval`: says which data it scores, honours --max-samples, reports the records really used;
--label-column / --text-label for classification data without a recipe."""

import json
from pathlib import Path

import pytest

from lorakit.cli.main import main

from .conftest import err_of

DEMO_TEST = "builtin:demo_test.jsonl"


def write_recipe(tmp_path, model_dir, data_file, **data):
    import yaml

    recipe = {"model": str(model_dir),
              "data": {"train": str(data_file), "template": "classification", "label_column": "label",
                       "template_args": {"text_label": "Ticket"}, **data},
              "eval": {"accuracy": False}, "output": {"dir": str(tmp_path / "no_run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def demo_rows(tmp_path):
    from lorakit.data.selection import resolve_source

    rows = [json.loads(l) for l in Path(resolve_source(DEMO_TEST)).read_text().splitlines()[:16]]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_eval_on_training_data_says_so_and_honours_max_samples(tmp_path, tiny_model_dir, demo_rows, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, demo_rows)
    assert main(["eval", str(recipe), "--max-samples", "4"]) == 0
    captured = capsys.readouterr()
    assert f"data: TRAINING records of {demo_rows}: 4 of 16 records (--max-samples 4)" in captured.out
    assert "warning: the recipe has no held-out data" in captured.err
    assert "4 records)" in captured.out  # the loss line


def test_eval_held_out_fraction_is_named(tmp_path, tiny_model_dir, demo_rows, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, demo_rows, eval_fraction=0.25)
    assert main(["eval", str(recipe)]) == 0
    captured = capsys.readouterr()
    assert f"data: the held-out 0.25 of {demo_rows}" in captured.out and ": 4 records" in captured.out
    assert "warning" not in captured.err


def test_eval_reports_records_left_out_of_the_loss(tmp_path, tiny_model_dir, capsys):
    long = "a label far too long to fit in so few tokens"
    rows = [{"text": "short", "label": "yes"}, {"text": "a rather longer text here", "label": "yes"},
            {"text": "short", "label": long}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--label-column", "label",
                 "--max-length", "5", "--no-accuracy"]) == 0
    out = capsys.readouterr().out
    assert ": 3 records" in out
    assert "2 of 3 records)" in out  # the loss line: what the loss really covers
    assert "1 record(s) whose whole answer cannot fit data.max_length=5 left out of the loss" in out
    assert "e.g. record 2" in out and "shortened to fit" in out


def test_eval_label_column_implies_classification(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", DEMO_TEST, "--label-column", "label",
                 "--max-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert ": 4 of 100 records" in out and "accuracy" in out and "billing" in out


def test_eval_answer_field_error_before_loading(tmp_path, tiny_model_dir, capsys, no_model_load):
    err = err_of(["eval", "--model", str(tiny_model_dir), "--data", DEMO_TEST, "--template", "alpaca"], capsys)
    assert "no answer field 'output' to evaluate" in err and "--label-column" in err
    err = err_of(["eval", "--model", str(tiny_model_dir), "--data", DEMO_TEST, "--template", "alpaca",
                  "--text-label", "Ticket"], capsys)
    assert "--text-label is an option of the classification template" in err


def test_eval_text_label_and_the_help_example(tiny_model_dir):
    """The example in `lorakit eval --help` renders the prompts the demo adapter was trained on."""
    import shlex

    from lorakit.cli import eval_cmd
    from lorakit.cli.main import build_parser
    from lorakit.train.recipe import load_recipe
    from lorakit.data.selection import make_template

    lines = eval_cmd.DESCRIPTION.split("examples:")[1].replace("\\\n", " ").splitlines()
    example = next(l for l in lines if "--data" in l).split("#")[0]
    args = build_parser().parse_args(shlex.split(example)[1:])
    eval_cmd._check_options(args)
    cfg = eval_cmd._load_config(args)
    record = {"text": "my card was charged twice", "label": "billing"}
    demo = make_template(load_recipe("demo").data).render(record)
    assert make_template(cfg.data).render(record) == demo
    assert demo[0].startswith("Ticket : ")
    # with a recipe, --text-column is merged into its template_args (its text_label stays)
    args = build_parser().parse_args(["eval", "demo", "--text-column", "body"])
    eval_cmd._check_options(args)
    assert dict(eval_cmd._load_config(args).data.template_args) == {"text_label": "Ticket", "text_column": "body"}
