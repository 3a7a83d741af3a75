import pytest

# Real data no one on the project wrote, under ../shared/data (tests/conftest.py's shared_data fixture)
RAFT_DIR = "raft/twitter_complaints"
ALPACA_ZH = "alpaca/alpaca_zh_demo.json"


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    """The real SmolLM2 tokenizer (no BOS added by itself, eos = pad = <|im_end|>, has a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)
