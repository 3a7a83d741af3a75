"""`lorakit merge`: refuses a non-empty --out before loading; writes via a temporary folder."""

from pathlib import Path

from lorakit.cli.main import main

from .conftest import err_of


def test_merge_refuses_non_empty_out_before_loading(adapter, tmp_path, capsys, no_model_load):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = err_of(["merge", "--adapter", str(adapter), "--out", str(out)], capsys)
    assert "already holds files (keep.txt)" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # the folder holding the adapter: refused even with --overwrite (it would lose the adapter)
    err = err_of(["merge", "--adapter", str(adapter), "--out", str(adapter.parent), "--overwrite"], capsys)
    assert "holds the --adapter folder" in err


def test_merge_overwrite_and_failed_merge_leaves_nothing(adapter, tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left

    from transformers import PreTrainedModel

    def disk_full(self, *a, **k):
        (Path(a[0]) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(a[0]))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    fresh = tmp_path / "fresh"
    err = err_of(["merge", "--adapter", str(adapter), "--out", str(fresh)], capsys)
    assert "No space left on device" in err
    assert not fresh.exists()
    err = err_of(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"], capsys)
    assert (out / "config.json").is_file()  # the previous result is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
