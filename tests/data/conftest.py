from pathlib import Path

import pytest

# Real data no one on the project wrote, read in place (never copied): ../shared/data from the repo root.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
RAFT_DIR = SHARED_DATA / "raft" / "twitter_complaints"
ALPACA_ZH = SHARED_DATA / "alpaca" / "alpaca_zh_demo.json"


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    """The real SmolLM2 tokenizer (no BOS added by itself, eos = pad = <|im_end|>, has a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the project's shared real data there.")
    return SHARED_DATA
