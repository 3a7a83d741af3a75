"""Shared test set-up: no network, fixed seeds, and the embedded model converted once per session."""

import os

# Before anything imports transformers / huggingface_hub: never try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402


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
