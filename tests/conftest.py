"""Shared test set-up: no network, fixed seeds, and the embedded model converted once per session."""

import os

# Before anything imports transformers / huggingface_hub: never try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: The project's shared real data (not ours; see SOURCES.md there), read in place, never copied:
#: ../shared/data beside the repository. A user's fresh clone has no ../shared; CI does.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_shared_data(relative: str = "") -> Path:
    """``../shared/data/<relative>`` for a test that reads the shared real data.

    Missing: skipped, with a reason naming the path (a user's machine); with ``CI=true`` the test fails
    instead (CI has ../shared, so there a missing file is an error, never a silent skip).
    """
    path = SHARED_DATA / relative
    if not path.exists():
        why = f"{path} is missing: this test reads the project's shared real data there"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (CI=true: CI has ../shared/data, so a missing file is an error)")
        pytest.skip(f"{why} (a fresh clone has no ../shared; CI runs this test)")
    return path


@pytest.fixture
def shared_data():
    """``shared_data("raft/twitter_complaints/train.csv")``: that path under ../shared/data, or the test
    skips (fails with CI=true) naming it; see ``need_shared_data``."""
    return need_shared_data


@pytest.fixture(autouse=True, scope="session")
def own_precision_cache(tmp_path_factory):
    """precision auto's measurements go to a folder of the test run's: a test run (busy cores) never leaves
    a choice behind for the user's real runs, and every run measures afresh once."""
    from lorakit import precision

    precision.CACHE_DIR = tmp_path_factory.mktemp("precision-cache")
    yield
    precision.CACHE_DIR = None


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same random state (torch, python)."""
    import torch

    random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The converted SmolLM2-135M-Instruct folder (model + tokenizer + chat template).

    The first run on a machine converts the GGUF file (~25 s) into the lorakit cache
    ($LORAKIT_CACHE or ~/.cache/lorakit); later runs find it there.
    """
    from lorakit.models import embedded_model_path

    return embedded_model_path()


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: a bad input must be reported before the model is loaded."""
    import lorakit.models
    import lorakit.models.embedded

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(lorakit.models.embedded, "load_model_and_tokenizer", refuse)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir):
    """A randomly initialised 2-layer Llama over the embedded model's tokenizer (head tied), saved like a real model."""
    from transformers import AutoTokenizer

    from tiny import tokenizer_llama

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer_llama(tok, tie=True).save_pretrained(out)
    tok.save_pretrained(out)
    return out

