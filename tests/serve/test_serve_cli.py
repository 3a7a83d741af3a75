"""`lorakit serve` on the command line: every bad input refused before any model loads, with one line and no
traceback; a model that fails to load ends the command with its reason."""
from __future__ import annotations

import socket

import pytest

from lorakit.cli.main import main


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    import lorakit.cli.common

    monkeypatch.setattr(lorakit.cli.common, "load_model_checked", refuse)


def err_of(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("lorakit serve: error: "))


@pytest.mark.parametrize("spec, says", [("just-a-folder", "NAME=DIR"), ("bad name=x", "letters"),
                                         ("a=/no/such/folder", "does not exist")])
def test_bad_adapter_specs(spec, says, capsys, no_model_load):
    assert says in err_of(["serve", "--model", "embedded", "--adapter", spec], capsys)


def test_other_bad_inputs(serve_dirs, capsys, no_model_load, monkeypatch, tmp_path):
    alpha = f"alpha={serve_dirs['alpha']}"
    assert "twice" in err_of(["serve", "--model", "embedded", "--adapter", alpha, "--adapter", alpha], capsys)
    assert "--served-model-name" in err_of(["serve", "--model", "embedded", "--served-model-name", "alpha",
                                            "--adapter", alpha], capsys)
    assert "not a folder" in err_of(["serve", "--model", "embedded", "--adapter-root", str(tmp_path / "no")], capsys)
    assert "--max-batch" in err_of(["serve", "--model", "embedded", "--max-batch", "0"], capsys)
    assert "--port" in err_of(["serve", "--model", "embedded", "--port", "70000"], capsys)
    assert "--model" in err_of(["serve"], capsys)
    monkeypatch.setenv("LORAKIT_API_KEY", " ")
    assert "API key is empty" in err_of(["serve", "--model", "embedded"], capsys)


def test_a_port_in_use_is_named(capsys, no_model_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert "pick another --port" in err_of(["serve", "--model", "embedded", "--port", str(port)], capsys)


def test_a_model_that_fails_to_load_ends_the_command(tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    err = err_of(["serve", "--model", str(broken), "--port", "0", "--log-level", "critical"], capsys)
    assert "the server stopped" in err and str(broken) in err


def test_serve_is_listed():
    from lorakit.cli.main import COMMANDS

    assert "serve" in COMMANDS
