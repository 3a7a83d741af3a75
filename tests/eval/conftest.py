import pytest
import torch

LABELS = ["complaint", "no complaint"]


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture
def tiny_llama(tokenizer):
    """A randomly initialised 2-layer Llama over the real tokenizer's vocabulary."""
    from tiny import tokenizer_llama

    return tokenizer_llama(tokenizer)


@pytest.fixture
def raft_records(shared_data):
    """RAFT twitter_complaints' 50 labelled tweets, from the shared real data."""
    from lorakit.data import load_records

    return load_records(shared_data("raft/twitter_complaints/train.csv"), label_column="Label")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: a 32-wide matmul is too small to split, and a second thread
    only adds waiting on it when other processes share the cores. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
