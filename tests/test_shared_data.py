"""The shared real data helper: a missing file skips on a user's machine and fails on CI, naming the path."""
import pytest


def test_a_missing_file_skips_with_its_path_named(shared_data, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"shared/data/no/such/file.csv is missing.*fresh clone"):
        shared_data("no/such/file.csv")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_a_missing_file_fails_on_ci(shared_data, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"shared/data/no/such/file.csv is missing.*CI=true"):
        shared_data("no/such/file.csv")


def test_a_present_path_is_returned(shared_data, monkeypatch, tmp_path):
    (tmp_path / "raft").mkdir()
    (tmp_path / "raft" / "train.csv").write_text("a,b\n")
    monkeypatch.setitem(shared_data.__globals__, "SHARED_DATA", tmp_path)  # tests/conftest.py's folder
    monkeypatch.setenv("CI", "true")
    assert shared_data("raft/train.csv") == tmp_path / "raft" / "train.csv"
