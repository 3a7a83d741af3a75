"""Recipes on records held in memory (e.g. cross-validation folds) instead of the recipe's data files."""
import pytest

from lorakit.errors import DataError
from lorakit.train.recipe import load_recipe
from lorakit.data.selection import recipe_records
from lorakit.train.run import prepare, train

ROWS = [{"Tweet text": f"my parcel {i} never came, again" if i % 3 == 0 else f"lovely morning number {i}",
         "Label": 1 if i % 3 == 0 else 2, "ID": i} for i in range(12)]


def load_data(cfg, **kw):
    """The records a recipe trains and evaluates on, as ``prepare`` selects them."""
    return recipe_records(cfg.data, cfg.train.seed, need_labels=cfg.wants_accuracy, **kw)


def _cfg(model_dir, *extra):
    return load_recipe("job_b_raft", [f"model={model_dir}", "train.max_steps=2", "train.batch_size=4",
                                      "train.progress=false", "output.plot=false", "output.tensorboard=false",
                                      "eval.accuracy=false", *extra])


def test_records_in_memory_are_checked_and_labelled_like_a_file(tiny_model_dir):
    train_recs, eval_recs, labels = load_data(_cfg(tiny_model_dir, "data.eval_fraction=0.25"), records=ROWS)
    assert labels == ("complaint", "no complaint")
    assert len(train_recs) == 9 and len(eval_recs) == 3                 # the recipe's eval_fraction applies
    assert {r["Label"] for r in train_recs + eval_recs} <= {"complaint", "no complaint"}  # codes 1/2 -> names
    tr, ev, _ = load_data(_cfg(tiny_model_dir), records=ROWS[:8], eval_records=ROWS[8:])
    assert [r["ID"] for r in ev] == [8, 9, 10, 11] and len(tr) == 8


def test_bad_in_memory_records_are_refused_with_the_record_named(tiny_model_dir):
    with pytest.raises(DataError, match="record 1 is a str"):
        load_data(_cfg(tiny_model_dir), records=[ROWS[0], "not a row"])
    with pytest.raises(DataError, match="no records"):
        load_data(_cfg(tiny_model_dir), records=[])
    with pytest.raises(DataError, match="record 0"):
        load_data(_cfg(tiny_model_dir), records=[{"Tweet text": "x", "Label": 7}])   # a code outside the set


def test_prepare_and_train_on_records_in_memory(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, "data.eval_fraction=0")
    setup = prepare(cfg, records=ROWS, print_fn=lambda s: None)
    assert len(setup.train_data) == 12 and setup.eval_data is None
    out = train(cfg, setup=setup, output_dir=tmp_path, print_fn=lambda s: None)
    assert out.result.steps == 2 and (out.result.adapter_dir / "adapter_model.safetensors").exists()


def test_an_empty_eval_list_means_no_held_out_set(tiny_model_dir):
    tr, ev, _ = load_data(_cfg(tiny_model_dir, "data.eval_fraction=0.25"), records=ROWS, eval_records=[])
    assert len(tr) == 12 and ev == []  # not "no records (split 'train')", and no fraction split either
