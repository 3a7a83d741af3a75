"""Fixtures of the reliability battery: one tiny model folder (over the embedded model's tokenizer) and one
saved adapter for it, built once per session; tiny in-memory models for the API cases."""

from __future__ import annotations

import pytest

from .helpers import build_adapter, build_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, embedded_model_dir):
    return build_model_dir(tmp_path_factory.mktemp("rel_model") / "model", embedded_model_dir)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, model_dir):
    return build_adapter(model_dir, tmp_path_factory.mktemp("rel_adapter") / "adapter")
